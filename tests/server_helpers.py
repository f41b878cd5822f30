"""Helpers for the server tests: a tiny random Llama with the embedded tokenizer, and a real `streamkv serve`
process on a free loopback port (always killed in teardown)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny"  # served model name of the tiny model


def build_tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import streamkv.models

    tok = AutoTokenizer.from_pretrained(streamkv.models.resolve(None))  # has a chat template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / TINY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m streamkv.server serve ...` as a child process."""

    def __init__(self, model: Path | None, data_dir: Path, *extra: str, env: dict | None = None,
                 log: Path | None = None):
        self.model, self.data_dir, self.extra = model, Path(data_dir), list(extra)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log or self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "streamkv.server", "serve", "--port", str(self.port), "--data-dir",
               str(self.data_dir), "--threads", "1", "--log-level", "info"]
        if self.model is not None:
            cmd += ["--model", str(self.model), "--served-model-name", TINY]
        return cmd + self.extra

    def start(self, timeout: float = 120) -> "Server":
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no shutdown hook runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode if self.proc else 0

    def stop(self) -> None:
        try:
            self.terminate(30)
        except Exception:
            self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI
        return OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def http(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120)


def create_session(http: httpx.Client, **body) -> str:
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def state(http: httpx.Client, sid: str, full: bool = False) -> dict:
    r = http.get(f"/v1/sessions/{sid}/state", params={"logits": "full" if full else "none"})
    assert r.status_code == 200, r.text
    return r.json()


def say(client, sid: str, text: str, max_tokens: int = 8) -> str:
    out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": text}],
                                         max_tokens=max_tokens, temperature=0, extra_body={"session_id": sid})
    return out.choices[0].message.content


# ---- hostile requests: every route x a table of hostile values --------------------------------------------
# Raw JSON texts (not Python values), so that what `json.dumps` would never write is tried too: NaN,
# Infinity, lone surrogates, deep nesting.
HOSTILE_VALUES = [
    "null", "true", "-1", "0", str(2**70), str(-(2**70)), "1e308", "-1e-300", "1e-300", "NaN", "Infinity",
    "-Infinity", '""', '"' + "x" * 100_000 + '"', '"\\u0000"', '"\\ud800"', '"' + "\U0001F4A5" * 2000 + '"',
    '"../../etc/passwd"', "[]", "{}", '["a", 1, null]', '{"a": {"b": [1, 2]}}', "[" * 3000 + "]" * 3000,
]
HOSTILE_IDS = ["..%2F..%2Fetc%2Fpasswd", "sess_" + "A" * 32, "sess_" + "A" * 500, "%00", "%F0%9F%92%A5", "'%20OR%201=1"]


def hostile_requests(model: str = TINY, session_id: str | None = None):
    """(method, path, raw body or None, headers) for every route and field x hostile value."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    completion = {"model": model, "prompt": "hi", "max_tokens": 1}
    json_ct = {"Content-Type": "application/json"}
    fields = {
        "/v1/chat/completions": (chat, ["model", "messages", "max_tokens", "max_completion_tokens", "temperature",
                                        "top_p", "top_k", "seed", "stop", "stream", "stream_options", "n",
                                        "session_id", "logprobs", "tools", "response_format", "presence_penalty",
                                        "user"]),
        "/v1/completions": (completion, ["model", "prompt", "max_tokens", "echo", "suffix", "best_of", "logprobs",
                                         "seed", "temperature", "stop", "session_id"]),
        "/v1/sessions": ({}, ["policy", "system", "metadata"]),
    }
    for path, (base, names) in fields.items():
        for name in names:
            for value in HOSTILE_VALUES:
                body = json.dumps({**base, name: "@@"}).replace('"@@"', value)
                yield "POST", path, body.encode(), json_ct
        for value in HOSTILE_VALUES[:12]:  # nested fields and whole bodies
            yield "POST", path, value.encode(), json_ct
    for value in HOSTILE_VALUES:
        for inner in ("role", "content"):
            msg = json.dumps({"role": "user", "content": "x", inner: "@@"}).replace('"@@"', value)
            yield "POST", "/v1/chat/completions", f'{{"model": "{model}", "messages": [{msg}]}}'.encode(), json_ct
        policy = json.dumps({"name": "sink", "window": "@@"}).replace('"@@"', value)
        yield "POST", "/v1/sessions", f'{{"policy": {policy}}}'.encode(), json_ct
        meta = json.dumps({"k": "@@"}).replace('"@@"', value)
        yield "POST", "/v1/sessions", f'{{"metadata": {meta}}}'.encode(), json_ct
    for sid in HOSTILE_IDS:
        for suffix in ("", "/messages", "/state"):
            yield "GET", f"/v1/sessions/{sid}{suffix}", None, {}
        yield "DELETE", f"/v1/sessions/{sid}", None, {}
        yield "GET", f"/v1/models/{sid}", None, {}
        yield "POST", "/v1/chat/completions", json.dumps(chat).encode(), {**json_ct, "X-Session-Id": sid}
    for query in ("limit=0", "limit=-1", f"limit={2**70}", "limit=1e3", "limit=%00", "limit=" + "9" * 5000):
        yield "GET", f"/v1/sessions?{query}", None, {}
    target = session_id or "sess_" + "A" * 32
    for query in ("top=-1", "top=101", f"top={2**70}", "logits=all", "logits=%00", "top=nan"):
        yield "GET", f"/v1/sessions/{target}/state?{query}", None, {}
    for header in ({"Authorization": "Bearer " + "x" * 10_000}, {"X-Request-Id": "\x7f" * 100},
                   {"X-Request-Id": "x" * 10_000}):
        yield "POST", "/v1/chat/completions", json.dumps(chat).encode(), {**json_ct, **header}


def run_hostile(base_url: str, session_id: str | None = None) -> dict:
    """Send every hostile request; returns counts and the requests that got a 5xx or a non-OpenAI error."""
    counts = {"tried": 0, "2xx": 0, "4xx": 0, "5xx": 0, "bad_error_body": 0}
    failures = []
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for method, path, body, headers in hostile_requests(session_id=session_id):
            counts["tried"] += 1
            try:
                r = http.request(method, path, content=body, headers=headers)
            except httpx.HTTPError:  # e.g. a header httpx itself refuses to send
                counts["tried"] -= 1
                continue
            bucket = f"{r.status_code // 100}xx"
            counts[bucket] = counts.get(bucket, 0) + 1
            if r.status_code >= 500:
                failures.append((method, path, (body or b"")[:200], r.status_code, r.text[:300]))
            elif r.status_code >= 400:
                try:
                    err = r.json()["error"]
                    assert isinstance(err["message"], str) and err["message"] and "type" in err
                except Exception:
                    counts["bad_error_body"] += 1
                    failures.append((method, path, (body or b"")[:200], r.status_code, r.text[:300]))
    return {**counts, "failures": failures}


# ---- crash/fault loop and load mix (short in the tests, long in benchmarks/server_reliability.py) ---------
def turn_text(who: str, i: int, max_tokens: int) -> str:
    return f"{who} turn {i} (max {max_tokens}): tell me about rivers."


def max_tokens_of(text: str) -> int:
    return int(text.split("(max ")[1].split(")")[0])


def damage_snapshot(data_dir: Path, rng, sids: list[str]) -> str | None:
    """Truncate, garble, delete or replace (with another session's) one random committed snapshot."""
    snaps = sorted((data_dir / "snapshots").glob("sess_*.pt"))
    if not snaps:
        return None
    victim, how = rng.choice(snaps), rng.choice(["truncated", "garbage", "deleted", "foreign"])
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[: rng.randrange(victim.stat().st_size)])
    elif how == "garbage":
        victim.write_bytes(os.urandom(victim.stat().st_size))
    elif how == "deleted":
        victim.unlink()
    else:
        others = [s for s in snaps if s != victim]
        if not others:
            return None
        victim.write_bytes(rng.choice(others).read_bytes())
    return how


def fault_loop(model: Path | None, data_dir: Path, kills: int, rng, *args: str, sessions: int = 2,
               damage_every: int = 2, model_name: str = TINY, crash_points: tuple[str, ...] = ()) -> dict:
    """kill -9 the server at random moments while clients run turns, `kills` times, damaging a snapshot
    every `damage_every` kills; then check every acknowledged turn is in its transcript (in order) and every
    session's state equals a control session that ran the transcript's turns without interruption.

    With `crash_points`, kill k is not sent from outside: the server is started with STREAMKV_CRASH_AT set to
    crash_points[k % len] (at its 3rd-8th arrival there) and SIGKILLs itself there (streamkv/server/faults.py)."""
    import threading

    from streamkv.server.faults import ENV

    acked: dict[str, list[tuple[str, str]]] = {}
    sids: list[str] = []
    damaged = []
    turns_sent = 0
    srv = None
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    hits = []
    for k in range(kills + 1):
        armed = f"{crash_points[k % len(crash_points)]}:{rng.randint(3, 8)}" if crash_points and k < kills else None
        srv = Server(model, data_dir, *args, log=data_dir.parent / "fault-server.log",
                     env={ENV: armed} if armed else None).start()
        if not sids:
            with srv.http() as h:
                sids = [create_session(h) for _ in range(sessions)]
            acked = {sid: [] for sid in sids}
        if k == kills:
            break
        stop = threading.Event()

        def client(sid, who):
            nonlocal turns_sent
            c = srv.client().with_options(timeout=30)
            i = len(acked[sid])
            while not stop.is_set():
                n = rng.randint(1, 12)
                text = turn_text(who, f"{k}.{i}", n)
                turns_sent += 1
                try:
                    out = c.chat.completions.create(model=model_name, messages=[{"role": "user", "content": text}],
                                                    max_tokens=n, temperature=0, extra_body={"session_id": sid})
                except Exception:
                    return  # the server died under us: this turn is not acknowledged
                acked[sid].append((text, out.choices[0].message.content))
                i += 1
        threads = [threading.Thread(target=client, args=(sid, f"s{j}")) for j, sid in enumerate(sids)]
        for t in threads:
            t.start()
        if armed:
            try:
                code = srv.proc.wait(60)
            except subprocess.TimeoutExpired:  # the point was never reached: a test failure, not a hang
                code = None
                srv.kill()
            hits.append({"point": armed, "killed_itself": code == -signal.SIGKILL})
        else:
            time.sleep(rng.uniform(0.2, 2.0))
            srv.kill()
        stop.set()
        for t in threads:
            t.join(30)
        if damage_every and (k + 1) % damage_every == 0:
            how = damage_snapshot(data_dir, rng, sids)
            if how:
                damaged.append(how)
    # the final server: verify
    lost, mismatched = 0, 0
    try:
        with srv.http() as h:
            client = srv.client()
            for sid in sids:
                rows = h.get(f"/v1/sessions/{sid}/messages").json()["data"]
                pairs = [(rows[i]["content"], rows[i + 1]["content"]) for i in range(0, len(rows) - 1, 2)]
                it = iter(pairs)
                lost += sum(1 for a in acked[sid] if a not in it)  # acknowledged turns, in order
                control = create_session(h)
                for user, reply in pairs:
                    if say(client, control, user, max_tokens=max_tokens_of(user)) != reply:
                        mismatched += 1
                a, b = state(h, sid), state(h, control)
                if (a["logits_sha256"], a["stats"]["tokens_seen"]) != (b["logits_sha256"], b["stats"]["tokens_seen"]):
                    mismatched += 1
                h.delete(f"/v1/sessions/{control}")
            rebuilds = h.get("/health").json()["counters"]["rebuilds"]
    finally:
        srv.stop()
    return {"kills": kills, "turns_sent": turns_sent, "turns_acknowledged": sum(len(v) for v in acked.values()),
            "turns_lost": lost, "sessions_diverged": mismatched, "snapshots_damaged": damaged,
            "rebuilds_after_restart": rebuilds, **({"crash_points": hits} if crash_points else {})}


def load_mix(srv: "Server", seconds: float, clients: int, rng, model_name: str = TINY) -> dict:
    """Concurrent clients, each with its own session, mixing streaming, non-streaming, abandoned and
    hostile requests for `seconds`. Returns status counts, peak RSS and whether every session's transcript
    is exactly its acknowledged turns (nothing mixed, nothing lost)."""
    import threading

    hostile = list(hostile_requests(model_name))
    statuses: dict[str, int] = {}
    fives: list = []
    lock = threading.Lock()
    peak_rss = [0]
    stop = threading.Event()
    with srv.http() as h:
        sids = [create_session(h) for _ in range(clients)]
    acked = {sid: [] for sid in sids}

    def backoff(r) -> None:
        """A well-behaved client: on 429 it waits (up to a second) before its next request."""
        if r.status_code == 429:
            time.sleep(min(1.0, float(r.headers.get("retry-after", 1))))

    def count(code: int, what) -> None:
        with lock:
            statuses[f"{code // 100}xx" if code != 429 else "429"] = statuses.get(
                f"{code // 100}xx" if code != 429 else "429", 0) + 1
            if code >= 500:
                fives.append(what)

    def worker(j: int, sid: str) -> None:
        r_ = __import__("random").Random(rng.random())
        http = httpx.Client(base_url=srv.base_url, timeout=60)
        i = 0
        while not stop.is_set():
            kind = r_.choice(["stream", "plain", "plain", "abandon", "hostile", "stateless"])
            text = turn_text(f"c{j}", i, r_.randint(1, 16))
            body = {"model": model_name, "messages": [{"role": "user", "content": text}],
                    "max_tokens": max_tokens_of(text), "temperature": 0, "session_id": sid}
            try:
                if kind == "plain":
                    r = http.post("/v1/chat/completions", json=body)
                    count(r.status_code, (kind, r.text[:200]))
                    backoff(r)
                    if r.status_code == 200:
                        acked[sid].append((text, r.json()["choices"][0]["message"]["content"]))
                        i += 1
                elif kind == "stream":
                    pieces, done = [], False
                    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                        count(r.status_code, (kind, ""))
                        backoff(r)
                        for line in r.iter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                chunk = json.loads(line[6:])
                                if chunk.get("choices"):
                                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                    if r.status_code == 200 and done:
                        acked[sid].append((text, "".join(pieces)))
                        i += 1
                elif kind == "abandon":  # stateless, so that it cannot land in a transcript we check
                    stateless = {k: v for k, v in body.items() if k != "session_id"}
                    try:
                        httpx.post(srv.base_url + "/v1/chat/completions", json={**stateless, "max_tokens": 4000},
                                   timeout=r_.uniform(0.05, 0.5))
                    except httpx.TimeoutException:
                        pass
                elif kind == "hostile":
                    method, path, content, headers = r_.choice(hostile)
                    r = http.request(method, path, content=content, headers=headers)
                    count(r.status_code, (method, path, (content or b"")[:100], r.text[:200]))
                else:
                    stateless = {k: v for k, v in body.items() if k != "session_id"}
                    r = http.post("/v1/chat/completions", json=stateless)
                    count(r.status_code, (kind, r.text[:200]))
                    backoff(r)
            except httpx.HTTPError as e:
                count(599, (kind, repr(e)))
        http.close()

    def sampler():
        with httpx.Client(base_url=srv.base_url, timeout=30) as h:
            while not stop.is_set():
                peak_rss[0] = max(peak_rss[0], h.get("/health").json()["rss_bytes"])
                time.sleep(0.1)
    threads = [threading.Thread(target=worker, args=(j, sid)) for j, sid in enumerate(sids)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
    mixed = 0
    with srv.http() as h:
        for sid in sids:
            rows = h.get(f"/v1/sessions/{sid}/messages").json()["data"]
            pairs = [(rows[i]["content"], rows[i + 1]["content"]) for i in range(0, len(rows) - 1, 2)]
            mixed += pairs != acked[sid]
        health = h.get("/health").json()
    return {"clients": clients, "seconds": seconds, "statuses": statuses, "five_xx": fives[:10],
            "turns_acknowledged": sum(len(v) for v in acked.values()), "sessions_mixed_or_lost": mixed,
            "peak_rss_bytes": peak_rss[0], "max_cache_bytes": health["max_cache_bytes"],
            "counters": health["counters"]}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
