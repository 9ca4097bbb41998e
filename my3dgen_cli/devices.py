"""Device and CPU-thread choice for commands. Library code takes devices from its tensors; only the CLI picks one.

torch is imported inside the functions: `cpu_thread_env` runs at CLI start, before anything loads torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

from my3dgen_cli.errors import UserInputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def cpu_thread_env(environ: MutableMapping[str, str] = os.environ) -> None:
    """Before torch loads: idle OpenMP threads sleep at once instead of spinning (OMP_WAIT_POLICY=PASSIVE).

    OpenMP's default keeps a finished thread spinning for a while, waiting for the next parallel op.
    On a loaded machine the spinners steal the cores the working threads need, and every op waits for
    a thread the scheduler parked: MTCNN on a 2-core box under load took 2.5-4 s per photo with 2
    spinning threads, 0.6-0.8 s with passive ones (docs/benchmarks.md). libgomp reads the variable
    when torch loads it, so this must run first; a value the user set is kept.
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """glibc: serve allocations below `mmap_threshold` from the heap and keep up to `trim_threshold` of freed
    memory there for reuse (mallopt), instead of returning it to the kernel and faulting it in again.

    Why: a small model's training allocates and frees the same few-MB tensors thousands of times; with glibc's
    defaults many of them are fresh pages each time, which the kernel must map and zero. For the tiny demo
    this halved its ~1 M minor page faults and cut its system time by a third (docs/benchmarks.md), for
    ~7 % more peak memory. Only the demo asks for it (a full-size run's peak memory matters more). Kept as
    they are when the user set glibc's own variables; False where there is no glibc (macOS, musl).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def pick_device(name: str = "auto") -> torch.device:
    """"auto" = CUDA if available, else MPS, else CPU. An unavailable explicit choice is an error.

    On the CPU, torch then runs as many threads as this process may use (speed.use_all_cores).
    """
    import torch

    if name not in DEVICE_CHOICES and not re.fullmatch(r"cuda:\d+", name):
        raise UserInputError(f"--device: got {name!r}, expected one of {', '.join(DEVICE_CHOICES)} or cuda:N")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda") and not cuda:
        raise UserInputError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
    if name == "mps" and not mps:
        raise UserInputError("--device mps: Apple MPS is not available on this machine (try --device cpu)")
    device = torch.device(name)
    if device.index is not None:
        check_gpu_index(device.index, f"--device {name}")
    if device.type == "cuda":
        exact_fp32_on_cuda()
    if device.type == "cpu":
        from my3dgen_cli.speed import use_all_cores

        use_all_cores()
    return device


def exact_fp32_on_cuda() -> None:
    """Turn TF32 off so fp32 on a GPU is fp32, as the official EG3D scripts do.

    cuDNN convolutions run in TF32 (10-bit mantissa) by default, which moves images by ~1e-3
    and breaks parity with the published model; `--amp` is the speed path. MY3DGEN_TF32=1 keeps
    torch's defaults for users who prefer TF32's speed.
    """
    if os.environ.get("MY3DGEN_TF32", "") == "1":
        return
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def check_gpu_index(index: int, what: str) -> None:
    """A CUDA index beyond the visible GPUs fails deep inside CUDA; say so in one line instead."""
    import torch

    count = torch.cuda.device_count()
    if index >= count:
        raise UserInputError(f"{what}: got GPU {index}, but this machine shows {count} GPU(s) "
                             f"(indices 0..{count - 1}; CUDA_VISIBLE_DEVICES narrows them)")
