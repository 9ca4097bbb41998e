"""CPU (or GPU) forward time and peak memory of the full-size generator, ours vs the official code.

    python bench/render_bench.py [--official PATH/TO/NVlabs/eg3d/eg3d] [--device cpu] [--repeats 3]

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

from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera


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
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_generator("ffhq512-128").to(device)
    config = ours.config.to_dict()
    theirs = None
    if args.official:
        theirs = official_generator(args.official, config).to(device)
        theirs.load_state_dict(ours.state_dict(), strict=True)
    n = args.batch
    z = torch.randn(n, 512, generator=torch.Generator().manual_seed(1)).to(device)
    c_cond, c = frontal_camera(n).to(device), lookat_camera([20.0] * n, 5.0).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"device {device}, batch {n}, threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"{'neural res':>10} {'ours s':>8} {'official s':>10} {'official/ours':>13}")
    for nrr in (64, 128):
        with torch.no_grad():
            ws = ours.mapping(z, c_cond)
            runs = {"ours": lambda ws=ws, nrr=nrr: ours.synthesis(ws, c, neural_rendering_resolution=nrr)}
            if theirs is not None:
                runs["official"] = lambda ws=ws, nrr=nrr: theirs.synthesis(
                    ws, c, neural_rendering_resolution=nrr, noise_mode="const")
            best = interleaved(runs, args.repeats, sync)
        t_ours, t_theirs = best["ours"], best.get("official")
        ratio = f"{t_theirs / t_ours:13.2f}" if t_theirs else f"{'n/a':>13}"
        official = f"{t_theirs:10.3f}" if t_theirs else f"{'n/a':>10}"
        print(f"{nrr:>10} {t_ours:8.3f} {official} {ratio}")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak process RSS {peak_rss_mb():.0f} MiB (both models loaded when --official is given)")


if __name__ == "__main__":
    main()
