"""Whether bf16 pays on this CPU: one conv and one matmul of the generator's sizes, fp32 vs bf16.

    python bench/bf16_cpu_bench.py [--threads 2] [--repeats 3]

Prints `speed.cpu_has_bf16_kernels()` (oneDNN's bf16 check: AVX-512 or Arm bf16) and, per op, the
best time in each dtype and their ratio. Where the probe says False, `--amp bf16` is refused on the
CPU (`speed.check_amp_on`); this shows why. A bf16 op without kernels can take seconds: lower
--repeats there.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from my3dgen_cli.speed import cpu_has_bf16_kernels


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernel on the first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 256, 64, 64, generator=gen), torch.randn(256, 256, 3, 3, generator=gen)
    a, b = torch.randn(4096, 512, generator=gen), torch.randn(512, 512, generator=gen)
    ops = {"conv 3x3, 256 ch, 64x64": lambda dt: F.conv2d(x.to(dt), w.to(dt), padding=1),
           "matmul 4096x512 @ 512x512": lambda dt: a.to(dt) @ b.to(dt)}
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"cpu_has_bf16_kernels: {cpu_has_bf16_kernels()}; best of {args.repeats}, seconds")
    print("| op | fp32 | bf16 | bf16 / fp32 |")
    print("|---|---:|---:|---:|")
    for name, op in ops.items():
        t32 = best_time(lambda op=op: op(torch.float32), args.repeats)
        t16 = best_time(lambda op=op: op(torch.bfloat16), args.repeats)
        print(f"| {name} | {t32:.4f} | {t16:.4f} | {t16 / t32:.1f}x |")


if __name__ == "__main__":
    main()
