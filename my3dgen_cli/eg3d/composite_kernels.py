"""A ray's colour as the weighted sum of its samples' colours, with its gradients, as one compiled loop each way.

Why: the renderer composites each pass's colours [N, M, S, C] with per-sample weights [N, M, S, 1]
(`renderer.weighted_colors`). For the tiny config (12 samples x 16 channels per ray) that was a multiply with the
weights broadcast along the channels and a sum, whose backward pass is two more broadcast multiplies and a sum, each
a trip through memory for ~0.2 M multiply-adds per pass. Here each ray is one short loop forward (the weighted sum)
and one backward (both gradients at once): 0.86x of the compositing's forward + backward alone
(`bench/composite_bench.py`), 0.95-0.97x of a whole tiny training view, where the torch ops' passes also evict
what the next op reads.

Same values as the multiply-sum to float rounding (tests/test_eg3d.py). Used where `usable` says: fp32 CPU tensors,
fast paths on, not compiling, numba present, an autograd graph being recorded (inference keeps torch's ops: a tiny
render would only pay numba's import).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from my3dgen_cli.eg3d import ops


@functools.cache
def _loops() -> Any:
    """composite_loops (numba-compiled), or None where numba cannot be imported."""
    try:
        from my3dgen_cli.eg3d import composite_loops
    except Exception:  # not installed, or broken (numba refuses a newer numpy at import): torch's ops do the same
        return None
    return composite_loops


def usable(colors: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether `weighted_sum` should run: see the module's docstring."""
    return (torch.is_grad_enabled() and colors.device.type == "cpu" and colors.dtype == torch.float32
            and weights.dtype == torch.float32 and ops.fast_paths() and not torch.compiler.is_compiling()
            and _loops() is not None)


def weighted_sum(colors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """colors [N, M, S, C], weights [N, M, S, 1] (any strides) -> sum over S of weights * colors, [N, M, C]."""
    return _WeightedSum.apply(colors, weights)


def _numpy(x: torch.Tensor, *shape: int) -> Any:
    return x.detach().reshape(*shape).numpy()


class _WeightedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, colors, weights):  # type: ignore[override]
        n, m, s, c = colors.shape
        colors = colors.contiguous()
        weights = weights.reshape(n, m, s).contiguous()  # a slice of the merged passes' weights: one small copy
        out = colors.new_empty(n, m, c)
        _loops().weighted_sum(_numpy(colors, -1, s, c), _numpy(weights, -1, s), _numpy(out, -1, c))
        ctx.save_for_backward(colors, weights)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        colors, weights = ctx.saved_tensors
        n, m, s, c = colors.shape
        grad_colors, grad_weights = torch.empty_like(colors), torch.empty_like(weights)
        _loops().weighted_sum_adjoint(_numpy(grad.contiguous(), -1, c), _numpy(colors, -1, s, c),
                                      _numpy(weights, -1, s), _numpy(grad_colors, -1, s, c),
                                      _numpy(grad_weights, -1, s))
        return (grad_colors if ctx.needs_input_grad[0] else None,
                grad_weights.unsqueeze(-1) if ctx.needs_input_grad[1] else None)
