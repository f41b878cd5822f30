"""POST /v1/chat/completions and /v1/completions: OpenAI-compatible, plain and SSE streaming, stateless
or appended to a persistent session (body field `session_id` or header `X-Session-Id`)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import ServerConfig
from ..deps import Manager, Owner, Rt, Runtime
from ..errors import BadRequest, Conflict, NotFound, ServerError, Unavailable, error_json
from ..responses import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, TextChoice,
                         TextCompletion, Usage)
from ..schemas import ChatRequest, CompletionRequest, parse_body
from ..sessions import Lease, SessionManager, Turn

log = logging.getLogger("streamkv.server")
router = APIRouter()

SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts
MAX_STOP_CHARS = 256  # stop strings are searched at every token: keep that cheap


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_common(cfg: ServerConfig, req) -> dict:
    """The generation settings of a request, checked against the server's limits."""
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

async def count_tokens(rt: Runtime, text_or_ids, what: str) -> int:
    """Tokens of a new input, refused (400) past --max-input-tokens before anything runs."""
    cfg, tokenizer = rt.cfg, rt.tokenizer
    n = len(text_or_ids) if isinstance(text_or_ids, list) else len(
        await rt.manager.run_io(lambda: tokenizer(text_or_ids, add_special_tokens=False).input_ids))
    if n > cfg.max_input_tokens:
        raise BadRequest(f"{what} is {n} tokens; this server accepts at most {cfg.max_input_tokens} per request",
                         param=what, code="context_length_exceeded")
    return n

async def lease_for(m: SessionManager, sid: str | None, owner: str, kind: str) -> Lease:
    """The session a turn runs on (a throwaway one for stateless requests), under the disk quotas."""
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
            async for kind, value in turn.events(keepalive=turn.lease.manager.cfg.sse_keepalive or None):
                if kind == "ping":  # an SSE comment: clients ignore it, proxies see a live connection
                    yield ": keep-alive\n\n"
                elif kind == "piece":
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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, rt: Rt, owner: Owner, m: Manager):
    cfg, tokenizer = rt.cfg, rt.tokenizer
    req = parse_body(ChatRequest, await request.body())
    gen = check_common(cfg, req)
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
    for i, msg in enumerate(messages):
        if not msg["content"].strip() and msg["role"] != "assistant":
            raise BadRequest(f"message {i} has empty content", param=f"messages.{i}.content", code="invalid_value")
    sid = session_id_of(request, req)
    history = messages[:-1]
    if sid is None:
        try:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # the model's template refuses this sequence of roles
            raise BadRequest(f"the chat template rejects these messages: {e}", param="messages") from None
        await count_tokens(rt, rendered, "messages")
    else:
        await count_tokens(rt, "\n".join(m["content"] for m in messages), "messages")
    lease = await lease_for(m, sid, owner, "chat")
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
            choices = [ChunkChoice(delta=delta, finish_reason=finish_reason)]
        out = ChatCompletionChunk(id=cid, created=created, model=cfg.model_name, choices=choices, **extra)
        if req.stream_options and req.stream_options.include_usage:
            out.usage = usage_ and Usage(**usage_)  # null on every chunk but the last
        return out.dump()

    def final(text, value):
        u, finish_reason = value
        return ChatCompletion(id=cid, created=created, model=cfg.model_name, usage=Usage(**u), **extra, choices=[
            ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)]).dump()

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    response = respond(request, turn, req.stream, include_usage, chunk, final)
    return response if req.stream else await response


@router.post("/v1/completions")
async def completions(request: Request, rt: Rt, owner: Owner, m: Manager):
    cfg, model, tokenizer = rt.cfg, rt.model, rt.tokenizer
    req = parse_body(CompletionRequest, await request.body())
    gen = check_common(cfg, req)
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
    await count_tokens(rt, prompt, "prompt")
    sid = session_id_of(request, req)
    lease = await lease_for(m, sid, owner, "text")
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
        choices = [] if usage_ is not None else [TextChoice(text=piece, finish_reason=finish_reason)]
        out = TextCompletion(id=cid, created=created, model=cfg.model_name, choices=choices, **extra)
        if include_usage:
            out.usage = usage_ and Usage(**usage_)
        return out.dump()

    def final(text, value):
        u, finish_reason = value
        return TextCompletion(id=cid, created=created, model=cfg.model_name, usage=Usage(**u), **extra,
                              choices=[TextChoice(text=text, finish_reason=finish_reason)]).dump()

    response = respond(request, turn, req.stream, include_usage, chunk, final)
    return response if req.stream else await response


def as_server_error(e: BaseException) -> ServerError:
    if isinstance(e, ServerError):
        return e
    if isinstance(e, ValueError):  # the core refuses an input (empty text, bad ids, template)
        return BadRequest(str(e))
    log.error("generation failed: %r", e)
    return ServerError("generation failed: internal error")
