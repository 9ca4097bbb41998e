"""CPU threads under load: one workload in fresh processes, OpenMP's default wait policy vs PASSIVE.

    python bench/threads_bench.py --load 2 --rounds 3            # MTCNN on a 512x1024 photo
    python bench/threads_bench.py --workload render --load 2     # one tiny-config view

Each round runs the workload once per policy, alternating, each in a new Python process (libgomp
reads OMP_WAIT_POLICY when torch loads, so a process cannot switch). "default" is OpenMP's own
setting (idle threads spin a while before sleeping); "PASSIVE" is what the `my3dgen` CLI sets at
start (devices.cpu_thread_env). --load K starts K CPU-bound busy loops beside it for the whole run
(the issue's "two other CPU-bound processes"); --load 0 is whatever the machine already runs.
Prints the best and median seconds per call of each, with the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "faces": (
        "import numpy as np; from skimage import data; from my3dgen_cli.faces.detect import default_detector\n"
        "img = np.concatenate([data.astronaut()] * 2, 1); d = default_detector(); d.detect(img)\n"
        "call = lambda: d.detect(img)\n"
    ),
    "render": (
        "import torch; from my3dgen_cli.eg3d import build_generator; from my3dgen_cli.eg3d.camera import "
        "frontal_camera, lookat_camera\n"
        "torch.manual_seed(0); G = build_generator('tiny').eval(); c = lookat_camera([20.0], 5.0)\n"
        "torch.set_grad_enabled(False); ws = G.mapping(torch.randn(1, G.z_dim), frontal_camera(1))\n"
        "call = lambda: G.synthesis(ws, c); call()\n"
    ),
}
TIMER = ("import time\nts = []\nfor _ in range({calls}):\n"
         "    t = time.perf_counter(); call(); ts.append(time.perf_counter() - t)\nprint(min(ts))\n")


def run_once(workload: str, policy: str, calls: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = str(ROOT)
    code = WORKLOADS[workload] + TIMER.format(calls=calls)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="faces")
    ap.add_argument("--load", type=int, default=2, help="busy processes to start beside it")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3, help="timed calls per process (its best is kept)")
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    try:
        times: dict[str, list[float]] = {"default": [], "PASSIVE": []}
        for _ in range(args.rounds):
            for policy in times:
                times[policy].append(run_once(args.workload, policy, args.calls))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"workload {args.workload}, {len(os.sched_getaffinity(0))} cores allowed, {args.load} busy processes "
          f"started, load average {os.getloadavg()[0]:.1f}; seconds per call, {args.rounds} processes each")
    print("| OMP_WAIT_POLICY | best | median |")
    print("|---|---:|---:|")
    for policy, ts in times.items():
        print(f"| {policy} | {min(ts):.3f} | {statistics.median(ts):.3f} |")


if __name__ == "__main__":
    main()
