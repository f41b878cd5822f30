"""Streaming perplexity: one unbroken token stream, every token predicted from what the policy kept.

How each policy is run (recorded per policy in the JSON as `mode`):
* `chunked` (default): the stream is fed through a `StreamSession` `chunk_size` tokens per forward and
  every token's logits are scored. For `dense`, and for any policy while the stream still fits its budget,
  this equals token-by-token streaming up to float rounding (tested: mean NLL within 1e-4, every position
  within 2e-3, see tests/test_eval_ppl.py). For bounded policies past their budget, tokens inside a chunk
  see between `budget` and `budget + chunk_size - 1` earlier tokens, so chunked is a slight *upper bound*
  on context (the JSON records the chunk size; `--mode token` removes the approximation).
* `token`: `chunk_size` 1, exact streaming, one forward per token (~65 ms/token for SmolLM2-135M on 2 cores).
* `sampled`: `recompute` with `--sample N` is evaluated only at N evenly spaced positions. That is exact:
  recompute's prediction at position t depends only on the previous W+1 tokens, so each sampled position is
  one forward over tokens t-W-1 .. t-1 (through the real `Recompute` policy object).
Every policy that covers the sampled positions is also scored on exactly those positions (`paired`), so
policies run in different modes are compared on the same tokens.

`dense` is capped at `--dense-max-tokens` (the whole stream cannot be kept for long; past the model's
trained context its perplexity explodes: that is a finding, shown in the plot).
"""
from __future__ import annotations

import hashlib
import math
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from ..policies import Recompute
from ..session import StreamSession
from .common import EvalError, PolicySpec, header, load_model, parse_policies, read_text_file, write_json

SEGMENT_EDGES = [1, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576]


def tokenize_file(tokenizer, path: str, n_tokens: int = 0) -> list[int]:
    text = read_text_file(path)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if n_tokens:
        if n_tokens > len(ids):
            raise EvalError(f"{path} has only {len(ids)} tokens, fewer than --tokens {n_tokens}")
        ids = ids[:n_tokens]
    if len(ids) < 2:
        raise EvalError(f"{path} has fewer than 2 tokens: nothing to predict")
    return ids


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)  # scored on the CPU whatever the model's device
    return (-logp.gather(1, targets.view(-1, 1)).squeeze(1)).numpy().astype(np.float64)


@torch.inference_mode()
def stream_nll(model, ids: list[int], spec: PolicySpec, chunk_size: int = 512, progress: bool = True,
               block: int = 256) -> np.ndarray:
    """NLL of ids[1:], each predicted by streaming ids through a session of `spec` (chunk_size 1 = exact
    token-by-token). Returns an array of len(ids)-1: entry t-1 is -log p(ids[t] | stream before t)."""
    session = StreamSession(model, None, spec.build(model), chunk_size=chunk_size)
    ids_t = torch.tensor(ids, dtype=torch.long)
    n = len(ids) - 1  # the last token is only a target
    out = np.empty(n, dtype=np.float64)
    step = chunk_size if chunk_size > 1 else block  # one feed call per `step` tokens (session splits into chunks)
    bar = tqdm(total=n, desc=spec.label, unit="tok", file=sys.stderr, disable=not progress, mininterval=2.0,
               dynamic_ncols=True)
    for start in range(0, n, step):
        end = min(n, start + step)
        logits = session.feed(ids_t[start:end], all_logits=True)
        out[start:end] = _nll(logits, ids_t[start + 1 : end + 1])
        bar.update(end - start)
    bar.close()
    return out


def sample_positions(n_targets: int, n_sample: int) -> np.ndarray:
    """n_sample evenly spaced target positions t in [1, n_targets] (the predicted token's stream index)."""
    if n_sample <= 0 or n_sample >= n_targets:
        return np.arange(1, n_targets + 1)
    return np.unique(np.linspace(1, n_targets, n_sample).round().astype(np.int64))


@torch.inference_mode()
def recompute_nll_at(model, ids: list[int], window: int, positions: np.ndarray, progress: bool = True,
                     label: str = "recompute") -> np.ndarray:
    """Exact NLL of `recompute` (window W) at target positions t: the policy holds ids[t-1-W : t-1] when
    ids[t-1] is fed, so one forward over those W+1 tokens predicts ids[t]."""
    out = np.empty(len(positions), dtype=np.float64)
    for i, t in enumerate(tqdm(positions, desc=label + " (sampled)", unit="pos", file=sys.stderr,
                               disable=not progress, mininterval=2.0, dynamic_ncols=True)):
        t = int(t)
        policy = Recompute(model, window=window)
        policy.ids = torch.tensor(ids[max(0, t - 1 - window) : t - 1], dtype=torch.long)
        policy.seen = t - 1
        logits = policy.forward(model, torch.tensor([[ids[t - 1]]], device=model.device), all_logits=False).float()
        out[i] = _nll(logits, torch.tensor([ids[t]]))[0]
    return out


# ---- summaries ---------------------------------------------------------------------------------------
def _ppl(nll: np.ndarray) -> float | None:
    return float(math.exp(float(np.mean(nll)))) if len(nll) else None


def segments(positions: np.ndarray, nll: np.ndarray, n_targets: int) -> list[dict]:
    """Perplexity per stream segment [start, end) of target positions (power-of-two edges)."""
    edges = [e for e in SEGMENT_EDGES if e <= n_targets] + [n_targets + 1]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (positions >= lo) & (positions < hi)
        if sel.any():
            rows.append({"start": int(lo), "end": int(hi), "count": int(sel.sum()),
                         "mean_nll": float(nll[sel].mean()), "ppl": _ppl(nll[sel])})
    return rows


def curve(positions: np.ndarray, nll: np.ndarray, n_bins: int = 60, min_count: int = 64) -> dict:
    """Perplexity in log-spaced position bins (what the plot draws; small enough to commit). Neighbouring
    bins are merged until each holds at least `min_count` positions (single-token bins are pure noise)."""
    positions = np.asarray(positions)
    lo, hi = max(1, int(positions.min())), int(positions.max()) + 1
    edges = np.unique(np.geomspace(lo, hi, n_bins + 1).round().astype(np.int64))
    idx = np.searchsorted(edges, positions, side="right") - 1
    x, y, c = [], [], []
    acc = np.zeros(len(positions), dtype=bool)
    for b in range(len(edges) - 1):
        acc |= idx == b
        if acc.sum() >= min_count or b == len(edges) - 2:
            if acc.any():
                x.append(float(np.exp(np.mean(np.log(positions[acc])))))
                y.append(_ppl(nll[acc]))
                c.append(int(acc.sum()))
            acc = np.zeros(len(positions), dtype=bool)
    return {"position": x, "ppl": y, "count": c}


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% paired-bootstrap interval of ppl(a)/ppl(b) on the same positions."""
    rng = np.random.default_rng(seed)
    d = a - b
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    ratios = np.exp(d[idx].mean(axis=1))
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


# ---- the command ---------------------------------------------------------------------------------------
def run(args) -> int:
    if args.merge:
        merge(args.merge, args.out, args.plot)
        print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
        return 0
    if not args.text:
        raise EvalError("--text is required (or --merge)")
    specs = parse_policies(args.policy, default="sink,window,dense,recompute")
    if args.chunk_size < 1:
        raise EvalError("--chunk-size must be at least 1")
    if args.sample < 0 or args.dense_max_tokens < 0:
        raise EvalError("--tokens, --sample and --dense-max-tokens must be non-negative")
    caps = parse_caps(args.cap or [])
    read_text_file(args.text)  # fail on a bad path before spending seconds on the model
    model, tok = load_model(args)
    ids = tokenize_file(tok, args.text, args.tokens or 0)
    n_targets = len(ids) - 1
    chunk = 1 if args.mode == "token" else args.chunk_size
    samples = sample_positions(n_targets, args.sample) if args.sample else None
    text_bytes = open(args.text, "rb").read()
    result = {
        **header("eval ppl", args, model),
        "text": str(args.text),
        "text_sha256": hashlib.sha256(text_bytes).hexdigest(),
        "tokens": len(ids),
        "targets": n_targets,
        "position_convention": "position t = index in the stream of the predicted token (1..tokens-1); "
                               "nll[t] = -log p(token t | what the policy kept of tokens < t)",
        "mode": args.mode,
        "chunk_size": chunk,
        "sample": int(len(samples)) if samples is not None else 0,
        "dense_max_tokens": args.dense_max_tokens,
        "policies": [],
        "paired": None,
    }
    full: dict[str, np.ndarray] = {}
    per_pos: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in specs:
        t0 = time.perf_counter()
        n_stream = len(ids)
        if spec.name == "dense" and args.dense_max_tokens:
            n_stream = min(n_stream, args.dense_max_tokens)
        cap = caps.get(spec.label, caps.get(spec.name))
        if cap:
            n_stream = min(n_stream, cap)
        entry = {"label": spec.label, "policy": spec.name, "params": spec.resolved_params(), "tokens_streamed": n_stream}
        if spec.name == "recompute" and samples is not None:
            window = spec.resolved_params()["window"]
            pos = samples
            nll = recompute_nll_at(model, ids, window, pos, not args.quiet, spec.label)
            entry.update(mode="sampled", chunk_size=None)
        else:
            nll = stream_nll(model, ids[:n_stream], spec, chunk, not args.quiet)
            pos = np.arange(1, n_stream)
            entry.update(mode="token" if chunk == 1 else "chunked", chunk_size=chunk)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        entry["positions_evaluated"] = int(len(pos))
        entry["mean_nll"] = float(nll.mean())
        entry["ppl"] = _ppl(nll)
        entry["segments"] = segments(pos, nll, n_targets)
        entry["curve"] = curve(pos, nll, n_bins=60, min_count=64 if len(pos) > 2000 else max(1, len(pos) // 6))
        if samples is not None:  # NLL at the sampled positions this policy covers (for paired comparisons/merging)
            keep = np.isin(pos, samples)
            entry["sampled"] = {"position": pos[keep].tolist(), "nll": [round(float(v), 5) for v in nll[keep]]}
        per_pos[spec.label] = (pos, nll)
        full[spec.label] = nll
        result["policies"].append(entry)
        if samples is not None:
            result["paired"] = paired(per_pos, samples)
        write_json(args.out, result)  # after every policy, so a long run keeps what it finished
        print(f"{spec.label}: ppl {entry['ppl']:.3f} over {len(pos)} positions ({entry['mode']}) "
              f"in {entry['seconds']:.0f}s", file=sys.stderr)
    if args.full_output:
        np.savez_compressed(args.full_output, **{f"{k}__pos": v[0] for k, v in per_pos.items()},
                            **{f"{k}__nll": v[1].astype(np.float32) for k, v in per_pos.items()})
        result["full_output"] = str(args.full_output)
    if args.plot:
        from .plots import plot_ppl

        plot_ppl(result, args.plot)
        result["plot"] = str(args.plot)
    write_json(args.out, result)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


def parse_caps(values: list[str]) -> dict:
    """--cap window=32768 (policy name or full label) -> {'window': 32768}."""
    caps = {}
    for v in values:
        label, eq, n = v.rpartition("=")
        try:
            caps[label.strip()] = int(n)
        except ValueError:
            raise EvalError(f"--cap expects POLICY=TOKENS, got {v!r}") from None
        if not eq or not label.strip() or caps[label.strip()] < 2:
            raise EvalError(f"--cap expects POLICY=TOKENS with TOKENS >= 2, got {v!r}")
    return caps


def paired(per_pos: dict, samples: np.ndarray) -> dict:
    """Every policy scored on the sampled positions; each compared with recompute on the positions both cover
    (all of them, or those below a policy's token cap)."""
    out = {"positions": int(len(samples)), "first": int(samples[0]), "last": int(samples[-1]), "ppl": {},
           "covered": {}, "ratio_to": None, "ratio": {}}
    vals = {}
    for label, (pos, nll) in per_pos.items():
        lookup = dict(zip(np.asarray(pos).tolist(), np.asarray(nll).tolist()))
        vals[label] = {int(t): lookup[int(t)] for t in samples if int(t) in lookup}
        out["covered"][label] = len(vals[label])
        if vals[label]:
            out["ppl"][label] = _ppl(np.array(list(vals[label].values())))
    ref = next((l for l in vals if l.startswith("recompute")), None)
    if ref:
        out["ratio_to"] = ref
        for label, v in vals.items():
            common = sorted(set(v) & set(vals[ref]))
            if label == ref or not common:
                continue
            a = np.array([v[t] for t in common])
            b = np.array([vals[ref][t] for t in common])
            past = [i for i, t in enumerate(common) if t > 2 * _window_of(ref)]
            out["ratio"][label] = {
                "positions": len(common), "ppl": _ppl(a), "ppl_recompute": _ppl(b),
                "ratio": float(np.exp(a.mean() - b.mean())), "ci95": bootstrap_ratio(a, b),
            }
            if past and len(past) < len(common):
                out["ratio"][label]["past_2W"] = {"positions": len(past),
                                                  "ratio": float(np.exp(a[past].mean() - b[past].mean())),
                                                  "ci95": bootstrap_ratio(a[past], b[past])}
    return out


def _window_of(label: str) -> int:
    params = dict(kv.split("=", 1) for kv in label.partition(":")[2].split(",") if "=" in kv)
    return int(params.get("window", 1024))


def merge(paths: list[str], out: str, plot: str | None) -> dict:
    """Combine result JSONs of runs over the same text and token count (e.g. policies run in parallel jobs)."""
    import json

    runs = []
    for p in paths:
        try:
            runs.append(json.loads(open(p).read()))
        except (OSError, ValueError) as e:
            raise EvalError(f"cannot read result {p}: {e}") from None
    base = runs[0]
    for r in runs[1:]:
        for key in ("text_sha256", "tokens", "sample"):
            if r.get(key) != base.get(key):
                raise EvalError(f"cannot merge: {key} differs ({base.get(key)!r} vs {r.get(key)!r})")
    merged = dict(base)
    merged["merged_from"] = [{"file": str(p), "argv": r.get("argv"), "created": r.get("created"),
                              "machine": r.get("machine")} for p, r in zip(paths, runs)]
    merged["policies"] = [p for r in runs for p in r["policies"]]
    labels = [p["label"] for p in merged["policies"]]
    if len(set(labels)) != len(labels):
        raise EvalError(f"cannot merge: a policy appears in several results ({', '.join(labels)})")
    merged["mode"] = sorted({m for r in runs for m in (r.get("mode") if isinstance(r.get("mode"), list) else [r.get("mode")])})
    merged["merged_from"] = [m for r, f in zip(runs, merged["merged_from"]) for m in (r.get("merged_from") or [f])]
    if base.get("sample"):
        per_pos = {p["label"]: (np.array(p["sampled"]["position"]), np.array(p["sampled"]["nll"]))
                   for p in merged["policies"] if "sampled" in p}
        merged["paired"] = paired(per_pos, sample_positions(base["targets"], base["sample"]))
    if plot:
        from .plots import plot_ppl

        plot_ppl(merged, plot)
        merged["plot"] = str(plot)
    write_json(out, merged)
    return merged
