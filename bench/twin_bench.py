"""Two training views at once: on two threads of one process, or in two processes (personalize/twin.py).

    OMP_WAIT_POLICY=PASSIVE python bench/twin_bench.py --config tiny --repeats 40

One view = the forward and backward pass of one photo (personalize_speed.photos_of's face) through a tiny
generator with the default adapters and extras (the work of one part of a training step), on one thread. Prints
the median wall milliseconds of one view alone, of two views on two threads (speed.run_parallel, as training ran
them before the twin) and of two views in two processes (this one and a `twin.Twin`, as training runs them now),
and each pair's time over one view's: 1.0x would be two cores' worth of work in the time of one. Layouts
alternate, round by round; the heap keeps freed memory as in `my3dgen demo` (devices.keep_freed_memory).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from personalize_speed import photos_of

from my3dgen_cli.devices import keep_freed_memory
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.lora import add_adapters, add_extras, match_extras
from my3dgen_cli.personalize import twin
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.speed import run_parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    keep_freed_memory()  # as `my3dgen demo` does: the heap keeps a step's blocks for the next one
    torch.manual_seed(0)
    G = build_generator(args.config)
    config = PersonalizeConfig().train_config()
    params = add_adapters(G, rank=config.rank, alpha=config.alpha, targets=config.targets, style=config.style)
    params += add_extras(G, match_extras(G))
    G.train()
    _, _, cams, ws = photos_of(G, 10)  # the training benches' face and views; the two here: yaw -35 and -27

    def view(k: int) -> tuple[tuple[torch.Tensor | None, ...], torch.Tensor]:
        out = G.synthesis(ws[k : k + 1], cams[k : k + 1])
        loss = out["image"].square().mean() + out["image_raw"].square().mean()
        return torch.autograd.grad(loss, params, allow_unused=True), loss.detach().reshape(1)

    torch.set_num_threads(2)
    other = twin.Twin(view, params, torch.zeros(1))

    def alone() -> None:
        torch.set_num_threads(1)
        view(0)
        torch.set_num_threads(2)

    def threads() -> None:
        run_parallel([lambda: view(0), lambda: view(1)])

    def processes() -> None:
        other.submit(1)
        torch.set_num_threads(1)
        view(0)
        torch.set_num_threads(2)
        other.result()

    layouts = {"one view alone": alone, "two views, two threads": threads, "two views, two processes": processes}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(args.rounds):
        for name, fn in layouts.items():
            for _ in range(3):
                fn()
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    other.close()
    base = statistics.median(times["one view alone"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"config {args.config}, {args.rounds} rounds x {args.repeats} repeats, load average {load:.1f}")
    print("| layout | median ms | vs one view |")
    print("|---|---:|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
