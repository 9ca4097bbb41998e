"""Hostile and careless command lines: refused before any work, in one line, with nothing written.

Table-driven through the real CLI. Every refusal: exit code != 0, exactly one line on stderr naming
the option (or file), no traceback, and the working folder and MY3DGEN_HOME (identities, cache) byte
for byte as before (a listing of paths, sizes and sha256). Unusable photos in a folder are skipped
with a warning and the run goes on; a folder with none usable is one error line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data as skimage_data
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli.cli import app


def listing(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under `root`: relative path -> (size, sha256)."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_bad_photos(folder: Path) -> list[str]:
    """A 1x1 photo, a 1x40 one, a corrupt JPEG, a truncated JPEG and a text file named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (1, 1), (200, 150, 120)).save(folder / "one_pixel.png")
    Image.new("RGB", (1, 40), (200, 150, 120)).save(folder / "one_wide.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    import io

    whole = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(whole, format="JPEG")
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[:3000])
    (folder / "notes.jpg").write_text("a text file with a photo's name")
    return ["one_pixel.png", "one_wide.png", "corrupt.jpg", "truncated.jpg", "notes.jpg"]


def user_identity(name: str, extra: dict | None = None) -> Path:
    """An identity the user made (a valid adapter file; no demo mark unless `extra` says so)."""
    from my3dgen_cli.adapter_file import AdapterFile, write_adapter
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.lora import AdapterConfig

    ip = identity_paths(name)
    ip.root.mkdir(parents=True)
    tensors = {"layer.lora_A": torch.ones(1, 4), "layer.lora_B": torch.zeros(4, 1)}
    write_adapter(ip.adapter, AdapterFile(tensors, AdapterConfig(1, 1.0, "my3dgen", ("layer",)),
                                          "eg3d-ffhq512-128", "0" * 64, extra or {"note": "the user's own"}))
    (ip.root / "notes.txt").write_text("mine\n")
    return ip.root


@pytest.fixture
def world(tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder with the user's own files, an identity `demo` the user made, bad photos."""
    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(work / "out" / "face.png")
    (work / "out" / "dataset.json").write_text('{"labels": [], "note": "my own"}\n')
    Image.fromarray(skimage_data.astronaut()).save(work / "face.png")
    write_bad_photos(work / "bad")
    user_identity("demo")
    monkeypatch.chdir(work)
    return tmp_path


# (case id, arguments, text the one error line must hold)
REFUSED = [
    ("render-orbit-fps-0", ["render", "--seed", "1", "--orbit", "4", "--fps", "0"], "--fps"),
    ("render-fps-nan", ["render", "--seed", "1", "--fps", "nan"], "--fps"),
    ("render-fps-negative", ["render", "--seed", "1", "--fps", "-24"], "--fps"),
    ("render-orbit-0", ["render", "--seed", "1", "--orbit", "0"], "--orbit"),
    ("render-orbit-huge", ["render", "--seed", "1", "--orbit", "100000000"], "--orbit"),
    ("render-batch-0", ["render", "--seed", "1", "--batch", "0"], "--batch"),
    ("render-mesh-res-4", ["render", "--seed", "1", "--mesh", "m.ply", "--mesh-res", "4"], "--mesh-res"),
    ("render-mesh-level-inf", ["render", "--seed", "1", "--mesh", "m.ply", "--mesh-level", "inf"], "--mesh-level"),
    ("render-truncation-nan", ["render", "--seed", "1", "--truncation", "nan"], "--truncation"),
    ("render-truncation-huge", ["render", "--seed", "1", "--truncation", "1e9"], "--truncation"),
    ("render-yaw-1000", ["render", "--seed", "1", "--yaw", "1000"], "--yaw"),
    ("render-latent-is-a-folder", ["render", "--latent", "out"], "out is a folder"),
    ("invert-image-is-a-folder", ["invert", "out", "--yaw", "0"], "out is a folder"),
    ("invert-out-not-latent", ["invert", "face.png", "--yaw", "0", "-o", "new.txt"], "expected a .latent file or a"),
    ("render-pitch-nan", ["render", "--seed", "1", "--pitch", "nan"], "--pitch"),
    ("render-yaw-count-huge", ["render", "--seed", "1", "--yaw", "-30:30:99999999"], "--yaw"),
    ("render-seed-negative", ["render", "--seed", "-1"], "--seed"),
    ("interp-yaw-1000", ["interpolate", "seed:0", "seed:1", "--yaw", "1000:-1000"], "--yaw"),
    ("interp-yaw-nan", ["interpolate", "seed:0", "seed:1", "--yaw", "nan:0"], "--yaw"),
    ("interp-yaw-three", ["interpolate", "seed:0", "seed:1", "--yaw", "1:2:3"], "--yaw"),
    ("interp-frames-1", ["interpolate", "seed:0", "seed:1", "--frames", "1"], "--frames"),
    ("interp-frames-huge", ["interpolate", "seed:0", "seed:1", "--frames", "99999999"], "--frames"),
    ("interp-fps-0", ["interpolate", "seed:0", "seed:1", "--fps", "0"], "--fps"),
    ("interp-batch-0", ["interpolate", "seed:0", "seed:1", "--batch", "0"], "--batch"),
    ("interp-truncation", ["interpolate", "seed:0", "seed:1", "--truncation", "-1"], "--truncation"),
    ("interp-strip-0", ["interpolate", "seed:0", "seed:1", "--strip", "0"], "--strip"),
    ("invert-steps", ["invert", "face.png", "--steps", "-1"], "--steps"),
    ("invert-lr-0", ["invert", "face.png", "--lr", "0"], "--lr"),
    ("invert-lr-nan", ["invert", "face.png", "--lr", "nan"], "--lr"),
    ("invert-tune", ["invert", "face.png", "--tune", "-1"], "--tune"),
    ("invert-tune-rank", ["invert", "face.png", "--tune", "2", "--tune-rank", "0"], "--tune-rank"),
    ("invert-yaw", ["invert", "face.png", "--yaw", "400"], "--yaw"),
    ("invert-pitch-nan", ["invert", "face.png", "--pitch", "nan"], "--pitch"),
    ("view-port", ["view", "--seed", "1", "--port", "70000"], "--port"),
    ("view-orbit-frames", ["view", "--seed", "1", "--orbit-frames", "1"], "--orbit-frames"),
    ("view-fps", ["view", "--seed", "1", "--fps", "0"], "--fps"),
    ("view-truncation", ["view", "--seed", "1", "--truncation", "5"], "--truncation"),
    ("export-opset", ["export", "-i", "demo", "-o", "x.onnx", "--opset", "3"], "--opset"),
    ("export-neural-res", ["export", "-i", "demo", "-o", "x.onnx", "--neural-res", "4"], "--neural-res"),
    ("export-tolerance", ["export", "-i", "demo", "-o", "x.onnx", "--tolerance", "nan"], "--tolerance"),
    ("export-truncation", ["export", "-i", "demo", "-o", "x.onnx", "--truncation", "nan"], "--truncation"),
    ("eval-steps", ["eval", "face.png", "--identity", "demo", "--steps", "-1"], "--steps"),
    # the inputs are checked before any progress line or note: the error is the only line
    ("export-no-such-identity", ["export", "--identity", "nosuch", "-o", "x.onnx"], "no identity named 'nosuch'"),
    ("export-base-file-missing", ["export", "-i", "demo", "-o", "x.onnx", "--base", "gone.safetensors"],
     "base generator file not found: gone.safetensors"),
    ("export-base-not-cached", ["export", "-i", "demo", "-o", "x.safetensors"], "eg3d-ffhq512-128"),
    ("eval-no-such-identity", ["eval", "face.png", "--identity", "nosuch"], "no identity named 'nosuch'"),
    ("fetch-local-bad-name", ["fetch", "Bad/Name", "--from", "face.png", "--local"], "local base name: got"),
    ("fetch-local-not-a-pickle", ["fetch", "mine", "--from", "face.png", "--local"], "--from: got 'face.png'"),
    ("eval-space", ["eval", "face.png", "--identity", "demo", "--space", "z"], "--space"),
    ("personalize-steps-0", ["personalize", "face.png", "--name", "p", "--steps", "0"], "--steps"),
    ("personalize-rank-0", ["personalize", "face.png", "--name", "p", "--rank", "0"], "--rank"),
    ("personalize-alpha-0", ["personalize", "face.png", "--name", "p", "--alpha", "0"], "--alpha"),
    ("personalize-lr-inf", ["personalize", "face.png", "--name", "p", "--lr", "inf"], "--lr"),
    ("personalize-batch-0", ["personalize", "face.png", "--name", "p", "--batch", "0"], "--batch"),
    ("personalize-accum-0", ["personalize", "face.png", "--name", "p", "--accum", "0"], "--accum"),
    ("personalize-sym-every", ["personalize", "face.png", "--name", "p", "--sym-every", "0"], "--sym-every"),
    ("personalize-anchor-steps", ["personalize", "face.png", "--name", "p", "--anchor-steps", "-1"],
     "--anchor-steps"),
    ("personalize-checkpoint-every", ["personalize", "face.png", "--name", "p", "--checkpoint-every", "-1"],
     "--checkpoint-every"),
    ("personalize-seed", ["personalize", "face.png", "--name", "p", "--seed", "-1"], "--seed"),
    ("faces-face-index", ["faces", "face.png", "-o", "new", "--face-index", "-1"], "--face-index"),
    ("faces-min-faces", ["faces", "face.png", "-o", "new", "--min-faces", "-1"], "--min-faces"),
    ("faces-users-files", ["faces", "face.png", "-o", "out"], "out/face.png already exists (use --force"),
    ("faces-none-usable", ["faces", "bad", "-o", "new"], "got 0 usable photo(s) of 5"),
    ("demo-users-identity", ["demo", "--fast"], "pass --force"),
    # Click's own usage errors: one line too (option first), not the usage block
    ("usage-float-abc", ["render", "--seed", "1", "--fps", "abc"], "--fps: "),
    ("usage-int-float", ["render", "--seed", "1", "--orbit", "1.5"], "--orbit: "),
    ("usage-unknown-option", ["render", "--bogus"], "No such option: --bogus"),
    ("usage-unknown-root-option", ["--bogus"], "No such option: --bogus"),
    ("usage-unknown-command", ["rendr"], "No such command 'rendr'"),
    ("usage-missing-argument", ["invert"], "Missing argument"),
    ("usage-missing-option", ["export", "-o", "x.onnx"], "Missing option '--identity'"),
    ("usage-bad-choice", ["render", "--seed", "1", "--amp", "fp8"], "--amp: 'fp8' is not one of 'off', 'bf16', 'fp16'"),
    ("usage-bad-choice-personalize", ["personalize", "face.png", "--name", "p", "--budget", "huge"], "--budget: "),
    ("usage-personalize-amp-fp8", ["personalize", "--amp", "fp8", "bad"],
     "--amp: 'fp8' is not one of 'off', 'bf16', 'fp16'"),
    ("usage-personalize-amp-dtype-gone", ["personalize", "face.png", "--name", "p", "--amp-dtype", "fp16"],
     "No such option: --amp-dtype"),
    ("usage-subcommand-missing-argument", ["identities", "rm"], "Missing argument"),
    ("usage-subcommand-unknown", ["cache", "lsx"], "No such command 'lsx'"),
]


@pytest.mark.parametrize("args, expected", [pytest.param(a, e, id=i) for i, a, e in REFUSED])
def test_refused_in_one_line_and_nothing_changes(world: Path, args: list[str], expected: str) -> None:
    before = listing(world)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # no exception escaped
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0], lines[0]
    assert listing(world) == before


@pytest.mark.parametrize("args", [["render", "--fps", "abc"], ["render", "--bogus"], ["invert"],
                                  ["render", "--amp", "x"], ["nope"]])
def test_usage_errors_exit_2_naming_the_help(args: list[str]) -> None:
    result = CliRunner().invoke(app, args, prog_name="my3dgen")
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.count("\n") == 1 and "Usage:" not in result.stderr, result.stderr
    assert "--help`)" in result.stderr and "my3dgen" in result.stderr


def test_help_still_works_beside_usage_errors() -> None:
    result = CliRunner().invoke(app, ["render", "--help"], prog_name="my3dgen")
    assert result.exit_code == 0 and "--fps" in result.stdout and result.stderr == ""


def test_faces_skips_unusable_photos_and_goes_on(world: Path) -> None:
    """One good photo among five bad ones: exit 0, one warning per bad photo, only the good crop written."""
    folder = world / "work" / "bad"
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    result = CliRunner().invoke(app, ["faces", str(folder), "-o", "crops"])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    names = sorted(Path(line.split()[2].rstrip(":")).name for line in skipped)
    assert names == sorted(write_bad_photos(world / "again")), result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (world / "work" / "crops").iterdir()) == [
        "astronaut.png", "contact_sheet.png", "dataset.json"]
    labels = json.loads((world / "work" / "crops" / "dataset.json").read_text())["labels"]
    assert [name for name, _ in labels] == ["astronaut.png"]


def test_faces_force_overwrites_the_users_files(world: Path) -> None:
    result = CliRunner().invoke(app, ["faces", "face.png", "-o", "out", "--force"])
    assert result.exit_code == 0, result.output
    labels = json.loads((world / "work" / "out" / "dataset.json").read_text())["labels"]
    assert [name for name, _ in labels] == ["face.png"]


def test_personalize_skips_unusable_photos(world: Path) -> None:
    """Aligned crops listed in dataset.json beside unusable ones: the run trains on the good ones, warns on the rest."""
    from my3dgen_cli.generators import save_local_base
    from tests.personalize_helpers import fresh, make_person, write_photos

    person = make_person()
    save_local_base(fresh(person), "tiny-test")
    folder = write_photos(person, world / "photos", [-20.0, 0.0, 20.0])
    bad = write_bad_photos(folder)
    data = json.loads((folder / "dataset.json").read_text())
    data["labels"] += [[name, data["labels"][0][1]] for name in bad]
    (folder / "dataset.json").write_text(json.dumps(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, ["personalize", str(folder), "--name", "kept", "--base", "tiny-test",
                                          "--steps", "2", "--anchor-steps", "2", "--sym-every", "2", "--device",
                                          "cpu", "--checkpoint-every", "0"])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert sorted(Path(line.split()[2].rstrip(":")).name for line in skipped) == sorted(bad), result.stderr
    from my3dgen_cli.identity import read_anchors, require_identity

    assert read_anchors(require_identity("kept").anchors).photos == ["view0", "view1", "view2"]


def test_demo_replaces_only_its_own_identity(isolated_home: Path) -> None:
    from my3dgen_cli.demo.run import MADE_BY, check_demo_identity
    from my3dgen_cli.errors import UserInputError

    check_demo_identity(force=False)  # no identity `demo` yet
    root = user_identity("demo", {"made_by": MADE_BY})
    check_demo_identity(force=False)  # the demo's own: replaced without asking
    (root / "adapter.safetensors").write_bytes(b"not an adapter")
    with pytest.raises(UserInputError, match="--force"):
        check_demo_identity(force=False)  # unreadable: not provably the demo's
    check_demo_identity(force=True)


def test_one_range_check_for_every_command() -> None:
    from my3dgen_cli.commands.options import check_range
    from my3dgen_cli.errors import UserInputError

    check_range("--x", 3, 1, 5)
    check_range("--x", None, 1, 5)
    for bad in (0, 6, float("nan"), float("inf"), -np.inf):
        with pytest.raises(UserInputError, match=r"^--x: got .*, expected 1\.\.5$"):
            check_range("--x", bad, 1, 5)
    with pytest.raises(UserInputError, match="expected 0 or more"):
        check_range("--x", -1, 0)
