"""`streamkv eval {ppl,passkey,chat}` and `streamkv bench`: argparse registration.

`register(subparsers)` is called by streamkv/cli.py. Each command's func(args) returns an exit code;
bad arguments or inputs print one line `streamkv <cmd>: error: ...` and return 2 (never a traceback).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..cli import add_load_args
from ..policies import POLICIES, policy_params

POLICY_HELP = (
    "cache policies to compare, as NAME or NAME:key=value,... (comma-separated list, or repeat the option). "
    "Available: " + "; ".join(f"{n}({', '.join(f'{k}={v}' for k, v in policy_params(n).items())})" for n in POLICIES)
)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _nonneg(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {v}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _float_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"depths must be numbers in [0, 1], got {text!r}")
    return vals


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="Hugging Face id (already in the local cache) or local folder; default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: 2)")
    add_load_args(g)  # --dtype, --quantize, --device: defined once, in streamkv/cli.py
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _runner(module: str):
    """func(args) for the module's run(args), turning bad inputs into a one-line error and exit code 2."""
    def func(args) -> int:
        from ..rope import UnsupportedModelError
        from .common import EvalError

        try:
            return importlib.import_module(f"streamkv.evaluation.{module}").run(args)
        except (EvalError, UnsupportedModelError) as e:
            print(f"streamkv {args.command_name}: error: {e}", file=sys.stderr)
            return 2
    return func


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' except when there is no meaningful default (None/False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def register(subparsers) -> None:
    fmt = _Formatter
    ev = subparsers.add_parser("eval", help="evaluate cache policies: streaming perplexity, passkey retrieval, streaming chat",
                               description="Evaluate how cache policies trade quality over long streams.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="{ppl,passkey,chat}")
    evsub.required = True

    # ---- ppl ----
    p = evsub.add_parser("ppl", formatter_class=fmt, help="streaming perplexity over one unbroken text stream",
                         description="Streaming perplexity: feed a text file as ONE stream through each policy and "
                                     "score every token's prediction. Writes JSON (summary by segment, binned curve, "
                                     "paired comparison on sampled positions) and a PNG of perplexity against position.")
    p.add_argument("--text", default=None, help="UTF-8 text file to stream (e.g. a whole book); required unless --merge")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="instead of running: merge result JSONs of runs over the same text/--tokens/--sample "
                        "(e.g. policies run as parallel jobs) into --out and --plot")
    p.add_argument("--tokens", type=_positive, default=None, help="use only the first N tokens of the file (default: all)")
    p.add_argument("--policy", action="append", help=POLICY_HELP + " (default: sink,window,dense,recompute)")
    p.add_argument("--mode", choices=["chunked", "token"], default="chunked",
                   help="chunked: feed --chunk-size tokens per forward (fast; exact for dense and while the stream "
                        "fits the budget); token: one token per forward (exact streaming, slow)")
    p.add_argument("--chunk-size", type=_positive, default=512, help="tokens per forward in chunked mode")
    p.add_argument("--sample", type=_nonneg, default=0,
                   help="evaluate recompute only at N evenly spaced positions (exact; 0 = every position) and "
                        "compare all policies on those positions")
    p.add_argument("--dense-max-tokens", type=_nonneg, default=16384,
                   help="stream at most this many tokens through dense (0 = no cap)")
    p.add_argument("--cap", action="append", metavar="POLICY=TOKENS",
                   help="stream at most TOKENS tokens through POLICY (its name or full label); repeatable")
    p.add_argument("--out", default="ppl.json", help="result JSON")
    p.add_argument("--plot", default="ppl.png", help="PNG of perplexity against stream position ('' = none)")
    p.add_argument("--full-output", default=None, help="optional .npz with the per-position NLL of every policy")
    _model_args(p)
    p.set_defaults(func=_runner("ppl"), command_name="eval ppl")

    # ---- passkey ----
    p = evsub.add_parser("passkey", formatter_class=fmt, help="passkey retrieval at several depths and lengths",
                         description="Passkey retrieval (Landmark Attention style): a 5-digit pass key is hidden at "
                                     "several depths of generated filler of several lengths, then asked for. "
                                     "Writes an accuracy grid per policy (JSON) and a heatmap PNG.")
    p.add_argument("--lengths", type=_int_list, default=[512, 1024, 2048, 4096],
                   help="context lengths in tokens (comma-separated)")
    p.add_argument("--depths", type=_float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="key depths as fractions of the filler (0 = start, 1 = right before the question)")
    p.add_argument("--trials", type=_positive, default=3, help="trials (different keys) per cell")
    p.add_argument("--policy", action="append", help=POLICY_HELP + " (default: dense,sink)")
    p.add_argument("--chunk-size", type=_positive, default=512, help="prefill chunk size")
    p.add_argument("--max-new-tokens", type=_positive, default=10, help="most tokens generated for the answer (stops after the first number)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pass keys")
    p.add_argument("--chat-template", action="store_true",
                   help="wrap the prompt as one user turn with the tokenizer's chat template (default: plain text "
                        "completion, 'What is the pass key? The pass key is')")
    p.add_argument("--multi", action="store_true",
                   help="multi-fact variant: each prompt (one per length and trial) holds one named key per depth "
                        "('The red pass key is ...'); each is asked of the state right after the prompt (snapshot and "
                        "restore); accuracy is still reported per length and depth")
    p.add_argument("--out", default="passkey.json", help="result JSON")
    p.add_argument("--plot", default="passkey.png", help="heatmap PNG ('' = none)")
    _model_args(p)
    p.set_defaults(func=_runner("passkey"), command_name="eval passkey")

    # ---- chat ----
    p = evsub.add_parser("chat", formatter_class=fmt, help="multi-round streaming dialogue in one bounded session",
                         description="Streaming chat: every turn of every question of an MT-Bench-style JSONL file "
                                     "(objects with a 'turns' list of strings) is fed into ONE session with a "
                                     "bounded cache. Records per-turn latency, cache tokens, cache bytes, RSS and the "
                                     "answers (JSONL), plus a summary JSON and PNG.")
    p.add_argument("--questions", required=True, help="JSONL file: one object per line with 'turns' (list of str)")
    p.add_argument("--policy", default="sink", help="ONE cache policy, NAME or NAME:key=value,...")
    p.add_argument("--limit", type=_nonneg, default=0, help="use only the first N questions (0 = all)")
    p.add_argument("--max-new-tokens", type=_positive, default=64, help="reply length cap per turn")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--chunk-size", type=_positive, default=512, help="prefill chunk size")
    p.add_argument("--out", default="chat.jsonl", help="per-turn records (JSONL)")
    p.add_argument("--summary", default=None, help="summary JSON (default: OUT with .summary.json)")
    p.add_argument("--plot", default=None, help="PNG of cache/memory/latency per turn (default: OUT with .png; '' = none)")
    p.add_argument("--no-recall", dest="recall", action="store_false",
                   help="skip the recall check (by default a fact is stated in a first turn and asked for after the last)")
    _model_args(p)
    p.set_defaults(func=_runner("chat"), command_name="eval chat")

    # ---- bench ----
    p = subparsers.add_parser("bench", formatter_class=fmt, help="decode latency and memory against stream position",
                              description="Per-token decode latency and process RSS against stream position for each "
                                          "policy (the stream is advanced by chunked prefill between measurement "
                                          "points), prefill throughput, and the speedup of sink over recompute. "
                                          "Writes JSON and a PNG; records the machine and load average.")
    p.add_argument("--policy", action="append",
                   help=POLICY_HELP + " (default: sink,dense,recompute:window=1024 i.e. recompute at sink's budget)")
    p.add_argument("--max-tokens", type=_positive, default=100_000, help="longest stream position to measure at")
    p.add_argument("--points", type=_int_list, default=None,
                   help="measurement positions (default: 1k, 2k, 5k, 10k, 20k, 50k, 100k up to --max-tokens)")
    p.add_argument("--decode-steps", type=_positive, default=20, help="single-token steps averaged per point")
    p.add_argument("--chunk-size", type=_positive, default=512, help="prefill chunk size between points")
    p.add_argument("--dense-rss-budget", type=float, default=3.0,
                   help="stop dense once process RSS exceeds this many GiB (or its cache no longer fits)")
    p.add_argument("--dense-max-tokens", type=_nonneg, default=32768, help="stop dense past this position (0 = no cap)")
    p.add_argument("--recompute-max-tokens", type=_nonneg, default=4096,
                   help="measure recompute only up to this position (each step re-encodes the whole window)")
    p.add_argument("--recompute-steps", type=_positive, default=3, help="decode steps averaged per point for recompute")
    p.add_argument("--text", default=None, help="text to stream, repeated as needed (default: generated filler text)")
    p.add_argument("--interleaved", action="store_true",
                   help="load-robust mode: hold one session per (policy, --points position) in one process and "
                        "alternate single-token steps between them (--decode-steps rounds); JSON only")
    p.add_argument("--peer", choices=["llamacpp"], default=None,
                   help="also run llama.cpp (llama-cpp-python, the optional extra streamkv[peer]) on the embedded model's "
                        "GGUF with its context shift, each engine in its own process, and report every policy's "
                        "ms/token and prefill tokens/s as a ratio to it (summary.vs_peer)")
    p.add_argument("--rounds", type=_positive, default=1,
                   help="run every engine this many times, alternating, in a rotated order each round (default 1)")
    p.add_argument("--in-process", action="store_true",
                   help="measure every policy in this process (default: a fresh process per policy, so RSS is its own)")
    p.add_argument("--out", default="bench.json", help="result JSON")
    p.add_argument("--plot", default="bench.png", help="PNG of latency and RSS against position ('' = none)")
    _model_args(p)
    p.set_defaults(func=_runner("bench"), command_name="bench")
