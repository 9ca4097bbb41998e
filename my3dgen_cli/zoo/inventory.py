"""What `my3dgen cache` shows and tidies: every item in the cache folder with size and last use
(`inventory`), rehashing (`verify`), removal by name (`remove`) and what `prune` may delete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from my3dgen_cli.errors import ArtifactError
from my3dgen_cli.zoo import store
from my3dgen_cli.zoo.download import sha256_file
from my3dgen_cli.zoo.local_bases import bases_dir
from my3dgen_cli.zoo.registry import forget_hash


def cache_list() -> list[dict[str, Any]]:
    """One dict per cached name: name, kind, sha256, size, path, converted, fetched_at, present."""
    rows = []
    for ref in store.refs():
        blob = store.blob_path(ref["sha256"])
        conv = store.root() / ref["converted"] if ref.get("converted") else None
        rows.append({
            "name": ref["name"], "kind": ref.get("kind"), "sha256": ref["sha256"], "size": ref.get("size"),
            "path": str(blob) if blob.is_file() else None,
            "converted": str(conv) if conv and conv.is_file() else None,
            "fetched_at": ref.get("fetched_at"), "source": ref.get("source"),
        })  # fmt: skip
    return rows


def verify(names: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rehash cached files. One dict per name: name, status ("ok", "corrupt", "missing"), detail."""
    refs = {r["name"]: r for r in store.refs()}
    for name in names:
        if name not in refs:
            raise ArtifactError(f"{name} is not in the cache (`my3dgen cache ls` shows what is)")
    return [{"name": name, **_check(refs[name])} for name in names or sorted(refs)]


def _check(ref: dict[str, Any]) -> dict[str, str]:
    """The status and detail of one ref's blob and conversion."""
    blob = store.blob_path(ref["sha256"])
    if blob.is_file():
        actual = sha256_file(blob)
        if actual != ref["sha256"]:
            return {"status": "corrupt", "detail": f"blob sha256 {actual}, expected {ref['sha256']}"}
    elif not ref.get("pkl_dropped"):
        return {"status": "missing", "detail": f"blobs/{ref['sha256']} is gone"}
    if ref.get("converted"):
        conv = store.root() / ref["converted"]
        if not conv.is_file():
            return {"status": "missing", "detail": f"{ref['converted']} is gone"}
        if sha256_file(conv) != ref.get("converted_sha256"):
            return {"status": "corrupt", "detail": f"{ref['converted']} does not match its recorded sha256"}
    return {"status": "ok", "detail": "sha256 matches"}


def remove(name: str, *, forget: bool = False) -> dict[str, Any]:
    """Delete `name` from the cache (blob and conversion unless another name shares them).

    `forget=True` also drops a hash recorded on first fetch, so another file can be accepted.
    """
    removed: list[str] = []
    with store.locked(name):
        ref = store.read_ref(name)
        part = store.part_path(name)
        if part.exists():
            part.unlink()
            removed.append(str(part))
        if ref is not None:
            others = [r for r in store.refs() if r["name"] != name]
            store.ref_path(name).unlink()
            removed.append(str(store.ref_path(name)))
            if not any(r["sha256"] == ref["sha256"] for r in others):
                blob = store.blob_path(ref["sha256"])
                if blob.exists():
                    blob.unlink()
                    removed.append(str(blob))
                conv = store.root() / "converted" / ref["sha256"]
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


def _children(folder: Path, pattern: str) -> list[Path]:
    return sorted(folder.glob(pattern)) if folder.is_dir() else []


def inventory() -> list[dict[str, Any]]:
    """Everything in the cache folder, one row each (kind, name, size, last_used, path): blobs (named by the
    refs that use them, `unreferenced` otherwise), converted bases, local bases (the demo's too) and partial
    downloads. Rows of `prune_candidates()` are among them."""
    root = store.root()
    users: dict[str, list[str]] = {}
    for ref in store.refs():
        users.setdefault(ref["sha256"], []).append(ref["name"])
    rows = []
    for blob in _children(root / "blobs", "*"):
        rows.append(_row("blob", ", ".join(users.get(blob.name, [])) or "unreferenced", blob, sha256=blob.name))
    for conv in _children(root / "converted", "*"):
        if conv.is_dir() and not conv.name.startswith("."):
            rows.append(_row("converted", ", ".join(users.get(conv.name, [])) or "unreferenced", conv,
                             sha256=conv.name))
    for weights in _children(bases_dir(), "*.safetensors"):
        row = _row("local-base", weights.stem, weights)
        sidecar = weights.with_suffix(".json")
        if sidecar.is_file():
            size, last = _usage(sidecar)
            row.update(size=row["size"] + size, last_used=max(row["last_used"], last))
        rows.append(row)
    for part in _children(root / "partial", "*.part"):
        rows.append(_row("partial", part.stem, part))
    return rows


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
    refs = store.refs()
    used = {r["sha256"] for r in refs}
    converted = {r["sha256"] for r in refs if r.get("converted")}
    rows = []
    for row in inventory():
        if row["kind"] == "partial" and not store.in_use(row["name"]):
            rows.append({**row, "reason": "partial download"})
        elif row["kind"] == "blob" and row["sha256"] not in used:
            rows.append({**row, "reason": "no cached name refers to it"})
        elif row["kind"] == "converted" and row["sha256"] not in converted:
            rows.append({**row, "reason": "no cached name refers to it"})
    for tmp in _children(store.root() / "converted", ".*.tmp"):
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
