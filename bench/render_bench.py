"""CPU (or GPU) forward time and peak memory of the full-size generator, ours vs the official code.

    python bench/render_bench.py [--official PATH/TO/NVlabs/eg3d/eg3d] [--device cpu] [--repeats 3]
    python bench/render_bench.py --batches 1,8 --amp bf16 [--compile] --official ...   # + our fast path
    python bench/render_bench.py --batches 1,4 --channels-last                          # NHWC vs NCHW
    python bench/render_bench.py --device cuda --amp fp16 --channels-last   # + fp16 in NCHW, alternating
    python bench/render_bench.py --reference --official ...   # + ours with ops.reference_paths() (no CPU fast paths)
    python bench/render_bench.py --rss --official ...          # peak RSS of one view instead, each in its own process
    python bench/render_bench.py --rss --channels-last ...     # the same, ours in NHWC

Times are per view (a batch's time / its size), for each neural rendering resolution and batch.
With --amp, --compile or --channels-last a third column times our fast path (speed.autocast /
speed.compiled / NHWC convolutions), alternating with the reference run by run, and its largest
pixel difference from our fp32 output is printed beside it. --reference adds a column for our fp32
path with the CPU fast paths off (`ops.reference_paths()`: official-order compositing, allocating conv
epilogues, torch's softplus), alternating with the others, so one run shows what those paths save.

--rss measures, instead of times, the peak resident memory of one batch-1 view per neural resolution,
ours and the official each in a fresh process of its own (build the model, render once, read VmHWM):
the figure a user sees, imports and weights included.

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
import subprocess
import sys
import time

import torch

from my3dgen_cli.eg3d import build_generator, ops
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.speed import autocast, check_amp_on, compiled


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


def peak_rss_mb(this_process_only: bool = False) -> float:
    """Peak RSS in MiB. ru_maxrss survives fork and exec (a child starts at its parent's peak); with
    `this_process_only`, Linux's VmHWM of /proc/self/status: the peak of this program's own memory."""
    if this_process_only and os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_view_rss(which: str, args: argparse.Namespace, nrr: int) -> float:
    """Peak RSS (MiB) of a fresh process that builds `which` ("ours" / "official") and renders one view."""
    command = [sys.executable, __file__, "--rss-child", which, "--resolutions", str(nrr), "--config", args.config,
               "--device", args.device] + (["--official", args.official] if args.official else []) + (
               ["--threads", str(args.threads)] if args.threads else []) + (
               ["--channels-last"] if args.channels_last else [])
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def rss_child(which: str, args: argparse.Namespace) -> None:
    """Body of `one_view_rss`' process: print the peak RSS after one batch-1 view."""
    torch.manual_seed(0)
    if which == "official":  # its own random init: the same sizes, and our model never built in its process
        with torch.device("meta"):
            config = build_generator(args.config).config.to_dict()
        G = official_generator(args.official, config).to(args.device)
    else:
        G = build_generator(args.config).eval().to(args.device)
    nrr = int(args.resolutions)
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(1)).to(args.device)
    c_cond, c = frontal_camera(1).to(args.device), lookat_camera([20.0], 5.0).to(args.device)
    with torch.no_grad():
        ws = G.mapping(z, c_cond)
        extra = {"noise_mode": "const"} if which == "official" else {"channels_last": args.channels_last}
        G.synthesis(ws, c, neural_rendering_resolution=nrr, **extra)
    print(f"{peak_rss_mb(this_process_only=True):.0f}")


def rss_table(args: argparse.Namespace) -> None:
    """Peak RSS of one batch-1 view per neural resolution, ours then the official, each in a fresh process."""
    print(f"config {args.config}, device {args.device}, one view (batch 1), each in its own process")
    print("| neural res | ours peak RSS MiB | official peak RSS MiB | ours / official |\n|---:|---:|---:|---:|")
    for nrr in (int(r) for r in args.resolutions.split(",")):
        ours_mb = one_view_rss("ours", args, nrr)
        theirs_mb = one_view_rss("official", args, nrr) if args.official else None
        print(f"| {nrr} | {ours_mb:.0f} | {f'{theirs_mb:.0f}' if theirs_mb else 'n/a'} | "
              f"{f'{ours_mb / theirs_mb:.2f}' if theirs_mb else 'n/a'} |")


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
    parser.add_argument("--rss", action="store_true", help="only the peak RSS of one view, each in its own process")
    parser.add_argument("--rss-child", choices=("ours", "official"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args)
        return
    if args.rss:
        rss_table(args)
        return
    device = torch.device(args.device)
    check_amp_on(device, args.amp)  # bf16 on a CPU without its kernels: hundreds of times slower, refused
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
