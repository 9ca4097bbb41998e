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

The values themselves are bounded where later code would trip over them: tuples nest at most
`MAX_TUPLE_DEPTH` deep (hashing a deeper one overflows the C stack: a segfault), integers fit in 64
bits (a 6000-digit one cannot even be printed in an error message), dict keys and set members are plain
scalars (tuples of crafted integers share one hash, and a dict of them fills in quadratic time), and
out-of-band buffers, which no weights file uses, are refused.
"""

from __future__ import annotations

import pickle
from struct import unpack
from typing import Any

MAX_TUPLE_DEPTH = 64
MAX_INT_BITS = 64
# What a dict key or set member may be: scalars whose hashes an attacker cannot make collide in bulk
# (strings and bytes hash with a per-process key; 64-bit ints and floats have a handful per hash value).
KEY_TYPES = (str, int, float, bool, bytes, type(None))


def check_keys(keys: Any, what: str) -> None:
    """Refuse dict keys / set members outside `KEY_TYPES` (exact types: a subclass may hash as it likes)."""
    for key in keys:
        if type(key) not in KEY_TYPES:
            raise pickle.UnpicklingError(f"{what} holds a {type(key).__name__} key; a weights file uses names")


def checked_pairs(items: Any, what: str) -> list:
    """(key, value) pairs of a dict or a list/tuple of pairs, their keys checked (`check_keys`) before any dict
    hashes them."""
    if isinstance(items, dict):
        return list(items.items())
    if not isinstance(items, (list, tuple)):
        raise pickle.UnpicklingError(f"{what} is built from a {type(items).__name__}, expected pairs")
    pairs = list(items)
    if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
        raise pickle.UnpicklingError(f"{what} record is malformed: expected (key, value) pairs")
    check_keys([pair[0] for pair in pairs], what)
    return pairs


class Opcodes(dict):
    """Opcode -> handler; an opcode pickle does not know is a malformed file, not a `KeyError`."""

    def __missing__(self, opcode: int) -> Any:
        raise pickle.UnpicklingError(f"invalid load key, {bytes([opcode])!r}")


def _opcode(name: str) -> int:
    return getattr(pickle, name)[0]


class BoundedUnpickler(pickle._Unpickler):  # noqa: SLF001 - the reference unpickler is the point
    """`pickle._Unpickler` over a reader whose short read is a truncated file, with `BYTEARRAY8`
    read before it is allocated and the bounds above. Subclasses say which globals and persistent
    ids exist."""

    dispatch = Opcodes(pickle._Unpickler.dispatch)  # noqa: SLF001
    max_int_bits = MAX_INT_BITS

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._source_read = file.read
        self._source_readline = file.readline
        self._file_read = self._read_exactly
        self._file_readline = self._read_line
        self._tuple_depth: dict[int, tuple[int, tuple]] = {}  # id -> (depth, the tuple: keeps the id alive)

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

    # --- records read before they are built -------------------------------------------------------

    def load_bytearray8(self) -> None:
        (size,) = unpack("<Q", self.read(8))
        self.append(bytearray(self.read(size)))

    dispatch[_opcode("BYTEARRAY8")] = load_bytearray8

    def load_buffer(self) -> None:
        raise pickle.UnpicklingError("the pickle refers to out-of-band buffers, which a weights file never has")

    dispatch[_opcode("NEXT_BUFFER")] = load_buffer
    dispatch[_opcode("READONLY_BUFFER")] = load_buffer

    # --- integers of at most 64 bits ------------------------------------------------------------------

    def load_long1(self) -> None:
        data = self.read(self.read(1)[0])
        self._push_int(pickle.decode_long(data))

    def load_long4(self) -> None:
        (n,) = unpack("<i", self.read(4))
        if n < 0 or n > self.max_int_bits // 8 + 1:  # beyond any bound once decoded: refused unread
            raise pickle.UnpicklingError(f"the pickle holds an integer of {n:,} bytes")
        self._push_int(pickle.decode_long(self.read(n)))

    def load_int(self) -> None:
        line = self._digits()
        self.append(False if line == b"00\n" else True if line == b"01\n" else self._checked(int(line, 0)))

    def load_long(self) -> None:
        line = self._digits()[:-1]
        self._push_int(int(line[:-1] if line.endswith(b"L") else line, 0))

    def _digits(self) -> bytes:
        line = self.readline()
        if len(line) > 26:  # sign, 0x or 20 digits, L, newline: more is an integer beyond 64 bits
            raise pickle.UnpicklingError(f"the pickle holds an integer of {len(line) - 1:,} digits")
        return line

    def _checked(self, value: int) -> int:
        if value.bit_length() > self.max_int_bits:
            raise pickle.UnpicklingError(f"the pickle holds an integer of {value.bit_length():,} bits")
        return value

    def _push_int(self, value: int) -> None:
        self.append(self._checked(value))

    dispatch[_opcode("INT")] = load_int
    dispatch[_opcode("LONG1")] = load_long1
    dispatch[_opcode("LONG4")] = load_long4
    dispatch[_opcode("LONG")] = load_long

    # --- tuples at most MAX_TUPLE_DEPTH deep ----------------------------------------------------------

    def _push_tuple(self, items: Any) -> None:
        depth = 1
        for item in items:
            if type(item) is tuple and item:
                depth = max(depth, 1 + self._tuple_depth.get(id(item), (1, None))[0])
        if depth > MAX_TUPLE_DEPTH:
            raise pickle.UnpicklingError(f"the pickle nests tuples more than {MAX_TUPLE_DEPTH} deep")
        value = tuple(items)
        if depth > 1:
            self._tuple_depth[id(value)] = (depth, value)
        self.append(value)

    def load_tuple(self) -> None:
        self._push_tuple(self.pop_mark())

    def load_tuple1(self) -> None:
        self._push_tuple([self.stack.pop()])

    def load_tuple2(self) -> None:
        items = self.stack[-2:]
        del self.stack[-2:]
        self._push_tuple(items)

    def load_tuple3(self) -> None:
        items = self.stack[-3:]
        del self.stack[-3:]
        self._push_tuple(items)

    dispatch[_opcode("TUPLE")] = load_tuple
    dispatch[_opcode("TUPLE1")] = load_tuple1
    dispatch[_opcode("TUPLE2")] = load_tuple2
    dispatch[_opcode("TUPLE3")] = load_tuple3

    # --- dict keys and set members --------------------------------------------------------------------

    def load_setitem(self) -> None:
        value, key = self.stack.pop(), self.stack.pop()
        check_keys([key], "a dict")
        self.stack[-1][key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        check_keys(items[::2], "a dict")
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        check_keys(items, "a set")
        target = self.stack[-1]
        if isinstance(target, set):
            target.update(items)
        else:
            for item in items:
                target.add(item)

    def load_frozenset(self) -> None:
        items = self.pop_mark()
        check_keys(items, "a frozenset")
        self.append(frozenset(items))

    dispatch[_opcode("SETITEM")] = load_setitem
    dispatch[_opcode("SETITEMS")] = load_setitems
    dispatch[_opcode("ADDITEMS")] = load_additems
    dispatch[_opcode("FROZENSET")] = load_frozenset

    # --- what subclasses decide -----------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")
