"""Bilinear tri-plane sampling on the CPU as two compiled loops (numba): the mean of a point's three plane
features, and its backward pass, which adds each point's gradient into the texels it read.

Why: torch's CPU `grid_sample` backward scatters channel by channel with scalar stores and computes the
sampling grid's gradient too, which the renderer never needs (a tiny training step's plane gradient:
10.0 ms there, 3.7 ms here; `bench/grid_backward_bench.py`); and grid_sample returns every plane's samples
apart ([N, 3, C, M]) for the decoder to average, where the loop hands it the mean ([N, M, C]).
Points outside the planes, and NaN or infinite coordinates, read and receive nothing (zeros padding).

Same values as `renderer.mean_plane_features` (grid_sample: bilinear, zeros outside the planes,
align_corners False) up to float rounding (tests/test_plane_kernels.py). The planes are read as a table
[N, 3, H, W, C] (`plane_table`: a free view of `renderer.gather_planes`' layout). numba compiles the loops
once per machine and keeps them in its cache (next to this file, or under ~/.cache when that is read-only);
importing numba and loading them costs ~1 s once per process and ~100 MiB, so inference keeps grid_sample
(`usable`, `INFERENCE_MIN_TEXELS`), as do the reference paths and a machine without numba.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from my3dgen_cli.eg3d import ops
from my3dgen_cli.speed import run_parallel  # one task runs on the calling thread

PARALLEL_POINTS = 16384  # a pass with fewer points per thread runs on one thread (a hand-off costs ~50 us)


@functools.cache
def _loops() -> Any:
    """plane_loops (numba-compiled), or None where numba cannot be imported."""
    try:
        from my3dgen_cli.eg3d import plane_loops
    except Exception:  # not installed, or broken (numba refuses a newer numpy at import): grid_sample does the same
        return None
    return plane_loops


# Without autograd, planes of at least this many texels would take the loops; None: inference keeps grid_sample.
# Its forward is as fast on small planes, and on full-size ones the loops saved 2-4 % of a view (2 threads), while
# numba and its loaded loops add ~100 MiB to a render's peak memory (875 vs 775 MiB at nrr 64: 0.55x the official
# code's peak instead of 0.48x, against #17's <= 0.5x goal; docs/benchmarks.md). Training always takes them.
INFERENCE_MIN_TEXELS: int | None = None


def usable(planes: torch.Tensor) -> bool:
    """Whether `plane_means` should sample these planes: fp32 CPU, fast paths on, not compiling, numba present,
    and an autograd graph being recorded (the backward is where grid_sample loses most); in inference only from
    `INFERENCE_MIN_TEXELS` (off by default: numba's memory)."""
    if planes.device.type != "cpu" or planes.dtype != torch.float32 or not ops.fast_paths():
        return False
    if not torch.is_grad_enabled() and (INFERENCE_MIN_TEXELS is None
                                        or planes.shape[-1] * planes.shape[-2] < INFERENCE_MIN_TEXELS):
        return False
    return not torch.compiler.is_compiling() and _loops() is not None


def plane_table(planes: torch.Tensor) -> torch.Tensor:
    """planes [N, 3, C, H, W] as the kernels read them, [N, 3, H, W, C] contiguous (differentiable).

    A view, no copy, of planes stored channels-last (`renderer.gather_planes`, `sampling_layout`).
    """
    if planes.ndim == 4:  # gather_planes' flat [N*3, C, H, W]
        planes = planes.unflatten(0, (-1, 3))
    return planes.permute(0, 1, 3, 4, 2).contiguous()


def plane_means(table: torch.Tensor, coordinates: torch.Tensor, box_warp: float) -> torch.Tensor:
    """Mean over the planes of each point's bilinear features: table [N, 3, H, W, C] (`plane_table`),
    coordinates [N, M, 3] (no gradient) -> [N, M, C]; `renderer.mean_plane_features`' values."""
    if coordinates.requires_grad:
        raise ValueError("plane_means: the sample coordinates take no gradient (use grid_sample)")
    return _PlaneMeans.apply(table, coordinates.detach().float().contiguous(), 2.0 / box_warp)


@functools.cache
def _axes() -> np.ndarray:
    """renderer.PLANE_AXES as the loops read them (made once)."""
    from my3dgen_cli.eg3d.renderer import PLANE_AXES

    return np.asarray(PLANE_AXES, dtype=np.int64)


def _point_ranges(m: int) -> list[tuple[int, int]]:
    """The points [0, m) in one range per thread that gets at least PARALLEL_POINTS (at least one range)."""
    parts = max(1, min(torch.get_num_threads(), m // PARALLEL_POINTS))
    bounds = [round(m * k / parts) for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


class _PlaneMeans(torch.autograd.Function):
    """table [N, P, H, W, C], coords [N, M, 3] (no gradient), scale -> [N, M, C]; the gradient reaches the table."""

    @staticmethod
    def forward(ctx, table, coords, scale):  # type: ignore[override]
        n, _, _, _, c = table.shape
        m = coords.shape[1]
        out = table.new_empty(n, m, c)
        loops, axes, table_np = _loops(), _axes(), table.detach().numpy()
        scale = np.float32(scale)
        run_parallel([functools.partial(loops.sample_mean, table_np, coords[:, a:b].numpy(), axes, scale,
                                        out[:, a:b].numpy()) for a, b in _point_ranges(m)])
        ctx.save_for_backward(coords)
        ctx.scale, ctx.table_shape = scale, table.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (coords,) = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        ranges = _point_ranges(coords.shape[1])
        grads = [grad_out.new_zeros(ctx.table_shape) for _ in ranges]  # one per thread: no write races
        loops, axes = _loops(), _axes()
        run_parallel([functools.partial(loops.scatter_mean, grad_out[:, a:b].numpy(), coords[:, a:b].numpy(), axes,
                                        ctx.scale, grad.numpy()) for (a, b), grad in zip(ranges, grads, strict=True)])
        return functools.reduce(torch.Tensor.add_, grads), None, None
