"""Durability and memory limits of the server: kill -9 recovery, SIGTERM, LRU eviction, 429 past the budget,
per-session serialisation. Real server processes on loopback, tiny random model."""
from __future__ import annotations

import json
import time

import httpx
import pytest

from server_helpers import TINY, Server, create_session, say, state, tiny_model  # noqa: F401

POLICY = "sink:sinks=4,window=40"


def stream_chat(srv: Server, sid: str, text: str, max_tokens: int):
    """Open a streaming chat turn; returns (response context, line iterator)."""
    client = httpx.Client(base_url=srv.base_url, timeout=120)
    cm = client.stream("POST", "/v1/chat/completions", json={
        "model": TINY, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0,
        "stream": True, "session_id": sid})
    return client, cm


def test_kill_9_mid_session_then_restart(tiny_model, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    srv = Server(tiny_model, data, "--policy", POLICY, "--max-tokens-cap", "4000").start()
    try:
        http, client = srv.http(), srv.client()
        sid, control = create_session(http), create_session(http)
        turns = ["First, a long message about rivers and mountains " * 3, "Second turn.", "Third turn, again."]
        for t in turns[:2]:
            say(client, sid, t, max_tokens=12)
        for t in turns:  # the control session runs all three turns without a restart
            say(client, control, t, max_tokens=12)
        control_reply = http.get(f"/v1/sessions/{control}/messages").json()["data"][-1]["content"]
        control_state = state(http, control, full=True)
        before = state(http, sid, full=True)
        transcript = http.get(f"/v1/sessions/{sid}/messages").json()["data"]
        assert before["stats"]["tokens_seen"] > 44  # the cache has already evicted

        # a turn in flight when the process dies is not acknowledged
        hc, cm = stream_chat(srv, sid, "This turn never completes.", 3000)
        with cm as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content": "' in line and '"role"' not in line:
                    break
            srv.kill()
        hc.close()
    finally:
        srv.kill()

    srv2 = Server(tiny_model, data, "--policy", POLICY, "--max-tokens-cap", "4000").start()
    try:
        http, client = srv2.http(), srv2.client()
        after = state(http, sid, full=True)
        assert after["logits"] == before["logits"]  # exactly, element by element (tolerance 0)
        assert after["logits_sha256"] == before["logits_sha256"]
        assert after["stats"] == before["stats"]
        assert http.get(f"/v1/sessions/{sid}/messages").json()["data"] == transcript
        # and the stream continues exactly as if nothing had happened
        reply = say(client, sid, turns[2], max_tokens=12)
        assert reply == control_reply
        assert state(http, sid)["logits_sha256"] == control_state["logits_sha256"]
        assert state(http, sid)["stats"]["tokens_seen"] == control_state["stats"]["tokens_seen"]
    finally:
        srv2.stop()


def test_sigterm_finishes_running_turn_and_flushes(tiny_model, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    srv = Server(tiny_model, data, "--policy", POLICY, "--max-tokens-cap", "400").start()
    try:
        http = srv.http()
        sid = create_session(http)
        say(srv.client(), sid, "hello", max_tokens=4)
        hc, cm = stream_chat(srv, sid, "A turn running at shutdown.", 300)
        lines = []
        with cm as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    srv.proc.send_signal(__import__("signal").SIGTERM)
        hc.close()
        assert lines[-1] == "data: [DONE]"  # the running turn was finished, not cut
        assert srv.proc.wait(60) == 0
        text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content", "")
                       for x in lines[:-1] if json.loads(x[6:])["choices"])
        log = srv.log_tail(200)
        assert "shutdown complete" in log
    finally:
        srv.kill()
    srv2 = Server(tiny_model, data, "--policy", POLICY).start()
    try:
        turns = srv2.http().get(f"/v1/sessions/{sid}/messages").json()["data"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * 2
        assert turns[-1]["content"] == text
    finally:
        srv2.stop()


@pytest.fixture(scope="module")
def small(tiny_model, tmp_path_factory):  # noqa: F811
    """Room for one resident session (and 16 MiB for caches and what a forward or snapshot needs at once)."""
    srv = Server(tiny_model, tmp_path_factory.mktemp("small") / "data", "--policy", POLICY,
                 "--max-resident-sessions", "1", "--max-tokens-cap", "3000", "--max-cache-mb", "16").start()
    yield srv
    srv.stop()


def test_lru_eviction_reloads_exactly(small):
    srv = small
    http, client = srv.http(), srv.client()
    a, b, c = (create_session(http) for _ in range(3))
    msgs = ["alpha " * 20, "beta gamma", "delta epsilon zeta"]
    replies = {}
    for m in msgs:  # round-robin over three sessions with room for one: every turn reloads from disk
        for sid in (a, b, c):
            replies.setdefault(sid, []).append(say(client, sid, m))
    health = http.get("/health").json()
    assert health["resident_sessions"] <= 1
    assert health["counters"]["evictions"] >= 6 and health["counters"]["loads"] >= 9
    ref = create_session(http)  # the same turns on one session, never evicted between them
    ref_replies = [say(client, ref, m) for m in msgs]
    assert replies[a] == replies[b] == replies[c] == ref_replies
    assert state(http, a)["logits_sha256"] == state(http, ref)["logits_sha256"]


def test_budget_exhausted_gives_429_with_retry_after(small):
    srv = small
    http = srv.http()
    a, b = create_session(http), create_session(http)
    # a policy whose cache alone exceeds the byte budget is refused up front
    r = http.post("/v1/sessions", json={"policy": "sink:sinks=4,window=100000"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "policy"
    hc, cm = stream_chat(srv, a, "keep the only slot busy", 2500)
    with cm as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator would close the response
        next(line for line in lines if line.startswith("data: "))
        busy = http.post("/v1/chat/completions", json={"model": TINY, "session_id": b, "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        stateless = http.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        for resp in (busy, stateless):
            assert resp.status_code == 429, resp.text
            assert int(resp.headers["retry-after"]) >= 1
            assert resp.json()["error"]["type"] == "rate_limit_error"
        assert http.get("/health").json()["status"] == "ok"  # the loop stays responsive meanwhile
        r.close()  # client goes away: the turn is cancelled and rolled back
    hc.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # once the slot is free, b is served
        r = http.post("/v1/chat/completions", json={"model": TINY, "session_id": b, "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        if r.status_code != 429:
            break
        time.sleep(float(r.headers["retry-after"]) / 4)
    assert r.status_code == 200, r.text
    assert http.get(f"/v1/sessions/{a}").json()["turns"] == 0  # the cancelled turn was never acknowledged
    assert http.get("/health").json()["counters"]["rollbacks"] >= 1


def _read_state(path) -> dict:
    """The state in a snapshot file (store.py's format: a magic line, a JSON header line, torch.save's bytes)."""
    import io

    import torch
    raw = path.read_bytes()
    payload = raw[raw.index(b"\n", raw.index(b"\n") + 1) + 1:]
    return torch.load(io.BytesIO(payload), weights_only=True)


def test_incremental_snapshots_are_small_survive_kill_9_and_a_lost_base(tiny_model, tmp_path):  # noqa: F811
    """Short turns on a large window write incremental snapshots (only the tokens the base does not hold);
    after kill -9 the session continues exactly as one that was never interrupted; with its base deleted it
    is rebuilt from the turn log, again exactly."""
    import sqlite3

    data = tmp_path / "data"
    srv = Server(tiny_model, data, "--policy", "sink:sinks=4,window=400", "--chunk-size", "16").start()
    turns = [f"turn {i}: rivers and hills" for i in range(8)]
    try:
        http, client = srv.http(), srv.client()
        sid, control = create_session(http), create_session(http)
        replies = [say(client, sid, t, max_tokens=4) for t in turns]
        db = sqlite3.connect(f"file:{data / 'streamkv.sqlite3'}?mode=ro", uri=True)
        version, base = db.execute("SELECT version, base_version FROM sessions WHERE id = ?", (sid,)).fetchone()
        db.close()
        assert base is not None and base < version, (version, base)  # the last one is incremental
        delta_file, base_file = data / "snapshots" / f"{sid}.{version}.pt", data / "snapshots" / f"{sid}.{base}.pt"
        kv_slots = lambda path: _read_state(path)["session"]["policy"]["layers"][0]["keys"].shape[2]  # noqa: E731
        # the incremental one holds the turn's new tokens (and the re-rotated sinks), not the whole window
        assert kv_slots(delta_file) * 3 < kv_slots(base_file), (kv_slots(delta_file), kv_slots(base_file))
        assert sorted(p.name for p in (data / "snapshots").glob(f"{sid}.*")) == sorted([delta_file.name, base_file.name])
        assert [say(client, control, t, max_tokens=4) for t in turns] == replies
        srv.kill()
        srv.start()  # kill -9, restart: the session loads from its incremental snapshot + base
        http, client = srv.http(), srv.client()
        assert say(client, sid, "after the crash", max_tokens=4) == say(client, control, "after the crash", max_tokens=4)
        assert state(http, sid)["logits_sha256"] == state(http, control)["logits_sha256"]
        db = sqlite3.connect(f"file:{data / 'streamkv.sqlite3'}?mode=ro", uri=True)
        version, base = db.execute("SELECT version, base_version FROM sessions WHERE id = ?", (sid,)).fetchone()
        db.close()
        srv.kill()
        (data / "snapshots" / f"{sid}.{base}.pt").unlink()  # the base is lost
        srv.start()
        http, client = srv.http(), srv.client()
        assert say(client, sid, "base gone", max_tokens=4) == say(client, control, "base gone", max_tokens=4)
        assert state(http, sid)["logits_sha256"] == state(http, control)["logits_sha256"]
        assert http.get("/health").json()["counters"]["rebuilds"] >= 1
    finally:
        srv.stop()
