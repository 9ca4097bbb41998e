"""The identities a user keeps: list them (broken ones with the reason), remove, export, import an archive.

An identity archive (`my3dgen identities export NAME -o ana.zip`) is a zip holding only the names
in `ARCHIVE_MEMBERS`: `identity.json` (format tag, name, base name and fingerprint, sha256 of every
other member), `adapter.safetensors`, and when present `anchors.safetensors`, `log.json`, `loss.png`,
`previews/grid.png`. Import trusts nothing in it: member names must be exactly those names (so no
absolute path or `..` can reach the disk), sizes are bounded while the bytes are read (a zip bomb
stops at the bound), every hash must match, the adapter and anchors must open, and the adapter's base
fingerprint must be the one of a base available here. The identity is written through
`identity.building_identity`, so a refusal leaves the identities folder as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from my3dgen_cli import __version__, paths
from my3dgen_cli.errors import IncompatibleAdapterError, My3DGenError, UserInputError

ARCHIVE_FORMAT = "my3dgen-identity-archive/1"
MANIFEST = "identity.json"
ARCHIVE_FILES = ("adapter.safetensors", "anchors.safetensors", "log.json", "loss.png", "previews/grid.png")
ARCHIVE_MEMBERS = (MANIFEST, *ARCHIVE_FILES)
MAX_MANIFEST_BYTES = 1 << 20
MAX_MEMBER_BYTES = 1 << 30  # a full-size rank-8 adapter is ~10 MB; anchors and previews are smaller
MAX_ARCHIVE_BYTES = 2 << 30
# Problems one identity folder can have; listing reports them instead of stopping at the first folder.
_FOLDER_PROBLEMS = (My3DGenError, OSError, KeyError, ValueError, TypeError, AttributeError)


@dataclass(frozen=True)
class Survey:
    """Every folder under identities/: the usable ones (as `describe_identity` rows), the broken ones, and
    the unfinished `personalize` builds (`.NAME.build`, which `--resume` continues)."""

    good: list[dict[str, Any]]
    broken: list[dict[str, str]]
    unfinished: list[dict[str, str]]


def survey_identities() -> Survey:
    """Describe every identity folder; a folder that cannot be read is reported with the reason, never raised."""
    from my3dgen_cli.identity import IdentityPaths, check_name, identity_paths, read_anchors
    from my3dgen_cli.personalize.pipeline import describe_identity

    root = paths.identities_dir()
    good: list[dict[str, Any]] = []
    broken: list[dict[str, str]] = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    for folder in folders:
        name = folder.name
        try:
            check_name(name)
            ip = identity_paths(name)
            if not ip.adapter.is_file():
                reason = "no adapter.safetensors"
                if ip.resumable():
                    reason += " (an unfinished run: `my3dgen personalize ... --resume` finishes it)"
                broken.append({"name": name, "reason": reason, "path": str(folder)})
                continue
            if ip.anchors.exists():  # optional, but a damaged one fails `render --anchor` and `interpolate`
                read_anchors(ip.anchors)
            good.append(describe_identity(name))
        except _FOLDER_PROBLEMS as err:
            broken.append({"name": name, "reason": _reason(err, folder), "path": str(folder)})
    unfinished = []
    for name, folder in unfinished_builds():
        stage = _build_stage(IdentityPaths(folder))
        replacing = (root / name).is_dir()  # `rm` would take the finished identity too
        if stage == "stopped before any anchor":  # nothing saved: --resume has nothing to continue from
            then = (f"{name} stays as it is; run personalize again with --force to replace it" if replacing else
                    f"nothing was saved: run personalize again (without --resume), or `my3dgen identities rm {name}`")
        elif replacing:
            then = f"{name} stays as it is until it finishes; rerun with --resume to finish, or --force to start over"
        else:
            then = f"rerun it with --resume to finish, or `my3dgen identities rm {name}` to drop it"
        unfinished.append({"name": name, "path": str(folder), "reason": f"an interrupted personalize ({stage}): "
                           f"{then}"})
    return Survey(good, broken, unfinished)


def unfinished_builds() -> list[tuple[str, Path]]:
    """(name, folder) of every unfinished `personalize` build (`identities/.NAME.build`), by name."""
    root = paths.identities_dir()
    builds = sorted(root.glob(".*.build")) if root.is_dir() else []
    return [(folder.name[1:-len(".build")], folder) for folder in builds if folder.is_dir()]


def named(finished: list[str], unfinished: list[str]) -> str:
    """Identity names for a one-line message: "ana, bob (unfinished)" (the unfinished builds marked)."""
    return ", ".join([*finished, *(f"{n} (unfinished)" for n in unfinished)])


@dataclass(frozen=True)
class BaseUsers:
    """The identities trained on one base: finished ones, and unfinished builds (what `--resume` continues)."""

    finished: list[str]
    unfinished: list[str]

    def __bool__(self) -> bool:
        return bool(self.finished or self.unfinished)

    def were(self) -> str:
        """ "identity ana was" or "identities ana, bob (unfinished) were": the subject of a one-line message."""
        many = len(self.finished) + len(self.unfinished) > 1
        return f"identit{'ies' if many else 'y'} {named(self.finished, self.unfinished)} {'were' if many else 'was'}"


def identities_on_base(base: str) -> BaseUsers:
    """The identities whose recorded base is named `base`: a finished one's adapter records it, an unfinished
    build's (or an older version's unfinished run's) anchors or partial anchors do. A build stopped before its
    first anchor chunk records no base yet and is not counted; unreadable files are passed over (the listing
    reports them)."""
    from my3dgen_cli.identity import IdentityPaths

    root = paths.identities_dir()
    folders = sorted(f for f in root.iterdir() if f.is_dir() and not f.name.startswith(".")) if root.is_dir() else []
    finished: list[str] = []
    unfinished: list[str] = []
    for name, folder in [(f.name, f) for f in folders] + unfinished_builds():
        ip = IdentityPaths(folder)
        if _recorded_base(ip) == base:
            (finished if ip.adapter.is_file() else unfinished).append(name)
    return BaseUsers(finished, [n for n in unfinished if n not in finished])


def _recorded_base(ip: Any) -> str | None:
    """The base name an identity folder (IdentityPaths) records: its adapter's, else its anchors', else the
    partial anchors' (None: none readable)."""
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import read_anchors, read_partial_anchors

    try:
        if ip.adapter.is_file():
            return read_adapter(ip.adapter).base_name
        if ip.anchors.is_file():
            return read_anchors(ip.anchors).extra.get("base")
        partial = read_partial_anchors(ip.partial_anchors)
        return None if partial is None else partial.fingerprint.get("base")
    except _FOLDER_PROBLEMS:
        return None


def _build_stage(build: Any) -> str:
    """How far an interrupted build got, from the files it left (IdentityPaths of the build folder)."""
    if any(build.checkpoints.glob("step-*.pt")):
        return "stopped while training"
    if build.anchors.is_file():
        return "anchors done"
    return "stopped while projecting anchors" if build.partial_anchors.is_file() else "stopped before any anchor"


def _reason(err: BaseException, folder: Path) -> str:
    text = str(err).replace(f"{folder}/", "").replace(str(folder), "the folder")
    if isinstance(err, KeyError):
        return f"adapter metadata lacks {text}"
    if not isinstance(err, My3DGenError | OSError):
        return f"bad adapter metadata ({type(err).__name__}: {text})"
    return text


def folder_usage(folder: Path) -> tuple[int, float]:
    """(bytes of all files under `folder`, latest access or modification time of any of them)."""
    size, last = 0, 0.0
    for p in folder.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue  # removed while we looked
        if p.is_file() and not p.is_symlink():
            size += st.st_size
        last = max(last, st.st_atime, st.st_mtime)
    return size, last


def remove_identity(name: str) -> dict[str, Any]:
    """Delete identity `name` (usable, broken or an unfinished build): each folder is renamed out of sight
    (`.NAME.trash-*`, never restored) first, so readers never see half of it."""
    from my3dgen_cli.identity import build_paths, identity_paths, list_identities

    folders = [f for f in (identity_paths(name).root, build_paths(name).root) if f.is_dir()]
    if not folders:
        finished = list_identities()
        unfinished = [n for n, _ in unfinished_builds() if n not in finished]
        raise UserInputError(f"no identity named {name!r} (known: {named(finished, unfinished) or 'none'})")
    what = ["identity"] if folders[0] == identity_paths(name).root else []
    if build_paths(name).root in folders:
        what.append("its unfinished build" if what else "unfinished build")
    size = 0
    for folder in folders:
        size += folder_usage(folder)[0]
        retired = folder.with_name(f".{name}.trash-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(folder, retired)
        shutil.rmtree(retired, ignore_errors=True)
    return {"name": name, "path": str(identity_paths(name).root), "bytes": size, "removed": " and ".join(what)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_identity(name: str, output: Path, force: bool = False) -> dict[str, Any]:
    """Write identity `name` as a zip archive at `output` (atomically); refuse a broken identity."""
    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.fileio import atomic_path, check_not_in_stores
    from my3dgen_cli.identity import require_identity

    ip = require_identity(name)
    try:
        adapter = read_adapter(ip.adapter)
    except _FOLDER_PROBLEMS as err:
        raise UserInputError(f"identity {name} is broken ({_reason(err, ip.root)}); nothing was exported") from None
    check_not_in_stores([output])
    if output.exists() and not force:
        raise UserInputError(f"{output} exists; pass --force to replace it")
    files = {m: ip.root / m for m in ARCHIVE_FILES if (ip.root / m).is_file()}
    manifest = {"format": ARCHIVE_FORMAT, "name": name, "base_name": adapter.base_name,
                "base_sha256": adapter.base_fingerprint, "my3dgen_version": __version__,
                "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": {m: {"sha256": _sha256(p), "bytes": p.stat().st_size} for m, p in files.items()}}
    with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for member, path in files.items():
            zf.write(path, member)
    return {"name": name, "output": str(output), "bytes": output.stat().st_size, "members": [MANIFEST, *files],
            "base": manifest["base_name"]}


def _refuse(archive: Path, why: str) -> UserInputError:
    return UserInputError(f"{archive}: {why}; nothing was imported")


def _checked_members(archive: Path, zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by name, after the name allow-list and the declared size bounds."""
    members: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in zf.infolist():
        if info.filename not in ARCHIVE_MEMBERS:
            raise _refuse(archive, f"member {info.filename!r} is not part of an identity archive "
                                   f"(allowed: {', '.join(ARCHIVE_MEMBERS)})")
        if info.filename in members:
            raise _refuse(archive, f"member {info.filename!r} appears twice")
        if info.file_size > MAX_MEMBER_BYTES:
            raise _refuse(archive, f"member {info.filename} would unpack to {info.file_size:,} bytes "
                                   f"(at most {MAX_MEMBER_BYTES:,})")
        total += info.file_size
        members[info.filename] = info
    if total > MAX_ARCHIVE_BYTES:
        raise _refuse(archive, f"unpacks to {total:,} bytes (at most {MAX_ARCHIVE_BYTES:,})")
    for needed in (MANIFEST, "adapter.safetensors"):
        if needed not in members:
            raise _refuse(archive, f"has no {needed}; is it an identity archive (`my3dgen identities export`)?")
    return members


def _read_bounded(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst: Path | None, bound: int) -> bytes:
    """Unpack one member, stopping as soon as it yields more than its declared size or `bound` (zip bombs).

    Returns the bytes when `dst` is None, else writes them to `dst` and returns b""."""
    limit = min(info.file_size, bound)
    got = 0
    chunks: list[bytes] = []
    try:
        with zf.open(info) as src, (dst.open("wb") if dst is not None else _NullSink()) as out:
            while block := src.read(1 << 20):
                got += len(block)
                if got > limit:
                    raise _refuse(archive, f"member {info.filename} unpacks to more than its declared "
                                           f"{info.file_size:,} bytes (or the {bound:,}-byte bound)")
                if dst is None:
                    chunks.append(block)
                else:
                    out.write(block)
    # a damaged member fails its CRC or inflate; an encrypted or exotically compressed one cannot be read
    except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as err:
        raise _refuse(archive, f"member {info.filename} cannot be unpacked ({err})") from None
    return b"".join(chunks)


class _NullSink:
    def __enter__(self) -> _NullSink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def write(self, data: bytes) -> None:
        return None


def _read_manifest(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, Any]:
    raw = _read_bounded(archive, zf, info, None, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _refuse(archive, f"{MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARCHIVE_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise _refuse(archive, f"{MANIFEST}: got format {got!r}, expected {ARCHIVE_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values()):
        raise _refuse(archive, f"{MANIFEST}: 'files' must map each member to its sha256")
    return manifest


def available_base_fingerprint(base_name: str) -> str | None:
    """The weight fingerprint of the base `base_name` if it is here (local base or converted zoo base), else None.

    Never downloads: an import must not fetch gigabytes to decide whether to refuse an archive."""
    from my3dgen_cli.generators import open_base, resolve_base_path
    from my3dgen_cli.weights.fingerprint import stored_fingerprint, weights_stamp

    try:
        _, path = resolve_base_path(base_name, offline=True)
    except My3DGenError:
        return None
    return stored_fingerprint(path, weights_stamp(path)) or open_base(base_name, device="cpu", offline=True)[1].sha256


def import_identity_archive(archive: Path, name: str | None = None, force: bool = False) -> dict[str, Any]:
    """Unpack an identity archive as identity `name` (default: the name it was exported as), verified as the
    module docstring says. Raises the project's one-line errors; the identities folder is unchanged then."""
    from safetensors import SafetensorError

    from my3dgen_cli.adapter_file import read_adapter
    from my3dgen_cli.identity import building_identity, check_name, identity_paths, read_anchors

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise _refuse(archive, f"not a readable zip archive ({err})") from None
    with zf:
        members = _checked_members(archive, zf)
        manifest = _read_manifest(archive, zf, members[MANIFEST])
        files = manifest["files"]
        unlisted = sorted(set(members) - {MANIFEST} - set(files)) + sorted(set(files) - set(members))
        if unlisted:
            raise _refuse(archive, f"{unlisted[0]} is in {MANIFEST} or the zip but not both")
        name = check_name(name if name is not None else str(manifest.get("name", "")))
        final = identity_paths(name)
        if final.root.exists() and not force:
            raise UserInputError(f"an identity named {name!r} exists; pass --force to replace it, or --name NEW")
        replacing = final.root.exists()
        with building_identity(name) as ip:
            for member, info in members.items():
                if member == MANIFEST:
                    continue
                dst = ip.root / member
                dst.parent.mkdir(exist_ok=True)
                _read_bounded(archive, zf, info, dst, MAX_MEMBER_BYTES)
                if _sha256(dst) != files[member]["sha256"]:
                    raise _refuse(archive, f"{member} does not match its sha256 in {MANIFEST}")
            try:
                adapter = read_adapter(ip.adapter)
                anchors = read_anchors(ip.anchors).ws.shape[0] if ip.anchors.is_file() else 0
            except (*_FOLDER_PROBLEMS, SafetensorError) as err:
                raise _refuse(archive, f"its adapter or anchors do not open ({_reason(err, ip.root)})") from None
            base, wanted = adapter.base_name, adapter.base_fingerprint
            have = available_base_fingerprint(base)
            if have is None:
                raise _refuse(archive, f"it was made on base {base!r}, which is not here; get it first "
                                       f"(`my3dgen fetch {base}`, or the person's local base) and import again")
            if have != wanted:
                raise IncompatibleAdapterError(
                    f"{archive}: made on base {base!r} with fingerprint {wanted[:12]}, but the base {base!r} here "
                    f"has {have[:12]} (other weights); nothing was imported")
    return {"name": name, "path": str(final.root), "base": base, "anchors": anchors,
            "members": sorted(members), "replaced": replacing}


def identity_rows() -> list[dict[str, Any]]:
    """`my3dgen cache ls` rows (kind, name, size, last_used, path) for identity folders and leftover build folders
    (`.NAME.build`, `.NAME.new-*`, `.NAME.old-*`, `.NAME.trash-*`: see `identity.building_identity`)."""
    root = paths.identities_dir()
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        size, last = folder_usage(folder)
        kind = "identity-leftover" if folder.name.startswith(".") else "identity"
        rows.append({"kind": kind, "name": folder.name, "size": size, "last_used": last, "path": str(folder)})
    return rows


def leftover_builds() -> list[dict[str, Any]]:
    """Leftover build folders whose process is gone (a running `personalize` keeps its own): what `cache prune`
    removes from identities/. Kept: `.NAME.build` (`--resume` continues it) and an `.NAME.old-*` folder while
    there is no `NAME` (a kill between a replacement's two renames: it is the whole old identity, which the
    next build of NAME puts back)."""
    from my3dgen_cli.zoo.inventory import pid_alive

    rows = []
    for row in identity_rows():
        name, _, marker = row["name"][1:].rpartition(".")  # ".NAME.new-PID-TAG" -> NAME, "new-PID-TAG"
        parts = marker.split("-")
        if row["kind"] != "identity-leftover" or len(parts) != 3 or parts[0] not in ("new", "old", "trash"):
            continue
        if parts[0] == "old" and not (Path(row["path"]).parent / name).is_dir():
            continue
        if not (parts[1].isdigit() and pid_alive(int(parts[1]))):
            rows.append({**row, "reason": "left by an interrupted identity build or replacement"})
    return rows
