"""One Adam step over a training run's trainable tensors: torch's fused kernel vs the foreach form.

    python bench/adam_bench.py                 # the tiny config's adapters and extras (the demo's step)
    python bench/adam_bench.py --config ffhq512-128

my3dgen's `optim.Adam` calls `torch._fused_adam_` where torch has it; without it the same update runs
as `torch._foreach_*` ops grouped by step count. Both update every tensor from the same gradients;
this prints each form's milliseconds per step (median of the rounds, the two alternating, one
thread) and their largest difference after the steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=50, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from my3dgen_cli import optim
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.personalize.config import PersonalizeConfig
    from my3dgen_cli.personalize.training import _trainable

    params = _trainable(build_generator(args.config), PersonalizeConfig().train_config(), None)
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in params]
    forms = {"fused (torch._fused_adam_)": optim._fused, "foreach": lambda tensors: False}
    copies = {name: [p.detach().clone() for p in params] for name in forms}
    opts = {name: optim.Adam(copies[name], lr=1e-3) for name in forms}
    times: dict[str, list[float]] = {name: [] for name in forms}
    real = optim._fused
    try:
        for _ in range(args.rounds):
            for name, choice in forms.items():
                optim._fused = choice
                for p, g in zip(copies[name], grads, strict=True):
                    p.grad = g
                start = time.perf_counter()
                for _ in range(args.steps):
                    opts[name].step()
                times[name].append((time.perf_counter() - start) / args.steps)
    finally:
        optim._fused = real
    a, b = copies.values()
    diff = max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
    print(f"config {args.config}: {len(params)} tensors, {sum(p.numel() for p in params)} values; torch "
          f"{torch.__version__}, 1 thread, {args.steps} steps x {args.rounds} rounds; max diff after them {diff:.1e}")
    print("| form | ms per step |")
    print("|---|---:|")
    for name in forms:
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
