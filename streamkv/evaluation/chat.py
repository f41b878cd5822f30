"""Multi-round streaming dialogue: every turn of every question fed into ONE session with a bounded cache.

The input is JSONL in MT-Bench's shape (one object per line with `turns`: a list of user messages;
`question_id` and `category` are kept when present). All questions are one conversation: the stream grows
by every user turn and every reply, far past the cache budget, while the cache and the process memory must
stay flat. Per turn we record: time to first token, decode ms per token, total seconds, tokens seen and
cached, KV-cache bytes, process RSS, the reply and its finish reason (one JSONL record per turn), and a
summary JSON with the memory-flatness figures.

The recall check (on by default): a first turn states a fact ("My locker code is 48213. ...") and a last
turn, after every question, asks for it. A policy that forgets what left its window cannot answer; the
summary records the reply, whether its first number is the code, and how many tokens lay in between.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..session import StreamSession
from .common import EvalError, header, load_model, parse_policies, policy_window, rss_bytes, write_json

RECALL_CODE = "48213"
RECALL_FACT = f"My locker code is {RECALL_CODE}. Please remember it, I will ask you for it later."
RECALL_QUESTION = "What is my locker code? Answer with the number only."


def load_questions(path: str, limit: int = 0) -> list[dict]:
    """Read MT-Bench-style JSONL; every line needs a non-empty `turns` list of non-empty strings."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{no}: not JSON ({e.msg})") from None
        turns = obj.get("turns") if isinstance(obj, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise EvalError(f"{path}:{no}: expected an object with 'turns': a non-empty list of non-empty strings")
        out.append({"question_id": obj.get("question_id", len(out) + 1), "category": obj.get("category"), "turns": turns})
        if limit and len(out) >= limit:
            break
    if not out:
        raise EvalError(f"{path} has no questions")
    return out


def run_turn(session: StreamSession, message: str, **gen) -> dict:
    """One chat turn with timing. Decode speed is measured between the first and last reply piece."""
    p = session.policy
    seen0 = p.seen
    t0 = time.perf_counter()
    t_first = t_last = None
    seen_first = seen_last = None
    pieces = []
    for piece in session.chat(message, **gen):
        now = time.perf_counter()
        if t_first is None:
            t_first, seen_first = now, p.seen
        t_last, seen_last = now, p.seen
        pieces.append(piece)
    total = time.perf_counter() - t0
    decoded = (seen_last - seen_first) if seen_first is not None else 0
    st = session.stats()
    return {
        "reply": "".join(pieces),
        "finish_reason": session.last_finish_reason,
        "seconds": round(total, 4),
        "ttft_seconds": round(t_first - t0, 4) if t_first is not None else None,
        "ms_per_token": round(1000 * (t_last - t_first) / decoded, 2) if decoded > 0 else None,
        "turn_tokens": p.seen - seen0,
        "tokens_seen": st["tokens_seen"],
        "tokens_cached": st["tokens_cached"],
        "cache_bytes": st["cache_bytes"],
        "rss_bytes": rss_bytes(),
    }


def run(args) -> int:
    specs = parse_policies(args.policy, default="sink")
    if len(specs) != 1:
        raise EvalError("eval chat runs ONE policy per run (give one --policy)")
    spec = specs[0]
    questions = load_questions(args.questions, args.limit)
    model, tok = load_model(args)
    if not getattr(tok, "chat_template", None):
        raise EvalError("eval chat needs a tokenizer with a chat template")
    policy = spec.build(model)
    session = StreamSession(model, tok, policy, chunk_size=args.chunk_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary_path = Path(args.summary) if args.summary else out.with_suffix(".summary.json")
    plot_path = args.plot if args.plot is not None else str(out.with_suffix(".png"))
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    rows, errors = [], []
    n_turns = sum(len(q["turns"]) for q in questions)
    recall = {}
    if getattr(args, "recall", True):
        questions = [{"question_id": "recall-fact", "category": "recall", "turns": [RECALL_FACT]}, *questions,
                     {"question_id": "recall-question", "category": "recall", "turns": [RECALL_QUESTION]}]
        n_turns += 2
    t0 = time.perf_counter()
    with out.open("w", encoding="utf-8") as f:
        bar = tqdm(total=n_turns, desc=f"chat {spec.label}", unit="turn", file=sys.stderr, disable=args.quiet,
                   mininterval=2.0, dynamic_ncols=True)
        for q in questions:
            for i, message in enumerate(q["turns"]):
                rec = {"question_id": q["question_id"], "category": q["category"], "turn": i + 1}
                try:
                    rec.update(run_turn(session, message, **gen))
                except Exception as e:  # record and go on: the point is to see whether any turn fails
                    rec.update(error=f"{type(e).__name__}: {e}")
                    errors.append(rec)
                rows.append(rec)
                if q["question_id"] == "recall-fact":
                    recall["tokens_seen_after_fact"] = session.policy.seen
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(1)
        bar.close()
    if recall and "reply" in rows[-1]:
        import re

        found = re.search(r"\d+", rows[-1]["reply"])
        recall.update(fact=RECALL_FACT, question=RECALL_QUESTION, answer=rows[-1]["reply"],
                      correct=bool(found and found.group(0) == RECALL_CODE),
                      tokens_between=rows[-1]["tokens_seen"] - rows[-1]["turn_tokens"] - recall["tokens_seen_after_fact"])
    ok = [r for r in rows if "error" not in r]
    budget = policy_window(policy)
    summary = {
        **header("eval chat", args, model),
        "questions_file": str(args.questions),
        "policy": {"label": spec.label, "policy": spec.name, "params": spec.resolved_params(), "budget": budget},
        "questions": len(questions),
        "turns": len(rows),
        "errors": len(errors),
        "error_messages": [e["error"] for e in errors[:10]],
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "chunk_size": args.chunk_size,
        "seconds": round(time.perf_counter() - t0, 1),
        "records": str(out),
        "recall": recall or None,
    }
    if ok:
        full = [r for r in ok if budget is None or r["tokens_seen"] > budget]  # turns after the cache filled
        summary.update(
            tokens_seen=ok[-1]["tokens_seen"],
            max_tokens_cached=max(r["tokens_cached"] for r in ok),
            cache_bytes_min_after_full=min((r["cache_bytes"] for r in full), default=None),
            cache_bytes_max=max(r["cache_bytes"] for r in ok),
            rss_bytes_first=ok[0]["rss_bytes"],
            rss_bytes_after_full=full[0]["rss_bytes"] if full else None,
            rss_bytes_last=ok[-1]["rss_bytes"],
            rss_bytes_max=max(r["rss_bytes"] for r in ok),
            rss_growth_after_full=(ok[-1]["rss_bytes"] / full[0]["rss_bytes"] - 1) if full else None,
            mean_ms_per_token=_mean([r["ms_per_token"] for r in ok if r["ms_per_token"]]),
            mean_ttft_seconds=_mean([r["ttft_seconds"] for r in ok if r["ttft_seconds"] is not None]),
            finish_reasons={k: sum(r["finish_reason"] == k for r in ok) for k in ("stop", "length")},
            cache_bounded=budget is not None and max(r["tokens_cached"] for r in ok) <= budget,
        )
    if plot_path and ok:
        from .plots import plot_chat

        plot_chat(ok, plot_path, title=f"Streaming chat, {summary['model']}, {spec.label}: {len(rows)} turns in one session")
        summary["plot"] = plot_path
    write_json(summary_path, summary)
    print(f"{len(rows)} turns, {len(errors)} errors, {summary.get('tokens_seen')} tokens streamed"
          + (f"; recall after {recall['tokens_between']:,} tokens: {'correct' if recall['correct'] else 'wrong'} ({recall['answer']!r})"
             if recall.get("answer") is not None else "") + f"; wrote {out} and {summary_path}", file=sys.stderr)
    return 1 if errors else 0


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None
