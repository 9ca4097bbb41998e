"""`my3dgen demo --fast` end to end (offline, CPU, the shipped base) and `my3dgen eval` on the demo identity."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.cli import app
from my3dgen_cli.demo import base as db
from my3dgen_cli.demo.run import SECTIONS


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    """One fast demo for the module: (MY3DGEN_HOME, report folder, JSON result)."""
    home = tmp_path_factory.mktemp("home")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only oversubscribe
    mp = pytest.MonkeyPatch()
    mp.setenv("MY3DGEN_HOME", str(home))
    mp.setenv("MY3DGEN_OFFLINE", "1")

    def no_fitting(*args, **kwargs):
        raise AssertionError("the demo fitted a base; it should use the shipped one")

    out = home / "report"
    with pytest.MonkeyPatch.context() as guard:  # a fresh home must not train the base or the person
        guard.setattr(db, "build_demo_base", no_fitting)
        guard.setattr(db, "fit_person", no_fitting)
        result = CliRunner().invoke(app, ["demo", "--fast", "-o", str(out), "--json"])
    yield home, out, result
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture
def env(demo_run, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MY3DGEN_HOME", str(demo_run[0]))
    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield demo_run
    torch.set_num_threads(threads)


def test_demo_runs_and_report_has_every_section_and_file(env):
    home, out, result = env
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.stderr  # missing loss networks: the demo's one note, not a warning each
    data = json.loads(result.stdout)
    report = Path(data["report"])
    assert report == out / "report.html"
    page = report.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "a tiny synthetic base, not a face model" in page.lower()
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).is_file(), src
    for name, path in data["files"].items():
        assert Path(path).exists(), name
        assert f"<code>{path}</code>" in page, name
    for name in ("orbit.gif", "contact_sheet.png", "interpolation.png", "inversion.png", "loss.png",
                 "heldout.latent", "metrics.json", "photos/dataset.json"):
        assert (out / name).is_file(), name
    assert (home / "identities" / "demo" / "adapter.safetensors").is_file()
    assert len(list((out / "photos").glob("train*.png"))) == 10


def test_fresh_home_demo_uses_the_shipped_base_without_training(env):
    """No base training (the fixture makes fitting raise): the zoo entries, checked and converted in the cache."""
    from my3dgen_cli import zoo
    from my3dgen_cli.generators import local_bases_dir

    home, out, result = env
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["base"], data["base_origin"]) == (db.SHIPPED_BASE, "shipped")
    assert "fitted" not in " ".join(data["stages"])
    assert not local_bases_dir().is_dir() or not list(local_bases_dir().glob("demo-tiny*"))
    assert zoo.converted(db.SHIPPED_BASE) is not None and zoo.cached(db.SHIPPED_PERSON) is not None
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "shipped with my3dgen" in page
    from my3dgen_cli.adapter_file import read_adapter

    adapter = read_adapter(home / "identities" / "demo" / "adapter.safetensors")
    assert adapter.base_name == db.SHIPPED_BASE  # `--identity demo` finds the shipped base by name


@pytest.mark.parametrize("name", [db.SHIPPED_BASE, db.SHIPPED_PERSON])
def test_shipped_blob_matches_its_zoo_entry(name: str):
    from my3dgen_cli import zoo
    from my3dgen_cli.zoo.download import resolve_local, sha256_file

    entry = zoo.get_entry(name)
    blob = resolve_local(entry.url)
    assert blob.parent.name == "demo_assets" and blob.suffix == ".safetensors"
    assert sha256_file(blob) == entry.sha256 and blob.stat().st_size == entry.size
    assert entry.size < 1_000_000  # the wheel stays small


def test_rebuild_base_fits_from_the_recipe_under_its_own_name(monkeypatch: pytest.MonkeyPatch):
    """`--rebuild-base` plumbing on a 2-step recipe: a local base and person, never the shipped name."""
    from my3dgen_cli.adapter_file import load_adapter
    from my3dgen_cli.demo.run import demo_base
    from my3dgen_cli.generators import local_bases_dir, open_base
    from my3dgen_cli.output import Output

    tiny = db.FitConfig(field_steps=2, sr_steps=1, batch=2, points=256, person_field_steps=1, person_sr_steps=1)
    monkeypatch.setattr(db.FitConfig, "fast", classmethod(lambda cls: tiny))
    torch.set_num_threads(1)
    name, person, origin = demo_base(fast=True, out=Output("quiet"), rebuild=True)
    assert (name, origin) == ("demo-tiny-v2-fast-rebuilt", "rebuilt")
    assert (local_bases_dir() / f"{name}.safetensors").is_file() and person.is_file()
    G, ref = open_base(name)
    load_adapter(G, person, base_sha256=ref.sha256)  # the person belongs to the rebuilt base
    again = demo_base(fast=False, out=Output("quiet"))  # the shipped pair is still what a plain demo uses
    assert again[0] == db.SHIPPED_BASE and again[2] == "shipped"


def test_rebuild_base_refuses_a_real_base(tmp_path: Path):
    result = CliRunner().invoke(app, ["demo", "--rebuild-base", "--base", "eg3d-ffhq512-128", "--photos",
                                      str(tmp_path), "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--rebuild-base" in result.output


@pytest.mark.slow
def test_rebuilt_base_matches_the_shipped_one():
    """The recipe is reproducible: a base fitted now renders the analytic heads as well as the shipped
    one, within 0.5 dB (the same machine gives the same weights; other CPUs/BLAS differ by float order)."""
    from my3dgen_cli.generators import open_base

    torch.set_num_threads(2)
    shipped, _ = open_base(db.SHIPPED_BASE)
    rebuilt = db.build_demo_base(seed=0, config=db.FitConfig())
    ours, theirs = db.fidelity_psnr(rebuilt), db.fidelity_psnr(shipped)
    assert theirs > 20.0, f"shipped base {theirs:.2f} dB"
    assert abs(ours - theirs) < 0.5, f"rebuilt {ours:.2f} dB vs shipped {theirs:.2f} dB"


def test_demo_personalized_beats_base_on_held_out_views(env):
    data = json.loads(env[2].stdout)
    mean = data["metrics"]["mean"]
    assert mean["personalized"]["psnr"] > mean["base"]["psnr"]
    assert data["metrics"]["personalized_better"]["psnr"]


def test_demo_base_background_stays_dark(env):
    """Where the analytic heads show background, the fitted base renders near-black: no ghost heads
    or fog at the image edges (the base's empty space was once dense where rays leave the tri-plane box)."""
    from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
    from my3dgen_cli.generators import open_base

    G, _ = open_base(db.SHIPPED_BASE)
    z = torch.randn(4, G.z_dim, generator=torch.Generator().manual_seed(1))
    cams = lookat_camera([-50.0, -20.0, 20.0, 50.0], [0.0] * 4)
    with torch.no_grad():
        image = G.synthesis(G.mapping(z, frontal_camera(4)), cams, noise_mode="const")["image"]
    background = (db.render_heads(db.head_params(z), cams, G.img_resolution) < -0.98).all(1)
    glow = ((image + 1) / 2).amax(1)[background]  # brightest channel, 0 = black
    assert background.sum() > 1000
    assert glow.mean() < 0.08, f"mean {glow.mean():.3f}, 95 % {glow.quantile(0.95):.3f}"


def test_demo_export_is_onnx_or_says_why(env):
    data = json.loads(env[2].stdout)
    if "path" in data["export"]:
        assert Path(data["export"]["path"]).suffix == ".onnx"
        assert data["export"]["max_abs_diff"] < 1e-3
    else:
        assert "onnxruntime" in data["export"]["skipped"]


def test_eval_on_demo_identity_reports_personalized_better(env):
    _, out, _ = env
    photos = out / "photos"
    held = [str(photos / "heldout0.png"), str(photos / "heldout1.png")]
    result = CliRunner().invoke(app, ["eval", "--identity", "demo", *held, "--labels", str(photos / "dataset.json"),
                                      "--steps", "10", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["identity"] == "demo" and data["photos"] == ["heldout0", "heldout1"]
    assert data["mean"]["personalized"]["psnr"] > data["mean"]["base"]["psnr"]
    assert set(data["consistency"]) == {"base", "personalized"}
    human = CliRunner().invoke(app, ["eval", "--identity", "demo", str(photos), "--steps", "1"])
    assert human.exit_code == 0, human.output
    assert "PSNR" in human.stdout and "personalized" in human.stdout


def test_demo_rejects_base_without_photos(env, tmp_path: Path):
    result = CliRunner().invoke(app, ["demo", "--base", "eg3d-ffhq512-128", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0
    assert "--photos" in result.output


def test_demo_refuses_a_foreign_folder(env, tmp_path: Path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--fast", "-o", str(tmp_path)])
    assert result.exit_code != 0
    assert (tmp_path / "mine.txt").is_file()


def test_demo_replaces_only_a_folder_it_wrote(env, tmp_path: Path):
    """A user's folder that merely holds a report.html is not the demo's: refused, nothing deleted."""
    home, out, _ = env
    assert (out / ".my3dgen-demo").is_file()  # the demo's own folder is marked, so a rerun may replace it
    (tmp_path / "report.html").write_text("my own report")
    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["demo", "--fast", "-o", str(tmp_path)])
    assert result.exit_code != 0 and "not written by the demo" in result.output, result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "report.html").read_text() == "my own report"


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_failed_demo_keeps_the_earlier_report(env, monkeypatch: pytest.MonkeyPatch):
    """A demo that fails, before or during its stages, leaves the earlier report (and photos kept in it) as it was."""
    from my3dgen_cli.demo import run as demo_run

    _, out, _ = env
    before = _listing(out)
    assert "photos/train00.png" in before
    args = ["demo", "-o", str(out), "--base", "no-such-base", "--photos", str(out / "photos")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and "no-such-base" in result.output, result.output
    assert _listing(out) == before

    def fails_midway(folder: Path, *args, **kwargs):
        (folder / "half.png").write_bytes(b"half a report")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_run, "_run", fails_midway)
    result = CliRunner().invoke(app, ["demo", "--fast", "-o", str(out)])
    assert result.exit_code != 0
    assert _listing(out) == before
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.old-")]
    fresh = out.parent / "never-finished"
    assert CliRunner().invoke(app, ["demo", "--fast", "-o", str(fresh)]).exit_code != 0
    assert not fresh.exists()  # no half-written report

    from my3dgen_cli.fileio import held_lock

    with held_lock(out.with_name(f".{out.name}.lock"), "held by this test"):  # as a demo writing there holds it
        result = CliRunner().invoke(app, ["demo", "--fast", "-o", str(out)])
    assert result.exit_code != 0 and "is being written by another my3dgen process" in result.output, result.output
    assert _listing(out) == before


def test_ctrl_c_while_the_demo_trains_says_to_run_it_again(env, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The demo takes no --resume: its interrupt message must not send the user to it."""
    from my3dgen_cli.personalize import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "_gradients", interrupted)
    result = CliRunner().invoke(app, ["demo", "--fast", "-o", str(tmp_path / "out")])
    assert result.exit_code == 130, result.output
    assert "run `my3dgen demo` again" in result.output and "--resume" not in result.output


def test_demo_with_your_own_base_and_photos(env, tmp_path: Path):
    """`--base NAME --photos DIR`: the path for real weights, run here on a local tiny base whose
    "person" photos come with a dataset.json (the last photo is held out)."""
    from personalize_helpers import TRAIN_YAWS, make_person, write_photos

    from my3dgen_cli.generators import save_local_base

    person = make_person()
    base = person[2].__class__(person[2].config)
    base.load_state_dict(person[0])
    save_local_base(base.eval(), "own-base")
    photos = write_photos(person, tmp_path / "photos", TRAIN_YAWS[:6])
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["demo", "--fast", "--base", "own-base", "--photos", str(photos),
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out / src).is_file(), src
    assert json.loads(result.stdout)["metrics"]
