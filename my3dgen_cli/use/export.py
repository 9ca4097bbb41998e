"""Export an identity's generator: merged weights (safetensors) or a renderer-complete ONNX graph.

    G, base, meta = merged_generator(identity="ana")            # adapter merged into the weights
    export_safetensors(G, "ana.safetensors")                     # a base: `--base ana.safetensors`
    check = export_onnx(G, "ana.onnx", dynamic_batch=True)       # inputs ws [N,num_ws,w_dim], camera [N,25]
    check.max_abs_diff, check.diffs                              # onnxruntime vs PyTorch, checked before the
                                                                 # file is put in place (ExportMismatchError)

The ONNX graph is the whole renderer: backbone (unfused modulated conv), tri-plane sampling, coarse +
importance marching with deterministic sample positions, superresolution. The ops ONNX lacks are
replaced while exporting (`torch.onnx.is_in_onnx_export()` in eg3d/): cumprod -> exp(cumsum(log)),
searchsorted -> a comparison count, antialiased resize -> two constant MatMuls. fp32, opset >= 17.
`run_export(ExportPlan(...))` is `my3dgen export`: both formats, each checked after writing.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli import __version__
from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.fileio import atomic_path
from my3dgen_cli.output import Output

# `--outputs` name -> synthesis output key
OUTPUTS: dict[str, str] = {"image": "image", "depth": "image_depth", "raw": "image_raw",
                           "features": "image_features"}
MIN_OPSET = 17
MAX_OPSET = 20  # the newest the TorchScript-based exporter writes
DEFAULT_TOLERANCE = 1e-3  # fp32 graph vs eager: observed ~2e-6 (tiny) and ~4e-6 (full size); see docs/export.md


class ExportMismatchError(My3DGenError):
    """The exported file renders differently from PyTorch by more than the tolerance."""


@dataclass
class ExportCheck:
    """What `check_onnx` measured: max abs difference per output over all input sets."""

    diffs: dict[str, float]
    batch_sizes: list[int]
    providers: list[str]
    path: Path | None = None
    size: int | None = None

    @property
    def max_abs_diff(self) -> float:
        return max(self.diffs.values())

    @property
    def worst(self) -> str:
        return max(self.diffs, key=self.diffs.__getitem__)


class ExportedGenerator(nn.Module):
    """The exported signature, around a generator with no adapters attached (merge them first).

    forward(ws [N, num_ws, w_dim], camera [N, 25])                  (default)
    forward(z [N, z_dim], c_cond [N, 25], camera [N, 25])           (with_mapping; psi is fixed here)
    -> a tuple in the order of `outputs`: image [N,3,img,img], depth [N,1,r,r], raw [N,3,r,r] (the
    neural render's rgb, the official `image_raw`), features [N,C,r,r] (what superresolution reads).
    Cameras are the caller's: build them on the base's rig (`camera_rig(G)`; the file's metadata
    `avg_camera_pivot` / `avg_camera_radius` record it).
    Rendering: noise "const", deterministic sampling, unfused modulated conv (the exportable form).
    """

    def __init__(
        self,
        G: nn.Module,
        outputs: Sequence[str] = ("image",),
        with_mapping: bool = False,
        truncation_psi: float = 1.0,
        neural_res: int | None = None,
    ) -> None:
        super().__init__()
        self.G = G
        self.outputs = parse_outputs(outputs)
        self.with_mapping, self.truncation_psi = with_mapping, float(truncation_psi)
        self.neural_res = int(neural_res or G.neural_rendering_resolution)

    @property
    def input_names(self) -> list[str]:
        return ["z", "c_cond", "camera"] if self.with_mapping else ["ws", "camera"]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.with_mapping:
            z, c_cond, camera = inputs
            ws = self.G.mapping(z, c_cond, truncation_psi=self.truncation_psi)
        else:
            ws, camera = inputs
        out = self.G.synthesis(ws, camera, neural_rendering_resolution=self.neural_res, noise_mode="const",
                               sampling="deterministic", fused_modconv=False)
        return tuple(out[OUTPUTS[name]] for name in self.outputs)


def parse_outputs(outputs: str | Sequence[str]) -> tuple[str, ...]:
    """"image,depth" or a sequence -> validated names, in the given order, without repeats."""
    names = [s.strip() for s in outputs.split(",")] if isinstance(outputs, str) else list(outputs)
    bad = [n for n in names if n not in OUTPUTS]
    if not names or bad:
        raise UserInputError(f"outputs: got {bad[0] if bad else 'nothing'!r}, expected some of {', '.join(OUTPUTS)}")
    return tuple(dict.fromkeys(names))


def parse_samples(samples: str | int | None) -> tuple[int, int] | None:
    """"48" (coarse = importance) or "48,48" -> (depth_resolution, depth_resolution_importance)."""
    if samples is None:
        return None
    parts = [p.strip() for p in str(samples).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    from my3dgen_cli.eg3d.configs import MAX_DEPTH_SAMPLES

    if len(values) != 2 or not (2 <= values[0] <= MAX_DEPTH_SAMPLES and 0 <= values[1] <= MAX_DEPTH_SAMPLES):
        raise UserInputError(f"--samples: got {samples!r}, expected N or COARSE,IMPORTANCE "
                             f"(coarse 2..{MAX_DEPTH_SAMPLES}, importance 0..{MAX_DEPTH_SAMPLES})")
    return values[0], values[1]


def set_render_options(G: nn.Module, neural_res: int | None = None, samples: tuple[int, int] | None = None) -> None:
    """Change the neural rendering resolution and ray sample counts of `G` (and its saved config)."""
    if neural_res is not None:
        if not 16 <= neural_res <= 512:
            raise UserInputError(f"--neural-res: got {neural_res}, expected 16..512 (64 or 128 for EG3D)")
        G.neural_rendering_resolution = int(neural_res)
    if samples is not None:
        G.rendering_kwargs["depth_resolution"], G.rendering_kwargs["depth_resolution_importance"] = samples


def check_writable(path: str | Path) -> Path:
    """Fail early (before any model work) if `path` cannot be written: UserInputError naming why."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserInputError(f"output: got {path}, which is a folder; expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise UserInputError(f"output: cannot write {path} ({err.strerror or err})") from None
    return path


def merged_generator(
    base: str | None = None, identity: str | None = None, device: torch.device | str | None = None,
    offline: bool | None = None,
) -> tuple[nn.Module, Any, dict[str, Any] | None, float | None]:
    """(G with the identity's adapter merged into its weights, BaseRef, adapter metadata, merge diff).

    merge diff: max abs difference of the image between base+adapter and the merged weights on
    `check_inputs` (None without an identity). Raises IncompatibleAdapterError for another base.
    """
    from my3dgen_cli.generators import open_generator
    from my3dgen_cli.lora import merge_adapters

    G, ref, meta = open_generator(base=base, identity=identity, device=device, offline=offline)
    if meta is None:
        return G, ref, None, None
    inputs = check_inputs(G, batch_sizes=(1,))[0]
    wrapper = ExportedGenerator(G)
    with torch.no_grad():
        before = wrapper(*inputs)[0]
        merge_adapters(G)
        after = wrapper(*inputs)[0]
    return G, ref, meta, float((before - after).abs().max())


def export_safetensors(G: nn.Module, path: str | Path, source: dict[str, Any] | None = None,
                       fp16: bool = False) -> Path:
    """The merged generator in the converted format (safetensors + .json): loadable as a base."""
    from my3dgen_cli.weights.converted import ConvertedBase, write_converted_base

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserInputError(f"output: got suffix {path.suffix!r}, expected '.safetensors' (its .json goes beside)")
    if any(".adapter." in k for k in G.state_dict()):
        raise ValueError("export_safetensors: merge the adapters first (merged_generator)")
    config = copy.deepcopy(G.config.to_dict())
    config["neural_rendering_resolution"] = int(G.neural_rendering_resolution)
    for holder in (config, config.get("init_kwargs", {})):
        if "rendering_kwargs" in holder:
            holder["rendering_kwargs"] = copy.deepcopy(G.rendering_kwargs)
    config["source"] = dict(source or {})
    return write_converted_base(path, ConvertedBase(G.state_dict(), config), dtype=torch.float16 if fp16 else None)


def check_inputs(G: nn.Module, batch_sizes: Sequence[int] = (1, 2), with_mapping: bool = False,
                 truncation_psi: float = 0.7, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Inputs for the export check: one set per batch size, each with its own latents and cameras.

    Latents are mapped from seeded z (realistic ws, not raw noise); cameras turn from yaw -30 to
    +30 degrees with some pitch on G's own rig (its pivot and radius), so every set sees a
    different view the way the base is used. CPU float32.
    """
    from my3dgen_cli.eg3d.camera import camera_rig

    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    rig = camera_rig(G)
    total, done, sets = sum(batch_sizes), 0, []
    for k, n in enumerate(batch_sizes):
        z = torch.randn(n, G.z_dim, generator=gen)
        yaws = [-30.0 + 60.0 * (done + i + 0.5) / total for i in range(n)]
        camera = rig.lookat(yaws, 8.0 if k % 2 else -5.0).float()
        c_cond = rig.frontal(n).float()
        done += n
        if with_mapping:
            sets.append((z, c_cond, camera))
            continue
        with torch.no_grad():
            ws = G.mapping(z.to(device), c_cond.to(device), truncation_psi=truncation_psi).cpu()
        sets.append((ws, camera))
    return sets


def export_onnx(
    G: nn.Module,
    path: str | Path,
    outputs: Sequence[str] = ("image",),
    with_mapping: bool = False,
    truncation_psi: float = 0.7,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = False,
    fp16: bool = False,
    tolerance: float | None = DEFAULT_TOLERANCE,
    batch_sizes: Sequence[int] | None = None,
    metadata: dict[str, str] | None = None,
) -> ExportCheck:
    """Write the renderer-complete ONNX graph of `G` (CPU, fp32, merged weights) and check it.

    The file is checked before it is put in place (checker, onnxruntime vs PyTorch on
    `check_inputs`); with `tolerance` set, a larger max abs difference raises ExportMismatchError
    and `path` is left untouched. fp16: weights stored in half precision (computation stays
    fp32; PyTorch is checked with the same rounded weights): 125 -> 78 MiB at full size.
    G is moved to CPU float32 in place (and with fp16 its weights are rounded in place).
    metadata: extra model properties (identity, base, ...) beside the render settings always stored.
    """
    from my3dgen_cli.use.onnx_file import check_onnx, rewrite_model

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserInputError(f"--opset: got {opset}, expected {MIN_OPSET}..{MAX_OPSET}")
    G = G.cpu().float().eval()
    if fp16:
        with torch.no_grad():
            for p in G.parameters():
                p.copy_(p.half().float())
    wrapper = ExportedGenerator(G, outputs, with_mapping, truncation_psi).eval()
    names_in, names_out = wrapper.input_names, list(wrapper.outputs)
    batch_sizes = tuple(batch_sizes or ((1, 2) if dynamic_batch else (1, 1)))
    inputs = check_inputs(G, batch_sizes, with_mapping, truncation_psi)
    axes = {n: {0: "batch"} for n in names_in + names_out} if dynamic_batch else None
    path = Path(path)
    with atomic_path(path) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks baked as constants
            torch.onnx.export(wrapper, inputs[0], str(tmp), dynamo=False, opset_version=opset,
                              input_names=names_in, output_names=names_out, dynamic_axes=axes,
                              do_constant_folding=True)
        props = {"my3dgen_version": __version__, "neural_rendering_resolution": str(wrapper.neural_res),
                 "depth_resolution": str(G.rendering_kwargs["depth_resolution"]),
                 "depth_resolution_importance": str(G.rendering_kwargs["depth_resolution_importance"]),
                 "truncation_psi": str(truncation_psi) if with_mapping else "", "fp16_weights": str(fp16).lower(),
                 **rig_metadata(G)}
        rewrite_model(tmp, fp16, {**props, **(metadata or {})})
        check = check_onnx(tmp, wrapper, inputs)
        check.path, check.size = path, tmp.stat().st_size
        if tolerance is not None and not check.max_abs_diff <= tolerance:
            raise ExportMismatchError(
                f"ONNX output differs from PyTorch by {check.max_abs_diff:.3g} > tolerance {tolerance:g} "
                f"(worst output: {check.worst}); nothing written to {path}"
            )
    return check


def rig_metadata(G: nn.Module) -> dict[str, str]:
    """The base's camera rig as ONNX properties: the pivot and radius its camera inputs must use."""
    from my3dgen_cli.eg3d.camera import camera_rig

    rig = camera_rig(G)
    return {"avg_camera_pivot": ",".join(f"{v:g}" for v in rig.pivot), "avg_camera_radius": f"{rig.radius:g}",
            "camera_focal": f"{rig.focal:g}"}


@dataclass(frozen=True)
class ExportPlan:
    """What `my3dgen export` was asked for: an identity's generator, merged, as a base or a checked ONNX graph.

    fmt: "onnx" or "safetensors" (None: from the output's suffix). The ONNX-only settings (opset,
    outputs, dynamic_batch, with_mapping) must stay at their defaults for a safetensors export.
    """

    identity: str
    output: Path
    base: str | None = None
    fmt: str | None = None
    opset: int = MIN_OPSET
    neural_res: int | None = None
    samples: tuple[int, int] | None = None
    outputs: tuple[str, ...] = ("image",)
    dynamic_batch: bool = False
    with_mapping: bool = False
    truncation: float = 0.7
    fp16: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    offline: bool | None = None
    force: bool = False

    def format(self) -> str:
        """The format written, checked against the suffix and the ONNX-only settings (UserInputError)."""
        fmt = self.fmt
        if fmt is None:
            fmt = self.output.suffix.lstrip(".")
            if fmt not in ("onnx", "safetensors"):
                raise UserInputError(f"output: got suffix {self.output.suffix!r}, expected .onnx or .safetensors "
                                     "(or --format)")
        onnx_only = {"--opset": self.opset != MIN_OPSET, "--outputs": self.outputs != ("image",),
                     "--dynamic-batch": self.dynamic_batch, "--with-mapping": self.with_mapping}
        if fmt == "safetensors" and any(onnx_only.values()):
            flag = next(k for k, v in onnx_only.items() if v)
            raise UserInputError(f"{flag} applies to --format onnx only; drop it for a .safetensors export")
        if fmt == "safetensors" and self.output.suffix != ".safetensors":
            raise UserInputError(f"output: got suffix {self.output.suffix!r}, expected '.safetensors' for --format "
                                 "safetensors")
        return fmt


def run_export(plan: ExportPlan, output: Output | None = None) -> dict[str, Any]:
    """Merge the identity's adapter and write `plan.output`, checked after writing; the result's summary."""
    from my3dgen_cli.fileio import check_free

    path = check_writable(plan.output)
    plan = dataclasses.replace(plan, output=path)
    fmt = plan.format()
    check_free([path, path.with_suffix(".json")] if fmt == "safetensors" else [path], plan.force)
    _check_sources(plan)
    out = output or Output("quiet")
    out.info(f"merging the adapter of {plan.identity!r}")
    G, ref, _, merge_diff = merged_generator(base=plan.base, identity=plan.identity, device="cpu",
                                             offline=plan.offline)
    set_render_options(G, plan.neural_res, plan.samples)
    source = {"identity": plan.identity, "base": ref.name, "base_sha256": ref.sha256}
    result: dict[str, Any] = {"identity": plan.identity, "base": ref.name, "format": fmt, "path": str(path),
                              "merge_max_abs_diff": merge_diff, "tolerance": plan.tolerance}
    if fmt == "safetensors":
        reload_diff = _export_merged(G, path, source, plan.fp16, plan.tolerance)
        result.update(config=str(path.with_suffix(".json")), reload_max_abs_diff=reload_diff)
    else:
        out.info(f"exporting ONNX (opset {plan.opset}) and checking it against PyTorch")
        check = export_onnx(G, path, outputs=plan.outputs, with_mapping=plan.with_mapping,
                            truncation_psi=plan.truncation, opset=plan.opset, dynamic_batch=plan.dynamic_batch,
                            fp16=plan.fp16, tolerance=plan.tolerance, metadata=source)
        result.update(opset=plan.opset, inputs=ExportedGenerator(G, plan.outputs, plan.with_mapping).input_names,
                      outputs=list(plan.outputs), dynamic_batch=plan.dynamic_batch, batch_sizes=check.batch_sizes,
                      max_abs_diff=check.max_abs_diff, diffs=check.diffs)
    result["size"] = path.stat().st_size
    return result


def _check_sources(plan: ExportPlan) -> None:
    """The identity, its adapter and the base, checked before the first progress line: a missing or damaged
    one is its error alone (a base not cached yet is fetched here, with the download's own progress)."""
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.errors import UnknownArtifactError
    from my3dgen_cli.generators import resolve_base_path, unknown_recorded_base
    from my3dgen_cli.identity import require_identity

    adapter = read_adapter(require_identity(plan.identity).adapter)
    try:
        resolve_base_path(plan.base or adapter.base_name, offline=plan.offline)
    except UnknownArtifactError:
        if plan.base is not None:
            raise
        raise unknown_recorded_base(f"identity {plan.identity!r}", adapter.base_name) from None


def _export_merged(G: nn.Module, path: Path, source: dict[str, Any], fp16: bool, tolerance: float) -> float:
    """Write the merged base, reload it as my3dgen would and compare with the merged weights."""
    from my3dgen_cli.eg3d import load_generator

    inputs = check_inputs(G, (1,))[0]
    with torch.no_grad():
        want = ExportedGenerator(G, ("image", "depth"))(*inputs)
        export_safetensors(G, path, source=source, fp16=fp16)
        got = ExportedGenerator(load_generator(path), ("image", "depth"))(*inputs)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    if not diff <= tolerance:
        raise ExportMismatchError(f"the reloaded {path} differs by {diff:.3g} > tolerance {tolerance:g}")
    return diff
