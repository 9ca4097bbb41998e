"""Getting an artifact's verified file by name: from the cache, torch hub's cache, a local source or
the network (`ensure`); a file the user downloaded by hand (`import_file`); a base generator's
converted weights (`resolve_base`); all of it for one name, as `my3dgen fetch` does (`fetch`).

Every download is visible (`visible.Display`): one line naming the artifact, its size and licence,
then a progress bar. Every failure is one line saying what failed (network, checksum, offline) and
how to fix it (`my3dgen fetch NAME`, `--from FILE`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from my3dgen_cli.errors import (
    ArtifactError,
    ChecksumError,
    DownloadError,
    My3DGenError,
    OfflineError,
    UnsafeCheckpointError,
    UserInputError,
)
from my3dgen_cli.zoo import admit, download, store, torch_hub
from my3dgen_cli.zoo.download import ProgressHook, sha256_file
from my3dgen_cli.zoo.registry import Entry, get_entry
from my3dgen_cli.zoo.visible import Display, download_progress


def offline_error(entry: Entry) -> OfflineError:
    return OfflineError(
        f"{entry.name} is not in the cache and offline mode is on (MY3DGEN_OFFLINE or --offline); "
        f"fetch it with network access: `my3dgen fetch {entry.name}`, or import a copy: "
        f"`my3dgen fetch {entry.name} --from {entry.display_filename}`"
    )


def ensure(
    name: str,
    *,
    offline: bool | None = None,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
    on_wait: Callable[[str], None] | None = None,
    verify: bool = False,
    display: Display | None = None,
) -> Path:
    """The verified file of artifact `name`, fetching it first if it is not cached.

    Args:
        name: a registry name (`my3dgen fetch --list`).
        offline: never use the network (default: `MY3DGEN_OFFLINE`). `package://` and `file://`
            sources, and a verified copy in torch hub's cache, are local and work offline.
        registry: extra registry files or URLs (beside `MY3DGEN_REGISTRY`).
        progress: `progress(done_bytes, total_bytes_or_None)` while bytes arrive (default: a bar of
            `display`'s).
        verify: rehash a cached file first; one that no longer matches is fetched again.
        display: where the download line, notes and warnings go (default: the running command's output).

    A base generator is converted before its bytes enter the cache; a file with no published hash
    is trusted (hash recorded) only once it converted or opened (`admit.stage`). A URL whose bytes
    are refused falls back to the mirrors.

    Raises:
        ArtifactError: unknown name (with the closest names), or a missing `package://` package.
        OfflineError: not cached and offline.
        DownloadError: every URL failed (each reason given), or too little free disk.
        ChecksumError: the bytes do not match the registry's (or the recorded) sha256.
        UserInputError: the bytes are not a usable file of the entry's format (or config).
    """
    entry = get_entry(name, registry)
    hit = store.cached(name, entry)
    if hit is not None and not verify:
        return hit
    local = [u for u in entry.urls if download.is_local(u)]
    if hit is None and store.is_offline(offline) and not local and torch_hub.candidate(entry) is None:
        raise offline_error(entry)
    display = display or Display()
    with store.locked(name, on_wait or display.info):
        entry = get_entry(name, registry)  # another process may have recorded the hash meanwhile
        hit = store.cached(name, entry)
        if hit is not None and (not verify or sha256_file(hit) == hit.name):
            return hit
        if hit is not None:
            hit.unlink()  # damaged since it was cached: fetch the bytes again
        part = store.part_path(name)
        part.parent.mkdir(parents=True, exist_ok=True)
        if local:
            download.copy_local(local[0], part, progress)
            return admit.commit(entry, part, local[0])
        reused = _from_torch_hub(entry, part, progress, display)
        if reused is not None:
            return reused
        if store.is_offline(offline):
            raise offline_error(entry)
        with display.download(entry, entry.url, progress) as hook:
            return _download(entry, part, hook)


def _from_torch_hub(entry: Entry, part: Path, progress: ProgressHook | None, display: Display) -> Path | None:
    """torch hub's verified copy of `entry` put into the cache (lock held), or None when there is no
    usable one (a mismatching file is ignored with a warning, and the caller downloads)."""
    src = torch_hub.candidate(entry)
    if src is None:
        return None
    if not torch_hub.place(src, part):
        download.copy_local(src.resolve().as_uri(), part, progress)
    try:
        staged = admit.stage(entry, part, f"file:{src}")
    except My3DGenError as err:
        display.warn(f"ignoring torch hub's {src}: it {err}")
        return None
    display.info(f"{entry.name}: using torch hub's copy {src} (sha256 verified)")
    return admit.install(entry, staged)


def _download(entry: Entry, part: Path, progress: ProgressHook | None) -> Path:
    """Download `entry` into `part` from the first URL whose bytes pass `admit.stage`, and install it."""
    staged: list[admit.Staged] = []
    refused: list[My3DGenError] = []

    def check(url: str) -> None:
        try:
            staged.append(admit.stage(entry, part, url))
        except My3DGenError as err:
            refused.append(err)
            raise

    try:
        download.http_download(entry.name, entry.urls, part, entry.size, progress, check=check)
    except DownloadError as err:
        why = refused[-1] if refused else None  # some URL served bytes, none of them the right ones
        raise DownloadError(f"{err}; nothing was cached ({admit.advice(entry, why, None)})") from None
    except (ChecksumError, UserInputError, UnsafeCheckpointError) as err:  # the only URL was refused
        raise admit.refusal(entry, err) from None
    return admit.install(entry, staged[-1])


def import_file(
    name: str,
    src: str | os.PathLike[str],
    *,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
) -> Path:
    """Put a file the user downloaded by hand into the cache as `name`, after verifying it.

    Checked as a download is (`admit.stage`): unknown-hash entries record the file's sha256 (trust
    on first use) only after it converted or opened; a refused file leaves the cache as it was.
    """
    src = Path(src).expanduser()
    entry = get_entry(name, registry)
    if not src.is_file():
        raise UserInputError(
            f"--from: got {str(src)!r}, expected an existing file ({entry.display_filename})"
        )
    with store.locked(name):
        entry = get_entry(name, registry)
        part = store.part_path(name)
        part.parent.mkdir(parents=True, exist_ok=True)
        download.copy_local(src.resolve().as_uri(), part, progress)
        return admit.commit(entry, part, f"file:{src}", user_file=src)


def resolve_base(
    name: str,
    *,
    keep_pkl: bool = True,
    offline: bool | None = None,
    registry: Sequence[str] = (),
    progress: ProgressHook | None = None,
    on_wait: Callable[[str], None] | None = None,
    verify: bool = False,
    display: Display | None = None,
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
    done = store.converted(name, entry, verify=verify)
    if done is None:
        src = ensure(name, offline=offline, registry=registry, progress=progress, on_wait=on_wait, verify=verify,
                     display=display)
        with store.locked(name, on_wait):
            done = store.converted(name, entry, verify=verify) or _convert(name, src, entry)
    if not keep_pkl:
        _drop_pkl(name)
    return done


def _convert(name: str, src: Path, entry: Entry) -> Path:
    """Convert cached blob `src` into converted/<sha256>/ and note it in the ref (lock held)."""
    ref = store.read_ref(name)
    if ref is None:
        raise ArtifactError(f"{name}: its cache entry vanished during conversion; fetch again")
    sha = ref["sha256"]
    out = admit.move_conversion(admit.convert_into_temp(entry, src, sha), sha)
    ref.update(converted=str(out.relative_to(store.root())), converted_sha256=sha256_file(out))
    store.write_ref(ref)
    return out


def _drop_pkl(name: str) -> None:
    with store.locked(name):
        ref = store.read_ref(name)
        if not ref or not ref.get("converted"):
            return
        if not any(r["sha256"] == ref["sha256"] for r in store.refs() if r["name"] != name):
            store.blob_path(ref["sha256"]).unlink(missing_ok=True)
        ref["pkl_dropped"] = True
        store.write_ref(ref)


def fetch(name: str, source: Path | None = None, *, offline: bool | None = None, keep_pkl: bool = True,
          registry: Sequence[str] = (), display: Display | None = None) -> dict[str, Any]:
    """What `my3dgen fetch NAME [--from FILE]` does for one name: import `source` or fetch (a damaged cached
    file is fetched again, never returned), convert a base generator, and describe the result
    (name, kind, converted, path, sha256, size)."""
    display = display or Display()
    entry = get_entry(name, registry)
    convert = entry.kind == "base-generator"  # .pkl or plain .safetensors -> converted pair
    row: dict[str, Any] = {"name": name, "kind": entry.kind}
    if source is not None:
        with download_progress(display.output, name) as hook:
            import_file(name, source, registry=registry, progress=hook)
    elif not convert or store.cached(name, entry) or not store.converted(name, entry):
        ensure(name, offline=offline, registry=registry, on_wait=display.info, verify=True, display=display)
    if convert:
        base = resolve_base(name, keep_pkl=keep_pkl, offline=offline, registry=registry, verify=True, display=display)
        row["converted"] = str(base)
    path = store.cached(name, get_entry(name, registry))
    ref = store.read_ref(name) or {}
    row.update(path=str(path) if path else None, sha256=ref.get("sha256"), size=ref.get("size"))
    return row
