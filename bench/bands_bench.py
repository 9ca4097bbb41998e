"""A full-size view with and without the inference pieces: row bands, ray groups, heap trims (time, peak RSS).

    python bench/bands_bench.py                      # time per view (same process, alternating) and peak RSS
    python bench/bands_bench.py --rss-repeats 5 --channels-last

"whole" turns the three off for our own model (`row_strips.MIN_RESOLUTION`, `renderer.RENDER_RAYS`,
`heap.MIN_STAGE_BYTES` out of reach), which is how a view ran before them. Time: best of --repeats views
per form, the two forms alternating. Peak RSS: each form in a fresh process per repeat (build the model,
render one view, read VmHWM), median and range; glibc's heap makes single runs vary by ~100 MiB.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from my3dgen_cli.eg3d import build_generator, heap, renderer, row_strips  # noqa: E402
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera  # noqa: E402

PIECES = {"bands": (row_strips.MIN_RESOLUTION, renderer.RENDER_RAYS, heap.MIN_STAGE_BYTES)}
PIECES["whole"] = (1 << 30, 1 << 30, 1 << 62)


def use(form: str) -> None:
    row_strips.MIN_RESOLUTION, renderer.RENDER_RAYS, heap.MIN_STAGE_BYTES = PIECES[form]


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def one_view(G: torch.nn.Module, batch: int, nrr: int, channels_last: bool) -> None:
    z = torch.randn(batch, G.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ws = G.mapping(z, frontal_camera(batch))
        G.synthesis(ws, lookat_camera([20.0] * batch, 5.0), neural_rendering_resolution=nrr,
                    channels_last=channels_last)


def rss_child(args: argparse.Namespace) -> None:
    use(args.rss_child)
    torch.manual_seed(0)
    one_view(build_generator(args.config).eval(), 1, args.nrr, args.channels_last)
    print(f"{peak_rss_mib():.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ffhq512-128")
    parser.add_argument("--resolutions", default="64,128")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6, help="timed views per form (after one warm-up)")
    parser.add_argument("--rss-repeats", type=int, default=3, help="fresh processes per form and resolution (0: none)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC convs (render picks it on some CPUs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-child", choices=tuple(PIECES), help=argparse.SUPPRESS)
    parser.add_argument("--nrr", type=int, default=64, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return
    resolutions = [int(r) for r in args.resolutions.split(",")]
    torch.manual_seed(0)
    G = build_generator(args.config).eval()
    print(f"config {args.config}, batch {args.batch}, threads {torch.get_num_threads()}, "
          f"{'NHWC' if args.channels_last else 'NCHW'}, torch {torch.__version__}")
    print("| neural res | whole s/view | bands s/view | bands / whole | whole peak RSS MiB | bands peak RSS MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for nrr in resolutions:
        best = dict.fromkeys(PIECES, float("inf"))
        for round_index in range(args.repeats + 1):
            for form in PIECES:
                use(form)
                start = time.perf_counter()
                one_view(G, args.batch, nrr, args.channels_last)
                if round_index:
                    best[form] = min(best[form], time.perf_counter() - start)
        use("bands")
        rss: dict[str, list[int]] = {form: [] for form in PIECES}
        for _ in range(args.rss_repeats):
            for form in PIECES:
                command = [sys.executable, __file__, "--rss-child", form, "--nrr", str(nrr), "--config", args.config,
                           "--threads", str(args.threads)] + (["--channels-last"] if args.channels_last else [])
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                rss[form].append(int(out.split()[-1]))

        def cell(values: list[int]) -> str:
            return f"{statistics.median(values):.0f} ({min(values)}-{max(values)})" if values else "n/a"

        print(f"| {nrr} | {best['whole']:.3f} | {best['bands']:.3f} | {best['bands'] / best['whole']:.2f} | "
              f"{cell(rss['whole'])} | {cell(rss['bands'])} |", flush=True)


if __name__ == "__main__":
    main()
