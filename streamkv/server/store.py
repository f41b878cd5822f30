"""Durable state of the server: SQLite for session metadata and transcripts, one snapshot file per session
for its cache state.

The commit protocol (why a turn survives `kill -9` or is cleanly absent):

1. the session's new state is written to `snapshots/<id>.<version>.pt` (temp file, fsync, os.replace,
   fsync of the directory), a file no committed row points at yet;
2. one SQLite transaction inserts the turn's transcript rows and moves `sessions.version` to the new
   version — this is the commit point;
3. the previous snapshot file is deleted (and its base, if the new one is not incremental to it).

Incremental snapshots: a version may hold only the slot-table tokens its *base* (an earlier full version,
`sessions.base_version`, kept on disk while referenced) does not (policies/base.py: delta_state). Loading
reads both and merges them; a missing or damaged base is handled like a damaged snapshot (rebuilt from the
turn log, below). A session writes a full snapshot again when more than half of what it keeps is new.

A crash before 2 leaves an orphan file that `sweep_orphans` removes at start-up; after 2 the turn is
acknowledged and both halves are on disk. SQLite runs in WAL mode with synchronous=FULL so a committed
transaction is durable when `commit()` returns.

The durable record is the *turn log* (table `feeds`, written in the same transaction): every token id the
turn fed, with the lengths of the forwards it was fed in, and the transcript state it left behind. A
snapshot is only a cache of replaying that log: each file starts with a header naming its session, its
version and the SHA-256 of its payload, so a truncated, garbage or foreign file is recognised on load and
the session is rebuilt from the log (same ids, same forward lengths: identical logits) instead of failing.

Everything here is private to the local user: the data folder is 0700 and the files 0600.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from array import array
from pathlib import Path

import torch

from .faults import crash_point

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,            -- sha256 of the API key that created it ('' when the server has no key)
    created INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    model TEXT NOT NULL,
    policy TEXT NOT NULL,           -- JSON {"name": ..., "params": {...}}
    kind TEXT,                      -- NULL until first use, then 'chat' or 'text'
    version INTEGER NOT NULL,       -- snapshot version on disk (0 = fresh, no snapshot)
    tokens_seen INTEGER NOT NULL DEFAULT 0,
    n_turns INTEGER NOT NULL DEFAULT 0,
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions(owner, created);
CREATE TABLE IF NOT EXISTS turns (
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS feeds (  -- the turn log: what each committed version fed into the stream
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    runs TEXT NOT NULL,             -- JSON [[forward_length, count], ...] in feed order
    ids BLOB NOT NULL,              -- int32 token ids, in feed order
    after TEXT NOT NULL,            -- JSON: messages appended, messages_fed, prompt_tokens, kind
    PRIMARY KEY (session_id, version)
);
"""
ADDED_COLUMNS = {  # columns newer than the first schema: added in place to an older database
    "snapshot_bytes": "INTEGER NOT NULL DEFAULT 0",  # size of the current snapshot file
    "log_bytes": "INTEGER NOT NULL DEFAULT 0",       # turn log + transcript bytes (grows with the stream)
    "base_version": "INTEGER",                       # the full snapshot an incremental one points at (NULL: full)
}
MAGIC = b"STREAMKV-SNAPSHOT 1\n"
HEADER_WIDTH = 256  # bytes of the JSON header line, padded with spaces (older files: unpadded; both read)


class _HashingWriter:
    """A write-only file object for torch.save: passes bytes on to `f`, counting and hashing them."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

SESSION_COLUMNS = ("id", "owner", "created", "updated", "model", "policy", "kind", "version", "tokens_seen",
                   "n_turns", "metadata", "snapshot_bytes", "log_bytes", "base_version")


class StoreError(Exception):
    """The database cannot be opened or is damaged: the server must not start on it."""


class SnapshotError(Exception):
    """A snapshot file is missing, damaged, or not the one the database points at."""


def _row_to_dict(row) -> dict:
    d = dict(zip(SESSION_COLUMNS, row))
    d["policy"] = json.loads(d["policy"])
    d["metadata"] = json.loads(d["metadata"])
    return d


class Store:
    """Thread-safe (one connection behind a lock): called from the server's I/O thread pool."""

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        self.snap_dir = self.dir / "snapshots"
        for d in (self.dir, self.snap_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        self._lock = threading.Lock()
        self.path = self.dir / "streamkv.sqlite3"
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.executescript(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(sessions)")}
            for column, decl in ADDED_COLUMNS.items():
                if column not in have:
                    self.db.execute(f"ALTER TABLE sessions ADD COLUMN {column} {decl}")
            check = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
        except sqlite3.Error as e:
            raise StoreError(
                f"the session database {self.path} is damaged or unreadable ({e}). Nothing was changed. Either "
                f"restore it from a backup, or salvage what is readable with `sqlite3 {self.path} .recover > "
                f"recovered.sql`, then move the damaged file aside (mv {self.path} {self.path}.damaged) and "
                "start again: the server creates an empty database, into which you can load recovered.sql."
            ) from None
        for f in self.dir.glob("streamkv.sqlite3*"):
            os.chmod(f, 0o600)

    # ---- sessions ---------------------------------------------------------------------------------
    def create_session(self, sid: str, owner: str, model: str, policy: dict, metadata: dict) -> dict:
        now = int(time.time())
        with self._lock:
            self.db.execute(
                "INSERT INTO sessions (id, owner, created, updated, model, policy, kind, version, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?, NULL, 0, ?)",
                (sid, owner, now, now, model, json.dumps(policy), json.dumps(metadata)),
            )
        return self.get_session(sid)

    def get_session(self, sid: str) -> dict | None:
        with self._lock:
            row = self.db.execute(f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions WHERE id = ?", (sid,)).fetchone()
        return _row_to_dict(row) if row else None

    def list_sessions(self, owner: str, limit: int = 100) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions WHERE owner = ? ORDER BY created DESC, id LIMIT ?",
                (owner, limit),
            ).fetchall()
        return [_row_to_dict(r) for r in rows]

    def count_sessions(self) -> int:
        with self._lock:
            return self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]

    def delete_session(self, sid: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
        for f in self.snap_dir.glob(f"{sid}.*.pt"):
            f.unlink(missing_ok=True)
        shutil.rmtree(self.dir / "memory" / sid, ignore_errors=True)

    def memory_dir(self, sid: str) -> Path:
        """The block store of a `memory` session (created on first use, private like the rest)."""
        path = self.dir / "memory" / sid
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    def turns(self, sid: str) -> list[dict]:
        with self._lock:
            rows = self.db.execute(
                "SELECT seq, role, content, created, prompt_tokens, completion_tokens, finish_reason FROM turns "
                "WHERE session_id = ? ORDER BY seq", (sid,)).fetchall()
        keys = ("seq", "role", "content", "created", "prompt_tokens", "completion_tokens", "finish_reason")
        return [dict(zip(keys, r)) for r in rows]

    # ---- snapshots and the commit ------------------------------------------------------------------
    def snapshot_path(self, sid: str, version: int) -> Path:
        return self.snap_dir / f"{sid}.{version}.pt"

    def write_snapshot(self, sid: str, version: int, state: dict) -> int:
        """Atomically write a snapshot file (header + payload; not yet referenced by the database). Returns
        its size in bytes.

        The payload is serialised straight into the file through a hashing writer, and the header (whose
        checksum is only known at the end) is written last into a fixed-width slot reserved before the
        payload: no in-memory copy of the payload, whose buffer used to double the session's bytes while a
        turn committed (the server prices that transient; see admission.transient_bytes)."""
        path = self.snapshot_path(sid, version)
        fd, tmp = tempfile.mkstemp(dir=self.snap_dir, prefix=f".{sid}.", suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                at = f.tell()
                f.write(b" " * (HEADER_WIDTH - 1) + b"\n")  # the header's slot, filled in below
                out = _HashingWriter(f)
                torch.save(state, out)
                header = json.dumps({"session_id": sid, "version": version, "bytes": out.n,
                                     "sha256": out.sha.hexdigest()}).encode()
                if len(header) >= HEADER_WIDTH:  # cannot happen with session ids of SESSION_ID_RE
                    raise ValueError(f"snapshot header of {len(header)} bytes does not fit {HEADER_WIDTH}")
                f.seek(at)
                f.write(header.ljust(HEADER_WIDTH - 1) + b"\n")  # JSON ignores the padding spaces
                f.flush()
                os.fsync(f.fileno())
            crash_point("snapshot-temp-written")
            os.replace(tmp, path)
            crash_point("snapshot-renamed")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.snap_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        crash_point("snapshot-written")
        return len(MAGIC) + HEADER_WIDTH + out.n

    def snapshot_size(self, sid: str, version: int) -> int:
        return self.snapshot_path(sid, version).stat().st_size

    def _open_snapshot(self, sid: str, version: int, verify: bool) -> tuple[dict, bytes | None]:
        path = self.snapshot_path(sid, version)
        try:
            with open(path, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    raise SnapshotError(f"{path.name}: not a streamkv snapshot")
                try:
                    header = json.loads(f.readline(4096))
                except ValueError:
                    raise SnapshotError(f"{path.name}: damaged header") from None
                if not isinstance(header, dict) or header.get("session_id") != sid or header.get("version") != version:
                    raise SnapshotError(f"{path.name}: belongs to {header.get('session_id') if isinstance(header, dict) else '?'}"
                                        f" version {header.get('version') if isinstance(header, dict) else '?'}")
                size = path.stat().st_size - f.tell()
                if size != header.get("bytes"):
                    raise SnapshotError(f"{path.name}: {size} payload bytes, header says {header.get('bytes')}")
                if not verify:
                    return header, None
                payload = f.read()
        except FileNotFoundError:
            raise SnapshotError(f"{path.name}: missing") from None
        if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
            raise SnapshotError(f"{path.name}: checksum mismatch")
        return header, payload

    def check_snapshot(self, sid: str, version: int) -> None:
        """Cheap start-up check (exists, header names this session and version, size matches); raises
        SnapshotError. The checksum is verified when the snapshot is read."""
        self._open_snapshot(sid, version, verify=False)

    def read_snapshot(self, sid: str, version: int) -> dict:
        """The verified state of `sid` at `version`; SnapshotError if it is missing, damaged or foreign."""
        _, payload = self._open_snapshot(sid, version, verify=True)
        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as e:  # a valid checksum over an unreadable payload: written by something else
            raise SnapshotError(f"snapshot of {sid} v{version}: unreadable payload ({e})") from None

    def read_legacy_snapshot(self, sid: str, version: int) -> dict:
        """A snapshot written before headers existed (no checksum to verify; only used when the session has
        no turn log to rebuild from)."""
        try:
            return torch.load(self.snapshot_path(sid, version), map_location="cpu", weights_only=True)
        except Exception as e:
            raise SnapshotError(f"{sid}.{version}.pt: unreadable ({e})") from None

    def damaged_snapshots(self) -> list[tuple[str, str]]:
        """(session id, reason) of every committed snapshot that fails `check_snapshot`."""
        with self._lock:
            rows = self.db.execute("SELECT id, version, base_version FROM sessions WHERE version > 0").fetchall()
        bad = []
        for sid, version, base in rows:
            try:
                for v in (version, base) if base else (version,):
                    self.check_snapshot(sid, v)
            except SnapshotError as e:
                bad.append((sid, str(e)))
        return bad

    def replace_snapshot(self, sid: str, version: int, state: dict) -> None:
        """Repair: rewrite the snapshot the database already points at (rebuilt from the turn log), as a
        full one: the base an incremental one pointed at is no longer needed."""
        size = self.write_snapshot(sid, version, state)
        with self._lock:
            (base,) = self.db.execute("SELECT base_version FROM sessions WHERE id = ?", (sid,)).fetchone()
            self.db.execute("UPDATE sessions SET snapshot_bytes = ?, base_version = NULL WHERE id = ?", (size, sid))
        if base and base != version:
            self.snapshot_path(sid, base).unlink(missing_ok=True)

    # ---- the turn log ------------------------------------------------------------------------------
    def feed_log(self, sid: str) -> list[dict]:
        """Every committed version's record, in order: {"version", "runs", "ids", "after"}."""
        with self._lock:
            rows = self.db.execute("SELECT version, runs, ids, after FROM feeds WHERE session_id = ? ORDER BY version",
                                   (sid,)).fetchall()
        out = []
        for version, runs, blob, after in rows:
            ids = array("i")
            ids.frombytes(blob)
            out.append({"version": version, "runs": json.loads(runs), "ids": ids.tolist(), "after": json.loads(after)})
        return out

    def owner_usage(self, owner: str) -> tuple[int, int]:
        """(sessions, disk bytes) held by one key."""
        with self._lock:
            n, disk = self.db.execute("SELECT COUNT(*), COALESCE(SUM(snapshot_bytes + log_bytes), 0) FROM sessions "
                                      "WHERE owner = ?", (owner,)).fetchone()
        return n, disk

    def commit_turn(self, sid: str, version: int, kind: str, tokens_seen: int, rows: list[dict],
                    record: dict | None = None, snapshot_bytes: int = 0, base_version: int | None = None) -> None:
        """The commit point: transcript rows, the turn-log record and the new snapshot version (with the
        full snapshot it is incremental to, if it is) in one transaction; then the previous snapshot file,
        and its base when the new one does not use it, are dropped. `record` is {"runs", "ids", "after"}."""
        now = int(time.time())
        log_bytes = sum(len(r["content"].encode()) + 64 for r in rows)
        if record is not None:
            runs, after = json.dumps(record["runs"]), json.dumps(record["after"])
            ids = array("i", record["ids"]).tobytes()
            log_bytes += len(runs) + len(after) + len(ids)
        with self._lock:
            cur = self.db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                old, n_turns, old_base = cur.execute("SELECT version, n_turns, base_version FROM sessions WHERE id = ?",
                                                     (sid,)).fetchone()
                for i, r in enumerate(rows):
                    cur.execute(
                        "INSERT INTO turns (session_id, seq, role, content, created, prompt_tokens, completion_tokens, "
                        "finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (sid, n_turns + i, r["role"], r["content"], now, r.get("prompt_tokens"),
                         r.get("completion_tokens"), r.get("finish_reason")),
                    )
                if record is not None:
                    cur.execute("INSERT INTO feeds (session_id, version, runs, ids, after) VALUES (?, ?, ?, ?, ?)",
                                (sid, version, runs, ids, after))
                cur.execute(
                    "UPDATE sessions SET version = ?, kind = ?, tokens_seen = ?, n_turns = ?, updated = ?, "
                    "snapshot_bytes = ?, log_bytes = log_bytes + ?, base_version = ? WHERE id = ?",
                    (version, kind, tokens_seen, n_turns + len(rows), now, snapshot_bytes, log_bytes, base_version, sid),
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        crash_point("turn-committed")
        for v in {old, old_base} - {version, base_version, None, 0}:
            self.snapshot_path(sid, v).unlink(missing_ok=True)

    def sweep_orphans(self) -> int:
        """Remove snapshot files no committed row points at (a crash between write and commit) and temp files."""
        with self._lock:
            live = {f"{sid}.{v}.pt" for sid, version, base in
                    self.db.execute("SELECT id, version, base_version FROM sessions WHERE version > 0")
                    for v in (version, base) if v}
        removed = 0
        for f in self.snap_dir.iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)
                removed += 1
        return removed

    def close(self) -> None:
        with self._lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self.db.close()
