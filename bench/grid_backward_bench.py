"""The tri-planes' gradient through bilinear sampling: torch's grid_sampler backward vs scatter alternatives.

    python bench/grid_backward_bench.py                       # tiny-config shapes, batch 2
    python bench/grid_backward_bench.py --planes 6 --channels 32 --res 256 --points 98304

On the CPU, `grid_sampler_2d_backward` always computes the grid's gradient too, though the renderer's
sampling grid needs none; in a training step it is the largest single op (~19 % of a full-size step).
This times what could replace it for the planes' gradient alone: index_add_ and index_put_(accumulate)
of the four corners' weighted gradients into an NHWC table, and embedding_bag's backward (bags of four
corners), and the compiled loop the renderer uses now (`eg3d/plane_loops.py`, numba; its first call
compiles or loads it, outside the timing). One thread, process CPU time, median of the rounds
(alternating), and each alternative's max abs difference from torch's gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F


def corners(grid: torch.Tensor, n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat texel index [4 * N * P] and weight of each bilinear corner (align_corners=False, zeros outside)."""
    ix = ((grid[..., 0] + 1) * w - 1) / 2
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = ix.floor(), iy.floor()
    fx, fy = ix - x0, iy - y0
    x0, y0 = x0.long(), y0.long()
    base = torch.arange(n).reshape(n, 1, 1) * (h * w)
    idx, wts = [], []
    for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        xx, yy = x0 + dx, y0 + dy
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        idx.append(torch.where(inside, base + yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1), 0).reshape(-1))
        wts.append(torch.where(inside, wt, 0).reshape(-1))
    return torch.cat(idx), torch.cat(wts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--planes", type=int, default=6, help="batch x 3 planes")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--points", type=int, default=12288, help="points per plane (rays x samples)")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, c, h, w, p = args.planes, args.channels, args.res, args.res, args.points
    planes = torch.randn(n, c, h, w)
    grid = torch.rand(n, 1, p, 2) * 2.2 - 1.1  # some points outside the planes, as on real rays
    grad = torch.randn(n, c, 1, p)
    idx, wts = corners(grid, n, h, w)
    rows = grad.reshape(n, c, p).transpose(1, 2).reshape(n * p, c)

    def to_nchw(table: torch.Tensor) -> torch.Tensor:
        return table.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()

    def index_add() -> torch.Tensor:
        return to_nchw(torch.zeros(n * h * w, c).index_add_(0, idx, rows.repeat(4, 1) * wts[:, None]))

    def index_put() -> torch.Tensor:
        return to_nchw(torch.zeros(n * h * w, c).index_put_((idx,), rows.repeat(4, 1) * wts[:, None], accumulate=True))

    def embedding_bag() -> torch.Tensor:
        table = torch.zeros(n * h * w, c, requires_grad=True)
        bags = F.embedding_bag(idx.reshape(4, -1).t().contiguous(), table,
                               per_sample_weights=wts.reshape(4, -1).t().contiguous(), mode="sum")
        bags.backward(rows)
        return to_nchw(table.grad)

    def torch_backward() -> torch.Tensor:
        return torch.ops.aten.grid_sampler_2d_backward(grad, planes, grid, 0, 0, False, [True, False])[0]

    from my3dgen_cli.eg3d.plane_kernels import _loops

    loops = _loops()
    coords = torch.cat([grid.reshape(n, p, 2), torch.zeros(n, p, 1)], -1).numpy()  # one plane: axes (x, y)
    axes = torch.tensor([[0, 1]]).numpy()
    rows_np = rows.reshape(n, p, c).contiguous().numpy()

    def compiled() -> torch.Tensor:
        table = torch.zeros(n, 1, h, w, c)
        loops.scatter_mean(rows_np, coords, axes, np.float32(1.0), table.numpy())
        return table.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()

    variants = {"grid_sampler backward (torch)": torch_backward,
                "corner indices + weights": lambda: corners(grid, n, h, w),
                "index_add_": index_add, "index_put_ accumulate": index_put, "embedding_bag backward": embedding_bag}
    if loops is not None:
        variants["compiled loop (numba, plane_loops)"] = compiled
        compiled()  # compiled, or loaded from numba's cache, before the timing
    reference = torch_backward()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    print(f"planes [{n}, {c}, {h}, {w}], {p} points per plane, 1 thread, torch {torch.__version__}; "
          f"CPU ms, median of {args.rounds}")
    print("| variant | CPU ms | vs torch | max abs diff |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["grid_sampler backward (torch)"])
    for name, fn in variants.items():
        out = fn()
        diff = "-" if isinstance(out, tuple) else f"{(out - reference).abs().max().item():.1e}"
        med = statistics.median(times[name])
        print(f"| {name} | {med * 1e3:.2f} | {med / base:.2f}x | {diff} |")


if __name__ == "__main__":
    main()
