"""Why does the MT-Bench recall check fail (issue 8)? Two diagnostics on the embedded model:

1. The whole MT-Bench session through `memory` (default settings): when the recall question is asked, do the
   layers attend the block holding the turn-1 code?
2. A control with a dense cache: the same fact, then the question after 0, 2 and 10 MT-Bench questions.

    python benchmarks/recall_diag.py        # ~5 min on 2 threads; prints its findings
"""
import time
from pathlib import Path

from streamkv import models
from streamkv.evaluation.chat import RECALL_CODE, RECALL_FACT, RECALL_QUESTION, load_questions
from streamkv.session import StreamSession

QUESTIONS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mt_bench.jsonl"


class Recording(StreamSession):
    """A session that keeps every token id it fed (to find where the code sits in the stream)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fed: list[int] = []

    def _forward(self, chunk, all_logits):
        self.fed.extend(chunk[0].tolist())
        return super()._forward(chunk, all_logits)


model, tok = models.load(None, threads=2)
s = Recording(model, tok, "memory", chunk_size=512)
gen = dict(max_new_tokens=16, temperature=0.0)
"".join(s.chat(RECALL_FACT, **gen))
qs = load_questions(str(QUESTIONS))
t0 = time.time()
for q in qs:
    for m in q["turns"]:
        "".join(s.chat(m, **gen))
print("turns done", s.policy.seen, round(time.time() - t0), "s", flush=True)
code = [tok.convert_tokens_to_ids(t) for t in tok.tokenize(RECALL_CODE)]
where = [i for i in range(200) if s.fed[i:i + len(code)] == code]
print("code tokens", tok.convert_ids_to_tokens(code), "at stream", where, flush=True)
p = s.policy
blocks = sorted({(i - p.sinks) // p.block for w in where for i in range(w, w + len(code))})
print("blocks holding it", blocks, "block size", p.block, "sinks", p.sinks, flush=True)
answer = []
first = True
for piece in s.chat(RECALL_QUESTION, **gen):
    if first:
        ret = {l: (ids if not isinstance(ids[0], list) else sorted({b for h in ids for b in h})) for l, ids in p.retrieved.items()}
        hit = sum(any(b in ids for b in blocks) for ids in ret.values())
        print(f"at the first answer token: {hit}/{len(ret)} layers attend a block holding the code; layer 0 chose {ret.get(0)}", flush=True)
        first = False
    answer.append(piece)
print("answer", repr("".join(answer)), flush=True)

# 2. the control: a dense cache, the question soon after the fact
for n_between in (0, 2, 10):
    d = StreamSession(model, tok, "dense", chunk_size=512)
    "".join(d.chat(RECALL_FACT, **gen))
    for q in qs[:n_between]:
        for m in q["turns"]:
            "".join(d.chat(m, **gen))
    print(f"dense, {n_between} questions between ({d.policy.seen} tokens):", repr("".join(d.chat(RECALL_QUESTION, **gen))),
          flush=True)
