"""The loops of plane_kernels.py, compiled by numba (imported only where numba is installed).

float32 throughout, in grid_sample's order of operations (unnormalize, floor, corner weights), so the
values match torch's to float rounding. Plain loops: numba compiles them once per machine and caches the
machine code (`cache=True`); each call releases the GIL (`nogil`), so views rendered on threads run at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from my3dgen_cli.eg3d.numba_jit import jit


@jit
def _pixel(coordinate: Any, scale: Any, size: int, one: Any, half: Any) -> tuple[int, Any, Any]:
    """grid_sample's unnormalized coordinate (align_corners False) as (first texel, its weight, the next's)."""
    i = ((coordinate * scale + one) * np.float32(size) - one) * half
    if not (i > -2 and i < size + 1):  # outside, NaN or inf: both corners off the plane, before any int conversion
        i = np.float32(-2.0)
    i0 = np.floor(i)
    return int(i0), i0 + one - i, i - i0


@jit
def _bilinear_mean(table, coords, axes, scale, values, adjoint):
    """adjoint False: values[n, m, :] = mean over planes p of bilinear(table[n, p], coords[n, m, axes[p]] * scale).
    adjoint True: table[n, p] += each corner's weight / planes times values[n, m, :] (the gradient's scatter).

    One loop for both, so that the two can never sample differently; `adjoint` is the same for the whole call,
    and LLVM takes its tests out of the loops.
    """
    n_, p_, h_, w_, c_ = table.shape
    one, half = np.float32(1.0), np.float32(0.5)
    y_gain = one / np.float32(p_) if adjoint else one
    for n in range(n_):
        for m in range(coords.shape[1]):
            if not adjoint:
                for c in range(c_):
                    values[n, m, c] = 0.0
            for p in range(p_):
                x0, wx0, wx1 = _pixel(coords[n, m, axes[p, 0]], scale, w_, one, half)
                y0, wy0, wy1 = _pixel(coords[n, m, axes[p, 1]], scale, h_, one, half)
                wxs, wys = (wx0, wx1), (wy0 * y_gain, wy1 * y_gain)
                for dy in range(2):
                    y = y0 + dy
                    if 0 <= y < h_:
                        for dx in range(2):
                            x = x0 + dx
                            if 0 <= x < w_:
                                weight = wxs[dx] * wys[dy]
                                if adjoint:
                                    for c in range(c_):
                                        table[n, p, y, x, c] += weight * values[n, m, c]
                                else:
                                    for c in range(c_):
                                        values[n, m, c] += weight * table[n, p, y, x, c]
            if not adjoint:
                for c in range(c_):
                    values[n, m, c] /= np.float32(p_)


@jit
def sample_mean(table, coords, axes, scale, out):
    """out[n, m, :] = mean over planes p of bilinear(table[n, p], coords[n, m, axes[p]] * scale)."""
    _bilinear_mean(table, coords, axes, scale, out, False)


@jit
def scatter_mean(grad_out, coords, axes, scale, grad_table):
    """The adjoint of `sample_mean`: grad_table += its weights times grad_out (grad_table zeroed by the caller)."""
    _bilinear_mean(grad_table, coords, axes, scale, grad_out, True)
