"""The loops of composite_kernels.py, compiled by numba (imported only where numba is installed).

float32 [R, S, C] colours, [R, S] weights (R rays, S samples, C channels); each ray's sums run over its samples in
order, as torch's multiply-then-sum does, so the values match it to float rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from my3dgen_cli.eg3d.numba_jit import jit


@jit(fastmath={"contract"})
def weighted_sum(colors: Any, weights: Any, out: Any) -> None:
    """out[r, c] = sum over s of weights[r, s] * colors[r, s, c]."""
    rays, samples, channels = colors.shape
    for r in range(rays):
        for c in range(channels):
            out[r, c] = np.float32(0.0)
        for s in range(samples):
            w = weights[r, s]
            for c in range(channels):
                out[r, c] += w * colors[r, s, c]


@jit(fastmath={"contract"})
def weighted_sum_adjoint(grad: Any, colors: Any, weights: Any, grad_colors: Any, grad_weights: Any) -> None:
    """The gradients of `weighted_sum` for grad [R, C]: grad_colors[r, s, c] = weights[r, s] * grad[r, c] and
    grad_weights[r, s] = sum over c of grad[r, c] * colors[r, s, c]."""
    rays, samples, channels = colors.shape
    for r in range(rays):
        for s in range(samples):
            w = weights[r, s]
            total = np.float32(0.0)
            for c in range(channels):
                g = grad[r, c]
                grad_colors[r, s, c] = w * g
                total += g * colors[r, s, c]
            grad_weights[r, s] = total
