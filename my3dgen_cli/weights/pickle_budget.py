"""The unpickler's allocation budget: a pickle may make the stand-ins allocate no more than the bytes of the file.

`bounded_reader(file)` wraps the file for `safe_load` and sets the budget every stand-in charges
(`charge`) before it allocates: a 32-byte pickle asking for `bytearray(3 GiB)` is refused at once.
"""

from __future__ import annotations

import contextvars
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from my3dgen_cli.errors import UserInputError

# Slack over the file size, for small pickles whose records legitimately build a few small objects.
_BUDGET_SLACK = 1 << 20
# Largest single read from a stream of unknown size (a record longer than this is read in pieces).
_CHUNK = 16 << 20


class AllocationBudget:
    """Bytes a pickle may make the stand-ins allocate: no more than the bytes of the file read so far.

    A legitimate weights pickle carries every byte of every storage in the file itself, before the
    record that builds it, so what it asks for never exceeds what was read; anything more is a hostile
    or broken file. (Also right for a decompressed stream, whose size is unknown up front.)
    """

    def __init__(self, reader: CappedReader) -> None:
        self.reader = reader
        self.charged = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes < 0:
            raise UserInputError(f"{what} asks for a negative size")
        if self.charged + nbytes > self.reader.seen + _BUDGET_SLACK:
            raise UserInputError(f"{what} asks for {nbytes:,} bytes, more than the file itself holds")
        self.charged += nbytes


_BUDGET: contextvars.ContextVar[AllocationBudget] = contextvars.ContextVar("my3dgen_unpickle_budget")


def charge(nbytes: int, what: str) -> None:
    """Charge `nbytes` that a stand-in is about to allocate to the current `safe_load`'s budget."""
    budget = _BUDGET.get(None)
    if budget is None:  # a stand-in called outside safe_load: no file to bound it by
        raise UserInputError(f"{what}: outside safe_load, no allocation budget")
    budget.charge(nbytes, what)


class CappedReader:
    """A file view that counts the bytes seen and, where the size is known, never asks the OS for more
    than the bytes left.

    Pickle's length-prefixed records (BINBYTES8, BINUNICODE8, ...) would otherwise make the
    unpickler request a buffer of the declared length before it finds the file is shorter.
    """

    def __init__(self, file: BinaryIO, size: int | None, stream_limit: int | None = None) -> None:
        self._file = file
        self._left = size
        # A stream of unknown size (decompressing) may yield at most this many bytes: an xz bomb of
        # zeros would otherwise fill the memory before a record of it could be judged.
        self._stream_limit = stream_limit if size is None else None
        self._consumed = 0
        self.seen = 0  # bytes read or peeked at: what the budget allows

    def _cap(self, n: int | None) -> int:
        if self._left is None:
            return -1 if n is None else n
        return self._left if n is None or n < 0 else min(n, self._left)

    def _took(self, count: int) -> None:
        self._consumed += count
        self.seen = max(self.seen, self._consumed)
        if self._left is not None:
            self._left -= count
        if self._stream_limit is not None and self._consumed > self._stream_limit:
            raise UserInputError(
                f"it decompresses to more than {self._stream_limit:,} bytes, far more than any network "
                "snapshot of its compressed size (a decompression bomb?)"
            )

    def read(self, n: int = -1) -> bytes:
        if self._left is None and n > _CHUNK:  # a stream of unknown size: what is there, not what is asked
            return self._read_chunks(n)
        data = self._file.read(self._cap(n))
        self._took(len(data))
        return data

    def _read_chunks(self, n: int) -> bytes:
        """`n` bytes of a decompressing stream, a chunk at a time: its `read(n)` would allocate all n
        first, and a record's declared length is whatever the file says."""
        chunks = []
        while n > 0:
            chunk = self._file.read(min(n, _CHUNK))
            if not chunk:
                break
            self._took(len(chunk))
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def readline(self, limit: int = -1) -> bytes:
        if self._stream_limit is not None and limit < 0:  # one line may not outgrow the limit either
            limit = self._stream_limit - self._consumed + 1
        data = self._file.readline(self._cap(limit))
        self._took(len(data))
        return data

    def peek(self, n: int = 0) -> bytes:
        """Buffered bytes ahead (lets pickle prefetch instead of one read per record)."""
        peek = getattr(self._file, "peek", None)
        data = peek(n) if peek is not None else b""
        if self._left is not None:
            data = data[: self._left]
        self.seen = max(self.seen, self._consumed + len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        n = self._file.readinto(view) or 0
        self._took(n)
        return n


def file_size(file: BinaryIO) -> int | None:
    """Bytes left in a plain file (None for a decompressing stream, whose fileno is the compressed file)."""
    if not isinstance(file, (io.BufferedReader, io.FileIO, io.BytesIO)):
        return None
    if isinstance(file, io.BytesIO):
        return len(file.getbuffer()) - file.tell()
    return os.fstat(file.fileno()).st_size - file.tell()


@contextmanager
def bounded_reader(file: BinaryIO, stream_limit: int | None = None) -> Iterator[CappedReader]:
    """`file` as a `CappedReader`, with the budget every `charge` inside the block draws on.

    `stream_limit`: the most bytes a stream of unknown size (a decompressing one) may yield.
    """
    reader = CappedReader(file, file_size(file), stream_limit)
    token = _BUDGET.set(AllocationBudget(reader))
    try:
        yield reader
    finally:
        _BUDGET.reset(token)
