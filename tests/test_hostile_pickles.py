"""Pickles built to crash, hang or fool the restricted reader (a red-team pass), and what it does with them.

Each is a few hundred bytes of opcodes. Before the fixes they segfaulted the process (a dtype with an
object field read a pointer from the file; a 200,000-deep tuple overflowed the C stack when hashed),
printed warnings or imported torch submodules named by the file, ended in tracebacks (BufferError,
LookupError, a 6000-digit integer in an error message, a module chain 5000 deep), took minutes
(punycode, colliding keys) or loaded a 268M-element view of a 16-byte storage.
"""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights.safe_unpickle import safe_load

ROOT = Path(__file__).resolve().parents[1]


def _ops(value: object) -> bytes:
    """The opcodes that push `value` (protocol 2, without PROTO and STOP), to splice into a hand-made pickle."""
    return pickle.dumps(value, protocol=2)[2:-1]


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


class _Reduce:
    """Pickles as `func(*args)`, then BUILD with `state` when given."""

    def __init__(self, func: object, args: tuple, state: object = None) -> None:
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self) -> tuple:
        return self.reduced


OBJECT_FIELD_STATE = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)

REFUSED: dict[str, tuple[bytes, type[Exception], str]] = {
    # numpy would take an object field (a pointer) or offsets past the item from the file
    "dtype with an object field": (pickle.dumps(_Reduce(np.dtype, ("V8", False, True), OBJECT_FIELD_STATE)),
                                   UnsafeCheckpointError, "numpy dtype"),
    "BUILD of fields on a number dtype": (
        b"\x80\x02cnumpy\ndtype\n" + _ops(("f8", False, True)) + b"R" + _ops((3, "|", None, ("a",), None, 8, 1, 0))
        + b"b.", UnsafeCheckpointError, "more than a byte order"),
    "object-dtype array by BUILD": (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n" + _ops((0,)) + _ops(b"b") + b"tR"
        + b"(K\x01" + _ops((2,)) + b"cnumpy\ndtype\n" + _ops(("f8", False, True)) + b"R\x89" + _ops([1, "x"])
        + b"tb.", UserInputError, "not the size"),
    "tensor resized by BUILD": (pickle.dumps(torch.arange(4.0), protocol=2)[:-1] + _ops((0, (1 << 28,), (0,)))
                                + b"b.", UnsafeCheckpointError, "sets the state of a Tensor"),
    "record rewritten by BUILD": (
        b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
        + _ops(({"type": "class", "state": {}, "class_name": "G"},)) + b"R" + _ops((None, {"state": [1]}))
        + b"b.", UnsafeCheckpointError, "sets the state of a PersistentObject"),
    "out-of-band buffer": (b"\x80\x05\x96\x03" + bytes(7) + b"abc\x94\x98h\x00(K\x01e.", UserInputError,
                           "out-of-band buffers"),
    "bytearray of an unknown codec": (b"\x80\x02cbuiltins\nbytearray\n" + _ops(("a", "bogus")) + b"R.",
                                      UnsafeCheckpointError, "bytearray record"),
    "bytearray of punycode": (b"\x80\x02cbuiltins\nbytearray\n" + _ops(("\u00e9" * 20000, "punycode")) + b"R.",
                              UnsafeCheckpointError, "bytearray record"),
    "6000-digit integer (LONG1)": (b"\x80\x02" + _ops(-(10**600)) + b".", UserInputError, "integer of"),
    "integer of 2 GB declared (LONG4)": (b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\x01" * 8 + b".", UserInputError,
                                         "integer of"),
    "6000-digit integer (protocol 0)": (b"I" + b"9" * 6000 + b"\n.", UserInputError, "integer of"),
    "tuple dict key": (b"\x80\x02}" + _ops((1, 2)) + b"K\x03s.", UserInputError, "tuple key"),
    "tuple set member": (b"\x80\x02cbuiltins\nset\n" + _ops(([(1, 2)],)) + b"R.", UserInputError, "tuple key"),
    "colliding integer keys": (b"\x80\x02}(" + b"".join(_ops(k * (2**61 - 1)) + b"N" for k in range(1, 100)) + b"u.",
                               UserInputError, "integer of"),
    "torch.has_cuda (lazy attribute)": (b"\x80\x02ctorch\nhas_cuda\n.", UnsafeCheckpointError, "torch.has_cuda"),
    "EasyDict called with tuple-key pairs": (b"\x80\x02cdnnlib.util\nEasyDict\n" + _ops(([((1, 2), None)],)) + b"R.",
                                             UserInputError, "EasyDict holds a tuple key"),
    "class_name of 300 references to 1 MiB": (
        b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
        + _ops(({"type": "class", "state": {}, "class_name": ["a" * (1 << 20)] * 300},)) + b"R.",
        UserInputError, "class_name"),
    "long double dtype": (b"\x80\x02cnumpy\ndtype\n" + _ops(("f16", False, True)) + b"R.", UnsafeCheckpointError,
                          "'f16'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_pickle_is_refused_in_one_line(case: str, capfd: pytest.CaptureFixture[str]) -> None:
    data, error, fragment = REFUSED[case]
    start = time.perf_counter()
    with pytest.raises(error, match=fragment) as info:
        safe_load(io.BytesIO(data))
    assert time.perf_counter() - start < 5, "a small file took seconds"
    assert "\n" not in str(info.value) and len(str(info.value)) < 400
    assert capfd.readouterr().err == "", "nothing printed beside the error (warnings, SystemError lines)"


_CHILD = """
import io, sys
from my3dgen_cli.errors import My3DGenError
from my3dgen_cli.weights.safe_unpickle import safe_load
before = set(sys.modules)
for path in sys.argv[1:]:
    try:
        safe_load(open(path, "rb"))
        print("loaded", path)
    except My3DGenError as err:
        print("refused", path, str(err)[:80])
print("new modules:", sorted(m for m in set(sys.modules) - before if m.startswith("torch.")))
"""


def _storage_with_keys(keys_pickle: bytes | None) -> bytes:
    """A pickle of one legacy `torch.save` storage (as official pickles hold them) whose list of storage keys,
    the fifth of the stream's pickles, is `keys_pickle` (None: torch's own)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(torch.arange(4.0).storage(), buf, _use_new_zipfile_serialization=False)
    raw, ends = buf.getvalue(), []
    stream = io.BytesIO(raw)
    for _ in range(5):  # magic, protocol, sys info, the storage (persistent ids), the keys
        reader = pickle.Unpickler(stream)
        reader.persistent_load = lambda pid: None
        reader.load()
        ends.append(stream.tell())
    inner = raw[: ends[3]] + (raw[ends[3] : ends[4]] if keys_pickle is None else keys_pickle) + raw[ends[4] :]
    return b"\x80\x02ctorch.storage\n_load_from_bytes\nB" + struct.pack("<I", len(inner)) + inner + b"\x85R."


def test_deep_tuple_key_and_torch_submodules_in_a_fresh_process(tmp_path: Path) -> None:
    """In a child process (a segfault must fail the test, not the run): a 200,000-deep tuple used as a dict
    key, the same among a tensor storage's keys (which torch's own loader reads), and globals naming torch
    submodules that torch's lazy `__getattr__` would import."""
    deep_key = b"\x80\x02})" + b"\x85" * 200_000 + b"Ns."
    files = {"deep": deep_key, "storage keys": _storage_with_keys(deep_key),
             "dynamo": b"\x80\x02ctorch\n_dynamo\n.", "onnx": b"\x80\x02ctorch\nonnx\n."}
    paths = []
    for name, data in files.items():
        paths.append(tmp_path / f"{name}.pkl")
        paths[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stdout.splitlines()
    assert all(line.startswith("refused") for line in lines[:4]), lines
    assert "nests tuples more than" in lines[0] and "tensor storage" in lines[1]
    assert lines[4] == "new modules: []", lines[4]
    assert proc.stderr == ""


def test_legitimate_values_of_every_protocol_still_load() -> None:
    """What the bounds leave alone: numbers to 64 bits, tuples, sets of names, numpy dtypes and arrays."""
    value = {"ints": [2**63, -(2**63), 2**64 - 1], "tuple": (1, (2, (3,))), "names": {"a", "b"},
             "frozen": frozenset({"q"}), "array": np.arange(3.0), "scalar": np.float32(2.5), "dtype": np.dtype(">f4"),
             "bytes": bytearray(b"xy"), "tensor": torch.arange(3.0)}
    for protocol in range(5):
        out = safe_load(io.BytesIO(pickle.dumps(value, protocol=protocol)))
        assert out["ints"] == value["ints"] and out["tuple"] == value["tuple"], protocol
        assert out["names"] == value["names"] and out["frozen"] == value["frozen"], protocol
        assert np.array_equal(out["array"], value["array"]) and out["scalar"] == value["scalar"], protocol
        assert out["dtype"] == value["dtype"] and out["bytes"] == value["bytes"], protocol
        assert torch.equal(out["tensor"], value["tensor"]), protocol
    assert np.dtype("f4").byteorder == "=", "a BUILD on a dtype never changes numpy's own float32"


def test_legitimate_storage_keys_still_load() -> None:
    storage = safe_load(io.BytesIO(_storage_with_keys(None)))
    assert storage.untyped.nbytes() == 16


def test_config_of_shared_lists_is_refused_without_copying_them(tmp_path: Path) -> None:
    """init_kwargs holding x = [x', x'], 25 levels down: 600 bytes, 2^25 values once copied; refused in
    well under a second."""
    from my3dgen_cli.weights.official_pkl import read_official_pkl

    shared: list = [1]
    for _ in range(25):
        shared = [shared, shared]
    meta = {"type": "class", "class_name": "TriPlaneGenerator", "state": {"_init_kwargs": {"dag": shared}}}
    path = tmp_path / "dag.pkl"
    path.write_bytes(b"\x80\x02}" + _text("G_ema") + b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n"
                     + _ops((meta,)) + b"Rs.")
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(UserInputError, match="more than 100,000 values"):
        read_official_pkl(path)
    assert time.perf_counter() - start < 2


def test_module_chain_thousands_deep_is_one_line(tmp_path: Path, isolated_home: Path) -> None:
    """A My3DGen snapshot whose G_ema is a chain of 5000 modules: walked without recursion (a traceback before)."""
    from typer.testing import CliRunner

    from my3dgen_cli.cli import app

    def get(i: int) -> bytes:
        return b"h" + bytes([i])

    head = b"\x80\x02ctorch_utils.persistence\n_reconstruct_persistent_obj\nq\x00"
    for i, s in enumerate(["type", "class", "class_name", "M", "state", "_modules", "m"], start=1):
        head += _text(s) + b"q" + bytes([i]) + b"0"

    def level(top: bool = False) -> bytes:
        out = get(0) + b"}(" + get(1) + get(2) + get(3) + (_text("TriPlaneGenerator") if top else get(4)) + get(5)
        out += b"}" + (_text("neural_rendering_resolution") + b"K\x40s" if top else b"")
        return out + get(6) + b"}" + get(7)

    depth = 5000
    pkl = tmp_path / "network-snapshot-000000.pkl"
    pkl.write_bytes(head + b"}" + _text("G_ema") + level(True) + level() * depth + b"N" + b"ssu\x85R" * (depth + 1)
                    + b"s.")
    result = CliRunner().invoke(app, ["identities", "import", str(pkl), "--name", "ana"])
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
