"""Commands under load: `my3dgen demo` and `my3dgen faces` quiet vs beside K CPU-bound busy loops.

    python bench/load_bench.py                                   # demo (full) and faces, 2 busy loops, 2 rounds
    python bench/load_bench.py --workloads demo-fast --rounds 1  # quicker: the test suite's demo
    python bench/load_bench.py --workloads faces --load 2 --rounds 3

Each round runs every workload twice in fresh `python -m my3dgen_cli` processes (the real CLI: its
thread settings, a fresh MY3DGEN_HOME each time): first as the machine is, then with --load K
processes spinning `while True: pass` beside it (the issue's "two other CPU-bound processes";
started just before, killed right after). Prints wall seconds (best and median over the rounds), the
loaded/quiet ratio, the demo's own stage times (personalize is the one that trains), the load
average before each run and the cores this process may use. The goal (#17): ratio <= 3 with 2 busy
loops. Run it on an otherwise idle machine for the quiet column to mean quiet; on a shared one,
"quiet" is whatever else runs (the load average column says how much).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("demo", "demo-fast", "faces")


def write_photos(folder: Path, count: int) -> Path:
    """`count` copies of scikit-image's astronaut side by side with itself (512 x 1024, one face each)."""
    import numpy as np
    from skimage import data

    from my3dgen_cli.media import write_png

    folder.mkdir(parents=True, exist_ok=True)
    photo = np.concatenate([data.astronaut()] * 2, 1)
    for k in range(count):
        write_png(folder / f"photo{k}.png", photo)
    return folder


def command_for(workload: str, work: Path, photos: Path) -> list[str]:
    cli = [sys.executable, "-m", "my3dgen_cli"]
    if workload.startswith("demo"):
        return [*cli, "demo", "-o", str(work / "out"), "--json", *(["--fast"] if workload == "demo-fast" else [])]
    return [*cli, "faces", str(photos), "-o", str(work / "crops"), "--json"]


def run_once(workload: str, photos: Path) -> tuple[float, dict[str, float], float]:
    """(wall seconds, the demo's stage seconds (empty for faces), load average at the start)."""
    with tempfile.TemporaryDirectory(prefix="my3dgen-load-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MY3DGEN_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        done = subprocess.run(command_for(workload, work, photos), env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{workload} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        stages = json.loads(done.stdout).get("stages", {}) if workload.startswith("demo") else {}
    return wall, stages, load


def busy_loops(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="demo,faces", help=f"comma-separated, of {', '.join(WORKLOADS)}")
    ap.add_argument("--load", type=int, default=2, help="busy loops beside the loaded run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--photos", type=int, default=3, help="photos for `faces`")
    args = ap.parse_args()
    workloads = args.workloads.split(",")
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: got {unknown[0]!r}, expected some of {', '.join(WORKLOADS)}")
    runs: dict[tuple[str, str], list[tuple[float, dict[str, float], float]]] = {}
    with tempfile.TemporaryDirectory(prefix="my3dgen-load-photos-") as tmp:
        photos = write_photos(Path(tmp), args.photos)
        for _ in range(args.rounds):
            for workload in workloads:
                runs.setdefault((workload, "quiet"), []).append(run_once(workload, photos))
                busy = busy_loops(args.load)
                try:
                    time.sleep(1.0)  # let the loops reach the scheduler before timing
                    runs.setdefault((workload, "loaded"), []).append(run_once(workload, photos))
                finally:
                    stop(busy)
    print(f"commit {commit()}, {len(os.sched_getaffinity(0))} cores allowed, {args.load} busy loops in the loaded "
          f"runs, {args.rounds} rounds (quiet and loaded alternating); wall seconds")
    print()
    print("| workload | quiet best | quiet median | load avg (quiet) | loaded best | loaded median | "
          "load avg (loaded) | loaded / quiet (median) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for workload in workloads:
        quiet, loaded = runs[(workload, "quiet")], runs[(workload, "loaded")]
        q = statistics.median(w for w, _, _ in quiet)
        m = statistics.median(w for w, _, _ in loaded)
        print(f"| {workload} | {min(w for w, _, _ in quiet):.1f} | {q:.1f} | "
              f"{statistics.mean(a for _, _, a in quiet):.1f} | {min(w for w, _, _ in loaded):.1f} | {m:.1f} | "
              f"{statistics.mean(a for _, _, a in loaded):.1f} | {m / q:.2f} |")
    for workload in (w for w in workloads if w.startswith("demo")):
        print()
        print(f"{workload} stages (median seconds): | stage | quiet | loaded | ratio |")
        print("|---|---:|---:|---:|")
        for stage in runs[(workload, "quiet")][0][1]:
            q = statistics.median(s.get(stage, float("nan")) for _, s, _ in runs[(workload, "quiet")])
            m = statistics.median(s.get(stage, float("nan")) for _, s, _ in runs[(workload, "loaded")])
            print(f"| {stage} | {q:.1f} | {m:.1f} | {m / q if q else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
