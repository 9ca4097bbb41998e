"""The cache's on-disk layout: where blobs, refs, conversions and partial downloads live, the refs
themselves, and the per-name lock that lets one process fetch a name at a time.

    $MY3DGEN_HOME/cache/              (paths.cache_dir())
    ├── blobs/<sha256>                verified bytes; only ever created by an atomic rename
    ├── refs/<name>.json              manifest: which blob a name is, when and where it came from
    ├── converted/<sha256>/           base generators converted once from an official .pkl
    │   ├── generator.safetensors     or a plain .safetensors (format = "safetensors"):
    │   └── generator.json            its config (weights.checkpoint.convert_pkl / convert_safetensors)
    ├── partial/<name>.part           an interrupted download, resumed with HTTP Range
    ├── locks/<name>.lock             held while one process fetches a name; deleted on release
    ├── registries/<hash>.toml        copies of --registry URLs, for offline use
    ├── bases/<name>.safetensors      local bases (zoo.local_bases)
    └── registry.local.json           sha256 and size recorded on first fetch when unpublished

Lookups here never hash (`cached`, `converted` check sizes and refs); `inventory.verify` rehashes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from my3dgen_cli import paths
from my3dgen_cli.fileio import lock_current_file, write_text_atomic
from my3dgen_cli.zoo.download import sha256_file
from my3dgen_cli.zoo.registry import Entry, get_entry

CONVERTED_NAME = "generator.safetensors"


def root() -> Path:
    return paths.cache_dir()


def ref_path(name: str) -> Path:
    return root() / "refs" / f"{name}.json"


def blob_path(sha256: str) -> Path:
    return root() / "blobs" / sha256


def part_path(name: str) -> Path:
    return root() / "partial" / f"{name}.part"


def lock_path(name: str) -> Path:
    return root() / "locks" / f"{name}.lock"


def is_offline(offline: bool | None = None) -> bool:
    """`offline` when given, else `MY3DGEN_OFFLINE`."""
    return paths.offline() if offline is None else offline


def read_ref(name: str) -> dict[str, Any] | None:
    path = ref_path(name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        return None  # a ref is written atomically; an unreadable one is treated as absent


def write_ref(ref: dict[str, Any]) -> None:
    write_text_atomic(ref_path(ref["name"]), json.dumps(ref, indent=2, sort_keys=True) + "\n")


def refs() -> list[dict[str, Any]]:
    """Every readable ref, sorted by name."""
    folder = root() / "refs"
    return [r for p in sorted(folder.glob("*.json")) if (r := read_ref(p.stem))] if folder.is_dir() else []


@contextmanager
def locked(name: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `locks/<name>.lock`; tell `on_wait` when another process holds it first.

    The lock file is deleted before the lock is released, so no lock file outlives its holder (a
    refused fetch leaves the cache folder as it was). A waiter that wakes up holding a deleted file
    sees that the path names another file (or none) and locks again (`fileio.lock_current_file`).
    """
    path = lock_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.name != "posix":  # Windows: filelock deletes its lock file itself after release
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    fd = lock_current_file(path, lambda _: on_wait and on_wait(f"waiting for another my3dgen process fetching {name}"))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the flock


def in_use(name: str) -> bool:
    """True while another process holds `locks/<name>.lock` (a download or conversion in progress)."""
    path = lock_path(name)
    if not path.is_file():
        return False
    if os.name != "posix":
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(path)).acquire(timeout=0):
                return False
        except Timeout:
            return True
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def cached(name: str, entry: Entry | None = None) -> Path | None:
    """The cached blob of `name` when present and consistent with the registry, else None.

    Cheap (no hashing): the ref must name the registry's sha256 when one is known and the blob
    must have the recorded size. `inventory.verify()` rehashes.
    """
    entry = entry or get_entry(name)
    ref = read_ref(name)
    if ref is None or (entry.sha256 is not None and ref.get("sha256") != entry.sha256):
        return None
    blob = blob_path(ref["sha256"])
    try:
        return blob if blob.stat().st_size == ref.get("size") else None
    except OSError:
        return None


def converted(name: str, entry: Entry | None = None, *, verify: bool = False) -> Path | None:
    """A base generator's converted .safetensors when present, else None.

    verify: also rehash it against the sha256 recorded at conversion (a damaged one counts as absent).
    """
    entry = entry or get_entry(name)
    ref = read_ref(name)
    if not ref or not ref.get("converted") or (entry.sha256 and ref.get("sha256") != entry.sha256):
        return None
    path = root() / ref["converted"]
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    if verify and sha256_file(path) != ref.get("converted_sha256"):
        return None
    return path
