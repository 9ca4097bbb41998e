"""numba's njit with the settings every compiled loop here uses (imported only where numba is installed)."""

from __future__ import annotations

from typing import Any

import numba


def jit(fn: Any = None, **options: Any) -> Any:
    """njit without the GIL (views rendered on threads run at once) and without bounds checks, its machine code
    cached on disk where numba finds a writable place (else compiled once per process). `options`: more njit
    options (e.g. fastmath flags)."""
    if fn is None:
        return lambda f: jit(f, **options)
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False, **options)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available" (read-only install and home)
        return numba.njit(nogil=True, boundscheck=False, **options)(fn)
