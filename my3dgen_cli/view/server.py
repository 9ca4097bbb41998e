"""The viewer's local web server (Starlette on uvicorn): one page, frames on request, two save buttons.

Safety: every request must carry the random token of the URL printed at start (compared in
constant time); a request from another Origin (or, on a loopback address, for another Host: DNS
rebinding) is refused; the only files served are the page's own, read into memory at start from
the installed package, so no part of a request path ever reaches the file system.

Frames: the generator runs on one worker thread, one frame at a time. Each request carries its
page's `client` id and a rising `seq`; a request overtaken by a newer one of the same page
before or while it renders is answered 204 (no content): the newest wins and stale work is
skipped. The page itself keeps one request in flight and sends only the latest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from my3dgen_cli.errors import My3DGenError, UserInputError
from my3dgen_cli.view.saves import Saver
from my3dgen_cli.view.scene import QUALITIES, Scene, ViewState

T = TypeVar("T")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# The page's files: name -> media type. Read once from the package; requests only index this map.
ASSET_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
IMAGE_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def load_assets(token: str) -> dict[str, tuple[bytes, str]]:
    """{name: (bytes, media type)} of the page: index.html (links carry the token) and ASSET_TYPES."""
    folder = resources.files("my3dgen_cli.view") / "assets"
    assets = {name: ((folder / name).read_bytes(), kind) for name, kind in ASSET_TYPES.items()}
    html = (folder / "index.html").read_text(encoding="utf-8").replace("{{token}}", token)
    assets["index.html"] = (html.encode("utf-8"), "text/html; charset=utf-8")
    return assets


class NewestWins:
    """One worker thread runs the generator; per page, a request overtaken by a newer one is dropped.

    `lock` is held while a job renders: the generator is never used by two threads at once (a
    test holds it to queue a burst of requests behind it).
    """

    def __init__(self, max_clients: int = 64) -> None:
        self.lock = threading.Lock()
        self._latest: OrderedDict[str, int] = OrderedDict()
        self._latest_lock = threading.Lock()
        self._max_clients = max_clients
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="my3dgen-view")

    def arrive(self, client: str, seq: int) -> None:
        with self._latest_lock:
            self._latest[client] = max(seq, self._latest.get(client, seq))
            self._latest.move_to_end(client)
            while len(self._latest) > self._max_clients:
                self._latest.popitem(last=False)

    def newest(self, client: str) -> int:
        with self._latest_lock:
            return self._latest.get(client, -1)

    def stale(self, client: str, seq: int) -> bool:
        return seq < self.newest(client)

    async def frame(self, client: str, seq: int, work: Callable[[], T]) -> T | None:
        """work() on the worker, or None when a newer request of `client` came before it finished."""
        self.arrive(client, seq)

        def job() -> T | None:
            with self.lock:
                if self.stale(client, seq):
                    return None
                out = work()
            return None if self.stale(client, seq) else out

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    async def run(self, work: Callable[[], T]) -> T:
        """work() on the worker, never dropped (saving a file)."""
        def job() -> T:
            with self.lock:
                return work()

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Guard:
    """ASGI middleware: refuse (403) a request without the token, from another Origin or for another Host."""

    def __init__(self, app: Any, token: str, loopback: bool) -> None:
        self.app, self.token, self.loopback = app, token.encode(), loopback

    def refusal(self, headers: Headers, query: bytes) -> str | None:
        """Why a request is refused, or None. Every request is checked, the page's files included."""
        given = parse_qs(query.decode("latin-1")).get("token", [headers.get("x-my3dgen-token", "")])[0]
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token):
            return "bad or missing token: open the URL that `my3dgen view` printed"
        host = headers.get("host", "")
        if self.loopback and urlsplit(f"//{host}").hostname not in LOOPBACK_NAMES:
            return f"refused: Host {host!r} is not this machine"
        origin = headers.get("origin")
        if (origin is not None and origin != f"http://{host}") or headers.get("sec-fetch-site") == "cross-site":
            return "refused: request from another origin"
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            reason = self.refusal(Headers(scope=scope), scope.get("query_string", b""))
            if reason is not None:
                await PlainTextResponse(reason, status_code=403)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def encode(image: np.ndarray, fmt: str) -> bytes:
    """uint8 [H, W, 3] -> JPEG (quality 90) or PNG (fast compression) bytes."""
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
    else:
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _client(params: Any) -> tuple[str, int]:
    client = params.get("client", "page")
    if not (0 < len(client) <= 64 and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in client)):
        raise UserInputError(f"client: got {client[:80]!r}, expected 1..64 letters, digits, - or _")
    try:
        seq = int(params.get("seq", "0"))
    except ValueError:
        raise UserInputError(f"seq: got {params.get('seq')!r}, expected an integer") from None
    return client, seq


def build_app(scene: Scene, saver: Saver, token: str, info: dict[str, Any], *, loopback: bool = True,
              truncation: float = 0.7) -> Starlette:
    """The viewer as an ASGI app. `info` is what the page is told about the scene (names, sizes).

    Long because each route is a short closure over the scene, saver and token, kept together so the
    whole request surface (and its checks) reads in one place."""
    assets = load_assets(token)
    scheduler = NewestWins()

    async def page(request: Request) -> Response:
        body, _ = assets["index.html"]
        return HTMLResponse(body, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store",
                                           "Referrer-Policy": "no-referrer"})

    async def asset(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None or request.path_params["name"] == "index.html":
            return PlainTextResponse("not found", status_code=404)
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-store"})

    async def describe(request: Request) -> Response:
        return JSONResponse(info)

    async def frame(request: Request) -> Response:
        params = request.query_params
        state = ViewState.parse(params, truncation)
        quality = params.get("quality", "preview")
        if quality not in QUALITIES:
            raise UserInputError(f"quality: got {quality!r}, expected one of {', '.join(QUALITIES)}")
        fmt = params.get("format", "jpeg" if quality == "preview" else "png")
        if fmt not in IMAGE_TYPES:
            raise UserInputError(f"format: got {fmt!r}, expected jpeg or png")
        client, seq = _client(params)

        def work() -> tuple[bytes, float]:
            start = time.perf_counter()
            data = encode(scene.frame(state, quality), fmt)
            return data, (time.perf_counter() - start) * 1000

        done = await scheduler.frame(client, seq, work)
        if done is None:
            return Response(status_code=204, headers={"X-Frame-Seq": str(seq)})
        data, ms = done
        return Response(data, media_type=IMAGE_TYPES[fmt], headers={
            "Cache-Control": "no-store", "X-Frame-Seq": str(seq), "X-Render-Ms": f"{ms:.1f}"})

    async def save(request: Request) -> Response:
        what = request.path_params["what"]
        state = ViewState.parse(request.query_params, truncation)
        write = {"png": saver.png, "orbit": saver.orbit}.get(what)
        if write is None:
            return PlainTextResponse("not found", status_code=404)
        path = await scheduler.run(lambda: write(state))
        return JSONResponse({"saved": str(path)})

    async def user_error(request: Request, err: Exception) -> Response:
        return JSONResponse({"error": str(err)}, status_code=400 if isinstance(err, UserInputError) else 500)

    async def os_error(request: Request, err: Exception) -> Response:
        where = f": {err.filename}" if getattr(err, "filename", None) else ""
        return JSONResponse({"error": f"{getattr(err, 'strerror', None) or err}{where}"}, status_code=500)

    routes = [
        Route("/", page),
        Route("/assets/{name}", asset),
        Route("/api/info", describe),
        Route("/api/frame", frame),
        Route("/api/save/{what}", save, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={My3DGenError: user_error, OSError: os_error},
                    middleware=[Middleware(Guard, token=token, loopback=loopback)])
    app.state.scheduler = scheduler  # its worker thread ends with `scheduler.close()` when serving stops
    return app


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), bound before the URL is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserInputError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(64)
    return sock


def url_of(sock: socket.socket, token: str) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def server_for(app: Starlette) -> Any:
    """A uvicorn server for `app` (quiet: no access log, no Server header, no proxy headers trusted).

    No lifespan events: the app needs none, and a Ctrl-C would log the cancelled lifespan task.
    """
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False,
                            proxy_headers=False, lifespan="off")
    return uvicorn.Server(config)


@contextlib.contextmanager
def running(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread for the block: yields its root URL (tests, benchmarks).

    `my3dgen view` itself runs the server in the main thread instead, so that Ctrl-C stops it.
    """
    sock = open_socket(host, port)
    uv = server_for(app)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uv.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the viewer's server did not start")
            time.sleep(0.02)
        yield url_of(sock, "").removesuffix("/?token=")
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()
        app.state.scheduler.close()
