"""A real HTTP file server on 127.0.0.1 for the zoo tests (Range, drops, 404, request log), and a
listing of the cache to compare before and after a refused file."""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class ServerState:
    files: dict[str, bytes] = field(default_factory=dict)  # path -> body
    content_types: dict[str, str] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the next drop
    drops_left: dict[str, int] = field(default_factory=dict)  # path -> how many requests still drop
    chunk_delay_s: float = 0.0  # sleep between 64 KiB chunks (to make downloads overlap)
    log: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def gets(self, path: str) -> list[str | None]:
        """Range headers of every GET of `path` (None for a plain GET)."""
        with self.lock:
            return [rng for p, rng in self.log if p == path]


def _handler(state: ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path, rng = self.path.split("?")[0], self.headers.get("Range")
            with state.lock:
                state.log.append((path, rng))
                body = state.files.get(path)
                drop = state.drops_left.get(path, 0) > 0
                if drop:
                    state.drops_left[path] -= 1
            if body is None:
                payload = b"not found"
                self.send_response(404)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            start = 0
            match = re.match(r"bytes=(\d+)-$", rng or "")
            if match:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Type", state.content_types.get(path, "application/octet-stream"))
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            view = body[start:]
            limit = state.drop_after.get(path, len(view)) if drop else len(view)
            sent = 0
            while sent < limit:
                piece = view[sent : min(limit, sent + 65536)]
                self.wfile.write(piece)
                sent += len(piece)
                if state.chunk_delay_s:
                    time.sleep(state.chunk_delay_s)
            if drop:  # hang up mid-file: the client sees fewer bytes than Content-Length
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

    return Handler


class _QuietServer(ThreadingHTTPServer):
    """Clients that hang up mid-file are what several tests do on purpose: no traceback for those."""

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class FileServer:
    def __init__(self) -> None:
        self.state = ServerState()
        self.httpd = _QuietServer(("127.0.0.1", 0), _handler(self.state))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def serving(monkeypatch, retries: int) -> Iterator[FileServer]:  # type: ignore[no-untyped-def]
    """A running FileServer, with my3dgen's client set up for tests: no proxy for 127.0.0.1,
    `retries` per URL (MY3DGEN_RETRIES) and a short backoff."""
    from my3dgen_cli.zoo import download

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("MY3DGEN_RETRIES", str(retries))
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    with FileServer() as srv:
        yield srv


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The cache's fixed folders (zoo.py): made as needed, empty or not they hold nothing by themselves.
LAYOUT_FOLDERS = {"cache", "blobs", "refs", "converted", "partial", "locks", "registries", "bases"}


def tree_listing(root: Path) -> dict[str, tuple[int, str] | None]:
    """Everything under `root` but the fixed folders: relative path -> (size, sha256), None for any
    other folder (a leftover temp folder shows up). Lock files count: none may outlive its fetch.

    Two equal listings mean byte-identical trees: what a refused file must leave behind.
    """
    if not root.exists():
        return {}
    listing: dict[str, tuple[int, str] | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir() and p.name in LAYOUT_FOLDERS:
            continue
        listing[str(rel)] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) if p.is_file() else None
    return listing
