"""Passkey retrieval (Landmark Attention style): a pass key hidden in filler text, then asked for.

The prompt, built in token ids so lengths and depths are exact:

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
    you about the important information there.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. (repeated)
    The pass key is 71432. Remember it. 71432 is the pass key.          <- at `depth` of the filler
    The grass is green. ... (repeated)
    What is the pass key? The pass key is

`depth` 0 puts the key right after the task description, 1 right before the question; the key is placed
at the filler sentence boundary nearest the requested depth and the JSON records the depth it actually got
and the key's distance in tokens from the end of the prompt (a bounded policy can only answer when that
distance fits its window). The whole prompt is streamed through one fresh session of each policy
(chunked prefill), then the answer is generated greedily; the first run of digits in it must equal the key.

Multi-fact variant (`--multi`): one prompt per length and trial holds one fact per depth, each a different
kind of number ("The pass key is 71432. ...", "The door code is 20298. ...", "The room number is ..."), and
each question ("What is the door code? The door code is") is asked of the same state: the session is
snapshotted after the prompt (`state_dict`) and restored before each question. Why this form, measured with
a dense cache on SmolLM2-135M at 1k-2k: keys told apart by colour ("the red pass key") were answered 3/6
(the model mixes them up), and questions asked one after another in one stream drew the previous answer
again; distinct kinds of numbers asked from one state: 11/12. Otherwise the test measures the model, not
the cache.
"""
from __future__ import annotations

import random
import re
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from ..session import StreamSession
from .common import EvalError, header, load_model, parse_policies, policy_window, write_json

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NAMES = ["pass key", "door code", "room number", "ticket number", "account number", "order number", "phone extension",
         "serial number"]  # of the facts in --multi, in the order of the depths
NAMED_KEY = "The {name} is {key}. Remember it. {key} is the {name}."
NAMED_QUESTION = "What is the {name}? The {name} is"


@dataclass
class PasskeyPrompt:
    ids: list[int]
    key: str
    depth: float  # requested
    actual_depth: float  # fraction of the filler tokens before the key sentence
    key_start: int  # token index where the key sentence starts
    key_end: int  # token index right after the key sentence
    filler_tokens: int

    @property
    def key_distance(self) -> int:
        """Tokens from the start of the key sentence to the end of the prompt."""
        return len(self.ids) - self.key_start


def filler_sentences(tokenizer, n_tokens: int) -> list[list[int]]:
    """Filler sentences (token ids, each with its leading space) totalling at least n_tokens."""
    enc = [tokenizer(" " + s, add_special_tokens=False).input_ids for s in FILLER]
    out, total, i = [], 0, 0
    while total < n_tokens:
        out.append(enc[i % len(enc)])
        total += len(out[-1])
        i += 1
    return out


def filler_text(tokenizer, n_tokens: int) -> list[int]:
    """Exactly n_tokens of filler token ids (used by bench as a default stream)."""
    ids = [t for s in filler_sentences(tokenizer, n_tokens) for t in s]
    return ids[:n_tokens]


def make_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens (or as close as sentence boundaries allow, never longer) with
    the key sentence at the filler sentence boundary nearest `depth`."""
    if not 0.0 <= depth <= 1.0:
        raise EvalError(f"depth must be in [0, 1], got {depth}")
    task = tokenizer(TASK, add_special_tokens=False).input_ids
    keys = tokenizer(" " + KEY_SENTENCE.format(key=key), add_special_tokens=False).input_ids
    question = tokenizer(" " + QUESTION, add_special_tokens=False).input_ids
    budget = length - len(task) - len(keys) - len(question)
    if budget < 0:
        raise EvalError(f"context length {length} is too short for the passkey prompt "
                        f"(needs at least {length - budget} tokens)")
    sents = filler_sentences(tokenizer, budget)
    while sents and sum(map(len, sents)) > budget:  # whole sentences only, never longer than asked
        sents.pop()
    n_fill = sum(map(len, sents))
    # split at the sentence boundary whose token offset is nearest depth * n_fill
    offsets = [0]
    for s in sents:
        offsets.append(offsets[-1] + len(s))
    k = min(range(len(offsets)), key=lambda i: abs(offsets[i] - depth * n_fill))
    before = [t for s in sents[:k] for t in s]
    after = [t for s in sents[k:] for t in s]
    ids = task + before + keys + after + question
    start = len(task) + len(before)
    return PasskeyPrompt(ids, key, depth, (offsets[k] / n_fill) if n_fill else depth, start, start + len(keys), n_fill)


@dataclass
class Fact:
    name: str
    key: str
    depth: float  # requested
    actual_depth: float
    key_start: int  # token index of the key sentence in the prompt


def make_multi_prompt(tokenizer, length: int, depths: list[float], keys: list[str]) -> tuple[list[int], list[Fact]]:
    """A prompt of at most `length` tokens before the questions, with one named key sentence per depth (names
    in the order of `depths`), each at the filler sentence boundary nearest its depth. The questions are fed
    afterwards (see `run`); `length` counts one question so that lengths match the single-key prompts."""
    if len(depths) > len(NAMES):
        raise EvalError(f"--multi places at most {len(NAMES)} keys (one per depth), got {len(depths)} depths")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise EvalError(f"depths must be in [0, 1], got {depths}")
    task = tokenizer(TASK, add_special_tokens=False).input_ids
    sentences = [tokenizer(" " + NAMED_KEY.format(name=n, key=k), add_special_tokens=False).input_ids
                 for n, k in zip(NAMES, keys)]
    question = tokenizer(" " + NAMED_QUESTION.format(name=NAMES[0]), add_special_tokens=False).input_ids
    budget = length - len(task) - sum(map(len, sentences)) - len(question)
    if budget < 0:
        raise EvalError(f"context length {length} is too short for {len(depths)} keys")
    sents = filler_sentences(tokenizer, budget)
    while sents and sum(map(len, sents)) > budget:
        sents.pop()
    n_fill = sum(map(len, sents))
    offsets = [0]
    for s in sents:
        offsets.append(offsets[-1] + len(s))
    cut = {}  # sentence index -> facts inserted before it (several depths may round to one boundary)
    for i, d in enumerate(depths):
        k = min(range(len(offsets)), key=lambda j: abs(offsets[j] - d * n_fill))
        cut.setdefault(k, []).append(i)
    ids, facts = list(task), [None] * len(depths)
    for k in range(len(sents) + 1):
        for i in cut.get(k, []):
            facts[i] = Fact(NAMES[i], keys[i], depths[i], offsets[k] / n_fill if n_fill else depths[i], len(ids))
            ids += sentences[i]
        if k < len(sents):
            ids += sents[k]
    return ids, facts


def make_key(seed: int, length: int, depth: float, trial: int) -> str:
    """Deterministic 5-digit key per (seed, length, depth, trial): every policy gets the same keys."""
    return str(random.Random(f"{seed}-{length}-{depth}-{trial}").randint(10000, 99999))


def extract_answer(text: str) -> str | None:
    """The first run of digits in the model's answer (None if it gave no number)."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def score(text: str, key: str) -> bool:
    """Correct iff the first number in the answer is exactly the key."""
    return extract_answer(text) == key


def answer(session: StreamSession, max_new_tokens: int) -> str:
    """Greedy answer, stopped once a number has been completed (or max_new_tokens)."""
    text = ""
    for _tok, piece in session.generate_tokens(max_new_tokens, stop=["\n"]):
        text += piece
        if re.search(r"\d+\D", text):
            break
    return text


def run(args) -> int:
    specs = parse_policies(args.policy, default="dense,sink")
    model, tok = load_model(args)
    lengths, depths = sorted(set(args.lengths)), sorted(set(args.depths))
    prompts = {}
    for L in lengths:
        for d in depths:
            for t in range(args.trials):
                prompts[(L, d, t)] = make_prompt(tok, L, d, make_key(args.seed, L, d, t))
    result = {
        **header("eval passkey", args, model),
        "lengths": lengths,
        "depths": depths,
        "trials": args.trials,
        "chunk_size": args.chunk_size,
        "max_new_tokens": args.max_new_tokens,
        "chat_template": bool(args.chat_template),
        "prompt_format": {"task": TASK, "filler": " ".join(FILLER), "key": KEY_SENTENCE, "question": QUESTION},
        "policies": [],
    }
    if args.multi:
        if args.chat_template:
            raise EvalError("--multi asks several questions in plain text; it cannot be combined with --chat-template")
        prompts = {(L, t): make_multi_prompt(tok, L, depths, [make_key(args.seed, L, d, t) for d in depths])
                   for L in lengths for t in range(args.trials)}
        result["multi"] = True
        result["prompt_format"].update(key=NAMED_KEY, question=NAMED_QUESTION)
    for spec in specs:
        t0 = time.perf_counter()
        samples = []
        bar = tqdm(total=len(prompts), desc=spec.label, unit="prompt", file=sys.stderr, disable=args.quiet,
                   mininterval=2.0, dynamic_ncols=True)
        budget = None
        for cell, p in prompts.items():
            if args.multi:
                policy = spec.build(model)
                budget = policy_window(policy)
                samples += _ask_multi(StreamSession(model, tok, policy, chunk_size=args.chunk_size), cell, p, args)
                bar.update(1)
                continue
            (L, d, t) = cell
            policy = spec.build(model)
            budget = policy_window(policy)
            session = StreamSession(model, tok, policy, chunk_size=args.chunk_size)
            ids = p.ids
            if args.chat_template:
                ids = _chat_wrap(tok, ids)
            session.feed(ids)
            text = answer(session, args.max_new_tokens)
            samples.append({"length": L, "depth": d, "trial": t, "tokens": len(ids), "actual_depth": round(p.actual_depth, 4),
                            "key": p.key, "key_distance": p.key_distance + (len(ids) - len(p.ids)),
                            "answer": text, "correct": score(text, p.key),
                            "kv_bytes": policy.used_bytes() if hasattr(policy, "used_bytes") else policy.nbytes()})
            bar.update(1)
        bar.close()
        acc = {str(L): {str(d): _mean([s["correct"] for s in samples if s["length"] == L and s["depth"] == d])
                        for d in depths} for L in lengths}
        entry = {"label": spec.label, "policy": spec.name, "params": spec.resolved_params(), "budget": budget,
                 "seconds": round(time.perf_counter() - t0, 1), "mean_accuracy": _mean([s["correct"] for s in samples]),
                 "accuracy": acc, "samples": samples,
                 "kv_bytes": {str(L): round(_mean([s["kv_bytes"] for s in samples if s["length"] == L])) for L in lengths}}
        if budget is not None:
            inside = [s["correct"] for s in samples if s["key_distance"] <= budget]
            outside = [s["correct"] for s in samples if s["key_distance"] > budget]
            entry["accuracy_key_within_budget"] = _mean(inside) if inside else None
            entry["accuracy_key_beyond_budget"] = _mean(outside) if outside else None
            entry["count_key_within_budget"], entry["count_key_beyond_budget"] = len(inside), len(outside)
        result["policies"].append(entry)
        write_json(args.out, result)
        print(f"{spec.label}: mean accuracy {entry['mean_accuracy']:.1%} in {entry['seconds']:.0f}s", file=sys.stderr)
    if args.plot:
        from .plots import plot_passkey

        plot_passkey(result, args.plot)
        result["plot"] = str(args.plot)
        write_json(args.out, result)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""), file=sys.stderr)
    return 0


def _ask_multi(session: StreamSession, cell, prompt, args) -> list[dict]:
    """Feed one multi-fact prompt, then ask for every key, each from the state right after the prompt."""
    (L, t), (ids, facts) = cell, prompt
    session.feed(ids)
    state = session.state_dict()
    out = []
    for i, f in enumerate(facts):
        if i:
            session.load_state_dict(state)
        session.feed(session.encode(" " + NAMED_QUESTION.format(name=f.name)))
        distance = session.policy.seen - f.key_start
        text = answer(session, args.max_new_tokens)
        out.append({"length": L, "depth": f.depth, "trial": t, "tokens": len(ids), "actual_depth": round(f.actual_depth, 4),
                    "name": f.name, "key": f.key, "key_distance": distance, "answer": text,
                    "correct": score(text, f.key),
                    "kv_bytes": session.policy.used_bytes() if hasattr(session.policy, "used_bytes") else session.policy.nbytes()})
    return out


def _chat_wrap(tok, ids: list[int]) -> list[int]:
    if not getattr(tok, "chat_template", None):
        raise EvalError("--chat-template: this tokenizer has no chat template")
    text = tok.decode(ids)
    q = text.rfind(QUESTION)
    body = text[:q] + "What is the pass key?"
    rendered = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True)
    return tok(rendered + "The pass key is", add_special_tokens=False).input_ids


def _mean(xs) -> float:
    xs = list(xs)
    return sum(map(float, xs)) / len(xs) if xs else 0.0
