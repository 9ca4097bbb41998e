"""The tri-plane decoder's softplus and slope: torch's ops vs the compiled loop (eg3d/softplus_loops.py).

    python bench/softplus_bench.py --points 4096 --repeats 300

One chunk of the decoder's hidden layer ([points, 64] float32, N(0, 4^2) values: both tails of softplus), one
thread. Prints the median microseconds of `fused_decoder.softplus_and_slope` on torch's ops (clamp, exp, add,
divide, log, maximum) and compiled (numba), of `softplus` alone both ways, the ratio, and each form's largest
error against float64 softplus and sigmoid. The forms alternate, round by round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from my3dgen_cli.eg3d import fused_decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if fused_decoder._compiled() is None:
        raise SystemExit("numba cannot be imported here: nothing to compare")
    torch.set_num_threads(1)
    x = torch.randn(args.points, 64, generator=torch.Generator().manual_seed(0)) * 4
    out, slope = torch.empty_like(x), torch.empty_like(x)
    forms = {
        "softplus and slope, torch ops": lambda: fused_decoder.softplus_and_slope(x, out, slope, False),
        "softplus and slope, compiled": lambda: fused_decoder.softplus_and_slope(x, out, slope, True),
        "softplus, torch ops": lambda: fused_decoder.softplus(x, False),
        "softplus, compiled": lambda: fused_decoder.softplus(x, True),
    }
    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, fn in forms.items():
            for _ in range(10):
                fn()
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    ref, ref_slope = torch.nn.functional.softplus(x.double()), torch.sigmoid(x.double())
    print(f"[{args.points}, 64] float32, 1 thread, {args.rounds} rounds x {args.repeats} repeats")
    print("| form | median us | vs torch ops | max error softplus | max error slope |")
    print("|---|---:|---:|---:|---:|")
    for name in forms:
        compiled = name.endswith("compiled")
        base = statistics.median(times[name.replace("compiled", "torch ops")])
        median = statistics.median(times[name])
        if name.startswith("softplus and slope"):
            fused_decoder.softplus_and_slope(x, out, slope, compiled)
            errors = (out.double() - ref).abs().max().item(), f"{(slope.double() - ref_slope).abs().max().item():.1e}"
        else:
            errors = (fused_decoder.softplus(x, compiled).double() - ref).abs().max().item(), ""
        print(f"| {name} | {median * 1e6:.0f} | {median / base:.2f}x | {errors[0]:.1e} | {errors[1]} |")


if __name__ == "__main__":
    main()
