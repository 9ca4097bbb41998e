"""The opcode loop under every pickle we read: Python's own, with no record allocating before it has its bytes.

CPython's C unpickler allocates a counted record (`BINBYTES8`, `BYTEARRAY8`) at its declared size
*before* reading it, and grows its memo to any index a `LONG_BINPUT` names: a 12-byte file can ask for
an exabyte. That ends in a `MemoryError`, and for `BYTEARRAY8` on Python 3.11 also in a stray
`SystemError: deallocated bytearray object has exported buffers` printed to stderr (the failed
bytearray is freed with an unset export count). Python's pure-Python unpickler (`pickle._Unpickler`,
the reference implementation the C one mirrors) reads every record through `read(n)` and keeps its memo
in a dict; here every `read(n)` must return exactly n bytes (and every line end in a newline) from a
reader that never asks for more than the file holds, and `BYTEARRAY8` is read before it is built.
Loading an official pickle takes the same time either way: torch's storage loads dominate (measured on
../shared/eg3d_snapshot).
"""

from __future__ import annotations

import pickle
from struct import unpack
from typing import Any

_BYTEARRAY8 = pickle.BYTEARRAY8[0]


class _Opcodes(dict):
    """Opcode -> handler; an opcode pickle does not know is a malformed file, not a `KeyError`."""

    def __missing__(self, opcode: int) -> Any:
        raise pickle.UnpicklingError(f"invalid load key, {bytes([opcode])!r}")


class BoundedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the reference unpickler is the point
    """`pickle._Unpickler` over a reader whose short read is a truncated file, with `BYTEARRAY8`
    read before it is allocated. Subclasses say which globals and persistent ids exist."""

    dispatch = _Opcodes(pickle._Unpickler.dispatch)  # noqa: SLF001

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._source_read = file.read
        self._source_readline = file.readline
        self._file_read = self._read_exactly
        self._file_readline = self._read_line

    def _read_exactly(self, n: int) -> bytes:
        data = self._source_read(n)
        if len(data) != n:
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def _read_line(self) -> bytes:
        """A protocol-0 argument; one cut off by the end of the file is a truncated file (as in C)."""
        data = self._source_readline()
        if not data.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def load_bytearray8(self) -> None:
        (size,) = unpack("<Q", self.read(8))
        self.append(bytearray(self.read(size)))

    dispatch[_BYTEARRAY8] = load_bytearray8

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")
