"""What choosing blocks ahead (`memory:choose=ahead`) costs in next-token prediction, against choosing first.

A decode step that chooses blocks either chooses with its own query before attending (`choose=current`, the
default) or attends the standing choice and chooses after, for the next steps (`choose=ahead`, which lets
every decode step run compiled). Prefill chunks always choose first, so perplexity over chunks cannot tell
the two apart: this feeds a text's first --prefill tokens in 512-token chunks, then the next --steps tokens
one at a time (decode steps, teacher-forced) and records each step's negative log-likelihood and greedy
token, for each variant in turn (`reselect=1`, choosing at every step, is the reference). Eager float32: the
choice, not the arithmetic, is what differs.

    python benchmarks/choose_nll.py --text ../shared/data/frankenstein.txt --prefill 16384 --steps 1024 \\
        --out docs/results/choose_ahead_nll.json

`--policy` takes another policy spec whose blocks are chosen the same way (e.g. `duo:retrieval=memory`, which
has no `choose`: `--variants reselect=1,current`).
"""
from __future__ import annotations

import argparse
import json
import math
import time

VARIANTS = {"reselect=1": {"reselect": 1}, "current": {}, "ahead": {"choose": "ahead"}}  # current: the defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", required=True, help="a plain-text file (e.g. ../shared/data/frankenstein.txt)")
    ap.add_argument("--prefill", type=int, default=16384, help="tokens fed in 512-token chunks first")
    ap.add_argument("--steps", type=int, default=1024, help="tokens then fed one at a time (scored)")
    ap.add_argument("--policy", default="memory", help="policy spec, e.g. duo:retrieval=memory,sparsity=0.3 (default memory)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/results/choose_ahead_nll.json")
    args = ap.parse_args()

    import torch
    from tqdm import tqdm

    from streamkv.models import load
    from streamkv.policies import parse_policy_spec
    from streamkv.session import StreamSession

    policy, base = parse_policy_spec(args.policy)
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    if "reselect=1" not in variants:
        raise SystemExit("--variants must include reselect=1 (the reference)")

    model, tok = load(None, threads=args.threads)
    ids = torch.tensor(tok(open(args.text, encoding="utf-8").read())["input_ids"][: args.prefill + args.steps + 1])
    if ids.numel() < args.prefill + args.steps + 1:
        raise SystemExit(f"{args.text} has {ids.numel()} tokens; --prefill + --steps + 1 must fit in it")
    runs = {}
    with torch.inference_mode():
        for name, params in variants.items():
            t0 = time.perf_counter()
            s = StreamSession(model, tok, policy, chunk_size=512, **{**base, **params})
            logits = s.feed(ids[: args.prefill])
            nll, greedy = [], []
            for i in tqdm(range(args.prefill, args.prefill + args.steps), desc=name, leave=False):
                logp = torch.log_softmax(logits.float(), dim=-1)
                nll.append(-logp[ids[i]].item())
                greedy.append(int(logits.argmax()))
                logits = s.feed(ids[i : i + 1])
            runs[name] = {"params": s.policy.describe(), "mean_nll": sum(nll) / len(nll),
                          "perplexity": math.exp(sum(nll) / len(nll)), "nll": nll, "greedy": greedy,
                          "seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name}: perplexity {runs[name]['perplexity']:.4f} over {args.steps} decode steps", flush=True)
    ref = runs["reselect=1"]["greedy"]
    for r in runs.values():
        r["greedy_agrees_with_reselect1"] = sum(a == b for a, b in zip(r["greedy"], ref)) / len(ref)
    json.dump({"command": "benchmarks/choose_nll.py", "args": vars(args), "torch": torch.__version__, "runs": runs},
              open(args.out, "w"), indent=1)
    for name, r in runs.items():
        print(f"{name}: perplexity {r['perplexity']:.4f}, greedy agrees with reselect=1 at "
              f"{100 * r['greedy_agrees_with_reselect1']:.1f}% of steps")


if __name__ == "__main__":
    main()
