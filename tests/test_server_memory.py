"""`memory` sessions in the server: the block store lives in the session's folder, counts in its disk quota,
survives kill -9 (the session continues with identical logits), and goes with the session when deleted."""
from __future__ import annotations

from server_helpers import Server, create_session, say, state, tiny_model  # noqa: F401

POLICY = {"name": "memory", "sinks": 4, "window": 24, "block": 8, "topk": 2, "ram_mb": 0}


def test_memory_session_store_restart_and_delete(tiny_model, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    srv = Server(tiny_model, data, "--max-tokens-cap", "4000").start()
    try:
        http, client = srv.http(), srv.client()
        r = http.post("/v1/sessions", json={"policy": {**POLICY, "store_dir": "/tmp"}})
        assert r.status_code == 400 and "set by the server" in r.json()["error"]["message"]
        sid = create_session(http, policy=POLICY)
        for text in ["The river runs north past the mill " * 4, "Then the road turns east.", "And the story ends."]:
            say(client, sid, text, max_tokens=10)
        before = state(http, sid, full=True)
        assert before["stats"]["blocks"] >= 4 and before["stats"]["blocks_on_disk"] == before["stats"]["blocks"]
        store = data / "memory" / sid
        assert len(list(store.glob("block-*.skv"))) == before["stats"]["blocks"]
        meta = http.get(f"/v1/sessions/{sid}").json()
        assert meta["disk_bytes"] >= before["stats"]["disk_bytes"]  # the store counts in the quota
        srv.kill()  # kill -9
        srv = Server(tiny_model, data, "--max-tokens-cap", "4000").start()
        http, client = srv.http(), srv.client()
        after = state(http, sid, full=True)
        assert after["logits"] == before["logits"] and after["stats"]["blocks"] == before["stats"]["blocks"]
        say(client, sid, "One more turn after the restart.", max_tokens=6)
        assert state(http, sid)["stats"]["blocks"] > before["stats"]["blocks"]
        assert http.delete(f"/v1/sessions/{sid}").status_code in (200, 204)
        assert not store.exists()
    finally:
        srv.kill()
