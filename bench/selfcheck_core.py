"""What every check of bench/gpu_selfcheck.py shares: its context (limits, device, partial results) and helpers.

A check is a function `check(ctx)` run in its own process. It records numbers, tables and
expectations (a value against a stated limit) on `ctx`; every record is written to the result file
at once, so a check killed at its time cap still reports what it measured. Status: "fail" when an
expectation fails, else "pass"; `ctx.skip(reason)` ends it as "skip"; an exception is "error".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.fileio import write_text_atomic

ROOT = Path(__file__).resolve().parents[1]

# Pass limits, max / mean abs difference on images in [-1, 1] (None = not checked), with their source.
TOLERANCES: dict[str, tuple[float, float | None, str]] = {
    "fp32": (1e-3, None, "the EG3D parity fixture's tolerance (same math, other summation order)"),
    "tf32": (0.02, None, "TF32 keeps fp16's 10 mantissa bits: fp16's limit"),
    "bf16": (0.15, 0.02, "scale.md / tests/test_scale_speed.py (docs table: ~0.05)"),
    "fp16": (0.02, 0.003, "scale.md / tests/test_device_hygiene.py (docs table: ~0.005)"),
    "compile": (1e-4, None, "scale.md: compiled 'to ~1e-5'"),
}
LOSS_AMP_ATOL = 0.005  # scale.md: bf16 "each step's loss within 0.005" of fp32
LOSS_EXACT_RTOL = 1e-4  # activation checkpointing recomputes the same math
NCCL_ADAPTER_ATOL = 1e-3  # gloo on CPU: 2e-5; GPU kernels (TF32, atomics) are less reproducible
MINUTES_LIMIT = 30.0  # "an identity of 10 photos in minutes": --budget paper projected under this


def child_env(**extra: str) -> dict[str, str]:
    """This environment with the checkout first on PYTHONPATH: subprocesses import this my3dgen_cli and bench."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


class Skipped(Exception):
    """Raised by ctx.skip: the check does not apply here (e.g. NCCL with one GPU)."""


@dataclass
class Ctx:
    device: torch.device
    quick: bool
    deadline: float  # time.monotonic() after which optional parts are left out
    result_path: Path | None = None
    result: dict[str, Any] = field(default_factory=lambda: {
        "status": "running", "summary": "", "expects": [], "numbers": {}, "tables": {}, "notes": [], "error": None})

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def save(self) -> None:
        if self.result_path is not None:
            write_text_atomic(self.result_path, json.dumps(self.result, indent=1, default=str))

    def expect(self, what: str, value: float, limit: float, source: str = "") -> bool:
        """Record `value <= limit` (NaN fails)."""
        ok = bool(math.isfinite(value) and value <= limit)
        self.result["expects"].append({"what": what, "value": value, "limit": limit, "ok": ok, "source": source})
        self.save()
        return ok

    def expect_true(self, what: str, ok: bool, value: Any = None) -> bool:
        self.result["expects"].append({"what": what, "value": value, "limit": None, "ok": bool(ok), "source": ""})
        self.save()
        return bool(ok)

    def number(self, key: str, value: Any) -> None:
        self.result["numbers"][key] = value
        self.save()

    def row(self, table: str, row: dict[str, Any]) -> None:
        self.result["tables"].setdefault(table, []).append(row)
        self.save()

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self.save()

    def summary(self, text: str) -> None:
        self.result["summary"] = text
        self.save()

    def skip(self, reason: str) -> None:
        self.result["summary"] = reason
        raise Skipped(reason)


def run_check(fn: Callable[[Ctx], None], ctx: Ctx) -> dict[str, Any]:
    """Run one check; its status from what it recorded. Exceptions become status "error" (one line)."""
    import traceback

    try:
        fn(ctx)
        failed = [e for e in ctx.result["expects"] if not e["ok"]]
        ctx.result["status"] = "fail" if failed else "pass"
        if failed and not ctx.result["summary"]:
            ctx.result["summary"] = f"{len(failed)} of {len(ctx.result['expects'])} expectations failed"
    except Skipped:
        ctx.result["status"] = "skip"
    except Exception as exc:  # noqa: BLE001 - a check's failure must not stop the report
        ctx.result["status"] = "error"
        ctx.result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        ctx.result["traceback"] = traceback.format_exc()[-4000:]
    ctx.save()
    return ctx.result


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for cuBLAS matmuls and cuDNN convolutions (torch's defaults: off and on), restored on exit."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def reset_peak(ctx: Ctx) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)


def peak_mib(ctx: Ctx) -> float | None:
    """torch.cuda.max_memory_allocated since the last reset_peak, MiB (None off CUDA)."""
    if not ctx.cuda:
        return None
    torch.cuda.synchronize(ctx.device)
    return round(torch.cuda.max_memory_allocated(ctx.device) / 2**20, 1)


def max_mean_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.detach().float().cpu() - b.detach().float().cpu()).abs()
    return float(d.max()), float(d.mean())


def all_finite(out: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in out.values())
