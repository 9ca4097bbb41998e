"""Verify every GPU promise of docs/scale.md on the GPU(s) this machine has, in one command.

    PYTHONPATH=. python bench/gpu_selfcheck.py --out selfcheck/                  # full size, ~4-6 min on one GPU
    PYTHONPATH=. python bench/gpu_selfcheck.py --device cpu --quick --out /tmp/sc  # tiny config, on a CPU

Checks, run in this order, each in its own process under its own time cap (a failing, crashing or
slow check does not stop the others; the whole run stays within --budget-s, default 540 s):

  parity       tiny and ffhq512-128 (random weights, seed 0): CUDA fp32 vs CPU fp32 (TF32 off, and
               torch's default flags: cuDNN TF32 on); bf16 and fp16 autocast vs CUDA fp32, against stated limits
  render       seconds per view and peak memory: neural res 64/128, batch 1/8, fp32/bf16/fp16
  personalize  seconds per training step (fp32, bf16, fp16 + GradScaler, activation checkpointing),
               peak memory, projected minutes per identity for each --budget
  cli          the real CLI: personalize -> invert -> render --amp fp16 -> export onnx, offline
  nccl         with >= 2 GPUs: torchrun 2 ranks personalize = 1 process; 1 GPU: skipped (NCCL smoke only)
  compile      torch.compile (inductor) vs eager: max diff, compile seconds, speedup per view

Prints a pass/fail table and every number (markdown); --out DIR also gets gpu_selfcheck.json,
gpu_selfcheck.md (rewritten after each check: a run cut short still leaves a report) and
checks/logs/<check>.log. Statuses: pass, fail (a number beyond its limit), skip (does not apply
here, e.g. NCCL on one GPU), error (crashed), timeout (killed at its cap; numbers so far kept),
not run (the budget was spent). Exit 0 when every check passed or was skipped, 1 otherwise, 2 when
the requested device is missing or an argument is wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python bench/gpu_selfcheck.py` from a checkout, PYTHONPATH or not

# name: (title, seconds cap full size, seconds cap --quick)
CHECKS: dict[str, tuple[str, int, int]] = {
    "parity": ("CUDA vs CPU fp32; bf16 / fp16 autocast vs fp32", 120, 90),
    "render": ("render time per view and peak memory", 120, 90),
    "personalize": ("training step time, peak memory, minutes per identity", 180, 120),
    "cli": ("CLI end to end: personalize, invert, render --amp, export onnx", 180, 300),
    "nccl": ("torchrun NCCL: 2 ranks = 1 process", 150, 60),
    "compile": ("torch.compile (inductor) vs eager", 300, 300),
}
MIN_CAP_S = 20  # a check is not started with less time than this left in the run's budget
GRACE_S = 20  # after its cap, a check's process group is killed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    ap.add_argument("--quick", action="store_true", help="tiny config only (seconds; the CPU test's mode)")
    ap.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_selfcheck.json / .md and logs/")
    ap.add_argument("--budget-s", type=float, default=540.0, help="seconds for the whole run (default 540)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cap-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        ap.error(f"--checks: got {args.checks!r}, expected a comma-separated subset of {', '.join(CHECKS)}")
    args.checks = names
    if not (args.device == "cpu" or args.device == "cuda" or
            (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        ap.error(f"--device: got {args.device!r}, expected cuda, cuda:N or cpu")
    return args


# --- the child: one check ----------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    import torch

    from bench.selfcheck_core import Ctx, run_check

    if args.child in ("cli", "nccl"):
        from bench import selfcheck_pipeline as module
    else:
        from bench import selfcheck_numerics as module
    fn = getattr(module, f"check_{args.child}")
    ctx = Ctx(torch.device(args.device), args.quick, time.monotonic() + args.cap_s - 5, args.result)
    if args.child == "compile":
        result = run_check(lambda c: fn(c, backend=args.compile_backend), ctx)
    else:
        result = run_check(fn, ctx)
    return 0 if result["status"] in ("pass", "skip") else 1


# --- the parent: all checks, the report --------------------------------------------------------


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(), "cpu cores": os.cpu_count(), "commit": git_commit(),
        "packages": {m: importlib.util.find_spec(m) is not None for m in ("lpips", "platformdirs", "mtcnn",
                                                                          "onnxruntime")},
        "device": device, "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    return env


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def spawn(name: str, cap: float, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one check in its own process group; kill the group at cap + GRACE_S. Its result, partial or not."""
    result_path, log_path = work / f"{name}.json", work / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--device", args.device,
           "--result", str(result_path), "--cap-s", str(cap)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--compile-backend", args.compile_backend] if args.compile_backend else []
    from bench.selfcheck_core import child_env

    env = child_env(PYTHONUNBUFFERED="1", MY3DGEN_OFFLINE="1")  # the checks never need the network
    timed_out = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=cap + GRACE_S)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):  # the check's own group: torchrun ranks, compile workers
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {"status": "running", "summary": "", "expects": [], "numbers": {}, "tables": {}, "notes": [],
                  "error": None}
    if timed_out:
        result["status"] = "timeout"
        result["summary"] = f"killed at its {cap:.0f} s cap (+{GRACE_S} s); numbers so far kept. " + result["summary"]
    elif result["status"] == "running":
        result["status"] = "error"
        result["error"] = result["error"] or f"exit {rc}: {tail(log_path)}"
    result["log"] = str(log_path)
    return result


def tail(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][-300:] if lines else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_selfcheck: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "try --device cpu --quick", file=sys.stderr)
        return 2
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        print(f"gpu_selfcheck: no CUDA device {args.device} ({torch.cuda.device_count()} visible)", file=sys.stderr)
        return 2
    from bench.selfcheck_report import markdown, write_report

    t0 = time.monotonic()
    report: dict[str, Any] = {
        "tool": "bench/gpu_selfcheck.py", "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python bench/gpu_selfcheck.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": "quick (tiny config)" if args.quick else "full size (ffhq512-128)",
        "environment": environment(args.device), "checks": [], "ok": None, "seconds": 0.0,
    }
    work = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="gpu_selfcheck-"))
    work.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(args.checks, 1):
        title, cap_full, cap_quick = CHECKS[name]
        cap = min(cap_quick if args.quick else cap_full, args.budget_s - (time.monotonic() - t0) - GRACE_S)
        print(f"[{i}/{len(args.checks)}] {name}: {title} (cap {max(cap, 0):.0f} s) ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        if cap < MIN_CAP_S:
            result = {"status": "not run", "summary": "the run's --budget-s is spent", "expects": [],
                      "numbers": {}, "tables": {}, "notes": [], "error": None}
        else:
            result = spawn(name, cap, args, work / "checks")
        result.update(name=name, title=title, seconds=round(time.monotonic() - start, 1), cap_s=round(max(cap, 0)))
        report["checks"].append(result)
        report["seconds"] = round(time.monotonic() - t0, 1)
        report["ok"] = all(c["status"] in ("pass", "skip") for c in report["checks"])
        print(f"    {result['status']} ({result['seconds']:.0f} s) {result['summary']}", file=sys.stderr, flush=True)
        if args.out is not None:
            write_report(report, args.out)
    print(markdown(report), end="")
    if args.out is not None:
        print(f"report: {args.out / 'gpu_selfcheck.md'} and .json", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
