"""``imgclf serve RUN``: the run behind a small HTTP API and a drop-an-image page (FastAPI + uvicorn).

Endpoints: ``GET /healthz`` (alive), ``GET /readyz`` (503 until the model is loaded and warm),
``GET /v1/model``, ``POST /v1/predict`` (multipart ``file`` parts; ``top_k``, ``explain``) and
``GET /`` (the page). Every refusal is JSON ``{"error": "..."}`` with a 4xx status; nothing a client
sends can stop the server. The guards (request log, token, body cap) are in ``middleware.py``, the
deadline for a request's headers in ``connections.py``.

fastapi and uvicorn come with the optional ``[serve]`` extra, so they are imported inside the
functions that need them; this module has no ``from __future__ import annotations`` because
FastAPI reads the route functions' annotations as objects.
"""

import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from imgclf.config.defaults import DEFAULT_MAX_PIXELS
from imgclf.data.images import decodable_pixels
from imgclf.errors import ConfigError, ImgclfError
from imgclf.logs import get_logger
from imgclf.serving.bundle import require
from imgclf.serving.connections import header_deadline_protocol
from imgclf.serving.middleware import BearerAuth, BodyLimit, BodyStalled, BodyTooLarge, LoopbackHosts, RequestLog
from imgclf.serving.page import render_page
from imgclf.serving.service import Service
from imgclf.serving.uploads import UploadError

log = get_logger("serve")
OPEN_PATHS = ("/healthz", "/readyz")
GRACE_SECONDS = 10  # SIGTERM: in-flight requests get this long to finish
MAX_UPLOAD_MB = 4096  # a request body is held in memory: larger is no image upload
MAX_CONNECTIONS = 256  # open connections and tasks at once; beyond, uvicorn answers 503


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    engine: str = "auto"
    max_batch: int = 16
    max_upload_mb: float = 10.0  # at most MAX_UPLOAD_MB
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def max_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def check(self) -> None:
        if self.max_batch < 1 or self.max_pixels < 4:
            raise ConfigError("--max-batch and --max-pixels must be positive")
        if self.max_pixels > decodable_pixels():  # a higher limit would be Pillow's, not the one given
            raise ConfigError(f"--max-pixels {self.max_pixels:,}: images over {decodable_pixels():,} pixels are "
                              f"refused as decompression bombs whatever the limit; give at most {decodable_pixels():,}")
        if not 0 < self.max_upload_mb <= MAX_UPLOAD_MB:  # also false for nan; inf is above the bound
            raise ConfigError(f"--max-upload-mb {self.max_upload_mb}: give a size above 0 and at most "
                              f"{MAX_UPLOAD_MB:,}")
        if self.token is not None and (len(self.token) < 8 or not self.token.isprintable() or " " in self.token):
            raise ConfigError("--token must be at least 8 printable characters without spaces")


def create_app(service: Service, options: ServeOptions, check_host: bool = False):
    """The ASGI app; the model loads in a thread when the app starts (``/readyz`` says when it is done).
    ``check_host``: answer only requests addressed to this machine (``serve`` on a loopback address)."""
    from fastapi import FastAPI, Request  # the [serve] extra
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=service.load, name="imgclf-load-model", daemon=True).start()
        yield
        log.info("imgclf serve: stopped; requests in flight were finished")

    app = FastAPI(title="imgclf", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def refusal(_request, err: Exception) -> JSONResponse:
        """Every refusal as JSON ``{"error": ...}`` with its 4xx status (503 while loading)."""
        if isinstance(err, HTTPException):
            return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)
        status = err.status if isinstance(err, UploadError) else 413 if isinstance(err, BodyTooLarge) \
            else 408 if isinstance(err, BodyStalled) else 422
        return JSONResponse({"error": str(err)}, status_code=status)

    for kind in (UploadError, BodyTooLarge, BodyStalled, ImgclfError, HTTPException):
        app.add_exception_handler(kind, refusal)

    @app.api_route("/healthz", methods=["GET", "HEAD"])  # HEAD too: uptime probes use it (RFC 9110)
    def healthz():
        return {"status": "alive"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    def readyz():
        if service.ready.is_set():
            return {"status": "ready", "engine": service.engine.name}
        if service.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(service.load_error)}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.api_route("/v1/model", methods=["GET", "HEAD"])
    def model():
        require_ready(service)
        return service.info()

    @app.post("/v1/predict")
    async def predict(request: Request):
        require_ready(service)
        top_k, explain = query_options(request, len(service.run.classes))
        uploads = await read_uploads(request, options.max_batch)
        try:
            return await run_in_threadpool(service.answer, uploads, top_k, explain)
        except (UploadError, ImgclfError):
            raise
        except Exception as err:  # a bug, or a library's error no check foresaw: JSON for the client, a line here
            log.error("error: /v1/predict failed: %s: %s", type(err).__name__, str(err).splitlines()[0][:200]
                      if str(err) else "", exc_info=log.isEnabledFor(logging.DEBUG))  # the traceback with -v
            raise HTTPException(500, f"the server failed on this request ({type(err).__name__}); its log says more") \
                from None

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def page():
        return render_page(service.run.path.name, service.run.classes, options.max_batch, options.max_bytes,
                           default_top_k(len(service.run.classes)), service.explain_refusal is None)

    guarded = BearerAuth(BodyLimit(app, options.max_bytes), options.token, OPEN_PATHS)
    return RequestLog(LoopbackHosts(guarded) if check_host else guarded)


def require_ready(service: Service) -> None:
    if not service.ready.is_set():
        raise UploadError(503, "the model is still loading; retry when /readyz answers 200")


def default_top_k(classes: int) -> int:
    return min(3, classes)


QUERY_PARAMETERS = ("top_k", "explain")


def query_options(request, classes: int) -> tuple[int, bool]:
    """``top_k`` (1 to the number of classes, default 3) and ``explain`` (true/false) from the query; any other
    parameter (``topk``, ``threshold``...) is refused rather than ignored."""
    unknown = sorted(set(request.query_params) - set(QUERY_PARAMETERS))
    if unknown:
        raise UploadError(422, f"unknown query parameter(s) {', '.join(unknown)}: /v1/predict takes "
                               f"{' and '.join(QUERY_PARAMETERS)}; its threshold and test-time views are the run's")
    twice = sorted(name for name in QUERY_PARAMETERS if len(request.query_params.getlist(name)) > 1)
    if twice:
        raise UploadError(422, f"query parameter(s) {', '.join(twice)} given more than once: give each once")
    raw_k = request.query_params.get("top_k")
    try:
        top_k = default_top_k(classes) if raw_k is None else int(raw_k)
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= classes:
        raise UploadError(422, f"top_k={raw_k[:40]!r}: give a whole number from 1 to {classes} (the run's classes)")
    raw_explain = request.query_params.get("explain", "false").lower()
    if raw_explain not in ("true", "false", "1", "0"):
        raise UploadError(422, f"explain={raw_explain!r}: give true or false")
    return top_k, raw_explain in ("true", "1")


async def read_uploads(request, max_batch: int) -> list[tuple[str, bytes]]:
    """The ``file`` parts of a multipart body as (name, bytes); at most ``max_batch`` of them."""
    from starlette.exceptions import HTTPException  # the [serve] extra
    from starlette.requests import ClientDisconnect

    kind = request.headers.get("content-type", "")
    if kind and not kind.lower().startswith("multipart/form-data"):
        raise UploadError(415, f"Content-Type {kind[:60]!r}: send the images as multipart/form-data parts named "
                               "'file'")
    try:
        form = await request.form(max_files=max_batch, max_fields=32)
    except ClientDisconnect:  # the client's doing: one request line (400), not a server error with a traceback
        raise UploadError(400, "the client disconnected before its body ended") from None
    except HTTPException as err:
        if "too many files" in str(err.detail).lower():
            raise UploadError(413, f"too many files: at most {max_batch} per request (--max-batch)") from None
        raise UploadError(400, f"the multipart body cannot be parsed: {err.detail}") from None
    try:
        items = form.multi_items()
        other = next(((key, value) for key, value in items if key != "file" or not hasattr(value, "read")), None)
        if other is not None:  # an image sent under another name, or a text field: said, not dropped
            what = "a text field" if isinstance(other[1], str) else "a file"
            raise UploadError(422, f"part {other[0][:40]!r} is {what}: send each image as a file part named 'file', "
                                   "and nothing else")
        files = [value for _, value in items]
        if not files:
            raise UploadError(400, "no images: send them as multipart/form-data parts named 'file'")
        return [(f.filename or "", await f.read()) for f in files]
    finally:
        await form.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before uvicorn starts, so a taken port is one clean line (and port 0 picks a free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or "
                          "--host") from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(options: ServeOptions) -> str | None:
    """A warning when the server listens beyond this machine without a token."""
    if options.token or is_loopback(options.host):
        return None
    return (f"warning: --host {options.host} without --token: anyone who can reach this machine can use the model; "
            "pass --token SECRET (clients then send 'Authorization: Bearer SECRET')")


def serve(run, options: ServeOptions) -> None:
    """Run the server until SIGTERM or Ctrl-C; a model that fails to load stops it with that error."""
    uvicorn = require("uvicorn", "serve")
    require("fastapi", "serve")
    require("python_multipart", "serve")
    options.check()
    service = Service(run, options.engine, options.max_pixels)
    if warning := exposure_warning(options):
        log.warning("%s", warning)
    sock = listening_socket(options.host, options.port)
    server = uvicorn.Server(server_config(create_app(service, options, check_host=is_loopback(options.host))))
    service.on_failure = lambda: setattr(server, "should_exit", True)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("imgclf serve: %s on http://%s:%d (%s engine, loading ...)", run.path, shown, port, service.kind)
    with sigterm_exits_cleanly(server):
        server.run(sockets=[sock])
    if service.load_error is not None:
        err = service.load_error
        raise err if isinstance(err, ImgclfError) else ConfigError(f"could not load the model: {err}")


def server_config(app):
    """uvicorn's settings for ``serve``: no access log of its own (the app logs a line a request), at most
    MAX_CONNECTIONS at once, and a deadline for each request's headers (``connections.py``)."""
    uvicorn = require("uvicorn", "serve")
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                          timeout_graceful_shutdown=GRACE_SECONDS, limit_concurrency=MAX_CONNECTIONS,
                          http=header_deadline_protocol())


@contextmanager
def sigterm_exits_cleanly(server) -> Iterator[None]:
    """SIGTERM stops the server gracefully and ``imgclf serve`` exits 0.

    uvicorn handles SIGTERM while it runs, then restores the handler it found and raises the
    signal again; with the default handler that kills the process (status -15) after a clean
    shutdown. This handler is the one it finds: it asks the server to stop (also for a SIGTERM
    before uvicorn's own handler is in place) and absorbs the repeat, so ``serve`` returns.
    """
    if threading.current_thread() is not threading.main_thread():  # signals belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda _sig, _frame: setattr(server, "should_exit", True))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
