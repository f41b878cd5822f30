"""The OpenAI-compatible server, over real HTTP against a real `streamkv serve` process (tiny random model)."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from server_helpers import ROOT, TINY, Server, create_session, say, state, tiny_model  # noqa: F401

WINDOW = 60  # the default session policy here: sink 4 + window 60 -> 64 cached tokens at most


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):  # noqa: F811
    srv = Server(tiny_model, tmp_path_factory.mktemp("srv") / "data", "--policy", f"sink:sinks=4,window={WINDOW}",
                 "--max-tokens-cap", "64", "--max-body-bytes", "65536", "--max-input-tokens", "2000").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def http(server):
    with server.http() as h:
        yield h


# ---- the official openai client, unchanged -----------------------------------------------------------
def test_models(client):
    assert [m.id for m in client.models.list()] == [TINY]
    assert client.models.retrieve(TINY).id == TINY


def test_chat_non_streaming_and_streaming_agree(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}]
    out = client.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0)
    choice = out.choices[0]
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("length", "stop")
    assert out.usage.completion_tokens >= 1 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12

    stream = client.chat.completions.create(model=TINY, messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content  # greedy: same answer streamed or not
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == out.usage.prompt_tokens


def test_completion_non_streaming_and_streaming_agree(client):
    out = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens >= 1
    pieces = list(client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == out.choices[0].text
    token_prompt = client.completions.create(model=TINY, prompt=[504, 2110, 253, 655], max_tokens=3, temperature=0)
    assert token_prompt.usage.prompt_tokens == 4


def test_sampling_with_seed_is_reproducible(client):
    kw = dict(model=TINY, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


# ---- sessions ----------------------------------------------------------------------------------------------
def test_session_turns_append_to_one_stream(client, http):
    sid = create_session(http, system="You are a pirate.", metadata={"user": "t"})
    assert http.get(f"/v1/sessions/{sid}").json()["metadata"] == {"user": "t"}
    replies, seen = [], []
    for i, msg in enumerate(["Hello!", "What is your ship called?", "And your parrot?"]):
        out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": msg}], max_tokens=6,
                                             temperature=0, extra_body={"session_id": sid})
        assert out.model_extra["session_id"] == sid
        replies.append(out.choices[0].message.content)
        seen.append(state(http, sid)["stats"]["tokens_seen"])
        # only the new turn is fed: the prompt of turn i is this message + template, not the whole history
        assert out.usage.prompt_tokens < 30
    assert seen == sorted(seen) and seen[0] > 0
    turns = http.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert [t["role"] for t in turns] == ["system"] + ["user", "assistant"] * 3
    assert [t["content"] for t in turns[2::2]] == replies
    # the header names a session too, and streaming works on sessions
    r = http.post("/v1/chat/completions", headers={"X-Session-Id": sid},
                  json={"model": TINY, "messages": [{"role": "user", "content": "Bye"}], "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["x-session-id"] == sid
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["session_id"] == sid
    assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 9
    listed = [s["id"] for s in http.get("/v1/sessions").json()["data"]]
    assert sid in listed


def test_session_accepts_resent_history(client, http):
    """A client that always sends the whole conversation (as OpenAI clients do) plus a session id: only the
    part the session does not hold yet is appended."""
    sid, ref = create_session(http), create_session(http)
    history = [{"role": "user", "content": "One."}]
    for msg in ["Two.", "Three."]:
        out = client.chat.completions.create(model=TINY, messages=history, max_tokens=4, temperature=0,
                                             extra_body={"session_id": sid})
        history += [{"role": "assistant", "content": out.choices[0].message.content}, {"role": "user", "content": msg}]
    for msg in ["One.", "Two.", "Three."][:2]:
        say(client, ref, msg, max_tokens=4)
    turns = http.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert [t["content"] for t in turns] == [m["content"] for m in history[:-1]]
    assert state(http, sid)["logits_sha256"] == state(http, ref)["logits_sha256"]


def test_text_session_continues_the_stream(client, http):
    sid = create_session(http, policy={"name": "window", "window": 48})
    a = client.completions.create(model=TINY, prompt="The river", max_tokens=5, temperature=0,
                                  extra_body={"session_id": sid})
    b = client.completions.create(model=TINY, prompt=" and then", max_tokens=5, temperature=0,
                                  extra_body={"session_id": sid})
    st = state(http, sid)["stats"]
    assert st["policy"] == "window" and st["tokens_seen"] == a.usage.total_tokens + b.usage.total_tokens
    with pytest.raises(openai.ConflictError) as e:  # a text stream is not a chat
        say(client, sid, "hi")
    assert e.value.body["code"] == "session_kind_mismatch"


def test_long_session_keeps_memory_flat(client, http, server):
    """Far more tokens than the cache holds: the cache stays at its budget, every turn costs the same."""
    sid = create_session(http)
    budget = 4 + WINDOW
    cache_bytes, rss, prompt_tokens = [], [], []
    for i in range(24):
        out = client.chat.completions.create(
            model=TINY, max_tokens=8, temperature=0, extra_body={"session_id": sid},
            messages=[{"role": "user", "content": f"Turn {i}: tell me about the number {i * 37} and its digits."}])
        prompt_tokens.append(out.usage.prompt_tokens)
        st = state(http, sid)["stats"]
        assert st["tokens_cached"] <= budget
        cache_bytes.append(st["cache_bytes"])
        rss.append(http.get("/health").json()["rss_bytes"])
    assert st["tokens_seen"] > 8 * budget  # the stream is many times longer than the cache
    assert len(set(cache_bytes[4:])) == 1  # allocated once, never grows
    assert max(prompt_tokens[1:]) < 40  # each turn feeds only itself (the first adds the default system prompt)
    assert rss[-1] - rss[4] < 16 << 20
    assert http.get(f"/v1/sessions/{sid}").json()["turns"] == 48


# ---- bad requests -------------------------------------------------------------------------------------
def chat(**over):
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body.update(over)
    return body


UNKNOWN_SESSION = "sess_" + "A" * 32
BAD = [
    # (id, method, path, body (dict -> JSON, bytes -> raw), headers, status, code, param)
    ("malformed-json", "POST", "/v1/chat/completions", b'{"model": "tiny", "messages": [', {}, 400, "invalid_json", None),
    ("invalid-utf8", "POST", "/v1/chat/completions",
     b'{"model": "tiny", "messages": [{"role": "user", "content": "h\xff\xfe"}]}', {}, 400, "invalid_json", None),
    ("empty-body", "POST", "/v1/chat/completions", b"", {}, 400, "invalid_json", None),
    ("not-an-object", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "invalid_json", None),
    ("messages-not-list", "POST", "/v1/chat/completions", chat(messages="hi"), {}, 400, "invalid_value", "messages"),
    ("messages-empty", "POST", "/v1/chat/completions", chat(messages=[]), {}, 400, "invalid_value", "messages"),
    ("content-empty", "POST", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "  "}]), {}, 400,
     "invalid_value", "messages.0.content"),
    ("bad-role", "POST", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]), {}, 400,
     "invalid_value", "messages.0.role"),
    ("last-not-user", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]), {}, 400,
     "invalid_value", "messages"),
    ("max-tokens-string", "POST", "/v1/chat/completions", chat(max_tokens="5"), {}, 400, "invalid_value", "max_tokens"),
    ("max-tokens-zero", "POST", "/v1/chat/completions", chat(max_tokens=0), {}, 400, "invalid_value", "max_tokens"),
    ("max-tokens-over-cap", "POST", "/v1/chat/completions", chat(max_tokens=100000), {}, 400, "invalid_value",
     "max_tokens"),
    ("temperature-negative", "POST", "/v1/chat/completions", chat(temperature=-1), {}, 400, "invalid_value",
     "temperature"),
    ("temperature-string", "POST", "/v1/chat/completions", chat(temperature="hot"), {}, 400, "invalid_value",
     "temperature"),
    ("stream-not-bool", "POST", "/v1/chat/completions", chat(stream="yes"), {}, 400, "invalid_value", "stream"),
    ("n-2", "POST", "/v1/chat/completions", chat(n=2), {}, 400, "invalid_value", "n"),
    ("five-stops", "POST", "/v1/chat/completions", chat(stop=["a", "b", "c", "d", "e"]), {}, 400, "invalid_value",
     "stop"),
    ("tools", "POST", "/v1/chat/completions", chat(tools=[{"type": "function"}]), {}, 400, "unsupported", "tools"),
    ("unknown-model", "POST", "/v1/chat/completions", chat(model="gpt-9"), {}, 404, "model_not_found", "model"),
    ("unknown-session", "POST", "/v1/chat/completions", chat(session_id=UNKNOWN_SESSION), {}, 404,
     "session_not_found", "session_id"),
    ("garbage-session-header", "POST", "/v1/chat/completions", chat(), {"X-Session-Id": "../../etc/passwd"}, 404,
     "session_not_found", "session_id"),
    ("session-id-wrong-type", "POST", "/v1/chat/completions", chat(session_id=5), {}, 400, "invalid_value",
     "session_id"),
    ("oversized-body", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "x" * 70000}]), {}, 413, "request_too_large", None),
    ("too-many-input-tokens", "POST", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": "hello world " * 3000}]), {}, 400, "context_length_exceeded",
     "messages"),
    ("prompt-empty", "POST", "/v1/completions", {"model": TINY, "prompt": ""}, {}, 400, "invalid_value", "prompt"),
    ("prompt-int", "POST", "/v1/completions", {"model": TINY, "prompt": 12}, {}, 400, "invalid_value", "prompt"),
    ("prompt-bad-token", "POST", "/v1/completions", {"model": TINY, "prompt": [99999999]}, {}, 400, "invalid_value",
     "prompt"),
    ("echo", "POST", "/v1/completions", {"model": TINY, "prompt": "x", "echo": True}, {}, 400, "unsupported", "echo"),
    ("session-dense-policy", "POST", "/v1/sessions", {"policy": "dense"}, {}, 400, None, "policy"),
    ("session-bad-policy-param", "POST", "/v1/sessions", {"policy": "sink:window=abc"}, {}, 400, None, "policy"),
    ("session-unknown-policy-param", "POST", "/v1/sessions", {"policy": "sink:foo=1"}, {}, 400, None, "policy"),
    ("session-zero-window", "POST", "/v1/sessions", {"policy": {"name": "window", "window": 0}}, {}, 400, None,
     "policy"),
    ("session-metadata-type", "POST", "/v1/sessions", {"metadata": {"a": 1}}, {}, 400, "invalid_value",
     "metadata.a"),
    ("get-unknown-session", "GET", f"/v1/sessions/{UNKNOWN_SESSION}", None, {}, 404, "session_not_found", None),
    ("state-unknown-session", "GET", f"/v1/sessions/{UNKNOWN_SESSION}/state", None, {}, 404, "session_not_found", None),
    ("delete-unknown-session", "DELETE", f"/v1/sessions/{UNKNOWN_SESSION}", None, {}, 404, "session_not_found", None),
    ("list-limit-type", "GET", "/v1/sessions?limit=abc", None, {}, 400, "invalid_value", "limit"),
    ("state-logits-value", "GET", f"/v1/sessions/{UNKNOWN_SESSION}/state?logits=some", None, {}, 400, "invalid_value",
     "logits"),
    ("unknown-route", "GET", "/v1/nothing", None, {}, 404, "not_found", None),
    ("wrong-method", "GET", "/v1/chat/completions", None, {}, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,code,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests(http, name, method, path, body, headers, status, code, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = http.request(method, path, headers={"Content-Type": "application/json", **headers}, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "rate_limit_error", "server_error")
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param or (err["param"] or "").startswith(param), err


def test_server_still_serves_after_bad_requests(client, http):
    for name, method, path, body, headers, *_ in BAD[:6]:
        http.request(method, path, content=body if isinstance(body, bytes) else json.dumps(body or {}))
    assert http.get("/health").json()["status"] == "ok"
    assert client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "still there?"}],
                                          max_tokens=2).choices[0].message.content is not None


def test_kind_mismatch_and_errors_through_openai_client(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        say(client, UNKNOWN_SESSION, "hi")
    assert e.value.body["code"] == "session_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)


def test_delete_session(client, http):
    sid = create_session(http)
    say(client, sid, "hello", max_tokens=2)
    assert http.delete(f"/v1/sessions/{sid}").json()["deleted"] is True
    assert http.get(f"/v1/sessions/{sid}").status_code == 404


# ---- auth and binding ------------------------------------------------------------------------------------
def test_api_keys_own_their_sessions(tiny_model, tmp_path):  # noqa: F811
    srv = Server(tiny_model, tmp_path / "data", "--api-key", "key-one", env={"STREAMKV_API_KEY": "key-two"}).start()
    try:
        assert httpx.get(srv.base_url + "/health").status_code == 200  # health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
            r = httpx.get(srv.base_url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            srv.client("wrong").models.list()
        one, two = srv.http("key-one"), srv.http("key-two")
        sid = create_session(one)
        other = create_session(one)
        assert sid != other and len(sid) == len("sess_") + 32
        say(srv.client("key-one"), sid, "hi", max_tokens=2)
        # the other key cannot see, use, inspect or delete it: it does not exist for them
        assert two.get(f"/v1/sessions/{sid}").status_code == 404
        assert two.get(f"/v1/sessions/{sid}/state").status_code == 404
        assert two.get(f"/v1/sessions/{sid}/messages").status_code == 404
        assert two.delete(f"/v1/sessions/{sid}").status_code == 404
        with pytest.raises(openai.NotFoundError):
            say(srv.client("key-two"), sid, "hi")
        assert sid not in [s["id"] for s in two.get("/v1/sessions").json()["data"]]
        assert one.get(f"/v1/sessions/{sid}/messages").json()["data"][0]["content"] == "hi"
    finally:
        srv.stop()


def test_refuses_public_bind_without_key(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "STREAMKV_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "streamkv.server", "serve", "--host", "0.0.0.0", "--data-dir",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "API key" in r.stderr


def test_serve_help():
    r = subprocess.run([sys.executable, "-m", "streamkv.server", "serve", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--api-key" in r.stdout and "--max-resident-sessions" in r.stdout


def test_cli_entry_point_has_serve():
    if not (ROOT / "streamkv" / "__main__.py").exists() or not (ROOT / "streamkv" / "cli.py").exists():
        pytest.skip("streamkv/cli.py or __main__.py not there yet")
    r = subprocess.run([sys.executable, "-m", "streamkv", "serve", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--data-dir" in r.stdout


def test_stream_keepalive_comments_during_a_long_prefill(tiny_model, tmp_path):  # noqa: F811
    """While a long prompt is prefilled no token comes for a while: the stream gets SSE comments
    (`: keep-alive`) so that a proxy does not close it; clients skip them (the openai client reads the same
    reply as a non-streaming request)."""
    srv = Server(tiny_model, tmp_path / "data", "--policy", f"sink:sinks=4,window={WINDOW}", "--chunk-size", "8",
                 "--sse-keepalive", "0.001").start()
    try:
        prompt = "rivers and valleys " * 250  # ~1,000 tokens in chunks of 8: many forwards before the first token
        body = {"model": TINY, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0}
        with srv.http() as h, h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        first_content = next(i for i, line in enumerate(lines) if '"content"' in line and '"role"' not in line)
        assert any(line == ": keep-alive" for line in lines[:first_content]), lines[:5]
        assert lines[-1] == "data: [DONE]"
        client = srv.client()
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**body, stream=True)
                           if c.choices)
        assert streamed == client.chat.completions.create(**body).choices[0].message.content
    finally:
        srv.stop()


def test_only_the_compute_workers_run_multithreaded_kernels():
    """libgomp keeps one OpenMP team per thread that starts a parallel region; once the process holds more
    OpenMP threads than cores, every small kernel waits on a futex (on 2 cores the server decoded at half the
    library's speed). So the compute workers split --threads between them, I/O threads get one, and the
    model is loaded on a compute worker (app.pools)."""
    import torch

    from streamkv.server.app import pools
    from streamkv.server.config import ServerConfig

    before = torch.get_num_threads()
    try:
        for workers, threads, per_worker in ((1, 2, 2), (2, 2, 1), (2, 6, 3), (3, 2, 1)):
            compute, io = pools(ServerConfig(workers=workers, threads=threads))
            try:
                seen = {compute.submit(torch.get_num_threads).result() for _ in range(2 * workers)}
                assert seen == {per_worker}, (workers, threads, seen)
                assert io.submit(torch.get_num_threads).result() == 1
            finally:
                compute.shutdown()
                io.shutdown()
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
