"""Decode latency and memory against stream position, prefill throughput, and sink vs recompute.

For each policy, in a fresh process (so RSS belongs to that policy alone): the stream is advanced by
chunked prefill to each measurement position, then `--decode-steps` single-token steps are timed (tokens
from the text, i.e. teacher-forced decoding: the same work as sampling without the sampler) and their mean
and median recorded together with process RSS, cached tokens and KV bytes. `dense` stops when the next
point would pass `--dense-max-tokens` or push RSS over `--dense-rss-budget`; `recompute` is measured up to
`--recompute-max-tokens` with `--recompute-steps` steps (each step re-encodes the whole window). The JSON
records the machine, threads, torch version and the load average before and after each policy (the suite
is usually run on shared machines: a high load average means noisy timings).
"""
from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch
from tqdm import tqdm

from .common import EvalError, PolicySpec, header, load_model, parse_policies, policy_window, read_text_file, rss_bytes, write_json
from .peer import PEERS

DEFAULT_POINTS = [1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000, 1000000]


def stream_ids(tok, text_path: str | None, n: int) -> list[int]:
    """n token ids: the text file repeated as often as needed, or generated filler."""
    from .passkey import filler_text

    if text_path is None:
        return filler_text(tok, n)
    ids = tok(read_text_file(text_path), add_special_tokens=False).input_ids
    if not ids:
        raise EvalError(f"{text_path} has no tokens")
    reps = math.ceil(n / len(ids))
    return (ids * reps)[:n]


@torch.inference_mode()
def bench_policy(model, ids: list[int], spec: PolicySpec, points: list[int], *, steps: int, chunk_size: int,
                 rss_budget: float | None = None, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Measure one policy along the stream `ids` at `points` (positions, ascending)."""
    from ..session import StreamSession

    policy = spec.build(model)
    session = StreamSession(model, None, policy, chunk_size=chunk_size)
    ids_t = torch.tensor(ids, dtype=torch.long)
    load0 = os.getloadavg()
    rss0 = rss_bytes()
    fed, prefill_tokens, prefill_seconds = 0, 0, 0.0
    out_points, stopped = [], None
    bar = tqdm(total=points[-1] if points else 0, desc=f"bench {spec.label}", unit="tok", file=sys.stderr,
               disable=not progress, mininterval=2.0, dynamic_ncols=True)
    for point in points:
        if max_tokens and point > max_tokens:
            stopped = f"position {point} is past the cap of {max_tokens} tokens for this policy"
            break
        if rss_budget and out_points:  # extrapolate the KV growth to the next point
            per_tok = policy.nbytes() / max(1, policy.n_kept)
            grow = per_tok * max(0, point - fed) if policy_window(policy) is None else 0
            if rss_bytes() + grow > rss_budget:
                stopped = (f"RSS would pass the budget of {rss_budget / 2**30:.2f} GiB before position {point}")
                break
        if point - fed > 0:
            t0 = time.perf_counter()
            session.feed(ids_t[fed:point - 1] if point - 1 > fed else ids_t[fed:fed + 1])
            dt = time.perf_counter() - t0
            n = max(1, point - 1 - fed)
            prefill_tokens += n
            prefill_seconds += dt
            fed += n
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            session.feed(ids_t[fed:fed + 1])
            times.append(time.perf_counter() - t0)
            fed += 1
        bar.update(fed - bar.n)
        st = session.stats()
        out_points.append({
            "position": fed,
            "ms_per_token": 1000 * statistics.fmean(times),
            "ms_per_token_median": 1000 * statistics.median(times),
            "ms_per_token_min": 1000 * min(times),
            "steps": steps,
            "rss_bytes": rss_bytes(),
            "tokens_cached": st["tokens_cached"],
            "cache_bytes": st["cache_bytes"],
            "loadavg1": os.getloadavg()[0],
        })
    bar.close()
    return {
        "label": spec.label, "policy": spec.name, "params": spec.resolved_params(), "budget": policy_window(policy),
        "chunk_size": chunk_size, "rss_bytes_start": rss0, "points": out_points, "stopped": stopped,
        "prefill": {"tokens": prefill_tokens, "seconds": round(prefill_seconds, 3),
                    "tokens_per_second": prefill_tokens / prefill_seconds if prefill_seconds else None},
        "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
    }


def _child(conn, model_name, load_kw, threads, ids, spec, points, kw):
    """Run bench_policy in a fresh process (spawned), sending back the result or the error."""
    try:
        from ..models import load

        model, _tok = load(model_name, threads=threads, **load_kw)
        conn.send(("ok", bench_policy(model, ids, spec, points, **kw)))
    except BaseException as e:  # pragma: no cover - reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def _peer_child(conn, peer, threads, ids, points, kw):
    """The peer engine (llama.cpp) in a fresh process, as `_child` runs a policy."""
    try:
        from .peer import bench_llamacpp

        conn.send(("ok", bench_llamacpp(ids, points, steps=kw["steps"], chunk_size=kw["chunk_size"], threads=threads)))
    except BaseException as e:  # pragma: no cover - reported by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_isolated(args, ids, spec, points, kw, peer: str | None = None) -> dict:
    """One engine in a fresh process: the policy `spec`, or the `peer` (llamacpp)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    from ..cli import load_kwargs

    if peer:
        proc = ctx.Process(target=_peer_child, args=(child, peer, args.threads, ids, points, kw))
    else:
        proc = ctx.Process(target=_child, args=(child, args.model, load_kwargs(args), args.threads, ids, spec, points, kw))
    proc.start()
    child.close()
    try:
        status, payload = parent.recv()
    except EOFError:
        status, payload = "error", f"benchmark process died (exit code {proc.exitcode}; out of memory?)"
    proc.join()
    if status != "ok":
        if peer:
            return {"label": peer, "policy": peer, "params": {}, "points": [], "stopped": payload, "error": payload}
        return {"label": spec.label, "policy": spec.name, "params": spec.resolved_params(), "points": [],
                "stopped": payload, "error": payload}
    return payload


def _at(points: list[dict], position: int) -> dict | None:
    """The measured point nearest `position` (within 10%)."""
    best = min(points, key=lambda q: abs(q["position"] - position), default=None)
    return best if best and abs(best["position"] - position) <= 0.1 * position + 32 else None


def summarise(result: dict) -> dict:
    pols = {p["label"]: p for p in result["policies"]}
    s = {}
    sink = next((p for p in result["policies"] if p["policy"] == "sink" and p["points"]), None)
    rec = next((p for p in result["policies"] if p["policy"] == "recompute" and p["points"]), None)
    if sink:
        pts = sink["points"]
        early = _at(pts, 2000) or pts[0]
        last = pts[-1]
        s["sink"] = {
            "label": sink["label"],
            "early_position": early["position"], "early_ms": early["ms_per_token"],
            "last_position": last["position"], "last_ms": last["ms_per_token"],
            "latency_change": last["ms_per_token"] / early["ms_per_token"] - 1,
            "latency_change_median": last["ms_per_token_median"] / early["ms_per_token_median"] - 1,
            "rss_early": early["rss_bytes"], "rss_last": last["rss_bytes"],
            "rss_change": last["rss_bytes"] / early["rss_bytes"] - 1,
            "rss_max_over_early": max(q["rss_bytes"] for q in pts if q["position"] >= early["position"]) / early["rss_bytes"] - 1,
        }
    if sink and rec:
        common = [(q, _at(sink["points"], q["position"])) for q in rec["points"]]
        common = [(r, k) for r, k in common if k]
        if common:
            ratios = [r["ms_per_token"] / k["ms_per_token"] for r, k in common]
            s["sink_vs_recompute"] = {
                "sink": sink["label"], "recompute": rec["label"],
                "same_window": (sink["budget"] == rec["budget"]),
                "positions": [r["position"] for r, _ in common],
                "recompute_ms": [r["ms_per_token"] for r, _ in common],
                "sink_ms": [k["ms_per_token"] for _, k in common],
                "speedup": ratios,
                "speedup_mean": statistics.fmean(ratios),
            }
    for label, p in pols.items():
        if p.get("prefill", {}).get("tokens_per_second"):
            s.setdefault("prefill_tokens_per_second", {})[label] = p["prefill"]["tokens_per_second"]
    peer = [p for p in result["policies"] if p["policy"] in PEERS and p["points"]]
    if peer:
        s["vs_peer"] = _vs_peer(result["policies"], peer)
    return s


def _vs_peer(entries: list[dict], peer: list[dict]) -> dict:
    """Per engine and point: the median over rounds of ms/token (of each run's median step), and its ratio to the
    peer's at the same point; the same for prefill tokens/s."""
    def med(runs, position, key="ms_per_token_median"):
        vals = [q[key] for r in runs for q in [_at(r["points"], position)] if q]
        return statistics.median(vals) if vals else None

    out = {}
    peer_prefill = statistics.median(p["prefill"]["tokens_per_second"] for p in peer)
    for label in dict.fromkeys(e["label"] for e in entries if e["points"] and e["policy"] not in PEERS):
        runs = [e for e in entries if e["label"] == label and e["points"]]
        rows = []
        for q in runs[0]["points"]:
            mine, theirs = med(runs, q["position"]), med(peer, q["position"])
            rows.append({"position": q["position"], "ms_per_token": mine, "peer_ms_per_token": theirs,
                         "ratio": mine / theirs if mine and theirs else None})
        prefill = statistics.median(r["prefill"]["tokens_per_second"] or 0 for r in runs)
        out[label] = {"rounds": len(runs), "points": rows, "prefill_tokens_per_second": prefill,
                      "prefill_ratio": prefill / peer_prefill if peer_prefill else None}
    return out


@torch.inference_mode()
def interleaved(model, ids: list[int], specs: list[PolicySpec], points: list[int], *, rounds: int, chunk_size: int,
                progress: bool = True, recompute_max_tokens: int | None = None) -> dict:
    """Load-robust comparison: one session per (policy, position) in this process, each advanced to its
    position, then `rounds` rounds of one single-token step on every session in turn. Background load
    hits all sessions alike, so the latency *ratios* are meaningful even on a busy machine."""
    from ..session import StreamSession

    ids_t = torch.tensor(ids, dtype=torch.long)
    cells = []
    for spec in specs:
        for point in points:
            if spec.name == "recompute" and recompute_max_tokens and point > recompute_max_tokens:
                continue  # advancing recompute costs one full-window forward per chunk
            session = StreamSession(model, None, spec.build(model), chunk_size=chunk_size)
            t0 = time.perf_counter()
            session.feed(ids_t[: point - 1])
            cells.append({"spec": spec, "position": point, "session": session, "fed": point - 1, "times": [],
                          "prefill_seconds": time.perf_counter() - t0})
    for _ in tqdm(range(rounds), desc="interleaved rounds", file=sys.stderr, disable=not progress):
        for c in cells:
            t0 = time.perf_counter()
            c["session"].feed(ids_t[c["fed"] : c["fed"] + 1])
            c["times"].append(time.perf_counter() - t0)
            c["fed"] += 1
    rows = [{"label": c["spec"].label, "position": c["position"], "steps": len(c["times"]),
             "ms_per_token": 1000 * statistics.fmean(c["times"]), "ms_per_token_median": 1000 * statistics.median(c["times"]),
             "ms_per_token_min": 1000 * min(c["times"]), "tokens_cached": c["session"].stats()["tokens_cached"],
             "prefill_tokens_per_second": (c["position"] - 1) / c["prefill_seconds"]} for c in cells]
    ref = rows[0]
    for r in rows:
        r["ratio_to_first"] = r["ms_per_token"] / ref["ms_per_token"]
        r["ratio_to_first_median"] = r["ms_per_token_median"] / ref["ms_per_token_median"]
    return {"reference": f"{ref['label']}@{ref['position']}", "rounds": rounds, "cells": rows}


def run(args) -> int:
    specs = parse_policies(args.policy, default="sink,dense,recompute:window=1024")
    if args.interleaved:
        if not args.points:
            raise EvalError("--interleaved needs --points (e.g. 2000,100000)")
        model, tok = load_model(args)
        points = sorted(set(args.points))
        ids = stream_ids(tok, args.text, points[-1] + args.decode_steps + 8)
        res = {**header("bench --interleaved", args, model), "points": points,
               **interleaved(model, ids, specs, points, rounds=args.decode_steps, chunk_size=args.chunk_size,
                             progress=not args.quiet, recompute_max_tokens=args.recompute_max_tokens or None)}
        res["machine_after"] = {"loadavg": list(os.getloadavg())}
        write_json(args.out, res)
        for r in res["cells"]:
            print(f"{r['label']}@{r['position']}: {r['ms_per_token']:.1f} ms/token (x{r['ratio_to_first']:.2f})", file=sys.stderr)
        return 0
    points = sorted(set(args.points)) if args.points else [p for p in DEFAULT_POINTS if p <= args.max_tokens]
    points = [p for p in points if p <= args.max_tokens]
    if not points:
        raise EvalError(f"no measurement point at or below --max-tokens {args.max_tokens}")
    if points[0] < 2:
        raise EvalError("measurement positions must be at least 2")
    if args.text:
        read_text_file(args.text)
    if args.peer:
        from .peer import PeerError, check

        try:
            check(args.peer, args.model)
        except PeerError as e:
            raise EvalError(str(e)) from None
        if args.in_process:
            raise EvalError("--peer runs every engine in its own process; drop --in-process")
    model, tok = load_model(args)
    n = points[-1] + args.decode_steps * len(points) + 8
    ids = stream_ids(tok, args.text, n)
    result = {**header("bench", args, model), "points": points, "decode_steps": args.decode_steps,
              "text": args.text or "generated filler (passkey filler sentences)", "isolated": not args.in_process,
              "rounds": args.rounds, "peer": args.peer, "policies": []}
    engines = [(spec, None) for spec in specs] + ([(None, args.peer)] if args.peer else [])
    for r in range(args.rounds):
        order = engines[r % len(engines):] + engines[: r % len(engines)]  # rotate who goes first
        for spec, peer in order:
            kw = dict(steps=args.decode_steps, chunk_size=args.chunk_size, progress=not args.quiet)
            if spec is not None and spec.name == "dense":
                kw.update(rss_budget=args.dense_rss_budget * 2**30 if args.dense_rss_budget else None,
                          max_tokens=args.dense_max_tokens or None)
            if spec is not None and spec.name == "recompute":
                kw.update(steps=args.recompute_steps, max_tokens=args.recompute_max_tokens or None)
            pts = [p for p in points if not kw.get("max_tokens") or p <= kw["max_tokens"]] or points[:1]
            if peer:
                entry = run_isolated(args, ids, None, points, kw, peer=peer)
            elif args.in_process:
                entry = bench_policy(model, ids, spec, points, **kw)
            else:
                entry = run_isolated(args, ids, spec, points, kw)
            entry["points_requested"] = pts
            if args.rounds > 1:
                entry["round"] = r
            result["policies"].append(entry)
            result["summary"] = summarise(result)
            write_json(args.out, result)
            last = entry["points"][-1] if entry["points"] else None
            print(f"{entry['label']}: " + (f"{last['ms_per_token']:.1f} ms/token at {last['position']}" if last else "no points")
                  + (f" ({entry['stopped']})" if entry.get("stopped") else ""), file=sys.stderr)
    result["machine_after"] = {"loadavg": list(os.getloadavg())}
    if args.plot:
        from .plots import plot_bench

        plot_bench(result, args.plot)
        result["plot"] = str(args.plot)
    write_json(args.out, result)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    errors = [p for p in result["policies"] if p.get("error")]
    return 1 if errors else 0
