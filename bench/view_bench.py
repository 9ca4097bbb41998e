"""Request-to-bytes time of `my3dgen view` frames over HTTP: previews while dragging, full frames at rest.

    python bench/view_bench.py                                  # the demo base, CPU, 2 threads (issue 18's case)
    python bench/view_bench.py --base eg3d-ffhq512-128 --device cuda          # a real base on a GPU
    python bench/view_bench.py --config ffhq512-128 --device cuda             # random weights of that size

The real server runs on a free loopback port; one client thread GETs /api/frame back to back, as
the page does (one request in flight), and times each from sending the request to holding the
image's bytes. Cases: `drag` (previews at yaws sweeping -45..45: new cameras, cached tri-planes),
`rest` (full frames at those yaws) and `scrub` (previews while the interpolation slider moves: the
tri-planes are computed for every request). Without --base/--config the demo's base
(`demo-tiny-v2`) is used, built into the cache the first time (a few minutes on 2 cores).
Targets (issue 18): demo base on 2 CPU cores: preview <= 150 ms, full frame <= 1 s; full size on a
GPU: >= 20 previews per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests
import torch


def open_generator(args: argparse.Namespace):
    from my3dgen_cli.devices import pick_device

    device = pick_device(args.device)
    if args.config:
        from my3dgen_cli.eg3d import build_generator

        torch.manual_seed(0)
        return build_generator(args.config).eval().requires_grad_(False).to(device), f"{args.config} (random)"
    from my3dgen_cli.generators import open_base

    name = args.base
    if name is None:
        from my3dgen_cli.demo.run import demo_base
        from my3dgen_cli.output import Output

        name, _ = demo_base(fast=False, out=Output("human"))
    G, ref = open_base(name, device=device)
    return G.requires_grad_(False), ref.name


def timed(session: requests.Session, url: str, token: str, queries: list[dict], client: str
          ) -> list[tuple[float, float]]:
    """(wall, CPU) milliseconds from request to bytes, one request at a time (`client`: a page id, seq from 1).

    CPU is this process's CPU time (server, renderer and client are all in it): on a machine shared
    with other work, it is what the request would take on an idle core at --threads 1.
    """
    times = []
    for seq, query in enumerate(queries, 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        response = session.get(f"{url}/api/frame", params={"token": token, "client": client, "seq": seq, **query})
        body = response.content
        times.append(((time.perf_counter() - start) * 1000, (time.process_time() - start_cpu) * 1000))
        if response.status_code != 200 or not body:
            raise RuntimeError(f"frame {query}: HTTP {response.status_code}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base name or path (default: the demo base)")
    parser.add_argument("--config", help="random weights of a named config instead (e.g. ffhq512-128)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--requests", type=int, default=30, help="frames per case")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from my3dgen_cli.view import server
    from my3dgen_cli.view.saves import Saver
    from my3dgen_cli.view.scene import Scene, Source

    G, name = open_generator(args)
    scene = Scene(G, [Source("seed1", seed=1), Source("seed2", seed=2)])
    token = "bench"
    app = server.build_app(scene, Saver(scene, Path(tempfile.gettempdir()) / "my3dgen-view-bench"), token,
                           {"sources": ["seed1", "seed2"]})  # nothing is saved: the folder is never made
    n = args.requests
    yaws = [-45 + 90 * k / (n - 1) for k in range(n)]
    cases = {
        "drag (preview)": [{"yaw": y, "quality": "preview"} for y in yaws],
        "rest (full)": [{"yaw": y, "quality": "full"} for y in yaws],
        "scrub (preview, new planes)": [{"mix": round(0.02 + 0.96 * k / (n - 1), 2), "quality": "preview"}
                                        for k in range(n)],
    }
    with server.running(app) as url, requests.Session() as session:
        timed(session, url, token, [{"quality": "full"}, {"quality": "preview"}], "warmup")  # planes of mix 0
        results = {case: timed(session, url, token, queries, f"case{k}")
                   for k, (case, queries) in enumerate(cases.items())}
    print(f"base {name}, device {args.device}, threads {args.threads}, torch {torch.__version__}, "
          f"image {G.img_resolution} px, neural render {G.neural_rendering_resolution} px, {n} requests per case")
    print("| case | wall median ms | wall p90 ms | wall best ms | frames/s (median) | CPU median ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for case, times in results.items():
        wall = sorted(w for w, _ in times)
        median = statistics.median(wall)
        print(f"| {case} | {median:.0f} | {wall[int(0.9 * (len(wall) - 1))]:.0f} | {wall[0]:.0f} | "
              f"{1000 / median:.1f} | {statistics.median(c for _, c in times):.0f} |")


if __name__ == "__main__":
    main()
