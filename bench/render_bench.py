"""CPU (or GPU) forward time and peak memory of the full-size generator, ours vs the official code.

    python bench/render_bench.py [--official PATH/TO/NVlabs/eg3d/eg3d] [--device cpu] [--repeats 3]
    python bench/render_bench.py --batches 1,8 --amp bf16 [--compile] --official ...   # + our fast path
    python bench/render_bench.py --batches 1,4 --channels-last                          # NHWC vs NCHW
    python bench/render_bench.py --device cuda --amp fp16 --channels-last   # + fp16 in NCHW, alternating
    python bench/render_bench.py --reference --official ...   # + ours with ops.reference_paths() (no CPU fast paths)

Times are per view (a batch's time / its size), for each neural rendering resolution and batch.
With --amp, --compile or --channels-last a third column times our fast path (speed.autocast /
speed.compiled / NHWC convolutions), alternating with the reference run by run, and its largest
pixel difference from our fp32 output is printed beside it. --reference adds a column for our fp32
path with the CPU fast paths off (`ops.reference_paths()`: official-order compositing, allocating conv
epilogues, torch's softplus), alternating with the others, so one run shows what those paths save.

The official implementation is optional: point --official (or $EG3D_OFFICIAL) at the `eg3d/`
folder of a checkout of NVlabs/eg3d and it is imported from there, given the same random weights,
and timed in the same run; the script prints both and their ratio. Nothing of it is copied here.
Both run in eval mode (fused modulated conv) with fp32 weights; ours uses deterministic sampling,
the official its stochastic sampler (same cost).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

from my3dgen_cli.eg3d import build_generator, ops
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.speed import autocast, compiled


def official_generator(folder: str, config: dict):
    sys.path.insert(0, folder)
    from training.triplane import TriPlaneGenerator  # the official class, from the user's checkout

    init = dict(config["init_kwargs"])
    G = TriPlaneGenerator(**init).eval()
    G.neural_rendering_resolution = config["neural_rendering_resolution"]
    return G


def interleaved(runs: dict, repeats: int, sync) -> dict[str, float]:
    """Best time of each callable, alternating between them so that machine load hits all alike."""
    best = {name: float("inf") for name in runs}
    for round_index in range(repeats + 1):  # round 0 is the warm-up
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            sync()
            if round_index:
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", default=os.environ.get("EG3D_OFFICIAL"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="one batch size (same as --batches N)")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes, e.g. 1,8")
    parser.add_argument("--resolutions", default="64,128", help="neural rendering resolutions")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd synthesis")
    parser.add_argument("--channels-last", action="store_true", help="the fast path runs its convs in NHWC")
    parser.add_argument("--config", default="ffhq512-128")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--reference", action="store_true", help="also time our fp32 path without the fast paths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_generator(args.config).to(device).eval()
    config = ours.config.to_dict()
    theirs = None
    if args.official:
        theirs = official_generator(args.official, config).to(device)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    batches = [args.batch] if args.batch else [int(b) for b in args.batches.split(",")]
    fast = args.amp != "off" or args.compile or args.channels_last
    fast_nchw = args.amp != "off" or args.compile  # with --channels-last: also time these without it
    synth_fast = compiled(ours.synthesis) if args.compile else ours.synthesis
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tag = "+".join(([args.amp] if args.amp != "off" else []) + (["compile"] if args.compile else [])
                   + (["channels_last"] if args.channels_last else []))
    print(f"device {device}, config {args.config}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"fast path: {tag or 'none'}; seconds per view (best of {args.repeats})")
    print(f"| neural res | batch | ours fp32 | {'ours ' + tag if fast else 'ours fast'} | official | "
          "official/ours | official/fast | fast max abs diff |" + (" fast in NCHW |" if fast_nchw and
                                                                   args.channels_last else "")
          + (" ours reference | ours/official |" if args.reference else ""))
    print("|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if fast_nchw and args.channels_last else "")
          + ("---:|---:|" if args.reference else ""))
    for n in batches:
        z = torch.randn(n, ours.z_dim, generator=torch.Generator().manual_seed(1)).to(device)
        c_cond, c = frontal_camera(n).to(device), lookat_camera([20.0] * n, 5.0).to(device)
        for nrr in (int(r) for r in args.resolutions.split(",")):
            with torch.no_grad():
                ws = ours.mapping(z, c_cond)
                runs = {"ours": lambda ws=ws, nrr=nrr, c=c: ours.synthesis(ws, c, neural_rendering_resolution=nrr)}
                if fast:
                    def run_fast(ws=ws, nrr=nrr, c=c, nhwc=args.channels_last):
                        with autocast(device, args.amp):
                            return synth_fast(ws, c, neural_rendering_resolution=nrr, channels_last=nhwc)
                    runs["fast"] = run_fast
                    if args.channels_last and fast_nchw:  # the same fast path in NCHW: NHWC's own share
                        runs["fast_nchw"] = lambda ws=ws, nrr=nrr, c=c: run_fast(ws, nrr, c, nhwc=False)
                if args.reference:
                    def run_reference(ws=ws, nrr=nrr, c=c):
                        with ops.reference_paths():
                            return ours.synthesis(ws, c, neural_rendering_resolution=nrr)
                    runs["reference"] = run_reference
                if theirs is not None:
                    runs["official"] = lambda ws=ws, nrr=nrr, c=c: theirs.synthesis(
                        ws, c, neural_rendering_resolution=nrr, noise_mode="const")
                best = interleaved(runs, args.repeats, sync)
                diff = None
                if fast:
                    diff = float((runs["fast"]()["image"].float() - runs["ours"]()["image"]).abs().max())
            per = {k: v / n for k, v in best.items()}

            def cell(v, fmt="{:.3f}"):
                return fmt.format(v) if v is not None else "n/a"

            t_off, t_fast = per.get("official"), per.get("fast")
            print(f"| {nrr} | {n} | {per['ours']:.3f} | {cell(t_fast)} | {cell(t_off)} | "
                  f"{cell(t_off / per['ours'] if t_off else None, '{:.2f}')} | "
                  f"{cell(t_off / t_fast if t_off and t_fast else None, '{:.2f}')} | {cell(diff, '{:.2g}')} |"
                  + (f" {cell(per['fast_nchw'])} |" if "fast_nchw" in per else "")
                  + (f" {cell(per.get('reference'))} | {cell(per['ours'] / t_off if t_off else None, '{:.2f}')} |"
                     if args.reference else ""))
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak process RSS {peak_rss_mb():.0f} MiB (both models loaded when --official is given)")


if __name__ == "__main__":
    main()
