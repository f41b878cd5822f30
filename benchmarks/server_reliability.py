"""The figures of issue #12 (server reliability), measured on real server processes:

* hostile requests tried / 4xx / 5xx (every route x hostile values; embedded model, default flags);
* kill -9 injected / acknowledged turns lost / sessions diverged, with damaged snapshots along the way
  (tiny random model, so that many kills fit in a few minutes); once at random moments, once at each named
  step of the commit protocol in turn (the server SIGKILLs itself there: streamkv/server/faults.py);
* peak RSS and disk under a load mix (streaming, non-streaming, abandoned, hostile; embedded model)
  against the server's budgets;
* snapshot bytes per kept token, and replay (rebuild from the turn log) time per 1k tokens (embedded).

    python benchmarks/server_reliability.py [--kills 16] [--crash-kills 20] [--load-seconds 90] [--load-clients 32]
        [--parts hostile,snapshot,faults,crashpoints,load]

Takes ~10 minutes on 2 CPU cores; results in docs/results/server_reliability.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from server_helpers import (Server, build_tiny_model, create_session, dir_bytes, fault_loop,  # noqa: E402
                            load_mix, run_hostile, state)

from streamkv.server.faults import POINTS  # noqa: E402

EMBEDDED = "embedded"
FILLER = ("The river wound through the valley past old mills and quiet farms, and the travellers spoke of "
          "harvests, of storms that came from the western hills, and of markets in distant towns. ")


def hostile(tmp: Path) -> dict:
    srv = Server(None, tmp / "hostile").start()
    try:
        with srv.http() as h:
            sid = create_session(h)
        srv.client().chat.completions.create(model=EMBEDDED, max_tokens=2, extra_body={"session_id": sid},
                                             messages=[{"role": "user", "content": "hello"}])
        t0 = time.perf_counter()
        out = run_hostile(srv.base_url, sid)
        out["seconds"] = round(time.perf_counter() - t0, 1)
        out["server_alive_after"] = srv.proc.poll() is None and srv.http().get("/health").json()["status"] == "ok"
        out["failures"] = out["failures"][:5]
        return out
    finally:
        srv.stop()


def _versions(data: Path, sid: str) -> tuple[int, int | None]:
    """(version, base_version) of a session, read from the server's database (read-only)."""
    import sqlite3
    db = sqlite3.connect(f"file:{data / 'streamkv.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT version, base_version FROM sessions WHERE id = ?", (sid,)).fetchone()
    finally:
        db.close()


def snapshot_and_replay(tmp: Path) -> dict:
    """A default-policy session (sink 4 + 1020) filled past its window; its snapshot size per kept token; the
    snapshots of 8 short turns after it (incremental); then its snapshot files are deleted and the time to
    rebuild it from the turn log is measured."""
    data = tmp / "replay"
    srv = Server(None, data).start()
    try:
        h, client = srv.http(), srv.client()
        sid = create_session(h)
        for i in range(4):
            client.chat.completions.create(model=EMBEDDED, max_tokens=16, temperature=0, extra_body={"session_id": sid},
                                           messages=[{"role": "user", "content": f"Part {i}. " + FILLER * 12}])
        before = state(h, sid)
        version, base = _versions(data, sid)
        snap = data / "snapshots" / f"{sid}.{base or version}.pt"  # the full one (the last may be incremental)
        size = snap.stat().st_size
        # then short turns: incremental snapshots (only what the base lacks), full again past half new
        short = []
        for i in range(8):
            client.chat.completions.create(model=EMBEDDED, max_tokens=16, temperature=0, extra_body={"session_id": sid},
                                           messages=[{"role": "user", "content": f"Thanks. Go on with part {i}."}])
            v, base = _versions(data, sid)
            short.append({"version": v, "bytes": (data / "snapshots" / f"{sid}.{v}.pt").stat().st_size,
                          "incremental_to": base})
        before = state(h, sid)
        version, base = _versions(data, sid)
        snaps = [data / "snapshots" / f"{sid}.{v}.pt" for v in (version, base) if v]
        small = create_session(h)  # the case: a few tokens used to write the whole 47.5 MB buffer
        client.chat.completions.create(model=EMBEDDED, max_tokens=2, temperature=0, extra_body={"session_id": small},
                                       messages=[{"role": "user", "content": "hi"}])
        small_kept = state(h, small)["stats"]["tokens_cached"]
        small_size = next((data / "snapshots").glob(f"{small}.*.pt")).stat().st_size
    finally:
        srv.kill()
    for snap in snaps:
        snap.unlink()
    srv = Server(None, data).start()
    try:
        h = srv.http()
        t0 = time.perf_counter()
        after = state(h, sid)
        seconds = time.perf_counter() - t0
        assert after["logits_sha256"] == before["logits_sha256"], "replay diverged"
    finally:
        srv.stop()
    seen, kept = before["stats"]["tokens_seen"], before["stats"]["tokens_cached"]
    return {"policy": "sink:sinks=4,window=1020", "tokens_seen": seen, "tokens_kept": kept,
            "snapshot_bytes": size, "snapshot_bytes_per_kept_token": round(size / kept),
            "kv_bytes_per_token": 46080,
            "small_session_tokens_kept": small_kept, "small_session_snapshot_bytes": small_size,
            "snapshot_bytes_before_fix_reported": 47_500_000,
            "short_turns_after": short,  # each turn's new snapshot file: incremental ones hold only new tokens
            "replay_seconds": round(seconds, 2), "replay_seconds_per_1k_tokens": round(seconds / seen * 1000, 3),
            "replayed_logits_identical": True}


def load(tmp: Path, seconds: float, clients: int) -> dict:
    data = tmp / "load"
    # a memory budget that binds: 12 sessions of ~47.5 MB (sink 4+1020) fit in 600 MiB, not many more
    srv = Server(None, data, "--max-cache-mb", "600", "--max-session-mb", "60", "--max-tokens-cap", "4000").start()
    try:
        health = srv.http().get("/health").json()
        rss0 = health["rss_bytes"]
        out = load_mix(srv, seconds, clients, random.Random(7), model_name=EMBEDDED)
        out["rss_at_start_bytes"] = rss0
        out["max_session_bytes"] = health["max_session_bytes"]
        out["rss_budget_bytes"] = rss0 + out["max_cache_bytes"]
        out["disk_bytes"] = dir_bytes(data)
        out["clients"], out["seconds"] = clients, seconds
        out["disk_budget_bytes"] = clients * 256 * (1 << 20)  # per-session quota x sessions
        out["mean_bytes_per_session_on_disk"] = out["disk_bytes"] // clients
        return out
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=16)
    ap.add_argument("--crash-kills", type=int, default=20, help="kills at the named crash points (cycled)")
    ap.add_argument("--load-seconds", type=float, default=90)
    ap.add_argument("--load-clients", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "server_reliability.json"))
    ap.add_argument("--parts", default="hostile,snapshot,faults,crashpoints,load",
                    help="which measurements to (re)run; the others are kept from an existing --out file")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() and parts != {"hostile", "snapshot", "faults", "crashpoints", "load"} else {}
    result["machine"] = {"python": platform.python_version(), "cpus": __import__("os").cpu_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        if "hostile" in parts:
            result["hostile"] = hostile(tmp)
            print("hostile", json.dumps(result["hostile"])[:300], flush=True)
        if "snapshot" in parts:
            result["snapshot_and_replay"] = snapshot_and_replay(tmp)
            print("snapshot", result["snapshot_and_replay"], flush=True)
        if "faults" in parts:
            tiny = build_tiny_model(tmp / "models" / "tiny")
            result["faults"] = fault_loop(tiny, tmp / "faults" / "data", args.kills, random.Random(12), "--policy",
                                          "sink:sinks=4,window=40", "--chunk-size", "16", damage_every=2)
            print("faults", result["faults"], flush=True)
        if "crashpoints" in parts:  # each step of the commit protocol, hit on purpose (streamkv/server/faults.py)
            tiny = build_tiny_model(tmp / "models" / "tiny")
            result["crash_points"] = fault_loop(tiny, tmp / "crash" / "data", args.crash_kills, random.Random(20),
                                                "--policy", "sink:sinks=4,window=40", "--chunk-size", "16",
                                                damage_every=0, crash_points=POINTS)
            print("crash points", result["crash_points"], flush=True)
        if "load" in parts:
            result["load"] = load(tmp, args.load_seconds, args.load_clients)
            print("load", json.dumps(result["load"])[:500], flush=True)
        result.setdefault("seconds", {})
        if not isinstance(result["seconds"], dict):
            result["seconds"] = {}
        result["seconds"][args.parts] = round(time.perf_counter() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
