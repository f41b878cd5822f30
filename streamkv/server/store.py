"""Durable state of the server: SQLite for session metadata and transcripts, one snapshot file per session
for its cache state.

The commit protocol (why a turn survives `kill -9` or is cleanly absent):

1. the session's new state is written to `snapshots/<id>.<version>.pt` (temp file, fsync, os.replace,
   fsync of the directory), a file no committed row points at yet;
2. one SQLite transaction inserts the turn's transcript rows and moves `sessions.version` to the new
   version — this is the commit point;
3. the previous snapshot file is deleted.

A crash before 2 leaves an orphan file that `sweep_orphans` removes at start-up; after 2 the turn is
acknowledged and both halves are on disk. SQLite runs in WAL mode with synchronous=FULL so a committed
transaction is durable when `commit()` returns.
"""
from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import torch

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
"""

SESSION_COLUMNS = ("id", "owner", "created", "updated", "model", "policy", "kind", "version", "tokens_seen",
                   "n_turns", "metadata")


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
        self.snap_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.dir / "streamkv.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

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

    def write_snapshot(self, sid: str, version: int, state: dict) -> Path:
        """Atomically write a snapshot file (not yet referenced by the database)."""
        path = self.snapshot_path(sid, version)
        fd, tmp = tempfile.mkstemp(dir=self.snap_dir, prefix=f".{sid}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dfd = os.open(self.snap_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return path

    def read_snapshot(self, sid: str, version: int) -> dict:
        return torch.load(self.snapshot_path(sid, version), map_location="cpu", weights_only=True)

    def commit_turn(self, sid: str, version: int, kind: str, tokens_seen: int, rows: list[dict]) -> None:
        """The commit point: transcript rows + the new snapshot version in one transaction; then the
        previous snapshot file is dropped."""
        now = int(time.time())
        with self._lock:
            cur = self.db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                old, n_turns = cur.execute("SELECT version, n_turns FROM sessions WHERE id = ?", (sid,)).fetchone()
                for i, r in enumerate(rows):
                    cur.execute(
                        "INSERT INTO turns (session_id, seq, role, content, created, prompt_tokens, completion_tokens, "
                        "finish_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (sid, n_turns + i, r["role"], r["content"], now, r.get("prompt_tokens"),
                         r.get("completion_tokens"), r.get("finish_reason")),
                    )
                cur.execute(
                    "UPDATE sessions SET version = ?, kind = ?, tokens_seen = ?, n_turns = ?, updated = ? WHERE id = ?",
                    (version, kind, tokens_seen, n_turns + len(rows), now, sid),
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        if old and old != version:
            self.snapshot_path(sid, old).unlink(missing_ok=True)

    def sweep_orphans(self) -> int:
        """Remove snapshot files no committed row points at (a crash between write and commit) and temp files."""
        with self._lock:
            live = {f"{sid}.{v}.pt" for sid, v in self.db.execute("SELECT id, version FROM sessions WHERE version > 0")}
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
