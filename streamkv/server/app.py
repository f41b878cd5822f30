"""The HTTP API: OpenAI-compatible completions and chat completions (plain and SSE streaming), models,
persistent sessions, health. FastAPI on uvicorn.

Requests name a session with the body field `session_id` (openai client: `extra_body={"session_id": ...}`)
or the header `X-Session-Id`; then only the new turn is sent and appended to that session's stream.
Without one, a request is stateless: its full message history runs in a throwaway session.

Layout: this module builds the app (lifespan, error handlers) and the `Guard` middleware in front of it;
the routes are in `routes/` (one router per resource) and get what they need from `deps.py`; errors are
in `errors.py`, defaults in `config.py`, admission in `admission.py`, sessions and turns in `sessions.py`,
durable state in `store.py`.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import resolve_budgets
from .config import ServerConfig
from .deps import Runtime, key_owner
from .errors import BadRequest, ServerError, TooLarge, UnsupportedMediaType, error_body, error_response
from .routes import ROUTERS
from .sessions import SessionManager
from .store import Store

log = logging.getLogger("streamkv.server")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def allowed_hosts(cfg: ServerConfig) -> set[str]:
    """Host header values (without port) the server answers to. A loopback server answers only to loopback
    names: a web page that rebinds its own DNS name to 127.0.0.1 still sends its own name and is refused."""
    if cfg.allowed_hosts:
        return {h.lower().strip("[]") for h in cfg.allowed_hosts}
    if cfg.host in LOOPBACK_NAMES:
        return set(LOOPBACK_NAMES)
    if cfg.host in ("0.0.0.0", "::", ""):
        return {"*"}  # bound everywhere (an API key is required then): any name may reach it
    return {cfg.host.lower().strip("[]")}


def host_of(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Pure ASGI middleware in front of every route (before routing, before any body is buffered):
    request ids and the access log; the Host check (DNS rebinding); JSON content type on POST (a browser
    page can only send form or text/plain bodies without a CORS preflight, so this stops cross-site POSTs);
    the body size limit (413, by Content-Length or while reading a chunked body). Being plain ASGI, it
    passes the client's `http.disconnect` through to the routes, which cancel their turn on it."""

    def __init__(self, app, cfg: ServerConfig):
        self.app, self.limit, self.hosts = app, cfg.max_body_bytes, allowed_hosts(cfg)

    def _check(self, scope, headers: dict) -> ServerError | None:
        host = host_of(headers.get(b"host", b"").decode("latin-1"))
        if "*" not in self.hosts and host not in self.hosts:
            return BadRequest(f"this server does not answer to host {host!r} (allowed: {', '.join(sorted(self.hosts))};"
                              " see --allowed-host)", code="invalid_host")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
            if ctype != "application/json":
                return UnsupportedMediaType(f"request body must be sent as Content-Type: application/json, got "
                                            f"{ctype or 'none'!r}")
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                return TooLarge(f"request body exceeds {self.limit} bytes")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if REQUEST_ID_RE.match(rid) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["rid"] = rid
        status, t0 = [0], time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)
        try:
            err = self._check(scope, headers)
            if err is None and scope["method"] in ("POST", "PUT", "PATCH"):
                receive, err = await self._buffer(receive)
            if err is not None:
                await error_response(err)(scope, receive, send_with_id)
            elif receive is not None:
                await self.app(scope, receive, send_with_id)
        finally:
            log.info("request", extra={"request_id": rid, "method": scope["method"], "path": scope["path"],
                                       "status": status[0], "ms": round((time.perf_counter() - t0) * 1e3, 1),
                                       "session_id": scope["state"].get("session_id")})

    async def _buffer(self, receive):
        """Read the whole body (refusing it past the limit) and hand the app a receive that replays it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return receive, TooLarge(f"request body exceeds {self.limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        return replay, None


def compute_threads(workers: int, threads: int) -> tuple[int, int]:
    """(torch threads per compute worker, threads for every other thread of the server)."""
    return max(1, threads // workers), 1


def _set_torch_threads(n: int) -> None:
    torch.set_num_threads(n)  # this thread's OpenMP team size (and the default of threads not started yet)


def pools(cfg: ServerConfig) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
    """The compute pool (forwards) and the I/O pool (snapshots, database).

    Why the thread counts are set per thread: torch's CPU kernels run on OpenMP, and libgomp keeps one team
    of worker threads per thread that starts a parallel region. Once the process holds more OpenMP threads
    than it has cores (the event loop's or an I/O thread's team beside the compute thread's), libgomp stops
    spinning between regions and every small matmul waits on a futex: measured on 2 cores, one decode step
    of the embedded model took 52 ms on the server's compute thread against 26 ms on the main thread, and a
    576x1536 linear 146 us against 41 us. So only the compute workers run multi-threaded kernels (the
    model is loaded on them too); the I/O threads get one thread each, and `serve` sets the main thread's to
    one before anything runs. With several workers the threads are split between them."""
    per_worker, other = compute_threads(cfg.workers, cfg.threads)
    compute = ThreadPoolExecutor(cfg.workers, thread_name_prefix="streamkv-compute",
                                 initializer=_set_torch_threads, initargs=(per_worker,))
    io = ThreadPoolExecutor(cfg.io_threads, thread_name_prefix="streamkv-io",
                            initializer=_set_torch_threads, initargs=(other,))
    return compute, io


def create_app(cfg: ServerConfig, model=None, tokenizer=None) -> FastAPI:
    """Build the app (the FastAPI object; `serve` wraps it in `Guard`). The store is opened first, so a
    damaged database stops start-up with `StoreError` before the model is loaded; the model is loaded here
    unless given; budgets left unset are derived from this machine."""
    store = Store(cfg.data_dir)
    compute, io = pools(cfg)
    if model is None:  # on a compute thread: its OpenMP team is the one every forward uses (see `pools`)
        from ..models import load
        try:
            model, tokenizer = compute.submit(load, cfg.model, dtype=cfg.dtype, quantize=cfg.quantize, device=cfg.device,
                                              compile=cfg.compile).result()
        except BaseException:
            compute.shutdown(wait=False)
            io.shutdown(wait=False)
            raise
    try:
        from ..models import cache_footprint
        compute.submit(cache_footprint, model).result()  # admission's per-token price: one forward, on a compute thread
        resolve_budgets(cfg)
        if "dense" in cfg.allowed_policies:
            raise ValueError("the dense policy cannot be served: its memory grows without bound")
        # fail now, with the reason, if the server's own default policy does not fit its own budgets
        SessionManager(model, tokenizer, store, cfg, compute=None, io=None)
    except BaseException:
        compute.shutdown(wait=False)
        io.shutdown(wait=False)
        raise
    rt = Runtime(cfg, model, tokenizer, started=time.time(), keys={key_owner(k): k for k in cfg.api_keys})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        swept = store.sweep_orphans()
        damaged = store.damaged_snapshots()
        for sid, reason in damaged:
            log.warning("snapshot damaged: the session will be rebuilt from its turn log on first use",
                        extra={"session_id": sid, "reason": reason})
        manager = SessionManager(model, tokenizer, store, cfg, compute=compute, io=io)
        rt.manager, rt.loop = manager, asyncio.get_running_loop()
        log.info("server ready", extra={"model": cfg.model_name, "data_dir": str(cfg.data_dir),
                                        "sessions": store.count_sessions(), "orphans_removed": swept,
                                        "damaged_snapshots": len(damaged), "policy": cfg.policy,
                                        "allowed_policies": list(cfg.allowed_policies),
                                        "max_resident": cfg.max_resident, "max_cache_bytes": cfg.max_cache_bytes,
                                        "max_session_bytes": cfg.max_session_bytes})
        try:
            yield
        finally:
            report = await manager.close(cfg.shutdown_timeout)
            compute.shutdown(wait=True, cancel_futures=True)
            io.shutdown(wait=True)
            store.close()
            log.info("shutdown complete", extra=report)

    app = FastAPI(title="streamkv", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    def on_signal() -> None:
        """Called from the signal handler (SIGTERM/SIGINT): start cancelling turns now, not after uvicorn
        has waited for every request to finish on its own."""
        if rt.loop is not None and rt.manager is not None:
            rt.loop.call_soon_threadsafe(rt.manager.begin_shutdown, cfg.shutdown_timeout)
    app.state.runtime, app.state.on_signal = rt, on_signal

    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=cfg.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "X-Session-Id", "X-Request-Id"],
                           expose_headers=["X-Session-Id", "X-Request-Id"])

    # ---- errors: everything in OpenAI's format ------------------------------------------------------
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, e: ServerError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _query_error(request: Request, e: RequestValidationError):  # query/path parameters
        err = e.errors()[0]
        param = str(err["loc"][-1]) if err.get("loc") else None
        return JSONResponse(error_body(f"invalid value for {param}: {err['msg']}", "invalid_request_error", param,
                                       "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        log.exception("unhandled error", extra={"path": request.url.path})
        return JSONResponse(error_body("internal server error", "server_error", None, "internal_error"), status_code=500)

    for router in ROUTERS:
        app.include_router(router)
    return app
