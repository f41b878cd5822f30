"""h2o, sirllm and duo sessions in the server: chat turns, kill -9 and restart (replay of the turn log must
reproduce sirllm's per-turn decay), identical logits after the restart, and what clients may not set."""
from __future__ import annotations

import pytest
from server_helpers import Server, create_session, say, state, tiny_model  # noqa: F401


@pytest.mark.parametrize("policy", [{"name": "h2o", "sinks": 2, "window": 12, "heavy": 6},
                                    {"name": "sirllm", "sinks": 2, "window": 12, "heavy": 6, "decay": 0.5}],
                         ids=["h2o", "sirllm"])
def test_scored_session_survives_kill(tiny_model, tmp_path, policy):  # noqa: F811
    data = tmp_path / "data"
    srv = Server(tiny_model, data, "--max-tokens-cap", "4000").start()
    try:
        http, client = srv.http(), srv.client()
        sid = create_session(http, policy=policy)
        for text in ["The river runs north past the mill " * 3, "Then the road turns east.", "And the story ends."]:
            say(client, sid, text, max_tokens=8)
        before = state(http, sid, full=True)
        assert before["stats"]["tokens_seen"] > 30
        srv.kill()  # kill -9: the last snapshot may be older than the last turn; the turn log replays the rest
        srv = Server(tiny_model, data, "--max-tokens-cap", "4000").start()
        http, client = srv.http(), srv.client()
        after = state(http, sid, full=True)
        assert after["logits"] == before["logits"]
        say(client, sid, "One more turn after the restart.", max_tokens=6)
    finally:
        srv.kill()


def test_clients_cannot_pick_a_pattern_file(tiny_model, tmp_path):  # noqa: F811
    srv = Server(tiny_model, tmp_path / "data").start()
    try:
        r = srv.http().post("/v1/sessions", json={"policy": {"name": "duo", "pattern": "/etc/passwd"}})
        assert r.status_code == 400 and "set by the server" in r.json()["error"]["message"]
        r = srv.http().post("/v1/sessions", json={"policy": "sirllm:decay=2.0"})
        assert r.status_code == 400 and "decay" in r.json()["error"]["message"]
    finally:
        srv.kill()


def test_turn_log_replay_reproduces_sirllm_decay(tiny_model):  # noqa: F811
    """The turn log records how many turns ended, so a replay applies sirllm's decay at the same points."""
    import torch

    from streamkv.models import load
    from streamkv.server.sessions import ServerSession

    model, tokenizer = load(str(tiny_model))
    policy = dict(sinks=2, window=12, heavy=6, decay=0.5)
    a = ServerSession(model, tokenizer, "sirllm", chunk_size=16, **policy)
    records = []
    for text in ["The river runs north past the mill " * 3, "Then the road turns east."]:
        list(a.chat(text, max_new_tokens=6))
        records.append(a.take_record())
    assert [r["after"]["turn_ends"] for r in records] == [1, 1]
    b = ServerSession(model, tokenizer, "sirllm", chunk_size=16, **policy)
    b.replay(records)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.policy.sets[0].value, b.policy.sets[0].value)
    c = ServerSession(model, tokenizer, "sirllm", chunk_size=16, **policy)  # without the decay: different scores
    c.replay([{**r, "after": {**r["after"], "turn_ends": 0}} for r in records])
    assert not torch.equal(a.policy.sets[0].value, c.policy.sets[0].value)
