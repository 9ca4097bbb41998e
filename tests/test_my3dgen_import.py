"""`my3dgen identities import`: a snapshot written by the official My3DGen code becomes an identity that
reproduces the official outputs (../shared/my3dgen_snapshot) to 1e-3; bad snapshots are one line and
write nothing. Skips when ../shared is absent."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d.configs import resolve_config
from my3dgen_cli.generators import local_bases_dir, open_generator
from my3dgen_cli.weights import my3dgen_snapshot as my3dgen_import
from my3dgen_cli.weights.converted import ConvertedBase, write_converted_base
from my3dgen_cli.weights.my3dgen_snapshot import import_snapshot

runner = CliRunner()
SNAPSHOT = "my3dgen_snapshot/network-snapshot-000000.pkl.xz"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def record():
    """The G_ema record of the fixture snapshot, read once (about 5 s)."""
    from tests.conftest import SHARED

    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the project")
    return my3dgen_import.read_snapshot_record(SHARED / SNAPSHOT)


@pytest.fixture
def cached_reader(record, monkeypatch):
    """Every import reads the module's record instead of decompressing the file again."""
    monkeypatch.setattr(my3dgen_import, "read_snapshot_record", lambda path: record)
    return record


def _parity_base(shared: Path, name: str = "parity", nudge: str | None = None) -> str:
    """../shared/eg3d_parity as a local base (the base the snapshot was made on); `nudge` changes one tensor."""
    config = resolve_config(json.loads((shared / "eg3d_parity" / "config.json").read_text())).to_dict()
    weights = {k: v.float() for k, v in load_file(shared / "eg3d_parity" / "weights.safetensors").items()}
    if nudge is not None:
        weights[nudge] = weights[nudge] + 1e-3
    write_converted_base(local_bases_dir() / f"{name}.safetensors", ConvertedBase(weights, config))
    return name


def _case(shared: Path, k: int):
    path = shared / "my3dgen_snapshot" / f"case{k}.safetensors"
    with safe_open(str(path), "pt") as f:
        return load_file(path), f.metadata()


def _max_diffs(G, data, meta) -> tuple[float, float, float, float]:
    with torch.no_grad():
        ws = G.mapping(data["z"], data["c_cond"], truncation_psi=float(meta["psi"]),
                       truncation_cutoff=int(meta["truncation_cutoff"]))
        out = G.synthesis(ws, data["c_render"], neural_rendering_resolution=int(meta["nrr"]), noise_mode="const",
                          sampling="deterministic")
    return (float((ws - data["ws"]).abs().max()), float((out["image"] - data["image"]).abs().max()),
            float((out["image_raw"][:, :3] - data["image_raw_rgb"]).abs().max()),
            float((out["image_depth"] - data["image_depth"]).abs().max()))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: equal before and after = nothing written."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_import_on_its_base_reproduces_the_official_outputs(shared_dir, cached_reader) -> None:
    result = import_snapshot(shared_dir / SNAPSHOT, "ana", base=_parity_base(shared_dir))
    assert (result.rank, result.alpha) == (1, 1.0)
    assert (result.lora_parameters, result.extra_parameters) == (58_790, 5_303)  # the fixture README's counts
    assert result.base == "parity" and not result.base_created
    G, _, meta = open_generator(identity="ana")
    assert meta.extra["imported_from"]["format"] == "my3dgen-snapshot"
    for k in range(3):
        ws, image, raw, depth = _max_diffs(G, *_case(shared_dir, k))
        assert ws <= 1e-4 and image <= TOLERANCE and raw <= TOLERANCE and depth <= TOLERANCE, (k, image, raw, depth)


def test_own_base_is_the_base_the_snapshot_started_from(shared_dir, cached_reader) -> None:
    """Without --base the wrap-time copy gives the untrained biases: the stored base is ../shared/eg3d_parity
    bit for bit (so every case matches as on that base), and the identity renders the official outputs."""
    from my3dgen_cli.weights.converted import read_converted_base

    result = import_snapshot(shared_dir / SNAPSHOT, "ana")
    assert result.base == "ana-base" and result.base_created
    stored = read_converted_base(local_bases_dir() / "ana-base.safetensors").state_dict
    parity = load_file(shared_dir / "eg3d_parity" / "weights.safetensors")
    assert stored.keys() == parity.keys()
    assert all(torch.equal(stored[k].float(), parity[k].float()) for k in parity)
    G, _, _ = open_generator(identity="ana")
    _, image, raw, depth = _max_diffs(G, *_case(shared_dir, 0))
    assert image <= TOLERANCE and raw <= TOLERANCE and depth <= TOLERANCE


def _cli(args: list[str]):
    return runner.invoke(app, args)


def _one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_cli_import_then_render_export_interpolate_invert(shared_dir, tmp_path, isolated_home) -> None:
    """The real file through the CLI (xz read with lzma), then every command that opens an identity."""
    res = _cli(["identities", "import", str(shared_dir / SNAPSHOT), "--name", "ana", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["base"] == "ana-base" and doc["parameters"] == 58_790 + 5_303
    rows = json.loads(_cli(["identities", "--json"]).output)["identities"]
    assert [(r["name"], r["base"], r["parameters"]) for r in rows] == [("ana", "ana-base", 64_093)]

    # render: case 1 is seed 1 (torch.Generator seed), psi 0.7, nrr 128 (the base's), yaw 0.4 rad, pitch 0.15 rad
    data, _ = _case(shared_dir, 1)
    yaw, pitch = math.degrees(0.4), math.degrees(0.15)
    out = tmp_path / "r"
    res = _cli(["render", "--identity", "ana", "--seed", "1", "--truncation", "0.7", "--yaw", repr(yaw),
                "--pitch", repr(pitch), "--depth", "-o", str(out), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    view = json.loads(res.output)["sources"][0]["views"][0]
    png = np.asarray(Image.open(view["image"])).astype(int)
    expected = media.to_uint8(data["image"]).astype(int)
    assert np.abs(png - expected).max() <= 1  # a PNG holds 1/127.5 steps: 1e-3 shows as at most one level
    assert (png != expected).mean() < 0.01
    near, far = 2.25, 3.3
    depth16 = np.asarray(Image.open(view["depth"])).astype(np.float64)
    depth = near + depth16 / 65535 * (far - near)
    assert np.abs(depth - data["image_depth"][0, 0].double().numpy()).max() <= TOLERANCE

    # export: the merged generator (trained extras in its weights) renders as base + adapter
    merged = tmp_path / "ana.safetensors"
    res = _cli(["export", "--identity", "ana", "-o", str(merged), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["merge_max_abs_diff"] <= TOLERANCE and doc["reload_max_abs_diff"] <= TOLERANCE
    from my3dgen_cli.adapter_file import read_adapter

    trained = read_adapter(isolated_home / "identities" / "ana" / "adapter.safetensors").tensors
    assert torch.equal(load_file(merged)["backbone.synthesis.b4.const"], trained["backbone.synthesis.b4.const"])

    res = _cli(["interpolate", "seed:0", "seed:1", "--identity", "ana", "--frames", "2", "--strip", "2",
                "-o", str(tmp_path / "morph.gif"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "morph.gif").stat().st_size > 0

    res = _cli(["invert", view["image"], "--identity", "ana", "--yaw", repr(yaw), "--pitch", repr(pitch),
                "--steps", "1", "--tune", "1", "--no-lpips", "-o", str(tmp_path / "inv"), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    tuned = next((tmp_path / "inv").glob("*.adapter.safetensors"))
    tensors = read_adapter(tuned).tensors
    assert "backbone.synthesis.b4.const" in tensors, "a tuned imported identity keeps its trained extras"


@contextlib.contextmanager
def _patched(record, module_path: str, table: str, edit):
    """Edit one module's `_parameters`/... table of the record (given by snapshot path) and put it back."""
    obj = record
    for part in module_path.split("."):
        obj = obj.state["_modules"][part]
    original = obj.state[table]
    obj.state[table] = edit(dict(original))
    try:
        yield
    finally:
        obj.state[table] = original


CONV = "backbone.synthesis.synthesis.b8.synthesis_block.conv0"


def _refused(args: list[str], home: Path) -> str:
    before = _tree(home)
    message = _one_line_error(_cli(args))
    assert _tree(home) == before, "a refused snapshot writes nothing (cache, bases, identities)"
    return message


@pytest.mark.parametrize("case", ["original_conv_lora", "adalora", "unknown_wrapper"])
def test_unknown_lora_layout_names_the_first_unknown_tensor(shared_dir, cached_reader, isolated_home, case) -> None:
    record = cached_reader
    if case == "original_conv_lora":  # A [r*k, in*k], B [out*k, r*k]
        edit, table, where = (lambda t: {**t, "lora_A": torch.zeros(3, 64 * 3), "lora_B": torch.zeros(64 * 3, 3)},
                              "_parameters", CONV)
        named = f"{CONV}.lora_A"
    elif case == "adalora":  # AdaLoRA's SVD form: lora_E beside A and B
        edit, table, where = lambda t: {**t, "lora_E": torch.zeros(1, 1)}, "_parameters", CONV
        named = f"{CONV}.lora_E"
    else:
        from my3dgen_cli.weights.safe_unpickle import PersistentObject

        def edit(t):
            old = t["conv0"]
            return {**t, "conv0": PersistentObject("SynthesisLayerAdaWrapper", old.version, old.state, "")}

        table, where = "_modules", "backbone.synthesis.synthesis.b8.synthesis_block"
        named = f"{CONV}.lora_A"
    with _patched(record, where, table, edit):
        message = _refused(["identities", "import", str(shared_dir / SNAPSHOT), "--name", "ana"], isolated_home)
    assert "unknown My3DGen LoRA layout" in message and named + " " in message, message


def test_snapshot_of_another_base_is_one_line(shared_dir, cached_reader, isolated_home) -> None:
    _parity_base(shared_dir, "other", nudge="backbone.mapping.fc0.weight")
    message = _refused(["identities", "import", str(shared_dir / SNAPSHOT), "--name", "ana", "--base", "other"],
                       isolated_home)
    assert "made on another base than 'other'" in message and "backbone.mapping.fc0.weight" in message


def test_plain_eg3d_pickle_and_garbage_are_one_line(shared_dir, isolated_home, tmp_path) -> None:
    plain = next((shared_dir / "eg3d_snapshot").glob("*.pkl*"))
    message = _refused(["identities", "import", str(plain), "--name", "ana"], isolated_home)
    assert "no My3DGen LoRA wrappers" in message
    junk = tmp_path / "junk.pkl.xz"
    junk.write_bytes(b"\xfd7zXZ\x00" + b"not really xz")
    assert "junk.pkl.xz" in _refused(["identities", "import", str(junk), "--name", "ana"], isolated_home)


@pytest.mark.parametrize("record", ["bytes", "line"])
def test_xz_bomb_is_refused_before_it_fills_the_memory(isolated_home, tmp_path, record: str) -> None:
    """64 MiB of zeros as one bytes record (or one protocol-0 line) xz-compress to ~10 KB: refused at
    64x the file's size, with the memory it took bounded by that, not by what the record declares."""
    import lzma

    size = 64 << 20
    if record == "bytes":
        data = b"\x80\x04\x8e" + size.to_bytes(8, "little") + bytes(size) + b"."
    else:
        data = b"S'" + b"a" * size + b"'\n."
    bomb = tmp_path / "network-snapshot-000000.pkl.xz"
    bomb.write_bytes(lzma.compress(data))
    assert bomb.stat().st_size * 64 < size
    message = _refused(["identities", "import", str(bomb), "--name", "ana"], isolated_home)
    assert "decompression bomb" in message and bomb.name in message


def test_name_clashes_are_refused_before_the_snapshot_is_read_or_a_bar_shown(isolated_home, tmp_path, monkeypatch):
    """An existing NAME-base (or identity) is refused in one line before the progress bar opens and before the
    (possibly large) snapshot is read: here the file is garbage, and the clash is what is reported."""
    from my3dgen_cli.output import Output

    opened = []
    real = Output.progress
    monkeypatch.setattr(Output, "progress", lambda self, *a, **k: opened.append(1) or real(self, *a, **k))
    junk = tmp_path / "network-snapshot-000100.pkl"
    junk.write_bytes(b"not a pickle")
    local_bases_dir().mkdir(parents=True, exist_ok=True)
    (local_bases_dir() / "ana-base.safetensors").write_bytes(b"a base the user made")
    message = _refused(["identities", "import", str(junk), "--name", "ana"], isolated_home)
    assert "local base 'ana-base' already exists" in message and not opened
    missing = _refused(["identities", "import", str(tmp_path / "nope.pkl"), "--name", "bob"], isolated_home)
    assert "nope.pkl: no such file" in missing and not opened
