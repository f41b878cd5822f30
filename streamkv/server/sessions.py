"""The session manager: which sessions are resident in memory, who may touch them, and how a turn is run
and committed.

Invariants (they are what makes eviction and crash recovery simple):
* A session's in-memory state, whenever nobody holds its lease, equals its last committed snapshot on disk
  (a turn either commits, or is rolled back by dropping the in-memory copy). So evicting an idle session
  writes nothing: it is just forgotten and reloaded from its snapshot on the next request.
* One lease per session at a time (an asyncio.Lock): requests to one session are serialised in arrival
  order. Different sessions interleave token by token in the compute pool (`Turn`), so no request can
  starve the others and the event loop only ever waits on futures.
* Residency is bounded by a number of sessions and/or an estimate of their bytes (KV buffers at full
  budget + logits). When a request needs room and every resident session is busy, it gets `Busy`
  (HTTP 429 + Retry-After) rather than allocating past the budget.
"""
from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import re
import secrets
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator


from ..policies import make_policy, parse_policy_spec
from ..session import StreamSession
from .store import Store

log = logging.getLogger("streamkv.server")

try:  # glibc: give freed memory back to the OS (see trim_memory)
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def trim_memory() -> None:
    """Return freed heap memory to the OS. Prefill activations and snapshot copies are freed after each turn
    but glibc keeps them in per-thread arenas, so without this RSS sits ~40% above the live caches (measured
    with 16 embedded-model sessions: 917 MB vs 723 MB of caches; after a trim, 723 MB)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


SESSION_ID_RE = re.compile(r"^sess_[A-Za-z0-9_-]{32}$")
ALLOWED_POLICIES = ("sink", "window", "recompute")  # bounded memory; `dense` grows without limit


class ServerError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        if code:
            self.code = code


class BadRequest(ServerError):
    status, type, code = 400, "invalid_request_error", None


class Unauthorized(ServerError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(ServerError):
    status, type, code = 404, "invalid_request_error", "not_found"


class Conflict(ServerError):
    status, type, code = 409, "invalid_request_error", "conflict"


class Busy(ServerError):
    status, type, code = 429, "rate_limit_error", "server_busy"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServerError):
    status, type, code = 503, "server_error", "shutting_down"


class ServerSession(StreamSession):
    """A StreamSession that remembers where the last generation started/ended in the stream (for usage
    counts) and what kind of stream it is ('chat' turns or raw 'text' completions: they do not mix)."""

    kind: str | None = None
    gen_start = gen_end = 0

    def generate_tokens(self, *args, **kwargs):
        self.gen_start = self.gen_end = self.policy.seen
        try:
            yield from super().generate_tokens(*args, **kwargs)
        finally:
            self.gen_end = self.policy.seen

    def logits_digest(self) -> str | None:
        if self.logits is None:
            return None
        return hashlib.sha256(self.logits.detach().float().contiguous().numpy().tobytes()).hexdigest()


def new_session_id() -> str:
    return "sess_" + secrets.token_urlsafe(24)  # 192 random bits, 32 url-safe characters


def parse_policy(spec: str | dict | None, default: tuple[str, dict]) -> tuple[str, dict]:
    """A policy as 'sink:sinks=4,window=1020' or {"name": "sink", "sinks": 4, ...}; None = server default."""
    if spec is None:
        return default
    if isinstance(spec, str):
        try:
            name, params = parse_policy_spec(spec)
        except ValueError as e:
            raise BadRequest(str(e), param="policy") from None
    elif isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise BadRequest("policy object needs a string 'name'", param="policy")
        if any(not isinstance(v, int) or isinstance(v, bool) for v in params.values()):
            raise BadRequest("policy parameters must be integers", param="policy")
    else:
        raise BadRequest("policy must be a string like 'sink:sinks=4,window=1020' or an object", param="policy")
    if name not in ALLOWED_POLICIES:
        raise BadRequest(f"policy {name!r} is not served; choose one of: {', '.join(ALLOWED_POLICIES)}", param="policy")
    return name, params


@dataclass
class Entry:
    """A session known to the manager (resident, loading, or with requests waiting for it)."""

    sid: str
    meta: dict
    est_bytes: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: ServerSession | None = None
    resident: bool = False  # counted against the budget (loaded or being loaded)
    users: int = 0  # requests holding or waiting for the lock
    dirty: bool = False  # a turn is mutating the in-memory state (not yet committed)
    last_used: float = field(default_factory=time.monotonic)


class Lease:
    """Exclusive use of one session (persistent or ephemeral) until `release()`."""

    def __init__(self, manager: "SessionManager", session: ServerSession, entry: Entry | None, release: Callable):
        self.manager, self.session, self.entry, self._release = manager, session, entry, release
        self.released = False

    @property
    def sid(self) -> str | None:
        return self.entry.sid if self.entry else None

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()


class SessionManager:
    def __init__(self, model, tokenizer, store: Store, *, model_name: str, default_policy: tuple[str, dict],
                 compute: Executor, io: Executor, max_resident: int = 16, max_cache_bytes: int | None = None,
                 max_waiters: int = 8, chunk_size: int = 512):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        self.model_name, self.default_policy = model_name, default_policy
        self.compute, self.io = compute, io
        self.max_resident, self.max_cache_bytes = max_resident, max_cache_bytes
        self.max_waiters, self.chunk_size = max_waiters, chunk_size
        self.entries: dict[str, Entry] = {}
        self.ephemeral_n = 0
        self.ephemeral_bytes = 0
        self.closing = False
        self.stats = {"loads": 0, "evictions": 0, "busy": 0, "commits": 0, "rollbacks": 0}
        self.check_policy(*default_policy)

    # ---- helpers ------------------------------------------------------------------------------------
    async def run_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def new_session(self, name: str, params: dict) -> ServerSession:
        return ServerSession(self.model, self.tokenizer, name, chunk_size=self.chunk_size, **params)

    def estimate_bytes(self, name: str, params: dict) -> int:
        """Upper bound of what a resident session of this policy holds: KV buffers at full budget (+1 slot),
        pristine sink keys, and the float32 next-token logits."""
        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        elt = self.model.dtype.itemsize if hasattr(self.model.dtype, "itemsize") else 4
        policy = make_policy(name, self.model, **params)
        logits = cfg.vocab_size * 4
        if name == "recompute":
            return logits + policy.window * 8
        per_slot = cfg.num_hidden_layers * 2 * kv * head_dim * elt
        return per_slot * (policy.budget + 1) + cfg.num_hidden_layers * kv * head_dim * elt * policy.sinks + logits

    def check_policy(self, name: str, params: dict) -> int:
        try:
            est = self.estimate_bytes(name, params)
        except (ValueError, TypeError) as e:
            raise BadRequest(str(e), param="policy") from None
        if self.max_cache_bytes is not None and est > self.max_cache_bytes:
            raise BadRequest(f"policy {name} {params} needs ~{est} bytes, more than the server's whole cache budget "
                             f"({self.max_cache_bytes} bytes)", param="policy")
        return est

    def _trim_soon(self) -> None:
        """Freed caches go back to the OS off the event loop (after the last reference is dropped)."""
        asyncio.get_running_loop().run_in_executor(self.io, trim_memory)

    def resident_count(self) -> int:
        return sum(e.resident for e in self.entries.values()) + self.ephemeral_n

    def resident_bytes(self) -> int:
        return sum(e.est_bytes for e in self.entries.values() if e.resident) + self.ephemeral_bytes

    def _make_room(self, need_bytes: int) -> None:
        """Evict idle sessions, least recently used first, until one more of `need_bytes` fits. Synchronous
        (no await between the check and the caller marking itself resident)."""
        def fits():
            if self.resident_count() + 1 > self.max_resident:
                return False
            return self.max_cache_bytes is None or self.resident_bytes() + need_bytes <= self.max_cache_bytes

        while not fits():
            idle = [e for e in self.entries.values() if e.resident and e.users == 0 and not e.lock.locked()]
            if not idle:
                self.stats["busy"] += 1
                raise Busy(f"all {self.resident_count()} resident sessions are busy (budget: {self.max_resident} "
                           f"sessions, {self.max_cache_bytes or 'unlimited'} bytes); retry shortly", retry_after=1)
            victim = min(idle, key=lambda e: e.last_used)
            # idle => its memory equals its committed snapshot: dropping it loses nothing
            victim.session, victim.resident = None, False
            del self.entries[victim.sid]
            self.stats["evictions"] += 1
            log.info("session evicted", extra={"session_id": victim.sid})
            self._trim_soon()

    # ---- session resources ----------------------------------------------------------------------------
    async def create(self, owner: str, policy: tuple[str, dict], metadata: dict, system: str | None) -> dict:
        if self.closing:
            raise Unavailable("server is shutting down")
        name, params = policy
        self.check_policy(name, params)
        sid = new_session_id()
        meta = await self.run_io(self.store.create_session, sid, owner, self.model_name,
                                 {"name": name, "params": params}, metadata)
        if system:
            # the system message lives in the session's transcript state; nothing is fed until the first turn
            s = self.new_session(name, params)
            s.messages.append({"role": "system", "content": system})
            s.kind = "chat"
            state = {"session": s.state_dict(copy=False), "kind": s.kind}  # under the session lock: no copy needed

            def write():
                self.store.write_snapshot(sid, 1, state)
                self.store.commit_turn(sid, 1, "chat", 0, [{"role": "system", "content": system}])
                return self.store.get_session(sid)
            meta = await self.run_io(write)
        return meta

    async def get_meta(self, sid: str, owner: str) -> dict:
        if not isinstance(sid, str) or not SESSION_ID_RE.match(sid):
            raise NotFound(f"no session {sid!r}", param="session_id", code="session_not_found")
        meta = await self.run_io(self.store.get_session, sid)
        # another key's session is reported exactly like a missing one (no existence oracle)
        if meta is None or not secrets.compare_digest(meta["owner"], owner):
            raise NotFound(f"no session {sid!r}", param="session_id", code="session_not_found")
        return meta

    async def delete(self, sid: str, owner: str) -> None:
        await self.get_meta(sid, owner)
        entry = self.entries.get(sid)
        if entry is not None:
            if entry.users:
                raise Conflict("session is in use; retry when its current request has finished", param="session_id")
            entry.session, entry.resident = None, False
            self.entries.pop(sid, None)
        await self.run_io(self.store.delete_session, sid)

    # ---- leases ------------------------------------------------------------------------------------
    async def acquire(self, sid: str, owner: str) -> Lease:
        """Wait for exclusive use of a persistent session, loading it from disk if it is not resident."""
        if self.closing:
            raise Unavailable("server is shutting down")
        meta = await self.get_meta(sid, owner)
        if meta["model"] != self.model_name:
            raise Conflict(f"session {sid} was created with model {meta['model']!r}; this server runs "
                           f"{self.model_name!r}", param="session_id")
        entry = self.entries.get(sid)
        if entry is None:
            name, params = meta["policy"]["name"], meta["policy"]["params"]
            entry = self.entries[sid] = Entry(sid, meta, self.estimate_bytes(name, params))
        if entry.users >= self.max_waiters:
            self.stats["busy"] += 1
            raise Busy(f"too many requests queued for session {sid}", retry_after=2)
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:
            self._unuse(entry)
            raise
        try:
            if entry.session is None:
                if not entry.resident:
                    self._make_room(entry.est_bytes)
                    entry.resident = True
                fresh = await self.run_io(self.store.get_session, sid)
                if fresh is None:  # deleted while this request was on its way
                    raise NotFound(f"no session {sid!r}", param="session_id", code="session_not_found")
                entry.meta = fresh
                entry.session = await self.run_io(self._load, entry.meta)
                self.stats["loads"] += 1
        except BaseException:
            entry.resident = entry.session is not None
            entry.lock.release()
            self._unuse(entry)
            raise
        entry.last_used = time.monotonic()

        def release():
            entry.last_used = time.monotonic()
            entry.lock.release()
            self._unuse(entry)
        return Lease(self, entry.session, entry, release)

    def _unuse(self, entry: Entry) -> None:
        entry.users -= 1
        if entry.users == 0 and not entry.resident and self.entries.get(entry.sid) is entry:
            del self.entries[entry.sid]

    def _load(self, meta: dict) -> ServerSession:
        s = self.new_session(meta["policy"]["name"], meta["policy"]["params"])
        if meta["version"] > 0:
            state = self.store.read_snapshot(meta["id"], meta["version"])
            s.load_state_dict(state["session"])
            s.kind = state["kind"]
        log.info("session loaded", extra={"session_id": meta["id"], "version": meta["version"]})
        return s

    async def acquire_ephemeral(self, policy: tuple[str, dict]) -> Lease:
        """A throwaway session for a stateless request; it counts against the budget while it runs."""
        if self.closing:
            raise Unavailable("server is shutting down")
        name, params = policy
        est = self.estimate_bytes(name, params)
        self._make_room(est)
        self.ephemeral_n += 1
        self.ephemeral_bytes += est

        def release():
            self.ephemeral_n -= 1
            self.ephemeral_bytes -= est
            lease.session = None  # drop the throwaway cache now, then give its memory back
            self._trim_soon()
        lease = Lease(self, self.new_session(name, params), None, release)
        return lease

    # ---- turns --------------------------------------------------------------------------------------
    async def commit(self, lease: Lease, rows: list[dict]) -> None:
        """Make the turn durable (snapshot + transcript, see store.py) before it is acknowledged."""
        entry, s = lease.entry, lease.session
        if entry is None:
            return
        version = entry.meta["version"] + 1

        def write():
            state = {"session": s.state_dict(copy=False), "kind": s.kind}  # under the session lock: no copy needed
            self.store.write_snapshot(entry.sid, version, state)
            self.store.commit_turn(entry.sid, version, s.kind, s.policy.seen, rows)
            del state
            trim_memory()
            return self.store.get_session(entry.sid)
        entry.meta = await self.run_io(write)
        entry.dirty = False
        self.stats["commits"] += 1

    def rollback(self, lease: Lease) -> None:
        """Forget an unacknowledged turn: the in-memory copy is dropped and reloaded from the last snapshot."""
        entry = lease.entry
        if entry is None:
            return
        entry.session, entry.resident, entry.dirty = None, False, False
        lease.session = None
        self.stats["rollbacks"] += 1
        log.info("turn rolled back", extra={"session_id": entry.sid})

    async def close(self, timeout: float = 30.0) -> dict:
        """Shutdown: refuse new work, let running turns finish (they commit), then report. Idle resident
        sessions already equal their snapshots; a turn still running after `timeout` is not acknowledged
        and stays rolled back on disk."""
        self.closing = True
        deadline = time.monotonic() + timeout
        while any(e.lock.locked() for e in self.entries.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = [e.sid for e in self.entries.values() if e.dirty]
        flushed = sum(1 for e in self.entries.values() if e.resident and not e.dirty)
        return {"resident_flushed": flushed, "unfinished_turns": unfinished}


_END = object()


class Turn:
    """Runs one generation (a sync generator of text pieces) in the compute pool, one step per executor
    call, in its own task: a client disconnect sets `cancelled` instead of interrupting the session between
    a model step and its bookkeeping. The task owns the lease and releases it at the end."""

    def __init__(self, lease: Lease, gen: Iterator[str], finish: Callable[[str], Awaitable[Any]]):
        self.lease, self.gen, self.finish = lease, gen, finish
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.task: asyncio.Task | None = None

    def start(self) -> "Turn":
        if self.lease.entry is not None:
            self.lease.entry.dirty = True
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        manager = self.lease.manager
        pieces: list[str] = []
        try:
            while not self.cancelled:
                piece = await loop.run_in_executor(manager.compute, next, self.gen, _END)
                if piece is _END:
                    break
                pieces.append(piece)
                self.queue.put_nowait(("piece", piece))
            if self.cancelled:
                self.gen.close()
                manager.rollback(self.lease)
                self.queue.put_nowait(("cancelled", None))
                return
            result = await self.finish("".join(pieces))
            self.queue.put_nowait(("done", result))
        except BaseException as e:  # noqa: BLE001 - report every failure to the waiting response
            try:
                self.gen.close()
            except Exception:  # a generator that is still running in the pool cannot be closed
                pass
            manager.rollback(self.lease)
            self.queue.put_nowait(("error", e))
            if not isinstance(e, Exception):
                raise
        finally:
            self.lease.release()

    async def events(self):
        while True:
            kind, value = await self.queue.get()
            yield kind, value
            if kind != "piece":
                return
