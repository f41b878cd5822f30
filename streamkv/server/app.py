"""The HTTP API: OpenAI-compatible completions and chat completions (plain and SSE streaming), models,
persistent sessions, health. FastAPI on uvicorn.

Requests name a session with the body field `session_id` (openai client: `extra_body={"session_id": ...}`)
or the header `X-Session-Id`; then only the new turn is sent and appended to that session's stream.
Without one, a request is stateless: its full message history runs in a throwaway session.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import resolve_budgets
from .config import ServerConfig  # noqa: F401 - re-exported: `from streamkv.server.app import ServerConfig`
from .errors import (BadRequest, Conflict, NotFound, ServerError, TooLarge, Unauthorized, Unavailable,
                     UnsupportedMediaType, error_body, error_json, error_response)
from .schemas import ChatRequest, CompletionRequest, SessionCreate, parse_body
from .sessions import Lease, SessionManager, Turn, parse_policy
from .store import Store

log = logging.getLogger("streamkv.server")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_STOP_CHARS = 256  # stop strings are searched at every token: keep that cheap


def key_owner(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(cfg: ServerConfig, model=None, tokenizer=None) -> FastAPI:
    """Build the app (the FastAPI object; `serve` wraps it in `Guard`). The store is opened first, so a
    damaged database stops start-up with `StoreError` before the model is loaded; the model is loaded here
    unless given; budgets left unset are derived from this machine."""
    store = Store(cfg.data_dir)
    if model is None:
        from ..models import load
        model, tokenizer = load(cfg.model, dtype=cfg.dtype, threads=cfg.threads)
    resolve_budgets(cfg)
    if "dense" in cfg.allowed_policies:
        raise ValueError("the dense policy cannot be served: its memory grows without bound")
    keys = {key_owner(k): k for k in cfg.api_keys}
    started = time.time()
    state: dict = {}
    # fail now, with the reason, if the server's own default policy does not fit its own budgets
    SessionManager(model, tokenizer, store, cfg, compute=None, io=None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        compute = ThreadPoolExecutor(cfg.workers, thread_name_prefix="streamkv-compute")
        io = ThreadPoolExecutor(2, thread_name_prefix="streamkv-io")
        swept = store.sweep_orphans()
        damaged = store.damaged_snapshots()
        for sid, reason in damaged:
            log.warning("snapshot damaged: the session will be rebuilt from its turn log on first use",
                        extra={"session_id": sid, "reason": reason})
        manager = SessionManager(model, tokenizer, store, cfg, compute=compute, io=io)
        state.update(manager=manager, store=store, loop=asyncio.get_running_loop())
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
        loop, m = state.get("loop"), state.get("manager")
        if loop is not None and m is not None:
            loop.call_soon_threadsafe(m.begin_shutdown, cfg.shutdown_timeout)
    app.state.on_signal = on_signal

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

    def owner_of(request: Request) -> str:
        """The caller's identity: the hash of its API key ('' when the server requires none)."""
        if not keys:
            return ""
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            owner = key_owner(token)
            if owner in keys and secrets.compare_digest(keys[owner], token):
                return owner
        raise Unauthorized("invalid or missing API key (send Authorization: Bearer <key>)")

    def manager() -> SessionManager:
        return state["manager"]

    # ---- models / health ------------------------------------------------------------------------------
    @app.get("/health")
    @app.get("/healthz")
    async def health():
        m = state.get("manager")
        if m is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {
            "status": "draining" if m.closing else "ok",
            "model": cfg.model_name,
            "uptime_s": round(time.time() - started, 1),
            "resident_sessions": m.resident_count(),
            "resident_bytes_estimate": m.resident_bytes(),
            "max_resident_sessions": cfg.max_resident,
            "max_cache_bytes": cfg.max_cache_bytes,
            "max_session_bytes": cfg.max_session_bytes,
            "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
            "counters": m.stats,
        }

    model_card = {"id": cfg.model_name, "object": "model", "created": int(started), "owned_by": "streamkv"}

    @app.get("/v1/models")
    async def list_models(request: Request):
        owner_of(request)
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        owner_of(request)
        if model_id != cfg.model_name:
            raise NotFound(f"the model {model_id!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        return model_card

    # ---- shared request handling --------------------------------------------------------------------
    def check_common(req) -> dict:
        if req.model != cfg.model_name:
            raise NotFound(f"the model {req.model!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        mct = getattr(req, "max_completion_tokens", None)
        max_tokens, param = (mct, "max_completion_tokens") if mct is not None else (req.max_tokens, "max_tokens")
        if max_tokens is None:
            max_tokens = min(cfg.default_max_tokens, cfg.max_tokens_cap)
        elif not 1 <= max_tokens <= cfg.max_tokens_cap:
            raise BadRequest(f"{param} must be between 1 and {cfg.max_tokens_cap}, got {max_tokens}", param=param,
                             code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
            raise BadRequest(f"stop must be up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters",
                             param="stop", code="invalid_value")
        temperature = cfg.default_temperature if req.temperature is None else req.temperature
        if 0 < temperature < cfg.min_temperature:
            raise BadRequest(f"temperature must be 0 (greedy) or at least {cfg.min_temperature}, got {temperature}",
                             param="temperature", code="invalid_value")
        if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
            raise BadRequest("seed must be a 64-bit integer", param="seed", code="invalid_value")
        return {"max_new_tokens": max_tokens, "stop": stop, "seed": req.seed, "top_k": req.top_k or 0,
                "temperature": temperature, "top_p": 1.0 if req.top_p is None else req.top_p}

    def session_id_of(request: Request, req) -> str | None:
        sid = req.session_id or request.headers.get("x-session-id")
        request.state.session_id = sid
        return sid

    async def count_tokens(text_or_ids, what: str) -> int:
        n = len(text_or_ids) if isinstance(text_or_ids, list) else len(
            await manager().run_io(lambda: tokenizer(text_or_ids, add_special_tokens=False).input_ids))
        if n > cfg.max_input_tokens:
            raise BadRequest(f"{what} is {n} tokens; this server accepts at most {cfg.max_input_tokens} per request",
                             param=what, code="context_length_exceeded")
        return n

    async def lease_for(sid: str | None, owner: str, kind: str) -> Lease:
        m = manager()
        if sid is None:
            return await m.acquire_ephemeral(m.default_policy)
        await m.check_disk(await m.get_meta(sid, owner))
        lease = await m.acquire(sid, owner)
        if lease.session.kind not in (None, kind):
            lease.release()
            other = "/v1/chat/completions" if kind == "text" else "/v1/completions"
            raise Conflict(f"session {sid} is a {lease.session.kind} session: continue it with {other}",
                           param="session_id", code="session_kind_mismatch")
        return lease

    def respond(request: Request, turn: Turn, stream: bool, include_usage: bool, make_chunk, make_final):
        """Non-streaming: wait for the turn (acknowledged = committed) and answer once; a client that
        disconnects first cancels it. Streaming: SSE chunks as pieces come; the final chunk and [DONE] only
        after the commit. Either way, an unacknowledged turn is rolled back."""
        headers = {"X-Session-Id": turn.lease.sid} if turn.lease.sid else {}
        if not stream:
            async def collect():
                pieces = []
                async for kind, value in turn.events():
                    if kind == "piece":
                        pieces.append(value)
                    elif kind == "error":
                        raise as_server_error(value)
                    elif kind == "cancelled":
                        raise Unavailable(f"the turn was cancelled and rolled back: {value}")
                    elif kind == "done":
                        return JSONResponse(make_final("".join(pieces), value), headers=headers)

            async def answer():
                result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone(request))
                try:
                    await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
                if result.done():
                    return result.result()
                turn.cancel("the client went away")  # stops after the current step, then rolls back
                await asyncio.wait({result})  # (the lease is free again when this returns)
                if not result.cancelled():
                    result.exception()  # retrieved: the client is gone, nobody reads it
                return Response(status_code=499)  # nginx's "client closed request": for the access log only
            return answer()

        async def sse():
            finished = False
            try:
                first = make_chunk(None)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                async for kind, value in turn.events():
                    if kind == "piece":
                        yield f"data: {json.dumps(make_chunk(value))}\n\n"
                    elif kind == "done":
                        usage, finish_reason = value
                        yield f"data: {json.dumps(make_chunk('', finish_reason))}\n\n"
                        if include_usage:
                            yield f"data: {json.dumps(make_chunk(None, None, usage))}\n\n"
                    elif kind in ("error", "cancelled"):
                        e = as_server_error(value) if kind == "error" else Unavailable(
                            f"the turn was cancelled and rolled back: {value}")
                        yield f"data: {json.dumps(error_json(e))}\n\n"
                        finished = True
                        return  # no [DONE]: the turn did not complete
                finished = True
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away: stop generating, the turn is not acknowledged
                    turn.cancel("the client went away")
        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    # ---- chat completions ----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        owner = owner_of(request)
        req = parse_body(ChatRequest, await request.body())
        gen = check_common(req)
        if req.logprobs:
            raise BadRequest("logprobs are not supported", param="logprobs", code="unsupported")
        if req.tools:
            raise BadRequest("tools are not supported", param="tools", code="unsupported")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise BadRequest("only response_format text is supported", param="response_format", code="unsupported")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        last = messages[-1]
        if last["role"] != "user":
            raise BadRequest("the last message must be a user message", param="messages", code="invalid_value")
        for i, m in enumerate(messages):
            if not m["content"].strip() and m["role"] != "assistant":
                raise BadRequest(f"message {i} has empty content", param=f"messages.{i}.content", code="invalid_value")
        sid = session_id_of(request, req)
        history = messages[:-1]
        if sid is None:
            try:
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as e:  # the model's template refuses this sequence of roles
                raise BadRequest(f"the chat template rejects these messages: {e}", param="messages") from None
            await count_tokens(rendered, "messages")
        else:
            await count_tokens("\n".join(m["content"] for m in messages), "messages")
        lease = await lease_for(sid, owner, "chat")
        s = lease.session
        before = s.policy.seen
        n_hist = len(s.messages)

        def run():
            # clients that always resend the whole conversation work too: a history that starts with what the
            # session already holds only adds what is new
            known = [{"role": m["role"], "content": m["content"]} for m in s.messages]
            new = history[len(known):] if history[:len(known)] == known else history
            s.add_messages(new)  # fed into the stream, so the reply sees the whole conversation
            yield from s.chat(last["content"], **gen)

        def usage():
            return {"prompt_tokens": s.gen_start - before, "completion_tokens": s.gen_end - s.gen_start,
                    "total_tokens": s.gen_end - before}

        async def finish(text: str):
            s.kind = "chat"
            u = usage()
            rows = [dict(m) for m in s.messages[n_hist:-2]]
            rows += [{"role": "user", "content": last["content"], "prompt_tokens": u["prompt_tokens"]},
                     {"role": "assistant", "content": text, "completion_tokens": u["completion_tokens"],
                      "finish_reason": s.last_finish_reason}]
            await lease.manager.commit(lease, rows)
            return u, s.last_finish_reason

        turn = Turn(lease, run(), finish).start()
        cid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        extra = {"session_id": lease.sid} if lease.sid else {}

        def chunk(piece, finish_reason=None, usage_=None):
            if usage_ is not None:
                choices = []
            else:
                delta = {"role": "assistant", "content": ""} if piece is None else ({"content": piece} if piece else {})
                choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": cfg.model_name,
                   "system_fingerprint": None, "choices": choices, **extra}
            if req.stream_options and req.stream_options.include_usage:
                out["usage"] = usage_
            return out

        def final(text, value):
            u, finish_reason = value
            return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                 "logprobs": None, "finish_reason": finish_reason}],
                    "usage": u, **extra}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        response = respond(request, turn, req.stream, include_usage, chunk, final)
        return response if req.stream else await response

    # ---- completions ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        owner = owner_of(request)
        req = parse_body(CompletionRequest, await request.body())
        gen = check_common(req)
        if req.echo or req.suffix or req.logprobs:
            raise BadRequest("echo, suffix and logprobs are not supported", param="echo", code="unsupported")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise BadRequest("one prompt per request (batching is not supported)", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise BadRequest("prompt is empty", param="prompt", code="invalid_value")
        if isinstance(prompt, list) and any(not 0 <= i < model.config.vocab_size for i in prompt):
            raise BadRequest(f"token ids must be in [0, {model.config.vocab_size})", param="prompt", code="invalid_value")
        await count_tokens(prompt, "prompt")
        sid = session_id_of(request, req)
        lease = await lease_for(sid, owner, "text")
        s = lease.session
        before = s.policy.seen

        def run():
            s.feed(prompt)
            for _token, piece in s.generate_tokens(**gen):
                if piece:
                    yield piece

        async def finish(text: str):
            s.kind = "text"
            u = {"prompt_tokens": s.gen_start - before, "completion_tokens": s.gen_end - s.gen_start,
                 "total_tokens": s.gen_end - before}
            shown = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            await lease.manager.commit(lease, [
                {"role": "prompt", "content": shown, "prompt_tokens": u["prompt_tokens"]},
                {"role": "completion", "content": text, "completion_tokens": u["completion_tokens"],
                 "finish_reason": s.last_finish_reason}])
            return u, s.last_finish_reason

        turn = Turn(lease, run(), finish).start()
        cid, created = "cmpl-" + uuid.uuid4().hex, int(time.time())
        extra = {"session_id": lease.sid} if lease.sid else {}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(piece, finish_reason=None, usage_=None):
            if piece is None and usage_ is None:
                return None  # completions streams have no role chunk
            choices = [] if usage_ is not None else [
                {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish_reason}]
            out = {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                   "system_fingerprint": None, "choices": choices, **extra}
            if include_usage:
                out["usage"] = usage_
            return out

        def final(text, value):
            u, finish_reason = value
            return {"id": cid, "object": "text_completion", "created": created, "model": cfg.model_name,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                    "usage": u, **extra}

        response = respond(request, turn, req.stream, include_usage, chunk, final)
        return response if req.stream else await response

    # ---- sessions -----------------------------------------------------------------------------------
    def session_object(meta: dict) -> dict:
        return {"id": meta["id"], "object": "session", "created": meta["created"], "updated": meta["updated"],
                "model": meta["model"], "policy": {"name": meta["policy"]["name"], **meta["policy"]["params"]},
                "kind": meta["kind"], "tokens_seen": meta["tokens_seen"], "turns": meta["n_turns"],
                "disk_bytes": meta["snapshot_bytes"] + meta["log_bytes"], "metadata": meta["metadata"]}

    @app.post("/v1/sessions")
    async def create_session(request: Request):
        owner = owner_of(request)
        body = await request.body()
        req = parse_body(SessionCreate, body) if body.strip() else SessionCreate()
        m = manager()
        policy = parse_policy(req.policy, m.default_policy)
        if req.system is not None and not req.system.strip():
            raise BadRequest("system is empty", param="system", code="invalid_value")
        if req.system:
            await count_tokens(req.system, "system")
        size = len(json.dumps(req.metadata).encode())
        if size > cfg.max_metadata_bytes:
            raise BadRequest(f"metadata is {size} bytes as JSON; this server accepts at most {cfg.max_metadata_bytes}",
                             param="metadata", code="invalid_value")
        meta = await m.create(owner, policy, req.metadata, req.system)
        request.state.session_id = meta["id"]
        log.info("session created", extra={"session_id": meta["id"], "policy": meta["policy"]})
        return JSONResponse(session_object(meta), status_code=201)

    @app.get("/v1/sessions")
    async def list_sessions(request: Request, limit: int = 100):
        owner = owner_of(request)
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000", param="limit", code="invalid_value")
        rows = await manager().run_io(manager().store.list_sessions, owner, limit)
        return {"object": "list", "data": [session_object(r) for r in rows]}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, request: Request):
        meta = await manager().get_meta(sid, owner_of(request))
        obj = session_object(meta)
        entry = manager().entries.get(sid)
        obj["resident"] = bool(entry and entry.resident)
        return obj

    @app.get("/v1/sessions/{sid}/messages")
    async def session_messages(sid: str, request: Request):
        await manager().get_meta(sid, owner_of(request))
        turns = await manager().run_io(manager().store.turns, sid)
        return {"object": "list", "session_id": sid, "data": turns}

    @app.get("/v1/sessions/{sid}/state")
    async def session_state(sid: str, request: Request, logits: str = "none", top: int = 10):
        """Debug view of the live stream state: stats, a digest of the next-token logits and their top-k
        (or the full vector with logits=full). Loads the session if it is not resident."""
        if logits not in ("none", "full"):
            raise BadRequest("logits must be 'none' or 'full'", param="logits", code="invalid_value")
        if not 0 <= top <= 100:
            raise BadRequest("top must be between 0 and 100", param="top", code="invalid_value")
        lease = await manager().acquire(sid, owner_of(request))
        try:
            s = lease.session

            def read():
                out = {"id": sid, "object": "session.state", "stats": s.stats(), "kind": s.kind,
                       "messages": len(s.messages), "snapshot_version": lease.entry.meta["version"],
                       "logits_sha256": s.logits_digest(), "top_logits": None}
                if s.logits is not None:
                    values, idx = s.logits.float().topk(top)
                    out["top_logits"] = [[int(i), float(v)] for i, v in zip(idx, values)]
                    if logits == "full":
                        out["logits"] = s.logits.float().tolist()
                return out
            return await manager().run_io(read)
        finally:
            lease.release()

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request):
        await manager().delete(sid, owner_of(request))
        return {"id": sid, "object": "session.deleted", "deleted": True}

    return app


def as_server_error(e: BaseException) -> ServerError:
    if isinstance(e, ServerError):
        return e
    if isinstance(e, ValueError):  # the core refuses an input (empty text, bad ids, template)
        return BadRequest(str(e))
    log.error("generation failed: %r", e)
    return ServerError("generation failed: internal error")
