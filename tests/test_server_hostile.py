"""The hostile sweep of issue #12: every route x a table of hostile values (types, ranges, NaN/inf/huge
numbers, huge strings, unicode, ids, deep nesting), against a real server. Each must get a 4xx (or a
normal answer where the value happens to be valid) with an OpenAI error body, never a 5xx, and the server
must still answer afterwards."""
from __future__ import annotations

from server_helpers import TINY, Server, create_session, run_hostile, say, tiny_model  # noqa: F401


def test_hostile_sweep_gets_no_5xx(tiny_model, tmp_path):  # noqa: F811
    srv = Server(tiny_model, tmp_path / "data", "--policy", "sink:sinks=4,window=60").start()
    try:
        http = srv.http()
        sid = create_session(http)
        say(srv.client(), sid, "hello", max_tokens=2)
        result = run_hostile(srv.base_url, sid)
        assert result["tried"] > 500
        assert result["5xx"] == 0 and result["bad_error_body"] == 0, result["failures"][:10]
        assert result["4xx"] > 0.8 * result["tried"]
        assert http.get("/health").json()["status"] == "ok"
        assert say(srv.client(), sid, "still there?", max_tokens=2) is not None
        assert srv.proc.poll() is None
    finally:
        srv.stop()
