"""Training step, this tree vs a baseline checkout: mean wall and CPU seconds per step, symmetry steps included.

    python bench/train_step_ab.py --baseline /path/to/main --config tiny --steps 16 --rounds 3
    python bench/train_step_ab.py --baseline /path/to/main --config ffhq512-128 --steps 4 --rounds 1 --photos 4

Each round trains an adapter once with each tree, alternating, in fresh processes (PYTHONPATH picks the tree;
the same Python and torch): 10 synthetic photos of the bench's random face, batch 2, PersonalizeConfig's
defaults otherwise (symmetry every 4th step, by MSE here since no loss network is loaded), one warm-up step,
then --steps timed steps. Unlike personalize_speed.py's best step, the mean counts the symmetry steps, which is
where the trees may differ; the best plain (non-symmetry) step is printed beside it, and the median plain and
symmetry steps (each the best median over the rounds). Prints each tree's best mean over the rounds, the ratio,
the last step's loss (the same data and seed in both trees) and the load average. CPU seconds count the training
twin's (personalize/twin.py) beside the process's own. --demo-malloc: both trees with the heap settings `my3dgen
demo` sets (devices.keep_freed_memory): without them glibc may return and re-fault a step's large blocks every
step, depending on what ran before (a tiny view took 51 ms instead of 44 ms after a different warm-up).
--photos: fewer synthetic photos (rendered once per process, without autograd: at full size each costs seconds;
the step trains on 2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import copy, multiprocessing, os, statistics, sys, time
import torch
sys.path.insert(0, os.path.join({root!r}, "bench"))
from personalize_speed import photos_of
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.personalize.training import train_adapter
torch.set_num_threads({threads})
torch.manual_seed(0)
G = build_generator({config!r})
images, raws, cams, ws = photos_of(G, {photos})
def cpu_seconds():  # this process's CPU time and its children's (the training twin), while they run
    total = time.process_time()
    for child in multiprocessing.active_children():
        try:
            fields = open(f"/proc/{{child.pid}}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total
times, last = [], [time.perf_counter(), cpu_seconds()]
def on_step(step, record):
    now = [time.perf_counter(), cpu_seconds()]
    times.append((now[0] - last[0], now[1] - last[1], "sym" in record))
    last[:] = now
config = PersonalizeConfig(steps={steps} + 1, batch=2, checkpoint_every=0)
result = train_adapter(copy.deepcopy(G), images, cams, ws, config, raw_images=raws, on_step=on_step)
timed = times[1:]
plains = [t for t, _, sym in timed if not sym] or [float("nan")]
syms = [t for t, _, sym in timed if sym] or [float("nan")]
print(statistics.mean(t for t, _, _ in timed), statistics.mean(c for _, c, _ in timed), min(plains),
      statistics.median(plains), statistics.median(syms), result.log[-1]["loss"])
"""


def run(tree: Path, args: argparse.Namespace) -> tuple[float, ...]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it
    if args.demo_malloc:  # the demo's glibc settings (devices.keep_freed_memory), the same for both trees
        env.update(MALLOC_MMAP_THRESHOLD_=str(256 << 20), MALLOC_TRIM_THRESHOLD_=str(512 << 20))
    code = CHILD.format(root=str(ROOT), threads=args.threads, config=args.config, steps=args.steps,
                        photos=args.photos)
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr.strip()[-2000:]}")
    return tuple(float(x) for x in done.stdout.split()[-6:])  # mean wall, mean CPU, best/median plain, median sym, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--photos", type=int, default=10, help="synthetic photos to train on (>= 2)")
    ap.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))))
    ap.add_argument("--demo-malloc", action="store_true",
                    help="both trees with the demo's glibc heap settings (freed memory kept for reuse)")
    args = ap.parse_args()
    trees = {"baseline": args.baseline.resolve(), "this tree": ROOT}
    runs: dict[str, list[tuple[float, ...]]] = {name: [] for name in trees}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(run(tree, args))
    load.append(os.getloadavg()[0])
    print(f"config {args.config}, batch 2, {args.photos} photos, {args.steps} timed steps (symmetry every 4th "
          f"included), threads {args.threads}, {args.rounds} rounds alternating"
          f"{', demo malloc settings' if args.demo_malloc else ''}; load average {load[0]:.1f} -> {load[1]:.1f}")
    print("| tree | wall s/step | CPU s/step | best plain step (wall) | vs baseline (wall) | vs baseline (CPU) "
          "| vs baseline (plain) | median plain / symmetry step | last loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = [min(r[i] for r in runs["baseline"]) for i in range(3)]
    for name, rs in runs.items():
        wall, cpu, plain = (min(r[i] for r in rs) for i in range(3))
        medians = f"{min(r[3] for r in rs):.3f} / {min(r[4] for r in rs):.3f}"
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {plain:.3f} | {wall / base[0]:.2f}x | {cpu / base[1]:.2f}x "
              f"| {plain / base[2]:.2f}x | {medians} | {rs[0][5]:.6f} |")


if __name__ == "__main__":
    main()
