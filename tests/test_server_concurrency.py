"""16 simultaneous streaming sessions on one server: they interleave, and each answer belongs to its own
session (checked against the same turns run one at a time afterwards)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from openai import AsyncOpenAI

from server_helpers import TINY, Server, create_session, say, state, tiny_model  # noqa: F401

N = 16


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):  # noqa: F811
    srv = Server(tiny_model, tmp_path_factory.mktemp("conc") / "data", "--policy", "sink:sinks=4,window=60",
                 "--max-resident-sessions", "40", "--workers", "2").start()
    yield srv
    srv.stop()


def test_sixteen_concurrent_streaming_sessions(server):
    http = server.http()
    sids = [create_session(http, metadata={"n": str(i)}) for i in range(N)]
    # distinct first turns: session i talks about i only
    messages = [f"Session {i}: the secret word is {'abcdefghijklmnopq'[i] * (i + 3)} and my number is {i * 1111}."
                for i in range(N)]

    async def one(client, i):
        t0 = time.perf_counter()
        first = None
        pieces, ids = [], set()
        stream = await client.chat.completions.create(
            model=TINY, messages=[{"role": "user", "content": messages[i]}], max_tokens=24, temperature=0,
            stream=True, extra_body={"session_id": sids[i]})
        async for chunk in stream:
            ids.add(chunk.model_extra.get("session_id"))
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - t0
                pieces.append(chunk.choices[0].delta.content)
        return "".join(pieces), ids, first, time.perf_counter() - t0

    async def run_all():
        async with AsyncOpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(client, i) for i in range(N)))

    results = asyncio.run(run_all())
    for i, (text, ids, first, total) in enumerate(results):
        assert ids == {sids[i]}, "every chunk of a stream carries its own session id"
        assert text, f"session {i} got no text"
    # they ran concurrently: most streams had their first token before the first stream was done
    first_done = min(r[3] for r in results)
    assert sum(r[2] < first_done for r in results) >= N // 2

    # each transcript holds exactly its own turn
    for i, sid in enumerate(sids):
        turns = http.get(f"/v1/sessions/{sid}/messages").json()["data"]
        assert [t["content"] for t in turns] == [messages[i], results[i][0]]

    # replayed one at a time in fresh sessions, every answer and final state is identical: no cross-talk
    client = server.client()
    for i, sid in enumerate(sids):
        ref = create_session(http)
        out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": messages[i]}],
                                             max_tokens=24, temperature=0, extra_body={"session_id": ref})
        assert out.choices[0].message.content == results[i][0], f"session {i} differs from its sequential replay"
        assert state(http, ref)["logits_sha256"] == state(http, sid)["logits_sha256"]
    # distinct inputs give distinct streams, so a mix-up could not go unnoticed
    assert len({state(http, sid)["logits_sha256"] for sid in sids}) == N
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["counters"]["rollbacks"] == 0


def test_requests_to_one_session_are_serialised(server):
    srv = server
    http, client = srv.http(), srv.client()
    sid = create_session(http)
    texts = [f"message number {i} " * 3 for i in range(4)]
    errors = []

    def send(t):
        try:
            say(client, sid, t, max_tokens=6)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=send, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    turns = http.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert [t["role"] for t in turns] == ["user", "assistant"] * 4
    order = [t["content"] for t in turns[::2]]
    assert sorted(order) == sorted(texts)
    ref = create_session(http)  # replaying the observed order sequentially gives the same stream
    ref_replies = [say(client, ref, t, max_tokens=6) for t in order]
    assert ref_replies == [t["content"] for t in turns[1::2]]
    assert state(http, ref)["logits_sha256"] == state(http, sid)["logits_sha256"]
