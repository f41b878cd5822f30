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


import torch

from ..policies import check_param_types, parse_policy_spec
from ..policies.base import delta_state, merge_delta, snapshot_index
from ..session import StreamSession
from .admission import Price, check_policy, price, server_params, transient_reserve
from .config import ServerConfig
from .errors import (BadRequest, Busy, Conflict, NotFound, QuotaExceeded, ServerError, Unauthorized,  # noqa: F401
                     Unavailable)
from .faults import crash_point
from .store import SnapshotError, Store

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


@dataclass(frozen=True)
class SnapshotBase:
    """The full snapshot a session's next snapshots may be incremental to (store.py)."""
    version: int
    index: tuple  # (seq, pos) of its kept slots: policies/base.py snapshot_index
    size: int  # its bytes on disk (they count in the session's disk quota while it is a base)


def snapshot_base(version: int, policy_state: dict, size: int) -> SnapshotBase | None:
    """A full snapshot as the base of incremental ones (None for a policy state without a slot table)."""
    index = snapshot_index(policy_state)
    return SnapshotBase(version, index, size) if index is not None else None


class ServerSession(StreamSession):
    """A StreamSession that remembers where the last generation started/ended in the stream (for usage
    counts), what kind of stream it is ('chat' turns or raw 'text' completions: they do not mix), and every
    forward it ran since the last commit (the turn log record: token ids and forward lengths, so a replay
    feeds exactly the same chunks and reproduces the logits bit for bit)."""

    kind: str | None = None
    gen_start = gen_end = 0
    recording = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._log_ids: list[int] = []
        self._log_runs: list[list[int]] = []  # [[forward length, count], ...]
        self._logged_messages = 0  # messages already in the committed log
        self._log_turn_ends = 0  # policy.end_turn() calls (sirllm's decay) since the last record
        self.snapshot_base: SnapshotBase | None = None  # what the next snapshot may be incremental to

    def _forward(self, chunk: torch.Tensor, all_logits: bool) -> torch.Tensor:
        if self.recording:
            n = chunk.shape[1]
            self._log_ids.extend(chunk[0].tolist())
            if self._log_runs and self._log_runs[-1][0] == n:
                self._log_runs[-1][1] += 1
            else:
                self._log_runs.append([n, 1])
        return super()._forward(chunk, all_logits)

    def take_record(self) -> dict:
        """The turn log record of everything since the last one (called at commit)."""
        record = {"runs": self._log_runs, "ids": self._log_ids,
                  "after": {"messages": self.messages[self._logged_messages:], "messages_fed": self._n_fed,
                            "prompt_tokens": self._prompt_tokens, "kind": self.kind, "turn_ends": self._log_turn_ends}}
        self._log_ids, self._log_runs, self._logged_messages, self._log_turn_ends = [], [], len(self.messages), 0
        return record

    def mark_committed(self) -> None:
        """After loading a snapshot or replaying the log: the in-memory state is what the log holds."""
        self._log_ids, self._log_runs, self._logged_messages, self._log_turn_ends = [], [], len(self.messages), 0

    def end_turn(self) -> None:
        if self.recording:
            self._log_turn_ends += 1
        super().end_turn()

    def replay(self, records: list[dict]) -> None:
        """Rebuild the stream from the turn log: the same ids through the same forward lengths."""
        self.recording, chunk_size = False, self.chunk_size
        try:
            for rec in records:
                ids, off = rec["ids"], 0
                for length, count in rec["runs"]:
                    self.chunk_size = length
                    self.feed(ids[off:off + length * count])
                    off += length * count
                after = rec["after"]
                for _ in range(after.get("turn_ends", 0)):  # a turn ends after its last feed (chat's closing)
                    self.end_turn()
                self.messages.extend(after["messages"])
                self._n_fed, self._prompt_tokens, self.kind = after["messages_fed"], after["prompt_tokens"], after["kind"]
        finally:
            self.recording, self.chunk_size = True, chunk_size
        self.mark_committed()

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
        try:
            check_param_types(params)
        except ValueError as e:
            raise BadRequest(str(e), param="policy") from None
    else:
        raise BadRequest("policy must be a string like 'sink:sinks=4,window=1020' or an object", param="policy")
    return name, params


@dataclass
class Entry:
    """A session known to the manager (resident, loading, or with requests waiting for it)."""

    sid: str
    meta: dict
    price: Price
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
    def __init__(self, model, tokenizer, store: Store, cfg: ServerConfig, *, compute: Executor, io: Executor):
        self.model, self.tokenizer, self.store, self.cfg = model, tokenizer, store, cfg
        self.model_name = cfg.model_name
        self.default_policy = parse_policy(cfg.policy, None)
        self.compute, self.io = compute, io
        self.max_resident, self.max_cache_bytes = cfg.max_resident, cfg.max_cache_bytes
        self.max_waiters, self.chunk_size = cfg.max_waiters, cfg.chunk_size
        self.entries: dict[str, Entry] = {}
        self.turns: set[Turn] = set()  # running turns (shutdown cancels what is left of them)
        self.ephemeral: list[Price] = []  # prices of the stateless requests running now
        self.closing = False
        self.stats = {"loads": 0, "evictions": 0, "busy": 0, "commits": 0, "rollbacks": 0, "cancelled": 0,
                      "rebuilds": 0}
        # the server's own default must pass its own admission (else: a clear start-up error)
        self.check_policy(*self.default_policy, allow_any=True)

    # ---- helpers ------------------------------------------------------------------------------------
    async def run_io(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    def new_session(self, name: str, params: dict, sid: str | None = None) -> ServerSession:
        """A fresh session; a `memory` session keeps its block store in the data folder (memory/<sid>, deleted
        with the session), or in a temporary folder for a stateless request."""
        params = server_params(self.cfg, name, params)
        if (name == "memory" or params.get("retrieval") == "memory") and sid is not None:
            params = {**params, "store_dir": str(self.store.memory_dir(sid))}
        return ServerSession(self.model, self.tokenizer, name, chunk_size=self.chunk_size, **params)

    def price(self, name: str, params: dict) -> Price:
        return price(self.model, name, params, self.cfg)

    def check_policy(self, name: str, params: dict, allow_any: bool = False) -> Price:
        """Admission of a session's policy (see admission.py). The operator's --policy may be a policy that
        clients may not pick themselves (allow_any), but it must still fit the budgets."""
        cfg = self.cfg
        if allow_any and name not in cfg.allowed_policies:
            cfg = ServerConfig(**{**vars(cfg), "allowed_policies": (*cfg.allowed_policies, name)})
        return check_policy(cfg, self.model, name, params)

    def _trim_soon(self) -> None:
        """Freed caches go back to the OS off the event loop (after the last reference is dropped)."""
        asyncio.get_running_loop().run_in_executor(self.io, trim_memory)

    def resident_count(self) -> int:
        return sum(e.resident for e in self.entries.values()) + len(self.ephemeral)

    def _resident_prices(self) -> list[Price]:
        return [e.price for e in self.entries.values() if e.resident] + self.ephemeral

    def resident_bytes(self) -> int:
        return sum(p.resident_bytes for p in self._resident_prices())

    def reserved_bytes(self, extra: Price | None = None) -> int:
        """Resident sessions at full budget, plus what the compute and I/O threads may allocate for them at
        once (prefill activations, snapshot copies: admission.transient_reserve)."""
        prices = self._resident_prices() + ([extra] if extra is not None else [])
        return sum(p.resident_bytes for p in prices) + transient_reserve(prices, self.cfg.workers, self.cfg.io_threads)

    def _make_room(self, need: Price) -> None:
        """Evict idle sessions, least recently used first, until one more priced `need` fits. Synchronous
        (no await between the check and the caller marking itself resident)."""
        def fits():
            if self.resident_count() + 1 > self.max_resident:
                return False
            return self.reserved_bytes(need) <= self.max_cache_bytes

        while not fits():
            idle = [e for e in self.entries.values() if e.resident and e.users == 0 and not e.lock.locked()]
            if not idle:
                self.stats["busy"] += 1
                raise Busy(f"all {self.resident_count()} resident sessions are busy (budget: {self.max_resident} "
                           f"sessions, {self.max_cache_bytes} bytes); retry shortly", retry_after=1)
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
        self.check_policy(name, params, allow_any=policy == self.default_policy)
        n, disk = await self.run_io(self.store.owner_usage, owner)
        if n >= self.cfg.max_sessions_per_key:
            raise QuotaExceeded(f"this API key already has {n} sessions, the most this server allows "
                                f"(--max-sessions-per-key); delete some first", param="session_id")
        if disk >= self.cfg.max_disk_bytes_per_key:
            raise QuotaExceeded(f"this API key's sessions use {disk} bytes of disk, the most this server allows "
                                f"({self.cfg.max_disk_bytes_per_key}, --max-disk-mb-per-key); delete some first")
        sid = new_session_id()
        meta = await self.run_io(self.store.create_session, sid, owner, self.model_name,
                                 {"name": name, "params": params}, metadata)
        if system:
            # the system message lives in the session's transcript state; nothing is fed until the first turn
            s = self.new_session(name, params, sid)
            s.messages.append({"role": "system", "content": system})
            s.kind = "chat"
            state = {"session": s.state_dict(copy=True), "kind": s.kind}
            record = s.take_record()

            def write():
                size = self.store.write_snapshot(sid, 1, state)
                self.store.commit_turn(sid, 1, "chat", 0, [{"role": "system", "content": system}], record, size)
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

    async def check_disk(self, meta: dict) -> None:
        """Before a turn: the session and its key must be under their disk quotas (the turn adds to both)."""
        used = meta["snapshot_bytes"] + meta["log_bytes"]
        if used >= self.cfg.max_session_disk_bytes:
            raise QuotaExceeded(f"session {meta['id']} uses {used} bytes of disk, the most one session may "
                                f"({self.cfg.max_session_disk_bytes}, --max-session-disk-mb); start a new session",
                                param="session_id")
        _, disk = await self.run_io(self.store.owner_usage, meta["owner"])
        if disk >= self.cfg.max_disk_bytes_per_key:
            raise QuotaExceeded(f"this API key's sessions use {disk} bytes of disk, the most this server allows "
                                f"({self.cfg.max_disk_bytes_per_key}, --max-disk-mb-per-key); delete some first")

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
            entry = self.entries[sid] = Entry(sid, meta, self.price(name, params))
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
                    self._make_room(entry.price)
                    entry.resident = True
                fresh = await self.run_io(self.store.get_session, sid)
                if fresh is None:  # deleted while this request was on its way
                    raise NotFound(f"no session {sid!r}", param="session_id", code="session_not_found")
                entry.meta = fresh
                entry.session = await loop_run(self.compute, self._load, entry.meta)
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
        """The committed state of a session: its snapshot if it verifies, else a replay of its turn log
        (then the snapshot is rewritten, so the next load is fast again)."""
        sid, version = meta["id"], meta["version"]
        name, params = meta["policy"]["name"], meta["policy"]["params"]
        s = self.new_session(name, params, sid)
        if version == 0:
            return s
        try:
            state = self.store.read_snapshot(sid, version)
            full = state.get("base", version)  # the full snapshot: this one, or the one it is incremental to
            full_policy = state["session"]["policy"] if full == version else \
                self.store.read_snapshot(sid, full)["session"]["policy"]
            if full != version:
                state["session"]["policy"] = merge_delta(full_policy, state["session"]["policy"])
            s.load_state_dict(state["session"])
            s.snapshot_base = snapshot_base(full, full_policy, self.store.snapshot_size(sid, full))
            s.kind = state["kind"]
            s.mark_committed()
            log.info("session loaded", extra={"session_id": sid, "version": version})
            return s
        except (SnapshotError, KeyError, ValueError, RuntimeError, TypeError) as e:
            reason = str(e)
        records = self.store.feed_log(sid)
        if not records:  # a session from before turn logs existed: its unverified snapshot is all there is
            try:
                state = self.store.read_legacy_snapshot(sid, version)
                s.load_state_dict(state["session"])
                s.kind = state["kind"]
                s.mark_committed()
                return s
            except (SnapshotError, KeyError, ValueError, RuntimeError, TypeError):
                s = self.new_session(name, params, sid)
        if [r["version"] for r in records] != list(range(1, version + 1)):
            log.error("session cannot be rebuilt", extra={"session_id": sid, "reason": reason})
            raise Conflict(f"session {sid} cannot be restored: its snapshot is unusable ({reason}) and its turn log "
                           "is incomplete (it predates turn logs); delete it", param="session_id",
                           code="session_unrecoverable")
        t0 = time.perf_counter()
        s = self.new_session(name, params, sid)
        s.replay(records)
        full = {"session": s.state_dict(copy=True), "kind": s.kind}
        self.store.replace_snapshot(sid, version, full)
        s.snapshot_base = snapshot_base(version, full["session"]["policy"], self.store.snapshot_size(sid, version))
        self.stats["rebuilds"] += 1
        log.warning("session rebuilt from its turn log", extra={
            "session_id": sid, "version": version, "reason": reason, "tokens": s.policy.seen,
            "seconds": round(time.perf_counter() - t0, 3)})
        return s

    async def acquire_ephemeral(self, policy: tuple[str, dict]) -> Lease:
        """A throwaway session for a stateless request; it counts against the budget while it runs."""
        if self.closing:
            raise Unavailable("server is shutting down")
        name, params = policy
        est = self.price(name, params)
        self._make_room(est)
        self.ephemeral.append(est)

        def release():
            self.ephemeral.remove(est)
            lease.session = None  # drop the throwaway cache now, then give its memory back
            self._trim_soon()
        session = self.new_session(name, params)
        session.recording = False  # never committed: nothing to log
        lease = Lease(self, session, None, release)
        return lease

    # ---- turns --------------------------------------------------------------------------------------
    async def commit(self, lease: Lease, rows: list[dict]) -> None:
        """Make the turn durable (snapshot + turn log + transcript, see store.py) before it is acknowledged."""
        entry, s = lease.entry, lease.session
        if entry is None:
            return
        version = entry.meta["version"] + 1

        def write():
            # compact copies of the kept tokens only: saving views would write the whole preallocated buffers
            state = {"session": s.state_dict(copy=True), "kind": s.kind}  # (flushes a memory store to disk)
            full_policy, base = state["session"]["policy"], s.snapshot_base
            delta = delta_state(full_policy, base.index) if base is not None else None
            if delta is not None:  # only what the base snapshot does not hold (store.py: incremental snapshots)
                state["session"]["policy"], state["base"] = delta, base.version
            size = self.store.write_snapshot(entry.sid, version, state)
            if delta is None:
                s.snapshot_base = snapshot_base(version, full_policy, size)
            base_size = s.snapshot_base.size if delta is not None else 0
            if hasattr(s.policy, "store"):  # a memory session's block store counts in its disk quota
                size += s.policy.store.disk_used()
            self.store.commit_turn(entry.sid, version, s.kind, s.policy.seen, rows, s.take_record(), size + base_size,
                                   base_version=base.version if delta is not None else None)
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

    def begin_shutdown(self, grace: float) -> None:
        """SIGTERM: refuse new work at once; running turns get `grace` seconds to finish (and commit), then
        they are cancelled (rolled back within one decode step)."""
        if self.closing:
            return
        self.closing = True
        loop = asyncio.get_running_loop()

        def cancel_rest():
            for turn in list(self.turns):
                turn.cancel("the server is shutting down")
        loop.call_later(max(0.0, grace), cancel_rest)

    async def close(self, timeout: float = 5.0) -> dict:
        """Lifespan shutdown: the same, then wait for the running turns to be gone, then report. Idle resident
        sessions already equal their snapshots: nothing to flush."""
        self.begin_shutdown(timeout)
        deadline = time.monotonic() + timeout + 10  # a cancelled turn stops after its current step
        while self.turns and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = [e.sid for e in self.entries.values() if e.dirty]
        flushed = sum(1 for e in self.entries.values() if e.resident and not e.dirty)
        return {"resident_flushed": flushed, "unfinished_turns": unfinished, "counters": dict(self.stats)}


async def loop_run(executor: Executor, fn, *args):
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


_END = object()


class Turn:
    """Runs one generation (a sync generator of text pieces) in the compute pool, one step per executor
    call, in its own task: a client disconnect or shutdown calls `cancel` instead of interrupting the session
    between a model step and its bookkeeping, so the turn stops after its current step and is rolled back.
    The task owns the lease and releases it at the end."""

    def __init__(self, lease: Lease, gen: Iterator[str], finish: Callable[[str], Awaitable[Any]]):
        self.lease, self.gen, self.finish = lease, gen, finish
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled: str | None = None  # why, once cancelled
        self.task: asyncio.Task | None = None

    def cancel(self, why: str = "the client went away") -> None:
        if self.cancelled is None:
            self.cancelled = why

    def start(self) -> "Turn":
        if self.lease.entry is not None:
            self.lease.entry.dirty = True
        self.lease.manager.turns.add(self)
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        manager = self.lease.manager
        pieces: list[str] = []
        try:
            while self.cancelled is None:
                piece = await loop.run_in_executor(manager.compute, next, self.gen, _END)
                if piece is _END:
                    break
                crash_point("decode-step")
                pieces.append(piece)
                self.queue.put_nowait(("piece", piece))
            if self.cancelled is not None:
                self.gen.close()
                manager.rollback(self.lease)
                manager.stats["cancelled"] += 1
                log.info("turn cancelled", extra={"session_id": self.lease.sid, "reason": self.cancelled})
                self.queue.put_nowait(("cancelled", self.cancelled))
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
            manager.turns.discard(self)

    async def events(self, keepalive: float | None = None):
        """("piece", text) ... then one of ("done", result), ("error", e), ("cancelled", why). With
        `keepalive`, ("ping", None) whenever nothing came for that many seconds (a long prefill)."""
        while True:
            try:
                kind, value = await asyncio.wait_for(self.queue.get(), keepalive) if keepalive else await self.queue.get()
            except asyncio.TimeoutError:
                yield "ping", None
                continue
            yield kind, value
            if kind != "piece":
                return
