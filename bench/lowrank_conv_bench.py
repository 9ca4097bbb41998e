"""Adapted convs in training: autograd through `W + delta` vs the factor-only gradient (eg3d/lowrank_conv.py).

    python bench/lowrank_conv_bench.py --config ffhq512-128 --threads 1
    python bench/lowrank_conv_bench.py --config tiny --threads 1

For every conv an adapter wraps by default (backbone and superresolution; shapes and resolutions of
the config, batch 2, rank 1 in My3DGen's form: R = 3 for a 3x3 conv, 1 for a 1x1): the time of one
forward + backward of the convolution alone (the 2x-up ones as the transposed conv, before the blur),
best of --rounds with the two forms alternating. "default" says whether `layers.adapted_conv_factors`
takes the factor-only form for that layer (`LOW_RANK_MIN_*`). The totals sum the layers, and the
last line sums only the layers the default takes. The training step runs its photos on a thread
each with one torch thread (speed.run_parallel), so --threads 1 is the step's setting.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from my3dgen_cli.eg3d import build_generator, layers
from my3dgen_cli.eg3d.lowrank_conv import lowrank_conv2d


def adapted_convs(config: str) -> list[tuple[str, tuple[int, int, int, int], int, int]]:
    """(name, weight shape, input resolution, up) of every conv the default adapter targets wrap."""
    with torch.device("meta"):
        G = build_generator(config)
    out, resolution = [], 0
    for name, module in G.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "adapter") or weight is None or weight.ndim != 4:
            continue
        up = getattr(module, "up", 1)
        resolution = getattr(module, "resolution", resolution)  # a ToRGB runs at its block's last resolution
        out.append((name, tuple(weight.shape), resolution // up, up))
    return out


def time_layer(shape: tuple[int, int, int, int], size: int, up: int, rounds: int) -> tuple[float, float]:
    """Seconds of forward + backward: (autograd through the merged weight, factor-only)."""
    out_ch, in_ch, k, _ = shape
    rank = 3 if k == 3 else 1
    x = torch.randn(2, in_ch, size, size, requires_grad=True)
    base = torch.randn(shape) / (in_ch * k * k) ** 0.5
    a = torch.randn(rank, in_ch, k, k, requires_grad=True)
    b = torch.zeros(out_ch, rank).normal_(0, 0.01).requires_grad_()

    def merged() -> torch.Tensor:
        return base + (b @ a.reshape(rank, -1)).reshape(shape)

    def plain() -> torch.Tensor:
        if up == 2:
            return F.conv_transpose2d(x, merged().transpose(0, 1), stride=2)
        return F.conv2d(x, merged(), padding=k // 2)

    def factors() -> torch.Tensor:
        b4 = b.reshape(out_ch, rank, 1, 1)
        if up == 2:
            return lowrank_conv2d(x, merged().transpose(0, 1), a.transpose(0, 1), b4, stride=2, transposed=True)
        return lowrank_conv2d(x, merged(), a, b4, padding=k // 2)

    grad = torch.randn_like(plain())
    repeats = max(1, int(2e7 // (out_ch * in_ch * size * size)))  # small layers: several calls per timing
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, run in enumerate((plain, factors)):
            start = time.perf_counter()
            for _ in range(repeats):
                run().backward(grad)
            best[i] = min(best[i], (time.perf_counter() - start) / repeats)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ffhq512-128")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"config {args.config}, batch 2, threads {args.threads}, best of {args.rounds}, torch {torch.__version__}")
    print("| layer | weight | input px | up | default | merged ms | factors ms | factors / merged |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    totals = {"all": [0.0, 0.0], "default": [0.0, 0.0]}
    for name, shape, size, up in adapted_convs(args.config):
        merged_s, factors_s = time_layer(shape, size, up, args.rounds)
        rank = 3 if shape[-1] == 3 else 1
        default = layers.low_rank_pays(shape, rank)
        print(f"| {name} | {'x'.join(map(str, shape))} | {size} | {up} | {'yes' if default else 'no'} | "
              f"{merged_s * 1e3:.2f} | {factors_s * 1e3:.2f} | {factors_s / merged_s:.2f} |")
        totals["all"][0] += merged_s
        totals["all"][1] += factors_s
        chosen = factors_s if default else merged_s
        totals["default"][0] += merged_s
        totals["default"][1] += chosen
    merged_s, factors_s = totals["all"]
    print(f"\nall layers: merged {merged_s:.3f} s, factors {factors_s:.3f} s: {factors_s / merged_s:.2f}x")
    merged_s, chosen_s = totals["default"]
    print(f"as the default chooses: {chosen_s:.3f} s vs {merged_s:.3f} s: {chosen_s / merged_s:.2f}x")


if __name__ == "__main__":
    main()
