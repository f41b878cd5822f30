"""Measure the server on the embedded model (real process, real HTTP, the openai client):

* time to first token (TTFT) and per-token latency of one short chat turn when the session's stream is
  ~1k tokens long vs ~50k tokens long (same sink cache of 4 + 1020 tokens: the cost should not change);
* resident memory (RSS) of the server with 16 sessions open, each with a full cache.

    python benchmarks/server_bench.py [--long 50000] [--out docs/results/server_bench.json]

Takes ~10-15 minutes on 2 CPU cores (most of it is prefilling the 50k-token session).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from streamkv.evaluation.common import cpu_model  # noqa: E402
MODEL = "embedded"
FILLER = (
    "The river wound through the valley past old mills and quiet farms, and the travellers spoke of harvests, "
    "of storms that came from the western hills, of markets in distant towns and of the songs their parents "
    "had taught them. "
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def filler(words: int, salt: int) -> str:
    base = FILLER.split()
    return f"Part {salt}. " + " ".join(base[(i + salt) % len(base)] for i in range(words))


def measure_turn(client: OpenAI, sid: str, text: str, max_tokens: int = 32) -> dict:
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"session_id": sid})
    times, usage, t_finish = [], None, None
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(now)
        if chunk.choices and chunk.choices[0].finish_reason:
            t_finish = now
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens
    return {
        "ttft_s": round(times[0] - t0, 4),
        "per_token_s": round((times[-1] - times[0]) / max(1, len(times) - 1), 4),
        "completion_tokens": tokens, "content_chunks": len(times),
        "commit_s": round(t_finish - times[-1], 4),  # snapshot + transcript written before the final chunk
        "turn_s": round(t_finish - t0, 4),
        "prompt_tokens": usage.prompt_tokens,
    }


def grow(client: OpenAI, http: httpx.Client, sid: str, target: int, words: int = 2600) -> float:
    t0, salt = time.perf_counter(), 0
    while (seen := http.get(f"/v1/sessions/{sid}/state").json()["stats"]["tokens_seen"]) < target:
        n = max(50, min(words, int((target - seen) * 0.7)))  # ~1.1 tokens per filler word: land near target
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": filler(n, salt)}],
                                       max_tokens=1, temperature=0, extra_body={"session_id": sid})
        salt += 1
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--long", type=int, default=50000)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "server_bench.json"))
    ap.add_argument("--serve-args", default="", help="more `streamkv serve` options, e.g. \"--quantize int4 --compile\"")
    ap.add_argument("--no-memory", action="store_true", help="skip the 16-session memory part")
    ap.add_argument("--only-memory", action="store_true",
                    help="skip the latency part; update sessions_open in an existing --out file")
    args = ap.parse_args()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: stop the server too
    data = tempfile.mkdtemp(prefix="streamkv-bench-")
    port = free_port()
    cmd = [sys.executable, "-m", "streamkv.server", "serve", "--port", str(port), "--data-dir", data,
           "--threads", str(args.threads), "--max-input-tokens", "8192", "--max-resident-sessions", str(args.sessions + 4),
           "--log-level", "warning", *args.serve_args.split()]
    log = open(Path(data) / "server.log", "wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.returncode}")
            time.sleep(0.5)
        http = httpx.Client(base_url=base, timeout=3600)
        client = OpenAI(base_url=base + "/v1", api_key="none", timeout=3600, max_retries=0)
        rss_idle = http.get("/health").json()["rss_bytes"]
        load_start = os.getloadavg()
        result = {"model": "SmolLM2-135M-Instruct (embedded)", "policy": "sink:sinks=4,window=1020",
                  "serve_args": args.serve_args,
                  "threads": args.threads, "cpu": cpu_model()[0], "cpu_flags": cpu_model()[1], "cores": os.cpu_count(),
                  "command": " ".join(["python", "benchmarks/server_bench.py"] + sys.argv[1:]),
                  "rss_bytes_model_loaded": rss_idle, "lengths": {}}
        sid = http.post("/v1/sessions", json={}).json()["id"]
        if args.only_memory:  # the same 17 sessions as the full run: one long + 16 more
            grow(client, http, sid, args.short)
        grown = 0.0
        if args.only_memory:
            result = json.loads(Path(args.out).read_text())
            result["rss_bytes_model_loaded"] = rss_idle
        for target in () if args.only_memory else (args.short, args.long):
            grown += grow(client, http, sid, target)
            seen = http.get(f"/v1/sessions/{sid}/state").json()["stats"]
            runs = [measure_turn(client, sid, f"In one sentence, what was part {k} about?") for k in range(args.repeats)]
            med = lambda key: sorted(r[key] for r in runs)[len(runs) // 2]  # noqa: E731
            result["lengths"][str(target)] = {
                "tokens_seen_before": seen["tokens_seen"], "tokens_cached": seen["tokens_cached"],
                "cache_bytes": seen["cache_bytes"], "ttft_s_median": med("ttft_s"),
                "per_token_s_median": med("per_token_s"), "commit_s_median": med("commit_s"), "runs": runs,
                "prefill_s_to_reach": round(grown, 1)}
            print(json.dumps({target: result["lengths"][str(target)]}), flush=True)
        # 16 sessions, each with a full cache (>1024 tokens in its stream)
        sids = [] if args.no_memory else [http.post("/v1/sessions", json={}).json()["id"] for _ in range(args.sessions)]
        for i, s in enumerate(sids):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": filler(1000, i)}],
                                           max_tokens=1, temperature=0, extra_body={"session_id": s})
        if sids:
            health = http.get("/health").json()
            stats = [http.get(f"/v1/sessions/{s}/state").json()["stats"] for s in sids]
            snaps = [f.stat().st_size for f in (Path(data) / "snapshots").glob("*.pt")]
            result["sessions_open"] = {
                "sessions": args.sessions + 1, "resident": health["resident_sessions"],
                "rss_bytes": health["rss_bytes"], "rss_over_model_bytes": health["rss_bytes"] - rss_idle,
                "cache_bytes_per_session": stats[0]["cache_bytes"], "tokens_cached_per_session": stats[0]["tokens_cached"],
                "snapshot_bytes_median": sorted(snaps)[len(snaps) // 2], "snapshot_files": len(snaps)}
            print(json.dumps(result["sessions_open"]), flush=True)
        result["loadavg_1_5_15" + ("_memory_rerun" if args.only_memory else "")] = {"start": load_start, "end": os.getloadavg(),
                                    "note": "the 2 cores were shared with other jobs; compare lengths within this run"}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
