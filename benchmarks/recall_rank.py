"""Was a missed passkey a retrieval miss? The rank of the key's block among every stored block, per layer,
when `memory` chooses blocks for the question (issue 8).

Streams the prompt of `benchmarks/long_stream.py` (same key, depth, checkpoints and the 16 tokens generated at
each checkpoint, 1 thread, so the stream is the same token for token), then feeds the question and answers.
Every choice of blocks made from the question on is recorded: for each layer, the rank (0 = best) of the
blocks holding the key sentence under that layer's scores, and whether they were among the K chosen.

    python benchmarks/recall_rank.py --tokens 262144 --out docs/results/recall_rank_262k.json   # ~20 min
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_stream import CHECKPOINTS  # noqa: E402

from streamkv.evaluation.passkey import QUESTION, answer, make_key, make_prompt, score  # noqa: E402
from streamkv.models import load  # noqa: E402
from streamkv.policies import make_policy  # noqa: E402
from streamkv.session import StreamSession  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--rep-rule", default="mean", choices=["mean", "attention"])
    ap.add_argument("--store-parent", default=None, help="where the store's temporary directory goes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load(None, threads=1)
    key = make_key(0, args.tokens, 0.5, 0)
    prompt = make_prompt(tok, args.tokens, 0.5, key)
    q = tok(" " + QUESTION, add_special_tokens=False).input_ids
    body = prompt.ids[: len(prompt.ids) - len(q)]
    pol = make_policy("memory", model, store_dir=tempfile.mkdtemp(dir=args.store_parent), rep_rule=args.rep_rule)
    session = StreamSession(model, tok, pol, chunk_size=512)
    choose, rec, key_blocks, recording = pol._select, [], [], [False]

    def recorded(layer_idx, query, gap, window_start):  # `MemoryCache._select`, and the scores of every block
        ids = choose(layer_idx, query, gap, window_start)
        if recording[0]:
            scores = pol.block_scores(layer_idx, query, gap, window_start).sum(dim=0)  # [n], as `_select` ranks them
            rec.append({"layer": layer_idx, "q": query.shape[2], "seen": pol.seen,
                        "ranks": [int((scores > scores[b]).sum()) for b in key_blocks],
                        "chosen": [b in ids for b in key_blocks]})
        return ids

    pol._select = recorded
    cps = sorted(c for c in CHECKPOINTS if c < len(body)) + [len(body)]
    fed, t0 = 0, time.time()
    with torch.inference_mode():
        for cp in cps:
            while fed < cp:
                n = min(512, cp - fed)
                if fed <= prompt.key_start < fed + n:  # stream index = body index + the tokens generated so far
                    off = pol.seen - fed
                    key_blocks = sorted({(i + off - pol.sinks) // pol.block for i in range(prompt.key_start, prompt.key_end)})
                session.feed(body[fed : fed + n])
                fed += n
            if cp < len(body):
                for _ in session.generate_tokens(16, stop_on_eos=False):
                    pass
            print(cp, f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        recording[0] = True
        session.feed(q)
        text = answer(session, 10)
    result = {"command": " ".join(sys.argv), "tokens": args.tokens, "params": pol.describe(), "key": key, "answer": text,
              "correct": score(text, key), "key_blocks": key_blocks, "n_blocks": pol.store.n_blocks, "choices": rec}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    first = [c for c in rec if c["q"] > 1]
    print(json.dumps({"answer": text, "correct": result["correct"], "key_blocks": key_blocks, "n_blocks": result["n_blocks"],
                      "question_chunk_layers_with_key": sum(all(c["chosen"]) for c in first), "layers": len(first)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
