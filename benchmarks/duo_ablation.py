"""Retrieval Head ablation (Wu et al. 2024) on the embedded model: make the top-N heads of a pattern streaming
(sinks + recent window) and compare passkey accuracy with making N random heads streaming.

    PYTHONPATH=. python benchmarks/duo_ablation.py --pattern optimize=PATH --pattern retrieval=PATH \
        --n 3 5 10 20 --trials 12 --random-draws 3 --out docs/results/duo_ablation.json

A pattern that found the real retrieval heads must hurt far more than random heads of the same number.
--sparsity adds the deployment view: DuoAttention's rule (retrieval_heads) streams that fraction of the heads
with the lowest gates; accuracy should stay up, unlike streaming the same number of random heads.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from streamkv.heads import load_pattern, retrieval_heads
from streamkv.identify import needle_sample, passkey_correct
from streamkv.models import load


def top_heads(gates: torch.Tensor, n: int) -> torch.Tensor:
    """Flat indices of the n highest gates (ties broken by position, deterministic)."""
    return torch.argsort(-gates.flatten(), stable=True)[:n]


def random_heads(n_heads: int, n: int, draw: int) -> torch.Tensor:
    return torch.randperm(n_heads, generator=torch.Generator().manual_seed(1000 + draw))[:n]


def streaming(shape, heads: torch.Tensor) -> torch.Tensor:
    """Gates: 1 everywhere except 0 for `heads` (flat indices)."""
    gates = torch.ones(shape)
    gates.view(-1)[heads] = 0.0
    return gates


def accuracy(model, tok, samples, gates, sinks, recent) -> float:
    return sum(passkey_correct(model, tok, s, gates, sinks, recent) for s in samples) / len(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", action="append", required=True, help="LABEL=PATH (repeatable)")
    ap.add_argument("--n", type=int, nargs="*", default=[3, 5, 10, 20])
    ap.add_argument("--sparsity", type=float, nargs="*", default=[])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--random-draws", type=int, default=3)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--seed", type=int, default=123, help="prompt seed (not the identification seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    model, tok = load(threads=args.threads)
    samples = [needle_sample(tok, args.context, args.seed, i, args.sinks, args.recent) for i in range(args.trials)]
    shape = load_pattern(args.pattern[0].split("=", 1)[1]).shape
    t0 = time.perf_counter()
    result = {"context": args.context, "sink_size": args.sinks, "recent_size": args.recent, "trials": args.trials,
              "prompt_seed": args.seed, "threads": args.threads, "torch": torch.__version__,
              "cpu": subprocess.run(["lscpu"], capture_output=True, text=True).stdout.split("Model name:")[1].splitlines()[0].strip(),
              "python": platform.python_version(),
              "full_attention_accuracy": accuracy(model, tok, samples, torch.ones(shape), args.sinks, args.recent),
              "rows": []}
    patterns = dict(p.split("=", 1) for p in args.pattern)
    for n in args.n or []:
        row = {"n": n, "random": [accuracy(model, tok, samples, streaming(shape, random_heads(shape.numel(), n, d)),
                                           args.sinks, args.recent) for d in range(args.random_draws)]}
        for label, path in patterns.items():
            heads = top_heads(load_pattern(path), n)
            row[label] = accuracy(model, tok, samples, streaming(shape, heads), args.sinks, args.recent)
            row[f"{label}_heads"] = [[int(h) // shape[1], int(h) % shape[1]] for h in heads]
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_heads")}), flush=True)
    result["sparsity_rows"] = []
    for sparsity in args.sparsity:
        full = {label: retrieval_heads(load_pattern(path), sparsity=sparsity) for label, path in patterns.items()}
        n = int((~next(iter(full.values()))).sum())  # heads made streaming by the rule
        row = {"sparsity": sparsity, "streaming_heads": n,
               "random": [accuracy(model, tok, samples, streaming(shape, random_heads(shape.numel(), n, d)),
                                   args.sinks, args.recent) for d in range(args.random_draws)]}
        for label, keep in full.items():
            row[label] = accuracy(model, tok, samples, keep.float(), args.sinks, args.recent)
        result["sparsity_rows"].append(row)
        print(json.dumps(row), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
