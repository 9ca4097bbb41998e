"""Hand the C heap's free pages back to the OS between the stages of a large CPU view.

glibc keeps freed blocks below its mmap threshold (which rises to 32 MiB as tensors are freed) in its
heap, resident, for reuse. A stage's blocks rarely fit the next stage's sizes, so a full-size view's
peak memory was its live tensors plus ~100-250 MiB of such free pages (docs/benchmarks.md).
`malloc_trim(0)` returns every whole free page (since glibc 2.8, not only the heap's top) in ~1 ms;
the pages are faulted in again only if reused. Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache

import torch

MIN_STAGE_BYTES = 16 << 20  # trim before stages this large: a tiny view would only pay the page faults


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free(stage_bytes: int, device: torch.device) -> bool:
    """Trim the heap before a CPU stage of `stage_bytes` or more, outside autograd. True if trimmed."""
    if device.type != "cpu" or torch.is_grad_enabled() or stage_bytes < MIN_STAGE_BYTES or (
            torch.compiler.is_compiling()):  # a foreign call there would only break the graph
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
