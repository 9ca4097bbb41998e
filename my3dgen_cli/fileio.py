"""Atomic writes: a process-unique temp file in the target folder, then `os.replace`.

A crash or Ctrl-C leaves either the old file or the new one, never half of one. The file gets the
mode a plain `open(..., "w")` would give (0666 less the umask), not mkstemp's private 0600, so files
in a shared lab folder stay readable by the group the user chose.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from my3dgen_cli.errors import UserInputError


def _umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits of a new regular file under the current umask."""
    return 0o666 & ~_umask()


def _cannot_write(target: Path, err: OSError) -> UserInputError:
    """The user named `target`; our temp file is an implementation detail they never saw."""
    return UserInputError(f"cannot write {target}: {err.strerror or err}")


@contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` if the block succeeds.

    Raises:
        UserInputError: the folder cannot be made or written, or `target` cannot be replaced
            (a folder of that name, a read-only place); the message names `target`.
    """
    target = Path(target)
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserInputError(f"cannot write {target}: {blocker} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise _cannot_write(target, err) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            yield tmp
        except OSError as err:
            if err.filename is not None and Path(err.filename) == tmp:
                raise _cannot_write(target, err) from None
            raise
        try:
            if tmp.exists():
                os.chmod(tmp, new_file_mode())
            os.replace(tmp, target)
        except OSError as err:
            raise _cannot_write(target, err) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(target: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call `writer(tmp_path)` and move the result onto `target` atomically."""
    with atomic_path(target) as tmp:
        writer(tmp)
    return Path(target)


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> Path:
    return write_atomic(target, lambda p: p.write_bytes(data))


def write_text_atomic(target: str | os.PathLike[str], text: str) -> Path:
    return write_atomic(target, lambda p: p.write_text(text, encoding="utf-8"))


def lock_current_file(path: Path, on_busy: Callable[[int], object]) -> int:
    """An open descriptor of `path` holding an exclusive flock, once the locked file is still the one at `path`
    (holders delete it before releasing). While another process holds it, `on_busy(fd)` runs first: it
    raises to refuse, or returns to wait for the lock. POSIX."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_busy(fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass  # deleted by the holder it raced or waited for: lock the new file
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextmanager
def held_lock(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` while open; if another process holds it, refuse: "<busy> by ... (pid N)".

    An flock (the kernel releases it if the holder dies) on a file that holds the holder's pid, deleted before
    release, so no lock file outlives its run; a process that opened the file just before its holder deleted
    it locks the new one. It does not nest: a second `held_lock` of one path in the same process is refused
    too. POSIX only; elsewhere nothing is locked.
    """
    if os.name != "posix":
        yield
        return

    def refuse(fd: int) -> None:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
        raise UserInputError(f"{busy} by another my3dgen process (pid {holder}); wait for it to finish")

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = lock_current_file(path, refuse)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def check_not_in_stores(targets: Iterable[Path]) -> None:
    """Refuse an output inside my3dgen's identities or cache folder, even with --force.

    Those folders change only through their own commands (personalize, identities import, fetch, cache):
    `export --identity ana -o <identities>/ana/adapter.safetensors --force` once wrote the merged base
    over the adapter it was reading, and the identity was gone.
    """
    from my3dgen_cli import paths

    stores = {"identities": paths.identities_dir(), "cache": paths.cache_dir()}
    for target in targets:
        where = Path(target).expanduser().resolve()
        for kind, root in stores.items():
            if where.is_relative_to(root.resolve()):
                raise UserInputError(f"{target} is inside my3dgen's {kind} folder ({root}), which only my3dgen's own "
                                     "commands change; choose an output elsewhere")


def check_free(paths: Iterable[Path], force: bool) -> None:
    """Refuse to overwrite: the first existing path is named unless --force; never inside my3dgen's stores."""
    paths = list(paths)
    check_not_in_stores(paths)
    for p in paths:
        if p.exists() and not force:
            raise UserInputError(f"{p} already exists (use --force to overwrite)")
        if p.exists() and p.is_dir():
            raise UserInputError(f"{p} is a folder, expected a file path")
