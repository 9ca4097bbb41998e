"""`my3dgen export`: an identity's generator as merged safetensors or a checked ONNX renderer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import TRUNCATION_RANGE, BaseOpt, ForceOpt, JsonOpt, check_free, check_range
from my3dgen_cli.errors import UserInputError

FORMATS = ("onnx", "safetensors")


def _format_for(output: Path, given: str | None) -> str:
    if given is not None:
        if given not in FORMATS:
            raise UserInputError(f"--format: got {given!r}, expected {' or '.join(FORMATS)}")
        return given
    suffix = output.suffix.lstrip(".")
    if suffix not in FORMATS:
        raise UserInputError(f"output: got suffix {output.suffix!r}, expected .onnx or .safetensors (or --format)")
    return suffix


@command("export", help="Export an identity's generator: merged .safetensors (a base) or a checked .onnx renderer.")
def export(
    identity: Annotated[str, typer.Option("--identity", "-i", help="Identity whose adapter is merged in.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help="File to write (.onnx or .safetensors).")],
    base: BaseOpt = None,
    format_: Annotated[
        str | None, typer.Option("--format", help="onnx or safetensors (default: from the file suffix).")
    ] = None,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset (>= 17).")] = 17,
    neural_res: Annotated[
        int | None, typer.Option("--neural-res", help="Neural rendering resolution, e.g. 64 or 128.")
    ] = None,
    samples: Annotated[
        str | None,
        typer.Option("--samples", help="Ray samples: N, or COARSE,IMPORTANCE (default: the base's, 48,48)."),
    ] = None,
    outputs: Annotated[
        str, typer.Option("--outputs", help="ONNX outputs, comma-separated: image, depth, raw (the neural "
                          "render's rgb), features (its 32-channel feature image).")
    ] = "image",
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch", help="ONNX batch dimension dynamic (default: batch 1).")
    ] = False,
    with_mapping: Annotated[
        bool, typer.Option("--with-mapping", help="ONNX inputs z + conditioning camera instead of ws.")
    ] = False,
    truncation: Annotated[
        float, typer.Option("--truncation", help="Truncation psi baked in with --with-mapping.")
    ] = 0.7,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="Store the weights in half precision (smaller file; compute stays fp32).")
    ] = False,
    tolerance: Annotated[
        float, typer.Option("--tolerance", help="Max abs difference to PyTorch allowed (checked after writing).")
    ] = 1e-3,
    offline: Annotated[bool, typer.Option("--offline", help="Never use the network.")] = False,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Results only.")] = False,
) -> None:
    from my3dgen_cli.use import export as lib

    out = output_for(json_mode, quiet)
    check_range("--opset", opset, lib.MIN_OPSET, lib.MAX_OPSET)
    check_range("--neural-res", neural_res, 16, 512)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_range("--tolerance", tolerance, 0.0, 1e6)
    output = lib.check_writable(output)
    fmt = _format_for(output, format_)
    onnx_only = {"--opset": opset != 17, "--outputs": outputs != "image", "--dynamic-batch": dynamic_batch,
                 "--with-mapping": with_mapping}
    if fmt == "safetensors" and any(onnx_only.values()):
        flag = next(k for k, v in onnx_only.items() if v)
        raise UserInputError(f"{flag} applies to --format onnx only; drop it for a .safetensors export")
    if fmt == "safetensors" and output.suffix != ".safetensors":
        raise UserInputError(f"output: got suffix {output.suffix!r}, expected '.safetensors' for --format safetensors")
    check_free([output, output.with_suffix(".json")] if fmt == "safetensors" else [output], force)
    out_names = lib.parse_outputs(outputs)
    sample_counts = lib.parse_samples(samples)

    out.info(f"merging the adapter of {identity!r}")
    G, ref, meta, merge_diff = lib.merged_generator(base=base, identity=identity, device="cpu",
                                                    offline=offline or None)
    lib.set_render_options(G, neural_res, sample_counts)
    result: dict[str, Any] = {"identity": identity, "base": ref.name, "format": fmt, "path": str(output),
                              "merge_max_abs_diff": merge_diff, "tolerance": tolerance}
    if fmt == "safetensors":
        reload_diff = _export_merged(lib, G, output, identity, ref, fp16, tolerance)
        result.update(config=str(output.with_suffix(".json")), reload_max_abs_diff=reload_diff)
    else:
        out.info(f"exporting ONNX (opset {opset}) and checking it against PyTorch")
        check = lib.export_onnx(G, output, outputs=out_names, with_mapping=with_mapping, truncation_psi=truncation,
                                opset=opset, dynamic_batch=dynamic_batch, fp16=fp16, tolerance=tolerance,
                                metadata={"identity": identity, "base": ref.name, "base_sha256": ref.sha256})
        result.update(opset=opset, inputs=lib.ExportedGenerator(G, out_names, with_mapping).input_names,
                      outputs=list(out_names), dynamic_batch=dynamic_batch, batch_sizes=check.batch_sizes,
                      max_abs_diff=check.max_abs_diff, diffs=check.diffs)
    result["size"] = output.stat().st_size
    human = [f"wrote {output} ({result['size'] / 2**20:.1f} MiB)"]
    if merge_diff is not None:
        human.append(f"merged adapter vs base+adapter: max abs diff {merge_diff:.2e}")
    if fmt == "safetensors":
        human.append(f"reloaded vs base+adapter: max abs diff {result['reload_max_abs_diff']:.2e}")
    else:
        per = ", ".join(f"{k} {v:.2e}" for k, v in result["diffs"].items())
        human.append(f"onnxruntime vs PyTorch (batch {result['batch_sizes']}): max abs diff "
                     f"{result['max_abs_diff']:.2e} ({per}); tolerance {tolerance:g}")
    out.result(result, human="\n".join(human))


def _export_merged(lib: Any, G: Any, output: Path, identity: str, ref: Any, fp16: bool, tolerance: float) -> float:
    """Write the merged base, reload it as my3dgen would and compare with the merged weights."""
    import torch

    from my3dgen_cli.eg3d import load_generator

    inputs = lib.check_inputs(G, (1,))[0]
    with torch.no_grad():
        want = lib.ExportedGenerator(G, ("image", "depth"))(*inputs)
        lib.export_safetensors(G, output, source={"identity": identity, "base": ref.name, "base_sha256": ref.sha256},
                               fp16=fp16)
        got = lib.ExportedGenerator(load_generator(output), ("image", "depth"))(*inputs)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    if not diff <= tolerance:
        raise lib.ExportMismatchError(f"the reloaded {output} differs by {diff:.3g} > tolerance {tolerance:g}")
    return diff
