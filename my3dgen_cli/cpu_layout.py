"""Which memory layout makes this CPU's large convolutions faster, measured once per machine and remembered.

oneDNN's fp32 convolutions run NCHW input through one set of kernels and NHWC (channels_last) through
another, and which wins depends on the CPU: a full-size view rendered in NHWC took 0.76x the NCHW time
on an AVX2 AMD EPYC (Zen 3) and 0.84-0.95x on an AVX-512 one, while an Intel machine of an earlier
session measured 1.23x (docs/benchmarks.md). So the layout is not guessed from the CPU's name: the
first full-size render on a CPU times one upsampling and one plain convolution of the superresolution's
kind in both layouts (about half a second) and stores the answer in the cache, keyed by the CPU model
and vector ISA, the torch version and the thread count. `--channels-last/--no-channels-last` overrides it.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TUNING_FORMAT = "my3dgen-cpu-layout/1"
TUNING_FILE = "cpu-conv-layout.json"
MAX_TUNING_BYTES = 1 << 20  # a few entries per machine; anything larger is not ours
NHWC_MARGIN = 0.95  # NHWC must be at least 5 % faster: a tie keeps torch's own default layout
TIMING_ROUNDS = 3

_decided: dict[str, bool] = {}


def tuning_path() -> Path:
    from my3dgen_cli import paths

    return paths.cache_dir() / "tuning" / TUNING_FILE


@functools.lru_cache(maxsize=1)
def _cpu_model() -> str:
    """The CPU's model name, read once per process (/proc/cpuinfo is long on many-core machines)."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return model or platform.processor() or platform.machine() or "unknown cpu"


def machine_key() -> str:
    """What the measurement depends on: the CPU model and its vector ISA (as torch dispatches on it: a
    cluster's nodes may share a cache and a model name), the torch (so oneDNN) version, the thread count."""
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{_cpu_model()} | {isa} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_layouts(rounds: int = TIMING_ROUNDS) -> tuple[float, float]:
    """Best seconds of (NCHW, NHWC) for a 2x-upsampling 3x3 conv (128 -> 64 channels, 128 -> 256 px) and a
    3x3 conv at 256 px: the superresolution's kind of work, at a quarter of its size. Alternating rounds."""
    from my3dgen_cli.eg3d import ops

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 128, 128, 128, generator=gen)
    w_up, w = torch.randn(64, 128, 3, 3, generator=gen), torch.randn(64, 64, 3, 3, generator=gen)
    blur = ops.setup_filter([1, 3, 3, 1])
    inputs = {nhwc: ops.nhwc(x, nhwc) for nhwc in (False, True)}  # a render's activations arrive in its layout

    def pair(nhwc: bool) -> None:
        y = ops.conv2d(inputs[nhwc], w_up, 2, blur, channels_last=nhwc)  # weights laid out per call, as modulated
        F.conv2d(y, ops.nhwc(w, nhwc), padding=1)

    best = {False: float("inf"), True: float("inf")}
    with torch.no_grad():
        for round_index in range(rounds + 1):  # round 0 warms up: oneDNN builds its kernels on first use
            for nhwc in (False, True):
                start = time.perf_counter()
                pair(nhwc)
                if round_index:
                    best[nhwc] = min(best[nhwc], time.perf_counter() - start)
    return best[False], best[True]


def _read_entries(path: Path) -> dict[str, Any]:
    """The stored measurements; {} for a missing, oversized, unreadable or foreign file (measured again).

    Only a regular file is opened (a FIFO or a link to /dev/zero would block or never end), and no more
    than MAX_TUNING_BYTES of it is read."""
    try:
        if not path.is_file():
            return {}
        with path.open("rb") as stored:
            raw = stored.read(MAX_TUNING_BYTES + 1)
        if len(raw) > MAX_TUNING_BYTES:
            return {}
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != TUNING_FORMAT or not isinstance(doc.get("machines"), dict):
        return {}
    return {key: entry for key, entry in doc["machines"].items()
            if isinstance(entry, dict) and isinstance(entry.get("nhwc"), bool)}


def _store(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add `entry` atomically; best effort (a read-only cache only means measuring again next time)."""
    from my3dgen_cli.errors import UserInputError
    from my3dgen_cli.fileio import write_bytes_atomic

    entries = _read_entries(path)
    entries[key] = entry
    doc = {"format": TUNING_FORMAT, "machines": entries}
    try:
        write_bytes_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    except (OSError, UserInputError):
        pass


def cpu_prefers_nhwc() -> bool:
    """True when this CPU runs the superresolution's convolutions at least 5 % faster in NHWC.

    Decided once per process and machine key: from the cache when measured before, else by
    `time_layouts` now (then stored).
    """
    key = machine_key()
    if key in _decided:
        return _decided[key]
    path = tuning_path()
    entry = _read_entries(path).get(key)
    if entry is None:
        nchw_s, nhwc_s = time_layouts()
        entry = {"nhwc": nhwc_s < NHWC_MARGIN * nchw_s, "nchw_s": round(nchw_s, 5), "nhwc_s": round(nhwc_s, 5),
                 "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        _store(path, key, entry)
    _decided[key] = bool(entry["nhwc"])
    return _decided[key]
