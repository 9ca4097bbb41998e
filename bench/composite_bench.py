"""A pass's compositing (renderer.weighted_colors) forward + backward: torch's multiply-sum vs the compiled loops.

    python bench/composite_bench.py --rays 1024 --samples 12 --channels 16 --repeats 300

The tiny config's pass (1024 rays x 12 samples x 16 channels; the weights a slice of the merged passes', as in a
render), one thread, with autograd. Prints the median microseconds of the forward and the backward pass of each
form, the ratio, and the largest difference of the outputs and gradients. The forms alternate, round by round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from my3dgen_cli.eg3d import composite_kernels
from my3dgen_cli.eg3d.renderer import weighted_colors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rays", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loops = composite_kernels._loops
    if loops() is None:
        raise SystemExit("numba cannot be imported here: nothing to compare")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    merged = torch.rand(1, args.rays, 2 * args.samples, 1, generator=g, requires_grad=True)
    colors = torch.randn(1, args.rays, args.samples, args.channels, generator=g, requires_grad=True)
    seed = torch.randn(1, args.rays, args.channels, generator=g)

    def run(compiled: bool) -> tuple[float, float, torch.Tensor, tuple[torch.Tensor, ...]]:
        composite_kernels._loops = loops if compiled else (lambda: None)
        start = time.perf_counter()
        out = weighted_colors(colors, merged[:, :, args.samples:])
        middle = time.perf_counter()
        grads = torch.autograd.grad(out, (merged, colors), seed)
        end = time.perf_counter()
        return middle - start, end - middle, out.detach(), grads

    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for compiled in (False, True):
            for _ in range(10):
                run(compiled)
            times[compiled] += [run(compiled)[:2] for _ in range(args.repeats)]
    composite_kernels._loops = loops
    _, _, out_ref, grads_ref = run(False)
    _, _, out, grads = run(True)
    pairs = [(out, out_ref), *zip(grads, grads_ref, strict=True)]
    diff = max((a - b).abs().max().item() for a, b in pairs)
    composite_kernels._loops = loops
    base = [statistics.median(t[i] for t in times[False]) for i in range(2)]
    print(f"{args.rays} rays x {args.samples} samples x {args.channels} channels, 1 thread, "
          f"{args.rounds} rounds x {args.repeats} repeats; largest difference {diff:.1e}")
    print("| form | forward us | backward us | forward + backward vs torch ops |")
    print("|---|---:|---:|---:|")
    for compiled, name in ((False, "torch multiply-sum"), (True, "compiled loops")):
        fwd, bwd = (statistics.median(t[i] for t in times[compiled]) for i in range(2))
        print(f"| {name} | {fwd * 1e6:.0f} | {bwd * 1e6:.0f} | {(fwd + bwd) / sum(base):.2f}x |")


if __name__ == "__main__":
    main()
