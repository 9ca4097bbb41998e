"""Personalization speed: seconds per training step and per identity, exact path vs the fast options.

    python bench/personalize_speed.py --config tiny --steps 20 --identity-steps 100
    python bench/personalize_speed.py --config ffhq512-128 --steps 3 --device cuda
    python bench/personalize_speed.py --config tiny --variants fp32,reference --rounds 3 --project

Per variant (fp32 eager; bf16 autocast; 2 micro-batches; activation checkpointing; compile with
--compile) it trains an adapter on 10 synthetic photos (batch 2, symmetry every 4th step, pixel
and LPIPS losses when LPIPS is cached) and prints the best seconds per step after one warm-up
step, the peak GPU memory on CUDA, and each variant's logged loss (the same batches in every variant:
step 1's loss is the forward alone, later ones include the updates) against the fp32 path's.
"per identity" then times a whole `personalize()` (anchors + training + identity folder) with
--identity-steps steps and --anchor-steps anchor steps in the fp32 path, or, with --project, prints
the projection (anchor step time x steps + step time x steps) for configs too slow to run to the end.
"reference" is the fp32 step with the CPU fast paths off (`ops.reference_paths()`); --rounds R runs
the whole variant list R times in turn and keeps each variant's best, so load on a shared machine
hits all variants alike. The official My3DGen code trains whole network pickles with NVIDIA's
CUDA-only plugins and has no per-step entry point, so it is not timed here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import time

import torch

from my3dgen_cli.eg3d import build_generator, ops
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.personalize.pipeline import LossNets, PersonalizeConfig, Photos, personalize
from my3dgen_cli.personalize.training import train_adapter


def photos_of(G, n: int = 10):
    """n views (yaw -35..35) of one random face: (images, raw images, cameras, w)."""
    cams = lookat_camera(torch.linspace(-35.0, 35.0, n), 0.0).to(next(G.parameters()).device)
    with torch.no_grad():
        w = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3)).to(cams.device),
                      frontal_camera(1).to(cams.device), 0.7)
        out = G.synthesis(w.expand(n, -1, -1), cams)
    return out["image"], out["image_raw"], cams, w.expand(n, -1, -1)


def time_steps(G, data, steps: int, sync, *, lpips=None, sym_distance=None, records: list | None = None,
               **options) -> float:
    """Best seconds per step over `steps` steps (after a warm-up step).

    lpips / sym_distance: the loss networks (default: pixel losses, symmetry by MSE); records, when
    given, collects each step's logged losses (bench/gpu_selfcheck.py compares them across variants).
    """
    images, raws, cams, ws = data
    times: list[float] = []
    last = [time.perf_counter()]

    def on_step(step, record):
        sync()
        now = time.perf_counter()
        if step > 1:
            times.append(now - last[0])
        last[0] = now
        if records is not None:
            records.append(dict(record))

    config = PersonalizeConfig(steps=steps + 1, batch=2, sym=True, sym_loss="lpips", checkpoint_every=0, **options)
    train_adapter(copy.deepcopy(G), images, cams, ws, config, raw_images=raws, on_step=on_step, lpips=lpips,
                  sym_distance=sym_distance)
    return min(times)


def time_anchor_step(G, data, sync, lpips=None) -> float:
    """Seconds per anchor projection step (one chunk of 4 photos; lpips: the LPIPS-VGG loss or None)."""
    from my3dgen_cli.personalize.anchors import project_to_w

    images, _, cams, _ = data
    sync()
    t0 = time.perf_counter()
    project_to_w(G, images[:4], cams[:4], 2, lpips=lpips)
    sync()
    return (time.perf_counter() - t0) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--identity-steps", type=int, default=100)
    ap.add_argument("--anchor-steps", type=int, default=50)
    ap.add_argument("--project", action="store_true", help="project per-identity time instead of running it")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset: fp32,reference,bf16,fp16,accum,ckpt,nhwc,compile")
    ap.add_argument("--rounds", type=int, default=1, help="run the variant list this many times, alternating")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    G = build_generator(args.config).to(device)
    data = photos_of(G)
    variants = [("fp32", "fp32 eager", {}), ("reference", "fp32, reference paths", {"reference": True}),
                ("bf16", "bf16 autocast", {"amp": "bf16"}),
                ("accum", "accum 2", {"accum": 2}), ("ckpt", "activation checkpointing", {"act_checkpointing": True}),
                ("nhwc", "fp32 channels_last", {"channels_last": True})]
    if device.type == "cuda":
        variants.insert(2, ("fp16", "fp16 autocast", {"amp": "fp16"}))
    if args.compile:
        variants.append(("compile", "compile", {"compile": True}))
    keep = set(args.variants.split(",")) if args.variants else {key for key, _, _ in variants}
    variants = [(label, options) for key, label, options in variants if key in keep or key == "fp32"]
    print(f"device {device}, config {args.config}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"10 photos, batch 2, best of {args.steps} steps")
    print("| variant | s/step | vs fp32 | peak GPU MiB | loss, step 1 | last loss | max abs loss diff vs fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    best: dict[str, float] = {}
    mem: dict[str, str] = {}
    losses: dict[str, list[float]] = {}  # each step's logged loss, first round (the same batches in every variant)
    for _ in range(args.rounds):
        for label, options in variants:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            options = dict(options)
            paths = ops.reference_paths() if options.pop("reference", False) else contextlib.nullcontext()
            records: list[dict] = []
            with paths:
                sps = time_steps(G, data, args.steps, sync, records=records, **options)
            losses.setdefault(label, [r["loss"] for r in records])
            best[label] = min(sps, best.get(label, sps))
            mem[label] = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "n/a"
    base = best[variants[0][0]]
    for label, _ in variants:
        diff = max(abs(a - b) for a, b in zip(losses[label], losses[variants[0][0]], strict=True))
        print(f"| {label} | {best[label]:.3f} | {base / best[label]:.2f}x | {mem[label]} | {losses[label][0]:.6f} | "
              f"{losses[label][-1]:.6f} | {diff:.2g} |")
    n_chunks = math.ceil(data[0].shape[0] / 4)
    if args.project:
        anchor_s = time_anchor_step(G, data, sync)
        total = anchor_s * args.anchor_steps * n_chunks + base * args.identity_steps
        print(f"\nper identity (projected, fp32): {args.anchor_steps} anchor steps x {n_chunks} chunks x "
              f"{anchor_s:.3f} s + {args.identity_steps} steps x {base:.3f} s = {total:.0f} s ({total / 60:.1f} min)")
        return
    images, _, cams, _ = data
    config = PersonalizeConfig(steps=args.identity_steps, anchor_steps=args.anchor_steps, batch=2, sym_loss="lpips",
                               checkpoint_every=0)
    t0 = time.perf_counter()
    personalize(Photos(images, cams, [f"p{i}" for i in range(len(images))]), "bench", config, base="bench",
                generator=copy.deepcopy(G), nets=LossNets(None, None, None), force=True)
    sync()
    total = time.perf_counter() - t0
    print(f"\nper identity (measured, fp32, pixel losses): {args.anchor_steps} anchor steps, {args.identity_steps} "
          f"steps: {total:.1f} s")


if __name__ == "__main__":
    main()
