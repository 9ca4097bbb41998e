"""Moving bytes into a partial file: HTTP(S) with resume, `package://` and `file://` sources.

Nothing here touches the cache proper: callers (my3dgen_cli.zoo.obtain) hold the lock, pass the
`.part` path, verify the sha256 and rename. The caller's `check` looks at each URL's complete
bytes before they count as downloaded, so a URL serving the wrong file falls back to the next.

Knobs, read at call time:

    MY3DGEN_RETRIES   retries per URL after the first attempt (default 3), backoff 0.5 s doubling
    MY3DGEN_TIMEOUT   seconds to connect and between received bytes (default 30)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

from my3dgen_cli.errors import ArtifactError, DownloadError, My3DGenError

ProgressHook = Callable[[int, "int | None"], None]
"""Called as `progress(done_bytes, total_bytes_or_None)` while bytes arrive (done includes a resumed part)."""

CHUNK = 1 << 20  # local copies and hashing
NET_CHUNK = 1 << 16  # network reads: an interrupted read loses at most this much
DISK_MARGIN = 64 << 20  # keep this much free beyond the file itself
BACKOFF_S = 0.5


class _Retryable(Exception):
    """A transient failure: try the same URL again (resuming)."""


class _Fatal(Exception):
    """This URL will not work: go on to the next mirror."""


def retries() -> int:
    try:
        return max(0, int(os.environ.get("MY3DGEN_RETRIES", "3")))
    except ValueError:
        return 3


def timeout_s() -> float:
    try:
        return max(0.1, float(os.environ.get("MY3DGEN_TIMEOUT", "30")))
    except ValueError:
        return 30.0


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def is_local(url: str) -> bool:
    """True for sources that never need the network (`package://`, `file://`)."""
    return urlparse(url).scheme in ("package", "file")


def resolve_local(url: str) -> Path:
    """The file behind a `package://PKG/relative/path` or `file:///abs/path` URL.

    `package://` finds the installed top-level package with `importlib.util.find_spec`, which
    locates it without importing (running) it.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    package, rel = parsed.netloc, unquote(parsed.path).lstrip("/")
    if not package.isidentifier() or not rel:
        raise ArtifactError(f"url: got {url!r}, expected package://PACKAGE/path/inside/it")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ArtifactError(
            f"Python package {package!r} is not installed (needed for {url}): pip install {package}"
        )
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        candidate = Path(root) / rel
        if candidate.is_file():
            return candidate
    raise ArtifactError(f"{url}: the installed {package!r} has no {rel} (another version?)")


def copy_local(url: str, part: Path, progress: ProgressHook | None = None) -> None:
    """Copy a local source into `part` (overwriting it)."""
    src = resolve_local(url)
    if not src.is_file():
        raise DownloadError(f"{url}: no such file")
    total = src.stat().st_size
    check_free_space(part.parent, total)
    done = 0
    with open(src, "rb") as fin, open(part, "wb") as fout:
        while block := fin.read(CHUNK):
            fout.write(block)
            done += len(block)
            if progress:
                progress(done, total)


def check_free_space(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > 0 and free < needed + DISK_MARGIN:
        raise DownloadError(
            f"not enough free disk in {folder}: need {needed / 2**20:.0f} MiB "
            f"(+{DISK_MARGIN >> 20} MiB margin), have {free / 2**20:.0f} MiB"
        )


def _reason(err: BaseException) -> str:
    """A short, one-line reason for a requests exception."""
    text = str(err)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if match:
        return match.group(1).strip()
    name = type(err).__name__
    if "timed out" in text.lower() or "Timeout" in name:
        return "timed out"
    return name


def _get_once(
    session, url: str, part: Path, expected_size: int | None, progress: ProgressHook | None
) -> None:
    """One HTTP GET into `part`, resuming from its current size with a Range request."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have >= expected_size:
        if have == expected_size:
            return  # complete already; the caller verifies it
        part.unlink()
        have = 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    t = timeout_s()
    done, total = have, None
    try:
        with session.get(url, stream=True, headers=headers, timeout=(t, t)) as r:
            if r.status_code == 416 and have:
                part.unlink()  # our partial does not fit the server's file: start again
                raise _Retryable("range not satisfiable")
            if r.status_code >= 500 or r.status_code == 429:
                raise _Retryable(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise _Fatal(f"HTTP {r.status_code} {r.reason}")
            start = 0
            if have and r.status_code == 206:
                match = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
                start = int(match.group(1)) if match else -1
                if start != have:
                    part.unlink()
                    raise _Retryable("server resumed at the wrong offset")
            if "text/html" in r.headers.get("Content-Type", ""):
                raise _Fatal(
                    "the server answered with an HTML page, not the file (a login or confirmation page?)"
                )
            length = r.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            if expected_size is not None and total is not None and total != expected_size:
                raise _Fatal(f"the server's file has {total} bytes, the registry expects {expected_size}")
            check_free_space(part.parent, (total or expected_size or 0) - start)
            done = start
            with open(part, "ab" if start else "wb") as f:
                for block in r.iter_content(NET_CHUNK):
                    f.write(block)
                    done += len(block)
                    if expected_size is not None and done > expected_size:
                        raise _Fatal(
                            f"the server sent more than the {expected_size} bytes the registry expects"
                        )
                    if progress:
                        progress(done, total)
            if total is not None and done != total:
                raise _Retryable(f"connection closed after {done} of {total} bytes")
    except requests.RequestException as err:
        if total is not None and done < total:
            raise _Retryable(f"connection broken after {done} of {total} bytes ({_reason(err)})") from err
        raise _Retryable(_reason(err)) from err


def http_download(
    name: str,
    urls: tuple[str, ...],
    part: Path,
    expected_size: int | None = None,
    progress: ProgressHook | None = None,
    on_attempt: Callable[[str], None] | None = None,
    check: Callable[[str], None] | None = None,
) -> str:
    """Download the first URL that works into `part`, resuming and retrying; returns that URL.

    check: called as `check(url)` once `part` holds a URL's complete bytes; a `My3DGenError` from it
    (wrong sha256, not the expected kind of file) rejects those bytes: `part` is deleted and the
    next URL is tried. A single URL whose bytes are rejected raises the rejection's type (message
    prefixed with the URL).

    Raises DownloadError naming every URL tried and why each failed.
    """
    import requests

    failures: list[str] = []
    rejected: list[My3DGenError] = []
    with requests.Session() as session:
        session.headers["User-Agent"] = "my3dgen"
        for url in urls:
            attempts = retries() + 1
            for attempt in range(attempts):
                if on_attempt:
                    on_attempt(url)
                try:
                    _get_once(session, url, part, expected_size, progress)
                except _Fatal as err:
                    failures.append(f"{url}: {err}")
                    break
                except _Retryable as err:
                    if attempt + 1 == attempts:
                        failures.append(f"{url}: {err}")
                        break
                    time.sleep(min(BACKOFF_S * 2**attempt, 8.0))
                    continue
                try:
                    if check:
                        check(url)
                except My3DGenError as err:
                    part.unlink(missing_ok=True)
                    failures.append(f"{url}: {err}")
                    rejected.append(err)
                    break
                return url
    if len(failures) == 1 and rejected:
        raise type(rejected[0])(failures[0])
    raise DownloadError(f"could not download {name}: " + "; ".join(failures))
