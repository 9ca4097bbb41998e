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
    ├── bases/<name>.safetensors      local bases (`import_local_base`, `fetch NAME --from F.pkl --local`)
    └── registry.local.json           sha256 and size recorded on first fetch when unpublished

A blob is verified (sha256, or the registry's sha256 prefix) *before* it is renamed into
`blobs/`, and a ref is written after its blob, so a reader never sees half a file. A base
generator is converted before that too (its config checked against the entry's), and a file whose
hash is not published is trusted on first use only once it converted or opened as its format: a
refused, empty or truncated file leaves no blob, no ref and no recorded hash. A URL whose bytes are
refused falls back to the mirrors; `ensure(..., verify=True)` (what `my3dgen fetch` does) rehashes
a cached file and fetches it again when it no longer matches.

Library API (other commands call these): `ensure(name) -> Path` (the verified file, fetched on
demand), `resolve_base(name) -> Path` (a base generator's converted .safetensors),
`import_file(name, src)`, `import_local_base(name, src)`, `get_entry(name)`, `list_entries()`,
`cached(name)`, `cache_list()`, `verify()`, `remove(name)`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from my3dgen_cli import paths
from my3dgen_cli.errors import (
    ArtifactError,
    ChecksumError,
    DownloadError,
    My3DGenError,
    OfflineError,
    UnsafeCheckpointError,
    UserInputError,
)
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.zoo import download
from my3dgen_cli.zoo.download import ProgressHook, sha256_file
from my3dgen_cli.zoo.registry import NAME_RE, Entry, forget_hash, get_entry, list_entries, load_registry, record_hash

__all__ = [
    "Entry", "ensure", "resolve_base", "import_file", "import_local_base", "get_entry", "list_entries", "cached",
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


@dataclass
class _Staged:
    """Bytes in `partial/` that passed every check, not yet in the cache (see `_stage`)."""

    part: Path
    sha256: str
    size: int
    source: str
    conversion: Path | None  # temp folder holding generator.safetensors + .json (base generators)


def _stage(entry: Entry, part: Path, source: str) -> _Staged:
    """Check `part` without touching the cache: its sha256 against the registry; a base generator
    is converted (into a temp folder, with the entry's config checked); a file with no published
    hash must also be non-empty and open as its format (trust on first use comes only after that).

    On a refusal `part` is deleted and the error names the reason only (callers add name and source).
    """
    sha, size = sha256_file(part), part.stat().st_size
    try:
        if (entry.sha256 and sha != entry.sha256) or (
            entry.sha256_prefix and not sha.startswith(entry.sha256_prefix)
        ):
            want = entry.sha256 or f"{entry.sha256_prefix}..."
            raise ChecksumError(f"has sha256 {sha}, expected {want}")
        if entry.sha256 is None and size == 0:
            raise ChecksumError("is empty (0 bytes)")
        conversion = _convert_into_temp(entry, part, sha) if entry.kind == "base-generator" else None
        if conversion is None and entry.sha256 is None:
            _open_check(entry, part)
    except My3DGenError as err:
        part.unlink(missing_ok=True)
        raise type(err)(_strip_path(str(err), part)) from None
    return _Staged(part, sha, size, source, conversion)


def _strip_path(message: str, part: Path) -> str:
    """Checkpoint errors start with the path they read: the temporary `.part` name means nothing to a user."""
    return message.removeprefix(f"{part}: ").replace(str(part), "the file")


def _open_check(entry: Entry, path: Path) -> None:
    """Open `path` as `entry.format` (without running anything in it); a file that does not open raises."""
    if entry.format == "eg3d-pkl":
        from my3dgen_cli.weights.official_pkl import read_official_pkl

        read_official_pkl(path)
    elif entry.format == "safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                list(f.keys())
        except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
            raise UserInputError(f"is not a readable safetensors file ({type(err).__name__})") from None
    elif entry.format == "torch-state-dict":
        import zipfile

        import torch

        try:  # weights_only: torch's restricted unpickler; a zip archive is memory-mapped, not read
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # torch raises many types for a damaged or foreign file
            raise UserInputError(f"is not a readable torch weights file ({type(err).__name__})") from None


def _refusal(entry: Entry, err: My3DGenError, user_file: Path | None = None) -> My3DGenError:
    """The one-line error for refused bytes: what was wrong, that nothing was kept, what to do.

    user_file: the file given with --from (None for a download)."""
    return type(err)(f"{entry.name}: {err}; nothing was cached ({_advice(entry, err, user_file)})")


def _advice(entry: Entry, err: My3DGenError, user_file: Path | None) -> str:
    from my3dgen_cli.weights.fit import ConfigMismatchError

    if isinstance(err, ConfigMismatchError):
        where = user_file or "FILE.pkl"
        fix = "" if user_file else f"fix the registry entry's config ({entry.config}), or download the file; "
        return (
            f"{fix}to use the file as it is, pass it as --base {where}, or keep it under a name of its own: "
            f"`my3dgen fetch NEW-NAME --from {where} --local`"
        )
    if entry.recorded:
        return f"its hash was recorded on first fetch; `my3dgen cache rm {entry.name} --forget` accepts another file"
    return (
        f"download {entry.display_filename} again ({entry.url}) and import it with "
        f"`my3dgen fetch {entry.name} --from {entry.display_filename}`"
    )


def _install(entry: Entry, staged: _Staged) -> Path:
    """Move staged bytes into blobs/ (and their conversion into converted/), record a first-use hash,
    then write the ref (lock held). Only checked bytes ever get here."""
    sha, part = staged.sha256, staged.part
    blob = _blob_path(sha)
    blob.parent.mkdir(parents=True, exist_ok=True)
    if blob.is_file() and blob.stat().st_size == staged.size:
        part.unlink()
    else:
        os.replace(part, blob)
    ref = read_ref(entry.name) or {}
    if ref.get("sha256") != sha:
        ref = {}
    if staged.conversion is not None:
        out = _move_conversion(staged.conversion, sha)
        ref.update(converted=str(out.relative_to(_root())), converted_sha256=sha256_file(out))
    if entry.sha256 is None:
        record_hash(entry.name, sha, staged.size, staged.source)
    ref.update(
        name=entry.name,
        kind=entry.kind,
        format=entry.format,
        sha256=sha,
        size=staged.size,
        source=staged.source,
        fetched_at=time.time(),
        blob=f"blobs/{sha}",
    )
    ref.pop("pkl_dropped", None)
    _write_ref(ref)
    return blob


def _commit(entry: Entry, part: Path, source: str, user_file: Path | None = None) -> Path:
    """Check `part` and put it into the cache, or raise the refusal with nothing kept (lock held)."""
    try:
        staged = _stage(entry, part, source)
    except My3DGenError as err:
        raise _refusal(entry, type(err)(f"{user_file or source}: {err}"), user_file) from None
    return _install(entry, staged)


def ensure(
    name: str,
    *,
    offline: bool | None = None,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
    on_wait: Callable[[str], None] | None = None,
    verify: bool = False,
) -> Path:
    """The verified file of artifact `name`, downloading it first if it is not cached.

    Args:
        name: a registry name (`my3dgen fetch --list`).
        offline: never use the network (default: `MY3DGEN_OFFLINE`). `package://` and `file://`
            sources are local and work offline.
        registry: extra registry files or URLs (beside `MY3DGEN_REGISTRY`).
        progress: `progress(done_bytes, total_bytes_or_None)` while bytes arrive.
        verify: rehash a cached file first; one that no longer matches is fetched again.

    A base generator is converted before its bytes enter the cache; a file with no published hash
    is trusted (hash recorded) only once it converted or opened (`_stage`). A URL whose bytes are
    refused falls back to the mirrors.

    Raises:
        ArtifactError: unknown name (with the closest names), or a missing `package://` package.
        OfflineError: not cached and offline.
        DownloadError: every URL failed (each reason given), or too little free disk.
        ChecksumError: the bytes do not match the registry's (or the recorded) sha256.
        UserInputError: the bytes are not a usable file of the entry's format (or config).
    """
    entry = get_entry(name, registry)
    hit = cached(name, entry)
    if hit is not None and not verify:
        return hit
    local = [u for u in entry.urls if download.is_local(u)]
    if hit is None and is_offline(offline) and not local:
        raise _offline_error(entry)
    with _locked(name, on_wait):
        entry = get_entry(name, registry)  # another process may have recorded the hash meanwhile
        hit = cached(name, entry)
        if hit is not None and (not verify or sha256_file(hit) == hit.name):
            return hit
        if hit is not None:
            hit.unlink()  # damaged since it was cached: fetch the bytes again
            if is_offline(offline) and not local:
                raise _offline_error(entry)
        part = _part_path(name)
        part.parent.mkdir(parents=True, exist_ok=True)
        if local:
            download.copy_local(local[0], part, progress)
            return _commit(entry, part, local[0])
        staged: list[_Staged] = []
        refused: list[My3DGenError] = []

        def check(url: str) -> None:
            try:
                staged.append(_stage(entry, part, url))
            except My3DGenError as err:
                refused.append(err)
                raise

        try:
            download.http_download(name, entry.urls, part, entry.size, progress, check=check)
        except DownloadError as err:
            if refused:  # some URL served bytes, none of them the right ones
                raise DownloadError(f"{err}; nothing was cached ({_advice(entry, refused[-1], None)})") from None
            raise
        except (ChecksumError, UserInputError, UnsafeCheckpointError) as err:  # the only URL was refused
            raise _refusal(entry, err) from None
        return _install(entry, staged[-1])


def import_file(
    name: str,
    src: str | os.PathLike[str],
    *,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
) -> Path:
    """Put a file the user downloaded by hand into the cache as `name`, after verifying it.

    Checked as a download is (`_stage`): unknown-hash entries record the file's sha256 (trust on
    first use) only after it converted or opened; a refused file leaves the cache as it was.
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
        return _commit(entry, part, f"file:{src}", user_file=src)


def _converter(entry: Entry) -> Callable[[Path, Path], Path]:
    """convert_pkl for an official pickle (its config must be the entry's); for a plain safetensors,
    its converter with the entry's config. The file name recorded is the artifact's usual one."""
    from my3dgen_cli.weights import checkpoint  # lazy: torch loads only when a base is converted

    if entry.format == "safetensors":
        return lambda src, dst: checkpoint.convert_safetensors(src, dst, config=entry.config)
    return lambda src, dst: checkpoint.convert_pkl(
        src, dst, config=entry.config, source_name=entry.display_filename
    )


def converted(name: str, entry: Entry | None = None, *, verify: bool = False) -> Path | None:
    """A base generator's converted .safetensors when present, else None.

    verify: also rehash it against the sha256 recorded at conversion (a damaged one counts as absent).
    """
    entry = entry or get_entry(name)
    ref = read_ref(name)
    if not ref or not ref.get("converted") or (entry.sha256 and ref.get("sha256") != entry.sha256):
        return None
    path = _root() / ref["converted"]
    if not (path.is_file() and path.with_suffix(".json").is_file()):
        return None
    if verify and sha256_file(path) != ref.get("converted_sha256"):
        return None
    return path


def resolve_base(
    name: str,
    *,
    keep_pkl: bool = True,
    offline: bool | None = None,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
    on_wait: Callable[[str], None] | None = None,
    verify: bool = False,
) -> Path:
    """The converted `.safetensors` of base generator `name` (config beside it, `.json`).

    Fetches the official `.pkl` if needed and converts it once with
    `my3dgen_cli.weights.checkpoint.convert_pkl`; an entry with `format = "safetensors"` (official
    tensor names, no config inside) is converted with `convert_safetensors` and the config its
    entry names. `keep_pkl=False` then deletes the downloaded blob. `verify=True` rehashes the
    conversion (and the blob, when it is needed) and redoes whatever no longer matches.
    Raises as `ensure`, plus ArtifactError for an entry that is not a base generator.
    """
    entry = get_entry(name, registry)
    if entry.kind != "base-generator":
        raise ArtifactError(f"{name} is a {entry.kind}, not a base generator")
    done = converted(name, entry, verify=verify)
    if done is None:
        src = ensure(name, offline=offline, registry=registry, progress=progress, on_wait=on_wait, verify=verify)
        with _locked(name, on_wait):
            done = converted(name, entry, verify=verify) or _convert(name, src, entry)
    if not keep_pkl:
        _drop_pkl(name)
    return done


def _convert_into_temp(entry: Entry, src: Path, sha: str) -> Path:
    """Convert `src` into a temp folder beside converted/<sha>/ (removed again if anything fails)."""
    tmp = _root() / "converted" / f".{sha}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _converter(entry)(src, tmp / CONVERTED_NAME)
        for needed in (tmp / CONVERTED_NAME, tmp / "generator.json"):
            if not needed.is_file():
                raise ArtifactError(f"{entry.name}: the converter did not write {needed.name}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(tmp.parent)
        raise
    return tmp


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (or gone): leave it


def _move_conversion(tmp: Path, sha: str) -> Path:
    final = _root() / "converted" / sha
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final / CONVERTED_NAME


def _convert(name: str, src: Path, entry: Entry) -> Path:
    """Convert cached blob `src` into converted/<sha256>/ and note it in the ref (lock held)."""
    ref = read_ref(name)
    if ref is None:
        raise ArtifactError(f"{name}: its cache entry vanished during conversion; fetch again")
    sha = ref["sha256"]
    out = _move_conversion(_convert_into_temp(entry, src, sha), sha)
    ref.update(converted=str(out.relative_to(_root())), converted_sha256=sha256_file(out))
    _write_ref(ref)
    return out


def import_local_base(name: str, src: str | os.PathLike[str], *, registry: Sequence[str] = ()) -> Path:
    """Convert an EG3D `.pkl` the user has (a training snapshot, a fine-tuned or reduced-width
    generator) into the local base `name`: `<cache>/bases/<name>.safetensors` + `.json`, with the
    file's own config. `--base name` then opens it (generators.resolve_base_path).

    A registry name is refused (a local base would shadow it), and so is an existing local base
    (identities made on it would stop matching). Nothing is written unless the file converts.
    """
    from my3dgen_cli.generators import local_bases_dir
    from my3dgen_cli.weights.checkpoint import convert_pkl

    src = Path(src).expanduser()
    if not NAME_RE.match(name):
        raise UserInputError(f"local base name: got {name!r}, expected lowercase letters, digits, '.', '_', '-'")
    if name in load_registry(registry):
        raise UserInputError(
            f"{name} is a registry artifact; import the file as it (`my3dgen fetch {name} --from {src}`, "
            "checked against its config) or give the local base another name"
        )
    if src.suffix != ".pkl" or not src.is_file():
        raise UserInputError(f"--from: got {str(src)!r}, expected an existing EG3D network pickle (.pkl)")
    dst = local_bases_dir() / f"{name}.safetensors"
    with _locked(f"base-{name}"):
        if dst.exists() or dst.with_suffix(".json").exists():
            raise UserInputError(
                f"a local base {name} exists already ({dst}); delete it and its .json to replace it, "
                "or pick another name"
            )
        return convert_pkl(src, dst)


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


def _usage(path: Path) -> tuple[int, float]:
    """(bytes, last use) of a file or a folder's files: last use is the latest atime or mtime seen."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    size, last = 0, 0.0
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue  # removed while we looked
        size += st.st_size
        last = max(last, st.st_atime, st.st_mtime)
    return size, last


def _row(kind: str, name: str, path: Path, **extra: Any) -> dict[str, Any]:
    size, last = _usage(path)
    return {"kind": kind, "name": name, "size": size, "last_used": last, "path": str(path), **extra}


def _bases_dir() -> Path:
    """`generators.local_bases_dir()`, without importing torch (listing the cache stays quick)."""
    return _root() / "bases"


def is_local_base(name: str) -> bool:
    """True when `name` is a local base (`bases/NAME.safetensors`)."""
    return "/" not in name and "\\" not in name and not name.startswith(".") and (
        _bases_dir() / f"{name}.safetensors").is_file()


def inventory() -> list[dict[str, Any]]:
    """Everything in the cache folder, one row each (kind, name, size, last_used, path): blobs (named by the
    refs that use them, `unreferenced` otherwise), converted bases, local bases (the demo's too) and partial
    downloads. Rows of `prune_candidates()` are among them."""
    root, refs = _root(), _refs()
    users: dict[str, list[str]] = {}
    for ref in refs:
        users.setdefault(ref["sha256"], []).append(ref["name"])
    rows = []
    for blob in sorted((root / "blobs").glob("*")) if (root / "blobs").is_dir() else []:
        rows.append(_row("blob", ", ".join(users.get(blob.name, [])) or "unreferenced", blob, sha256=blob.name))
    for conv in sorted((root / "converted").glob("*")) if (root / "converted").is_dir() else []:
        if conv.is_dir() and not conv.name.startswith("."):
            rows.append(_row("converted", ", ".join(users.get(conv.name, [])) or "unreferenced", conv,
                             sha256=conv.name))
    bases = _bases_dir()
    for weights in sorted(bases.glob("*.safetensors")) if bases.is_dir() else []:
        row = _row("local-base", weights.stem, weights)
        sidecar = weights.with_suffix(".json")
        if sidecar.is_file():
            size, last = _usage(sidecar)
            row.update(size=row["size"] + size, last_used=max(row["last_used"], last))
        rows.append(row)
    for part in sorted((root / "partial").glob("*.part")) if (root / "partial").is_dir() else []:
        rows.append(_row("partial", part.stem, part))
    return rows


def _in_use(name: str) -> bool:
    """True while another process holds `locks/<name>.lock` (a download or conversion in progress)."""
    from filelock import FileLock, Timeout

    path = _root() / "locks" / f"{name}.lock"
    if not path.is_file():
        return False
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def prune_candidates() -> list[dict[str, Any]]:
    """What `prune` removes: partial downloads nobody is writing, blobs and conversions no ref names, and
    conversion temp folders of processes that are gone (inventory rows, plus the `reason`)."""
    root, refs = _root(), _refs()
    used = {r["sha256"] for r in refs}
    converted = {r["sha256"] for r in refs if r.get("converted")}
    rows = []
    for row in inventory():
        if row["kind"] == "partial" and not _in_use(row["name"]):
            rows.append({**row, "reason": "partial download"})
        elif row["kind"] == "blob" and row["sha256"] not in used:
            rows.append({**row, "reason": "no cached name refers to it"})
        elif row["kind"] == "converted" and row["sha256"] not in converted:
            rows.append({**row, "reason": "no cached name refers to it"})
    for tmp in sorted((root / "converted").glob(".*.tmp")) if (root / "converted").is_dir() else []:
        pid = tmp.name.rsplit(".", 2)[-2]
        if not (pid.isdigit() and pid_alive(int(pid))):
            rows.append({**_row("conversion-leftover", tmp.name, tmp), "reason": "left by an interrupted conversion"})
    return rows


def remove_path(path: str | os.PathLike[str]) -> None:
    """Delete one inventory row's file or folder."""
    target = Path(path)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink(missing_ok=True)


def remove_local_base(name: str) -> dict[str, Any]:
    """Delete the local base `name` (`bases/NAME.safetensors` and its `.json`); identities made on it stop opening."""
    if not is_local_base(name):
        raise ArtifactError(f"{name} is not a local base (`my3dgen cache ls` shows what is)")
    weights = _bases_dir() / f"{name}.safetensors"
    removed = []
    with _locked(f"base-{name}"):
        for path in (weights, weights.with_suffix(".json")):
            if path.is_file():
                path.unlink()
                removed.append(str(path))
    return {"name": name, "removed": removed, "forgot_recorded_hash": False}


def verify_local_bases() -> list[dict[str, Any]]:
    """Reread every local base (`bases/NAME.safetensors` + `.json`): it must open as a converted base, and its
    weights must still have the fingerprint recorded when it was first opened (identities made on it record it)."""
    from my3dgen_cli.weights.converted import read_converted_base
    from my3dgen_cli.weights.fingerprint import KEY, state_fingerprint

    folder = _bases_dir()
    results = []
    for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        status, detail = "ok", "opens; no fingerprint recorded yet"
        try:
            base = read_converted_base(weights, full_check=True)
            state, config = base.state_dict, base.config
        except My3DGenError as err:
            results.append({"name": weights.stem, "status": "corrupt", "detail": str(err)})
            continue
        recorded = config.get(KEY)
        if isinstance(recorded, dict) and isinstance(recorded.get("sha256"), str):
            if state_fingerprint(state) == recorded["sha256"]:
                detail = "weights match their recorded fingerprint"
            else:
                status, detail = "corrupt", "weights no longer match their recorded fingerprint"
        results.append({"name": weights.stem, "status": status, "detail": detail})
    return results
