"""Deterministic crash points, for testing the commit protocol (store.py) under `kill -9`.

A kill at a random moment mostly lands in a decode step: the few microseconds between writing a snapshot
and committing it are almost never hit. So the places where a crash is most dangerous are named here, and
a test arms one of them through the environment:

    STREAMKV_CRASH_AT=snapshot-renamed:3 streamkv serve ...   # SIGKILL itself the 3rd time it gets there

The process then dies exactly as under `kill -9` (no handler, no flush, no atexit). Unset (always, outside
tests), `crash_point` is one dict lookup.

Points, in the order one turn reaches them:
  decode-step            a model step of a turn is done, nothing of the turn written
  snapshot-temp-written  the new snapshot is in its temp file (fsynced), not yet renamed into place
  snapshot-renamed       the new snapshot has its final name, the directory is not yet fsynced
  snapshot-written       the new snapshot is durable, no committed row points at it (an orphan if we die)
  turn-committed         the SQLite transaction committed the turn, the previous snapshot is not yet deleted
"""
from __future__ import annotations

import os
import signal

ENV = "STREAMKV_CRASH_AT"
POINTS = ("decode-step", "snapshot-temp-written", "snapshot-renamed", "snapshot-written", "turn-committed")


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, n = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown crash point {name!r}; choose one of {', '.join(POINTS)}")
    try:
        count = int(n) if n else 1
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{ENV}={spec!r}: the count after ':' must be a positive integer")
    return name, count


_armed = _parse(os.environ.get(ENV))
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """SIGKILL this process if `name` is the armed point and this is its n-th arrival; else nothing."""
    if _armed is None or _armed[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _armed[1]:
        os.kill(os.getpid(), signal.SIGKILL)
