"""`my3dgen export`: an identity's generator as merged safetensors or a checked ONNX renderer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command, output_for
from my3dgen_cli.commands.options import (
    TRUNCATION_RANGE,
    BaseOpt,
    ExportFormat,
    ForceOpt,
    JsonOpt,
    OfflineOpt,
    QuietOpt,
    check_range,
)


@command("export", help="Export an identity's generator: merged .safetensors (a base) or a checked .onnx renderer.")
def export(
    identity: Annotated[str, typer.Option("--identity", "-i", help="Identity whose adapter is merged in.")],
    output: Annotated[Path, typer.Option("--output", "--out", "-o", help="File to write (.onnx or .safetensors).",
                                         show_default=False)],
    base: BaseOpt = None,
    format_: Annotated[
        ExportFormat | None, typer.Option("--format", help="onnx or safetensors (default: from the file suffix).",
                                          show_default=False)
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
    offline: OfflineOpt = False,
    force: ForceOpt = False,
    json_mode: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    from my3dgen_cli.use.export import MAX_OPSET, MIN_OPSET, ExportPlan, parse_outputs, parse_samples, run_export

    out = output_for(json_mode, quiet)
    check_range("--opset", opset, MIN_OPSET, MAX_OPSET)
    check_range("--neural-res", neural_res, 16, 512)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_range("--tolerance", tolerance, 0.0, 1e6)
    plan = ExportPlan(identity, output, base=base, fmt=None if format_ is None else format_.value, opset=opset,
                      neural_res=neural_res, samples=parse_samples(samples), outputs=parse_outputs(outputs),
                      dynamic_batch=dynamic_batch, with_mapping=with_mapping, truncation=truncation, fp16=fp16,
                      tolerance=tolerance, offline=offline or None, force=force)
    result = run_export(plan, out)
    human = [f"wrote {result['path']} ({result['size'] / 2**20:.1f} MiB)"]
    if result["merge_max_abs_diff"] is not None:
        human.append(f"merged adapter vs base+adapter: max abs diff {result['merge_max_abs_diff']:.2e}")
    if result["format"] == "safetensors":
        human.append(f"reloaded vs base+adapter: max abs diff {result['reload_max_abs_diff']:.2e}")
    else:
        per = ", ".join(f"{k} {v:.2e}" for k, v in result["diffs"].items())
        human.append(f"onnxruntime vs PyTorch (batch {result['batch_sizes']}): max abs diff "
                     f"{result['max_abs_diff']:.2e} ({per}); tolerance {tolerance:g}")
    out.result(result, human="\n".join(human))
