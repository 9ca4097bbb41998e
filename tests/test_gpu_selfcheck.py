"""bench/gpu_selfcheck.py, the one-command GPU verification, in its CPU mode (--device cpu --quick).

The cheap checks (parity, render, personalize) run for real as a user runs them, each in its own process; the
report's structure and verdicts are asserted. Without a GPU, `--device cuda` must refuse in one line.
The slow ones (cli ~1 min, compile ~2 min on a CPU; nccl skips without GPUs) are run by hand: docs/scale.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_selfcheck.py"


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_in_one_line():
    proc = _run("--device", "cuda", "--quick")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_bad_check_name_is_refused():
    proc = _run("--device", "cpu", "--checks", "parity,warp")
    assert proc.returncode == 2 and "--checks" in proc.stderr and "warp" in proc.stderr


def test_quick_cpu_checks_pass_and_report(tmp_path):
    out = tmp_path / "report"
    proc = _run("--device", "cpu", "--quick", "--checks", "parity,render,personalize", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads((out / "gpu_selfcheck.json").read_text())
    assert report["ok"] is True and report["environment"]["device"] == "cpu"
    assert [c["name"] for c in report["checks"]] == ["parity", "render", "personalize"]
    for check in report["checks"]:
        assert check["status"] == "pass", check
        assert check["expects"] and all(e["ok"] for e in check["expects"]), check["expects"]
        assert check["seconds"] > 0 and check["error"] is None and Path(check["log"]).is_file()
    parity, render, personalize = report["checks"]
    bf16 = [e for e in parity["expects"] if "bf16" in e["what"] and "max" in e["what"]]
    assert len(bf16) == 1 and 0 < bf16[0]["value"] <= bf16[0]["limit"] == 0.15  # autocast really changed something
    rows = render["tables"]["render"]
    assert [(r["neural res"], r["batch"]) for r in rows] == [(16, 1), (32, 1), (16, 2), (32, 2)]
    assert all(r["fp32 s/view"] > 0 and r["bf16 s/view"] > 0 and r["fp32 peak MiB"] is None for r in rows)
    steps = personalize["tables"]["steps"]
    assert [r["variant"] for r in steps] == ["fp32", "bf16", "activation checkpointing"]  # fp16: CUDA only
    assert all(r["s/step"] > 0 for r in steps)
    budgets = {r["budget"]: r["fp32 min"] for r in personalize["tables"]["identity (10 photos, projected)"]}
    assert list(budgets) == ["quick", "standard", "paper"] and 0 < budgets["quick"] < budgets["paper"]
    md = (out / "gpu_selfcheck.md").read_text()
    assert md == proc.stdout  # the printed report is the written one
    assert "| 1 | parity | PASS |" in md and "| 3 | personalize | PASS |" in md and "result: PASS" in md


def test_a_check_that_fails_or_crashes_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    from bench import gpu_selfcheck
    from bench.selfcheck_core import Ctx, run_check

    def ctx() -> Ctx:
        return Ctx(torch.device("cpu"), True, float("inf"), tmp_path / "r.json")

    assert run_check(lambda c: c.expect("x", 1.0, 0.5), ctx())["status"] == "fail"
    assert run_check(lambda c: c.expect("x", float("nan"), 0.5), ctx())["status"] == "fail"
    assert run_check(lambda c: c.skip("not here"), ctx())["status"] == "skip"
    crashed = run_check(lambda c: 1 / 0, ctx())
    assert crashed["status"] == "error" and crashed["error"] == "ZeroDivisionError: division by zero"
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "error"  # what the parent reads

    seen = []

    def fake_spawn(name, cap, args, work):
        seen.append((name, cap))
        status = {"parity": "error", "render": "timeout"}.get(name, "pass")
        return {"status": status, "summary": status, "expects": [], "numbers": {}, "tables": {}, "notes": [],
                "error": "boom" if status == "error" else None}

    monkeypatch.setattr(gpu_selfcheck, "spawn", fake_spawn)
    rc = gpu_selfcheck.main(["--device", "cpu", "--quick", "--out", str(tmp_path / "out"), "--budget-s", "200"])
    assert rc == 1 and [n for n, _ in seen] == list(gpu_selfcheck.CHECKS)[:len(seen)]
    report = json.loads((tmp_path / "out" / "gpu_selfcheck.json").read_text())
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses["parity"] == "error" and statuses["render"] == "timeout" and statuses["personalize"] == "pass"
    assert len(report["checks"]) == 6 and "| 1 | parity | ERROR |" in capsys.readouterr().out
    # A budget that leaves no check its minimum: nothing started, each "not run", and the run fails.
    seen.clear()
    assert gpu_selfcheck.main(["--device", "cpu", "--quick", "--checks", "parity,cli", "--budget-s", "30"]) == 1
    assert seen == [] and "| 2 | cli | NOT RUN |" in capsys.readouterr().out


def test_a_check_past_its_cap_is_killed_and_reported_as_timeout(tmp_path, monkeypatch):
    from bench import gpu_selfcheck

    monkeypatch.setattr(gpu_selfcheck, "GRACE_S", 0)
    args = gpu_selfcheck.parse_args(["--device", "cpu", "--quick"])
    start = time.monotonic()
    result = gpu_selfcheck.spawn("render", 1.0, args, tmp_path)  # 1 s: killed while still importing torch
    assert time.monotonic() - start < 10
    assert result["status"] == "timeout" and "killed at its 1 s cap" in result["summary"]
    assert Path(result["log"]).is_file()
