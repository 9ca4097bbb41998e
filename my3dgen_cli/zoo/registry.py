"""The model registry: named artifacts (weights my3dgen downloads), one TOML entry each.

Sources, later ones overriding earlier ones field by field:

1. the packaged registry, `zoo/*.toml` at the repository top (installed as
   `my3dgen_cli/zoo_registry_data/`), one file per artifact;
2. extra registries from `MY3DGEN_REGISTRY` (comma-separated files or http(s) URLs) and then
   `--registry`, for a lab mirror: a file holds either one entry (top-level keys) or many
   (`[[artifact]]` tables); an entry with a packaged name only needs the fields it changes;
3. hashes recorded on first fetch or import, for entries that publish no sha256: the cache's
   own `registry.local.json` (never an edit of the packaged TOML).

Entry fields: name, description, kind, url, mirrors, sha256, sha256_prefix, size, format,
config (base generators: the named EG3D config), filename, license, terms.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from my3dgen_cli import paths
from my3dgen_cli.errors import ArtifactError, OfflineError, UnknownArtifactError, UserInputError, reason
from my3dgen_cli.fileio import write_text_atomic

KINDS = ("base-generator", "lpips-backbone", "identity-network", "face-detector", "other")
FORMATS = ("eg3d-pkl", "safetensors", "torch-state-dict", "joblib-lz4", "raw")
URL_SCHEMES = ("https", "http", "package", "file")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FIELDS = (
    "name", "description", "kind", "url", "mirrors", "sha256", "sha256_prefix", "size",
    "format", "config", "filename", "license", "terms",
)  # fmt: skip
LOCAL_REGISTRY = "registry.local.json"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One artifact. `sha256`/`size` are None when neither published nor recorded yet."""

    name: str
    url: str
    kind: str = "other"
    description: str = ""
    mirrors: tuple[str, ...] = ()
    sha256: str | None = None
    sha256_prefix: str | None = None
    size: int | None = None
    format: str = "raw"
    config: str | None = None
    filename: str | None = None
    license: str = ""
    terms: str = ""
    origin: str = "packaged"  # where the entry came from (file or URL); not a TOML field
    recorded: bool = False  # sha256/size were recorded on first fetch, not published

    def __post_init__(self) -> None:
        where = f"registry entry {self.name!r} ({self.origin})"
        if not NAME_RE.match(self.name):
            raise UserInputError(f"{where}: name: got {self.name!r}, expected lowercase [a-z0-9._-]")
        if self.kind not in KINDS:
            raise UserInputError(f"{where}: kind: got {self.kind!r}, expected one of {', '.join(KINDS)}")
        if self.format not in FORMATS:
            raise UserInputError(
                f"{where}: format: got {self.format!r}, expected one of {', '.join(FORMATS)}"
            )
        for url in self.urls:
            scheme = urlparse(url).scheme
            if scheme not in URL_SCHEMES:
                raise UserInputError(f"{where}: url: got {url!r}, expected a {'/'.join(URL_SCHEMES)} URL")
        if self.sha256 is not None and not SHA256_RE.match(self.sha256):
            raise UserInputError(f"{where}: sha256: got {self.sha256!r}, expected 64 lowercase hex digits")
        if self.sha256_prefix is not None and not re.match(r"^[0-9a-f]{1,64}$", self.sha256_prefix):
            raise UserInputError(f"{where}: sha256_prefix: got {self.sha256_prefix!r}, expected hex digits")
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise UserInputError(f"{where}: size: got {self.size!r}, expected a positive integer (bytes)")
        if self.kind == "base-generator":
            if self.format not in ("eg3d-pkl", "safetensors"):
                raise UserInputError(
                    f"{where}: format: got {self.format!r}, expected 'eg3d-pkl' or 'safetensors'"
                )
            if not self.config:
                raise UserInputError(f"{where}: config: a base-generator needs its EG3D config name")

    @property
    def urls(self) -> tuple[str, ...]:
        """Primary URL first, then the mirrors."""
        return (self.url, *self.mirrors)

    @property
    def display_filename(self) -> str:
        """The file name users know the artifact by (for `--from` advice)."""
        return self.filename or Path(urlparse(self.url).path).name or self.name

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["mirrors"] = list(self.mirrors)
        return data


# --------------------------------------------------------------------------- sources


def packaged_registry_dir() -> Path:
    """`zoo/` of a source checkout, or the copy installed inside the package."""
    package = Path(__file__).resolve().parents[1]  # my3dgen_cli/
    installed = package / "zoo_registry_data"
    return installed if installed.is_dir() else package.parent / "zoo"


def _tables(doc: Mapping[str, Any], origin: str) -> list[dict[str, Any]]:
    """A registry document's entries: top-level keys (one entry) or `[[artifact]]` tables."""
    if "artifact" in doc:
        tables = doc["artifact"]
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UserInputError(f"registry {origin}: artifact: expected [[artifact]] tables")
        return [dict(t) for t in tables]
    return [dict(doc)] if doc else []


def _check_fields(table: Mapping[str, Any], origin: str) -> None:
    unknown = sorted(set(table) - set(FIELDS))
    if unknown:
        raise UserInputError(
            f"registry {origin}: unknown field {unknown[0]!r}, expected one of {', '.join(FIELDS)}"
        )
    if "name" not in table:
        raise UserInputError(f"registry {origin}: an entry has no 'name'")


def _parse(text: str, origin: str) -> list[dict[str, Any]]:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserInputError(f"registry {origin}: not valid TOML ({err})") from None
    tables = _tables(doc, origin)
    for table in tables:
        _check_fields(table, origin)
        table["origin"] = origin
    return tables


def _read_registry_source(source: str) -> list[dict[str, Any]]:
    """Entries of one extra registry: a local file, or an http(s) URL (cached for offline use)."""
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        copy = paths.cache_dir() / "registries" / (hashlib.sha256(source.encode()).hexdigest()[:16] + ".toml")
        if paths.offline():
            if not copy.is_file():
                raise OfflineError(f"registry {source} was never downloaded and offline mode is on")
            return _parse(_text(copy, source), source)
        import requests

        try:
            response = requests.get(source, timeout=(10, 30))
            response.raise_for_status()
        except requests.RequestException as err:
            if copy.is_file():  # a lab server down should not stop work with what is cached
                return _parse(_text(copy, source), source)
            raise UserInputError(f"registry {source}: could not be read ({err})") from None
        tables = _parse(response.text, source)
        write_text_atomic(copy, response.text)
        return tables
    path = Path(source[len("file://") :] if scheme == "file" else source).expanduser()
    if not path.is_file():
        raise UserInputError(f"registry: got {source!r}, expected an existing TOML file or an http(s) URL")
    return _parse(_text(path, str(path)), str(path))


def _text(path: Path, origin: str) -> str:
    """A registry file's text; not UTF-8 (TOML's only encoding) is a one-line error."""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as err:
        raise UserInputError(f"registry {origin}: cannot read it ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise UserInputError(f"registry {origin}: not UTF-8 text, as TOML must be ({reason(err)})") from None


def extra_registry_sources(extra: Sequence[str] = ()) -> list[str]:
    """`MY3DGEN_REGISTRY` (comma-separated) then `extra` (from `--registry`)."""
    import os

    env = [s.strip() for s in os.environ.get("MY3DGEN_REGISTRY", "").split(",") if s.strip()]
    return [*env, *extra]


# --------------------------------------------------------------------------- recorded hashes


def local_registry_path() -> Path:
    return paths.cache_dir() / LOCAL_REGISTRY


def recorded_hashes() -> dict[str, dict[str, Any]]:
    """name -> {"sha256", "size", "source", "recorded_at"} for hashes recorded on first fetch."""
    path = local_registry_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise ArtifactError(
            f"{path} is corrupt; delete it (its hashes are recorded again on next fetch)"
        ) from None
    return data.get("recorded", {})


def record_hash(name: str, sha256: str, size: int, source: str) -> None:
    """Remember the hash of an entry that publishes none (caller holds the entry's lock)."""
    data = recorded_hashes()
    data[name] = {"sha256": sha256, "size": size, "source": source, "recorded_at": time.time()}
    write_text_atomic(local_registry_path(), json.dumps({"recorded": data}, indent=2, sort_keys=True) + "\n")


def forget_hash(name: str) -> bool:
    data = recorded_hashes()
    if name not in data:
        return False
    del data[name]
    write_text_atomic(local_registry_path(), json.dumps({"recorded": data}, indent=2, sort_keys=True) + "\n")
    return True


# --------------------------------------------------------------------------- lookup


def _merge(tables: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for table in tables:
        merged.setdefault(table["name"], {}).update(table)
    return merged


def _build(table: dict[str, Any]) -> Entry:
    kwargs = dict(table)
    if "url" not in kwargs:
        raise UserInputError(f"registry entry {kwargs['name']!r} ({kwargs['origin']}): no 'url'")
    kwargs["mirrors"] = tuple(kwargs.get("mirrors", ()))
    return Entry(**kwargs)


def load_registry(extra: Sequence[str] = ()) -> dict[str, Entry]:
    """All entries by name: packaged, then extra registries, then recorded hashes."""
    tables: list[dict[str, Any]] = []
    for file in sorted(packaged_registry_dir().glob("*.toml")):
        tables.extend(_parse(file.read_text(encoding="utf-8"), f"zoo/{file.name}"))
    for source in extra_registry_sources(extra):
        tables.extend(_read_registry_source(source))
    merged = _merge(tables)
    for name, rec in recorded_hashes().items():
        table = merged.get(name)
        if table is not None and table.get("sha256") is None:
            table.update(sha256=rec["sha256"], size=rec.get("size"), recorded=True)
    return {name: _build(table) for name, table in sorted(merged.items())}


def list_entries(extra: Sequence[str] = ()) -> list[Entry]:
    """Every registry entry, sorted by name."""
    return list(load_registry(extra).values())


def get_entry(name: str, extra: Sequence[str] = ()) -> Entry:
    """The entry called `name`; an unknown name raises ArtifactError with the closest names."""
    registry = load_registry(extra)
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownArtifactError(f"unknown artifact {name!r}{hint} (`my3dgen fetch --list` shows all)")
