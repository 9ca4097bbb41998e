"""Opening a base for an identity: where the time goes, and what two changes saved.

    python bench/open_base_bench.py                         # --compare init --config ffhq512-128 --repeats 5
    python bench/open_base_bench.py --compare fingerprint   # stored fingerprint vs hashing every open
    python bench/open_base_bench.py --compare finite        # stored NaN/Inf marker vs checking every open

Makes a random base of --config with `save_local_base` and an identity with a rank-1 adapter on
it, in a temporary MY3DGEN_HOME, then times `open_generator(identity=...)` (resolve, load the
weights, fingerprint, attach the adapter) alternately in two modes after one warm-up of each.

--compare init: "assign" builds the generator with its random init skipped and takes the file's
tensors as its own (this version); "random-init" builds it with random weights and copies the
file's in, as every open did before. Timed (a) in one process, (b) with one read of every weight
after the open (assigned weights stay memory-mapped and are read on first use), and (c) each in a
fresh Python process, as a CLI command opens it (import time excluded). Then the stages of both.
--compare fingerprint: "stored" reads the fingerprint from the base's JSON; "hashed" ignores it and
hashes the weights, as every open did before that. Also times the hash alone.
--compare finite: "marker" trusts the base JSON's record that this very weights file was checked
finite; "checked" reads every weight for NaN/Inf at each open, as every open did before. Timed for
the open alone and with one read of every weight after it (what a render does next: the check
also brings the mapped pages in, so part of its cost moves rather than disappears).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

MODES = ("random-init", "assign")


@contextmanager
def hashing_every_open() -> Iterator[None]:
    """open_base as before: no stored value is read or written."""
    from my3dgen_cli.weights import fingerprint

    saved = fingerprint.stored_fingerprint, fingerprint.store_fingerprint
    fingerprint.stored_fingerprint = lambda *_: None
    fingerprint.store_fingerprint = lambda *_: False
    try:
        yield
    finally:
        fingerprint.stored_fingerprint, fingerprint.store_fingerprint = saved


@contextmanager
def checking_every_open() -> Iterator[None]:
    """read_converted_base as before the marker: every weight checked for NaN/Inf at each open."""
    from my3dgen_cli.weights import converted

    saved = converted._checked_finite
    converted._checked_finite = lambda *_: False
    try:
        yield
    finally:
        converted._checked_finite = saved


@contextmanager
def random_init_and_copy() -> Iterator[None]:
    """load_generator as before: build with random initialisation, then copy the weights in."""
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.weights import checkpoint, fit

    def copy_state(G: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        G.load_state_dict(state_dict, strict=True)
        return G.eval()

    saved = fit.skeleton, checkpoint.assign_state
    fit.skeleton, checkpoint.assign_state = build_generator, copy_state
    try:
        yield
    finally:
        fit.skeleton, checkpoint.assign_state = saved


def read_all(G: torch.nn.Module) -> None:
    """Read every weight once (what the first forward does), so lazily mapped pages count."""
    with torch.no_grad():
        for t in G.state_dict().values():
            t.sum()


def timed_open(mode: str, touch: bool = False) -> float:
    """Seconds for open_generator(identity="bench") in `mode` (+ reading every weight if `touch`): "random-init"
    and "checked" the old ways (see the module docstring), any other mode as this version opens."""
    from my3dgen_cli.generators import open_generator

    old_way = {"random-init": random_init_and_copy, "checked": checking_every_open}.get(mode, nullcontext)
    t0 = time.perf_counter()
    with old_way():
        G, _, _ = open_generator(identity="bench")
    if touch:
        read_all(G)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=("init", "fingerprint", "finite"), default="init")
    ap.add_argument("--config", default="ffhq512-128")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)  # one fresh-process open
    args = ap.parse_args()
    if args.worker:
        import my3dgen_cli.generators  # noqa: F401  (import time is not the open's)

        print(json.dumps({"s": timed_open(args.worker)}))
        return
    with tempfile.TemporaryDirectory(prefix="my3dgen-open-bench-") as home:  # a full base is ~120 MiB
        os.environ["MY3DGEN_HOME"] = home
        make_identity(args.config)
        {"init": run_init, "fingerprint": run_fingerprint, "finite": run_finite}[args.compare](args)


def make_identity(config: str) -> None:
    """A random base "bench-base" and an identity "bench" (rank-1 adapter) made on it."""
    from my3dgen_cli.adapter_file import save_adapter
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.generators import save_local_base
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.lora import add_adapters, base_fingerprint

    torch.manual_seed(0)
    G = build_generator(config)
    save_local_base(G, "bench-base")
    add_adapters(G, rank=1)
    adapter = identity_paths("bench").adapter
    adapter.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(G, adapter, "bench-base", base_fingerprint(G))


def fresh_open(mode: str) -> float:
    """One open in a new Python process (what each CLI command pays)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return float(json.loads(out.stdout.strip().splitlines()[-1])["s"])


def alternate(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Each run once as warm-up, then `repeats` rounds of all runs in turn."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            times[key].append(fn())
    return times


def run_init(args: argparse.Namespace) -> None:
    from my3dgen_cli.generators import open_generator

    G, _, _ = open_generator(identity="bench")
    n = sum(p.numel() for k, p in G.named_parameters() if ".adapter." not in k)
    del G
    print(f"{args.config}, {n / 1e6:.1f} M parameters, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median (min) of {args.repeats} alternating runs after one warm-up each")
    cases: list[tuple[str, Callable[[str], float]]] = [
        ("open_generator(identity=...)", timed_open),
        ("... + read every weight once", lambda m: timed_open(m, touch=True)),
        ("... in a fresh process", fresh_open),
    ]
    for label, fn in cases:
        times = alternate(args.repeats, {m: (lambda m=m, fn=fn: fn(m)) for m in MODES})
        for mode, ts in times.items():
            print(f"{label:<30} {mode:>11}: {_median_min(ts)}")
        paired = [a - b for a, b in zip(times["random-init"], times["assign"], strict=True)]
        print(f"{'':<30} {'saved':>11}: {statistics.median(paired):.3f} s (median of pairs)")
    print_stages(args)


def _median_min(ts: list[float]) -> str:
    return f"{statistics.median(ts):.3f} s ({min(ts):.3f})"


def print_stages(args: argparse.Namespace) -> None:
    """Median time of each stage of load_generator, old path and new, on the bench base."""
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.generators import local_bases_dir
    from my3dgen_cli.weights.converted import read_converted_base
    from my3dgen_cli.weights.instantiate import assign_state, skeleton

    path = local_bases_dir() / "bench-base.safetensors"
    stages: dict[str, list[float]] = {}

    def stage(name: str, fn: Callable[..., Any], *a: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a)
        stages.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(args.repeats):
        base = stage("read safetensors + JSON (mapped)", read_converted_base, path)
        state_dict, config = base.state_dict, base.config
        G = stage("old: build_generator (random init)", build_generator, config)
        stage("old: load_state_dict (copy)", G.load_state_dict, state_dict)
        base = read_converted_base(path)
        state_dict, config = base.state_dict, base.config
        G = stage("new: skeleton (init skipped)", skeleton, config)
        G = stage("new: load_state_dict(assign=True)", assign_state, G, state_dict)
        stage("new: first read of every weight", read_all, G)
    print(f"stages of load_generator (in process), median of {args.repeats}:")
    for name, ts in stages.items():
        print(f"  {name:<36}: {statistics.median(ts):.3f} s")


def run_fingerprint(args: argparse.Namespace) -> None:
    from my3dgen_cli.generators import open_generator
    from my3dgen_cli.lora import base_fingerprint

    def timed(mode: str) -> float:
        t0 = time.perf_counter()
        if mode == "hashed":
            with hashing_every_open():
                open_generator(identity="bench")
        else:
            open_generator(identity="bench")
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"hashed": [], "stored": []}
    for mode in times:
        timed(mode)  # warm-up: page cache, allocator
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(timed(mode))
    G, _, _ = open_generator(identity="bench")
    hash_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        base_fingerprint(G)
        hash_s.append(time.perf_counter() - t0)
    n = sum(p.numel() for k, p in G.named_parameters() if ".adapter." not in k)
    print(f"{args.config}, {n / 1e6:.1f} M parameters, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median (min) of {args.repeats} alternating runs after one warm-up each")
    for mode, ts in times.items():
        print(f"open_generator(identity=...) {mode:>6}: {statistics.median(ts):.3f} s ({min(ts):.3f})")
    saved = [h - st for h, st in zip(times["hashed"], times["stored"], strict=True)]
    print(f"saved per open (paired)       : {statistics.median(saved):.3f} s (median of pairs)")
    print(f"base_fingerprint alone        : {statistics.median(hash_s):.3f} s ({min(hash_s):.3f})")


def run_finite(args: argparse.Namespace) -> None:
    from my3dgen_cli.generators import open_generator
    from my3dgen_cli.weights.converted import all_finite

    G, _, _ = open_generator(identity="bench")
    state = {k: v for k, v in G.state_dict().items() if ".adapter." not in k}
    n = sum(t.numel() for t in state.values())
    print(f"{args.config}, {n / 1e6:.1f} M weights, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median (min) of {args.repeats} alternating runs after one warm-up each")
    for label, touch in (("open_generator(identity=...)", False), ("... + read every weight once", True)):
        runs = {m: (lambda m=m, touch=touch: timed_open(m, touch)) for m in ("checked", "marker")}
        times = alternate(args.repeats, runs)
        for mode, ts in times.items():
            print(f"{label:<30} {mode:>8}: {_median_min(ts)}")
        ratio = statistics.median(times["checked"]) / statistics.median(times["marker"])
        paired = [a - b for a, b in zip(times["checked"], times["marker"], strict=True)]
        print(f"{'':<30} {'saved':>8}: {statistics.median(paired):.3f} s (median of pairs), "
              f"checked/marker {ratio:.2f}x")
    check_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        all_finite(state)
        check_s.append(time.perf_counter() - t0)
    print(f"{'the NaN/Inf check alone':<30} {'':>8}: {_median_min(check_s)}")


if __name__ == "__main__":
    main()
