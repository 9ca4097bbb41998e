"""Opening a base for an identity: stored fingerprint vs hashing every weight (the old behaviour).

    python bench/open_base_bench.py                      # --config ffhq512-128 --repeats 5

Makes a random base of --config with `save_local_base` and an identity with a rank-1 adapter on
it, in a temporary MY3DGEN_HOME, then times `open_generator(identity=...)` (resolve, load the
weights, fingerprint, attach the adapter) alternately in two modes after one warm-up of each:
"stored" reads the fingerprint from the base's JSON (this version); "hashed" ignores it and
hashes the weights, as every open did before. Also times the hash alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def hashing_every_open() -> Iterator[None]:
    """open_base as before: no stored value is read or written."""
    from my3dgen_cli.eg3d import fingerprint

    saved = fingerprint.stored_fingerprint, fingerprint.store_fingerprint
    fingerprint.stored_fingerprint = lambda *_: None
    fingerprint.store_fingerprint = lambda *_: False
    try:
        yield
    finally:
        fingerprint.stored_fingerprint, fingerprint.store_fingerprint = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="ffhq512-128")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="my3dgen-open-bench-") as home:  # a full base is ~120 MiB
        os.environ["MY3DGEN_HOME"] = home
        run(args)


def run(args: argparse.Namespace) -> None:
    from my3dgen_cli.eg3d import build_generator
    from my3dgen_cli.generators import open_generator, save_local_base
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.lora import add_adapters, base_fingerprint, save_adapter

    torch.manual_seed(0)
    G = build_generator(args.config)
    save_local_base(G, "bench-base")
    add_adapters(G, rank=1)
    adapter = identity_paths("bench").adapter
    adapter.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(G, adapter, "bench-base", base_fingerprint(G))
    del G

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


if __name__ == "__main__":
    main()
