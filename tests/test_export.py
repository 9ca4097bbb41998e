"""`my3dgen export`: merged weights reload and match, the ONNX graph matches PyTorch, bad input refused.

Tiny config on CPU. Identities are made here: a tiny local base + rank-1 adapters with random
non-zero B, saved where `personalize` would put them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.adapter_file import save_adapter
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d import build_generator, load_generator
from my3dgen_cli.errors import IncompatibleAdapterError, UserInputError
from my3dgen_cli.generators import open_base, open_generator, save_local_base
from my3dgen_cli.identity import identity_paths
from my3dgen_cli.lora import add_adapters, base_fingerprint
from my3dgen_cli.use.export import (
    ExportedGenerator,
    check_inputs,
    export_onnx,
    export_safetensors,
    merged_generator,
    parse_outputs,
    parse_samples,
)

TOL = 1e-3  # the CLI default; the tiny graph is observed at ~1e-5


def make_identity(name: str, base: str = "tiny-test", seed: int = 0) -> Path:
    """A local tiny base named `base` (weights from `seed`) and an identity with a non-zero adapter."""
    torch.manual_seed(seed)
    G = build_generator("tiny")
    save_local_base(G, base)
    params = add_adapters(G, rank=1, generator=torch.Generator().manual_seed(seed + 1))
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in params:  # B (and A) random: a fresh adapter (B = 0) would hide a broken merge
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    path = identity_paths(name).adapter
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(G, path, base_name=base, base_sha256=base_fingerprint(open_base(base)[0]))
    return path


@pytest.fixture
def ana() -> str:
    make_identity("ana")
    return "ana"


def test_parse_options() -> None:
    assert parse_outputs("image,depth") == ("image", "depth")
    assert parse_samples("24") == (24, 24) and parse_samples("16,8") == (16, 8)
    with pytest.raises(UserInputError, match="expected some of"):
        parse_outputs("image,normals")
    with pytest.raises(UserInputError, match="--samples"):
        parse_samples("many")
    for huge in ("100000", "48,5000", "1"):  # 100000 samples a ray once took 24 GB before failing
        with pytest.raises(UserInputError, match=r"--samples: .*coarse 2\.\.1024"):
            parse_samples(huge)
    with pytest.raises(UserInputError, match="expected 17..20"):
        export_onnx(build_generator("tiny"), "never.onnx", opset=13)


def test_merged_safetensors_reloads_and_matches(ana: str, tmp_path: Path) -> None:
    G_adapted, _, _ = open_generator(identity=ana)
    G, ref, meta, merge_diff = merged_generator(identity=ana)
    assert meta is not None and merge_diff is not None and merge_diff <= 1e-5
    out = export_safetensors(G, tmp_path / "ana.safetensors", source={"identity": ana, "base": ref.name})
    assert out.with_suffix(".json").is_file()
    G2 = load_generator(out)
    inputs = check_inputs(G2, (2,))[0]
    with torch.no_grad():
        want = ExportedGenerator(G_adapted, ("image", "depth"))(*inputs)
        got = ExportedGenerator(G2, ("image", "depth"))(*inputs)
        base_img = ExportedGenerator(open_generator(base="tiny-test")[0])(*inputs)[0]
    assert max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True)) <= 1e-5
    assert float((base_img - want[0]).abs().max()) > 1e-3  # the adapter really changes the image
    # and it is a base my3dgen opens by path
    G3, ref3, _ = open_generator(base=str(out))
    assert ref3.name == "ana"


def test_onnx_matches_pytorch_dynamic_batch(ana: str, tmp_path: Path) -> None:
    G, _, _, _ = merged_generator(identity=ana)
    check = export_onnx(G, tmp_path / "ana.onnx", outputs=("image", "depth", "raw"), dynamic_batch=True)
    assert check.batch_sizes == [1, 2]
    assert check.max_abs_diff <= TOL, check.diffs
    assert (tmp_path / "ana.onnx").stat().st_size == check.size
    import onnx

    model = onnx.load(str(tmp_path / "ana.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert model.opset_import[0].version >= 17
    assert not ops & {"CumProd", "ATen", "Loop"}, ops  # no op onnxruntime lacks, no Python fallbacks


def test_onnx_with_mapping_neural_res_and_samples(ana: str, tmp_path: Path) -> None:
    from my3dgen_cli.use.export import set_render_options

    G, _, _, _ = merged_generator(identity=ana)
    set_render_options(G, neural_res=64, samples=(8, 8))  # 64 -> 32 px SR input: the antialiased resize
    check = export_onnx(G, tmp_path / "m.onnx", with_mapping=True, truncation_psi=0.7, fp16=True)
    assert check.max_abs_diff <= TOL, check.diffs
    import onnx

    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in model.graph.input] == ["z", "c_cond", "camera"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["neural_rendering_resolution"] == "64" and props["depth_resolution"] == "8"
    assert props["truncation_psi"] == "0.7" and props["fp16_weights"] == "true"
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_adapter_from_another_base_is_refused(tmp_path: Path) -> None:
    make_identity("bo", base="tiny-test", seed=0)
    torch.manual_seed(7)
    save_local_base(build_generator("tiny"), "tiny-test")  # the base changed under the identity
    with pytest.raises(IncompatibleAdapterError):
        merged_generator(identity="bo")
    result = CliRunner().invoke(app, ["export", "--identity", "bo", "-o", str(tmp_path / "bo.onnx")])
    assert result.exit_code != 0
    assert "was made on base" in result.output and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "was made on base" in errors[0]
    assert not (tmp_path / "bo.onnx").exists()


def test_unwritable_output_is_a_clear_error(ana: str, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(app, ["export", "--identity", ana, "-o", str(blocker / "sub" / "a.onnx")])
    assert result.exit_code == 2
    assert "cannot write" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["export", "--identity", ana, "-o", str(tmp_path)])
    assert result.exit_code == 2 and "folder" in result.output


def test_cli_safetensors_json(ana: str, tmp_path: Path) -> None:
    out = tmp_path / "ana.safetensors"
    result = CliRunner().invoke(app, ["export", "--identity", ana, "-o", str(out), "--json", "--neural-res", "64"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "safetensors" and doc["merge_max_abs_diff"] <= 1e-5
    assert doc["reload_max_abs_diff"] <= 1e-5 and Path(doc["path"]) == out
    assert load_generator(out).neural_rendering_resolution == 64  # render settings travel with the base


def test_help_lists_the_options() -> None:
    text = CliRunner().invoke(app, ["export", "--help"]).output
    for flag in ("--identity", "--base", "--output", "--force", "--format", "--opset", "--neural-res", "--samples",
                 "--outputs", "--dynamic-batch", "--with-mapping", "--truncation", "--fp16", "--tolerance", "--json"):
        assert flag in text, flag


def test_cli_onnx_reports_and_fails_above_tolerance(ana: str, tmp_path: Path) -> None:
    out = tmp_path / "ana.onnx"
    args = ["export", "-i", ana, "-o", str(out), "--samples", "6,6"]
    result = CliRunner().invoke(app, [*args, "--outputs", "image,depth"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs PyTorch" in result.output and out.is_file()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "already exists (use --force" in result.output
    out.unlink()
    result = CliRunner().invoke(app, [*args, "--tolerance", "1e-12"])
    assert result.exit_code == 1 and "> tolerance" in result.output and "nothing written" in result.output
    assert not out.exists() and not list(tmp_path.glob(".ana.onnx.*"))  # no temp file left either
    result = CliRunner().invoke(app, ["export", "-i", ana, "-o", str(tmp_path / "a.safetensors"), "--with-mapping"])
    assert result.exit_code == 2 and "--format onnx only" in result.output
