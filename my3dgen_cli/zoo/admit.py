"""Admitting bytes into the cache: check a file in `partial/` (hash, conversion of a base, opening
as its format), then move it into `blobs/` and write its ref; or refuse it, leaving nothing.

A file becomes the trusted one only after it passed every check, never before: a refused, empty
or truncated file leaves no blob, no ref, no conversion and no recorded hash (docs/zoo.md, trust
on first use). The caller holds the name's lock (`store.locked`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from my3dgen_cli.errors import ArtifactError, ChecksumError, My3DGenError, UserInputError
from my3dgen_cli.zoo import store
from my3dgen_cli.zoo.download import sha256_file
from my3dgen_cli.zoo.registry import Entry, record_hash


@dataclass
class Staged:
    """Bytes in `partial/` that passed every check, not yet in the cache (see `stage`)."""

    part: Path
    sha256: str
    size: int
    source: str
    conversion: Path | None  # temp folder holding generator.safetensors + .json (base generators)


def stage(entry: Entry, part: Path, source: str) -> Staged:
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
        conversion = convert_into_temp(entry, part, sha) if entry.kind == "base-generator" else None
        if conversion is None and entry.sha256 is None:
            _open_check(entry, part)
    except My3DGenError as err:
        part.unlink(missing_ok=True)
        raise type(err)(_strip_path(str(err), part)) from None
    return Staged(part, sha, size, source, conversion)


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


def refusal(entry: Entry, err: My3DGenError, user_file: Path | None = None) -> My3DGenError:
    """The one-line error for refused bytes: what was wrong, that nothing was kept, what to do.

    user_file: the file given with --from (None for a download)."""
    return type(err)(f"{entry.name}: {err}; nothing was cached ({advice(entry, err, user_file)})")


def advice(entry: Entry, err: My3DGenError | None, user_file: Path | None) -> str:
    """What to do after `err` (None: the download itself failed, no bytes were refused)."""
    from my3dgen_cli.weights.fit import ConfigMismatchError

    if isinstance(err, ConfigMismatchError):
        where = user_file or "FILE.pkl"
        fix = "" if user_file else f"fix the registry entry's config ({entry.config}), or download the file; "
        return (
            f"{fix}to use the file as it is, pass it as --base {where}, or keep it under a name of its own: "
            f"`my3dgen fetch NEW-NAME --from {where} --local`"
        )
    if err is not None and entry.recorded:
        return f"its hash was recorded on first fetch; `my3dgen cache rm {entry.name} --forget` accepts another file"
    again = "try again later: `my3dgen fetch {name}`, or download {file} by hand" if err is None else \
        "download {file} again"
    return (
        again.format(name=entry.name, file=entry.display_filename)
        + f" ({entry.url}) and import it with `my3dgen fetch {entry.name} --from {entry.display_filename}`"
    )


def install(entry: Entry, staged: Staged) -> Path:
    """Move staged bytes into blobs/ (and their conversion into converted/), record a first-use hash,
    then write the ref (lock held). Only checked bytes ever get here."""
    sha, part = staged.sha256, staged.part
    blob = store.blob_path(sha)
    blob.parent.mkdir(parents=True, exist_ok=True)
    if blob.is_file() and blob.stat().st_size == staged.size:
        part.unlink()
    else:
        os.replace(part, blob)
    ref = store.read_ref(entry.name) or {}
    if ref.get("sha256") != sha:
        ref = {}
    if staged.conversion is not None:
        out = move_conversion(staged.conversion, sha)
        ref.update(converted=str(out.relative_to(store.root())), converted_sha256=sha256_file(out))
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
    store.write_ref(ref)
    return blob


def commit(entry: Entry, part: Path, source: str, user_file: Path | None = None) -> Path:
    """Check `part` and put it into the cache, or raise the refusal with nothing kept (lock held)."""
    try:
        staged = stage(entry, part, source)
    except My3DGenError as err:
        raise refusal(entry, type(err)(f"{user_file or source}: {err}"), user_file) from None
    return install(entry, staged)


def _converter(entry: Entry) -> Callable[[Path, Path], Path]:
    """convert_pkl for an official pickle (its config must be the entry's); for a plain safetensors,
    its converter with the entry's config. The file name recorded is the artifact's usual one."""
    from my3dgen_cli.weights import checkpoint  # lazy: torch loads only when a base is converted

    if entry.format == "safetensors":
        return lambda src, dst: checkpoint.convert_safetensors(src, dst, config=entry.config)
    return lambda src, dst: checkpoint.convert_pkl(
        src, dst, config=entry.config, source_name=entry.display_filename
    )


def convert_into_temp(entry: Entry, src: Path, sha: str) -> Path:
    """Convert `src` into a temp folder beside converted/<sha>/ (removed again if anything fails)."""
    tmp = store.root() / "converted" / f".{sha}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _converter(entry)(src, tmp / store.CONVERTED_NAME)
        for needed in (tmp / store.CONVERTED_NAME, tmp / "generator.json"):
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


def move_conversion(tmp: Path, sha: str) -> Path:
    final = store.root() / "converted" / sha
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final / store.CONVERTED_NAME
