"""The model cache: verified, resumable, offline-capable, content addressed by sha256.

    $MY3DGEN_HOME/cache/              (paths.cache_dir())
    ├── blobs/<sha256>                verified bytes; only ever created by an atomic rename
    ├── refs/<name>.json              manifest: which blob a name is, when and where it came from
    ├── converted/<sha256>/           base generators converted once from an official .pkl
    │   ├── generator.safetensors     or a plain .safetensors (format = "safetensors"):
    │   └── generator.json            its config (eg3d.checkpoint.convert_pkl / convert_safetensors)
    ├── partial/<name>.part           an interrupted download, resumed with HTTP Range
    ├── locks/<name>.lock             one process fetches a name at a time; others wait, then reuse
    ├── registries/<hash>.toml        copies of --registry URLs, for offline use
    └── registry.local.json           sha256 and size recorded on first fetch when unpublished

A blob is verified (sha256, or the registry's sha256 prefix) *before* it is renamed into
`blobs/`, and a ref is written after its blob, so a reader never sees half a file.

Library API (other commands call these): `ensure(name) -> Path` (the verified file, fetched on
demand), `resolve_base(name) -> Path` (a base generator's converted .safetensors),
`import_file(name, src)`, `get_entry(name)`, `list_entries()`, `cached(name)`, `cache_list()`,
`verify()`, `remove(name)`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from my3dgen_cli import download, paths
from my3dgen_cli.download import ProgressHook, sha256_file
from my3dgen_cli.errors import ArtifactError, ChecksumError, OfflineError, UserInputError
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.zoo_registry import Entry, forget_hash, get_entry, list_entries, record_hash

__all__ = [
    "Entry", "ensure", "resolve_base", "import_file", "get_entry", "list_entries", "cached",
    "cache_list", "verify", "remove", "is_offline",
]  # fmt: skip

CONVERTED_NAME = "generator.safetensors"


def _root() -> Path:
    return paths.cache_dir()


def _ref_path(name: str) -> Path:
    return _root() / "refs" / f"{name}.json"


def _blob_path(sha256: str) -> Path:
    return _root() / "blobs" / sha256


def _part_path(name: str) -> Path:
    return _root() / "partial" / f"{name}.part"


def is_offline(offline: bool | None = None) -> bool:
    """`offline` when given, else `MY3DGEN_OFFLINE`."""
    return paths.offline() if offline is None else offline


def read_ref(name: str) -> dict[str, Any] | None:
    path = _ref_path(name)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a ref is written atomically; an unreadable one is treated as absent


def _write_ref(ref: dict[str, Any]) -> None:
    write_text_atomic(_ref_path(ref["name"]), json.dumps(ref, indent=2, sort_keys=True) + "\n")


@contextmanager
def _locked(name: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `locks/<name>.lock`; tell `on_wait` when another process holds it first."""
    from filelock import FileLock, Timeout

    path = _root() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0.2)
    except Timeout:
        if on_wait:
            on_wait(f"waiting for another my3dgen process fetching {name}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cached(name: str, entry: Entry | None = None) -> Path | None:
    """The cached blob of `name` when present and consistent with the registry, else None.

    Cheap (no hashing): the ref must name the registry's sha256 when one is known and the blob
    must have the recorded size. `verify()` rehashes.
    """
    entry = entry or get_entry(name)
    ref = read_ref(name)
    if ref is None or (entry.sha256 is not None and ref.get("sha256") != entry.sha256):
        return None
    blob = _blob_path(ref["sha256"])
    try:
        return blob if blob.stat().st_size == ref.get("size") else None
    except OSError:
        return None


def _offline_error(entry: Entry) -> OfflineError:
    return OfflineError(
        f"{entry.name} is not in the cache and offline mode is on (MY3DGEN_OFFLINE or --offline); "
        f"fetch it with network access: `my3dgen fetch {entry.name}`, or import a copy: "
        f"`my3dgen fetch {entry.name} --from {entry.display_filename}`"
    )


def _commit(entry: Entry, part: Path, source: str) -> Path:
    """Verify `part` against the registry, move it into blobs/ and write the ref (lock held)."""
    sha, size = sha256_file(part), part.stat().st_size
    expected = entry.sha256
    if (expected and sha != expected) or (entry.sha256_prefix and not sha.startswith(entry.sha256_prefix)):
        part.unlink()
        want = expected or f"{entry.sha256_prefix}..."
        hint = (
            " (recorded on first fetch; `my3dgen cache rm --forget` accepts another file)"
            if entry.recorded
            else ""
        )
        raise ChecksumError(
            f"{entry.name}: {source} has sha256 {sha}, expected {want}{hint}; nothing was cached"
        )
    blob = _blob_path(sha)
    blob.parent.mkdir(parents=True, exist_ok=True)
    if blob.is_file() and blob.stat().st_size == size:
        part.unlink()
    else:
        os.replace(part, blob)
    if expected is None:
        record_hash(entry.name, sha, size, source)
    ref = read_ref(entry.name) or {}
    if ref.get("sha256") != sha:
        ref = {}
    ref.update(
        name=entry.name,
        kind=entry.kind,
        format=entry.format,
        sha256=sha,
        size=size,
        source=source,
        fetched_at=time.time(),
        blob=f"blobs/{sha}",
    )
    ref.pop("pkl_dropped", None)
    _write_ref(ref)
    return blob


def ensure(
    name: str,
    *,
    offline: bool | None = None,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Path:
    """The verified file of artifact `name`, downloading it first if it is not cached.

    Args:
        name: a registry name (`my3dgen fetch --list`).
        offline: never use the network (default: `MY3DGEN_OFFLINE`). `package://` and `file://`
            sources are local and work offline.
        registry: extra registry files or URLs (beside `MY3DGEN_REGISTRY`).
        progress: `progress(done_bytes, total_bytes_or_None)` while bytes arrive.

    Raises:
        ArtifactError: unknown name (with the closest names), or a missing `package://` package.
        OfflineError: not cached and offline.
        DownloadError: every URL failed (each reason given), or too little free disk.
        ChecksumError: the bytes do not match the registry's (or the recorded) sha256.
    """
    entry = get_entry(name, registry)
    hit = cached(name, entry)
    if hit is not None:
        return hit
    local = [u for u in entry.urls if download.is_local(u)]
    if is_offline(offline) and not local:
        raise _offline_error(entry)
    with _locked(name, on_wait):
        entry = get_entry(name, registry)  # another process may have recorded the hash meanwhile
        hit = cached(name, entry)
        if hit is not None:
            return hit
        part = _part_path(name)
        part.parent.mkdir(parents=True, exist_ok=True)
        if local:
            download.copy_local(local[0], part, progress)
            return _commit(entry, part, local[0])
        url = download.http_download(name, entry.urls, part, entry.size, progress)
        return _commit(entry, part, url)


def import_file(
    name: str,
    src: str | os.PathLike[str],
    *,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
) -> Path:
    """Put a file the user downloaded by hand into the cache as `name`, after verifying it.

    Unknown-hash entries record the file's sha256 (trust on first use).
    """
    src = Path(src).expanduser()
    entry = get_entry(name, registry)
    if not src.is_file():
        raise UserInputError(
            f"--from: got {str(src)!r}, expected an existing file ({entry.display_filename})"
        )
    with _locked(name):
        entry = get_entry(name, registry)
        part = _part_path(name)
        part.parent.mkdir(parents=True, exist_ok=True)
        download.copy_local(src.resolve().as_uri(), part, progress)
        return _commit(entry, part, f"file:{src}")


def _converter(entry: Entry) -> Callable[[Path, Path], Path]:
    """convert_pkl for an official pickle; for a plain safetensors, its converter with the entry's config."""
    from my3dgen_cli.eg3d import checkpoint  # lazy: torch loads only when a base is converted

    if entry.format == "safetensors":
        return lambda src, dst: checkpoint.convert_safetensors(src, dst, config=entry.config)
    return checkpoint.convert_pkl


def converted(name: str, entry: Entry | None = None) -> Path | None:
    """A base generator's converted .safetensors when present, else None."""
    entry = entry or get_entry(name)
    ref = read_ref(name)
    if not ref or not ref.get("converted") or (entry.sha256 and ref.get("sha256") != entry.sha256):
        return None
    path = _root() / ref["converted"]
    return path if path.is_file() and path.with_suffix(".json").is_file() else None


def resolve_base(
    name: str,
    *,
    keep_pkl: bool = True,
    offline: bool | None = None,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
    on_wait: Callable[[str], None] | None = None,
) -> Path:
    """The converted `.safetensors` of base generator `name` (config beside it, `.json`).

    Fetches the official `.pkl` if needed and converts it once with
    `my3dgen_cli.eg3d.checkpoint.convert_pkl`; an entry with `format = "safetensors"` (official
    tensor names, no config inside) is converted with `convert_safetensors` and the config its
    entry names. `keep_pkl=False` then deletes the downloaded blob.
    Raises as `ensure`, plus ArtifactError for an entry that is not a base generator.
    """
    entry = get_entry(name, registry)
    if entry.kind != "base-generator":
        raise ArtifactError(f"{name} is a {entry.kind}, not a base generator")
    done = converted(name, entry)
    if done is None:
        src = ensure(name, offline=offline, registry=registry, progress=progress, on_wait=on_wait)
        with _locked(name, on_wait):
            done = converted(name, entry) or _convert(name, src, entry)
    if not keep_pkl:
        _drop_pkl(name)
    return done


def _convert(name: str, src: Path, entry: Entry) -> Path:
    """Convert blob `src` into converted/<sha256>/ via a temp folder renamed at the end (lock held)."""
    convert = _converter(entry)
    ref = read_ref(name)
    if ref is None:
        raise ArtifactError(f"{name}: its cache entry vanished during conversion; fetch again")
    sha = ref["sha256"]
    final = _root() / "converted" / sha
    tmp = final.parent / f".{sha}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(src, tmp / CONVERTED_NAME)
        for needed in (tmp / CONVERTED_NAME, tmp / "generator.json"):
            if not needed.is_file():
                raise ArtifactError(f"{name}: the converter did not write {needed.name}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = final / CONVERTED_NAME
    ref.update(converted=str(out.relative_to(_root())), converted_sha256=sha256_file(out))
    _write_ref(ref)
    return out


def _refs() -> list[dict[str, Any]]:
    folder = _root() / "refs"
    return [r for p in sorted(folder.glob("*.json")) if (r := read_ref(p.stem))] if folder.is_dir() else []


def _drop_pkl(name: str) -> None:
    with _locked(name):
        ref = read_ref(name)
        if not ref or not ref.get("converted"):
            return
        if not any(r["sha256"] == ref["sha256"] for r in _refs() if r["name"] != name):
            _blob_path(ref["sha256"]).unlink(missing_ok=True)
        ref["pkl_dropped"] = True
        _write_ref(ref)


def cache_list() -> list[dict[str, Any]]:
    """One dict per cached name: name, kind, sha256, size, path, converted, fetched_at, present."""
    rows = []
    for ref in _refs():
        blob = _blob_path(ref["sha256"])
        conv = _root() / ref["converted"] if ref.get("converted") else None
        rows.append({
            "name": ref["name"], "kind": ref.get("kind"), "sha256": ref["sha256"], "size": ref.get("size"),
            "path": str(blob) if blob.is_file() else None,
            "converted": str(conv) if conv and conv.is_file() else None,
            "fetched_at": ref.get("fetched_at"), "source": ref.get("source"),
        })  # fmt: skip
    return rows


def verify(names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rehash cached files. One dict per name: name, status ("ok", "corrupt", "missing"), detail."""
    refs = {r["name"]: r for r in _refs()}
    for name in names:
        if name not in refs:
            raise ArtifactError(f"{name} is not in the cache (`my3dgen cache ls` shows what is)")
    results = []
    for name in names or sorted(refs):
        ref = refs[name]
        blob = _blob_path(ref["sha256"])
        status, detail = "ok", "sha256 matches"
        if blob.is_file():
            actual = sha256_file(blob)
            if actual != ref["sha256"]:
                status, detail = "corrupt", f"blob sha256 {actual}, expected {ref['sha256']}"
        elif not ref.get("pkl_dropped"):
            status, detail = "missing", f"blobs/{ref['sha256']} is gone"
        if status == "ok" and ref.get("converted"):
            conv = _root() / ref["converted"]
            if not conv.is_file():
                status, detail = "missing", f"{ref['converted']} is gone"
            elif sha256_file(conv) != ref.get("converted_sha256"):
                status, detail = "corrupt", f"{ref['converted']} does not match its recorded sha256"
        results.append({"name": name, "status": status, "detail": detail})
    return results


def remove(name: str, *, forget: bool = False) -> dict[str, Any]:
    """Delete `name` from the cache (blob and conversion unless another name shares them).

    `forget=True` also drops a hash recorded on first fetch, so another file can be accepted.
    """
    removed: list[str] = []
    with _locked(name):
        ref = read_ref(name)
        part = _part_path(name)
        if part.exists():
            part.unlink()
            removed.append(str(part))
        if ref is not None:
            others = [r for r in _refs() if r["name"] != name]
            _ref_path(name).unlink()
            removed.append(str(_ref_path(name)))
            if not any(r["sha256"] == ref["sha256"] for r in others):
                blob = _blob_path(ref["sha256"])
                if blob.exists():
                    blob.unlink()
                    removed.append(str(blob))
                conv = _root() / "converted" / ref["sha256"]
                if conv.exists():
                    shutil.rmtree(conv)
                    removed.append(str(conv))
        forgot = forget and forget_hash(name)
    if not removed and not forgot:
        raise ArtifactError(f"{name} is not in the cache (`my3dgen cache ls` shows what is)")
    return {"name": name, "removed": removed, "forgot_recorded_hash": forgot}
