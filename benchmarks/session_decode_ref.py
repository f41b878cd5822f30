"""Reference for server_bench.py: the same turn shape (a full sink 4+1020 cache, a ~20-token user turn, 32
greedy tokens) run in-process on a StreamSession, without HTTP, threads or snapshots. The difference to the
server's figures is the server's overhead.

    python benchmarks/session_decode_ref.py [--out docs/results/session_decode_ref.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamkv.models import load  # noqa: E402
from streamkv.session import StreamSession  # noqa: E402

FILLER = ("The river wound through the valley past old mills and quiet farms, and the travellers spoke of harvests, "
          "of storms that came from the western hills, of markets in distant towns. ")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "session_decode_ref.json"))
    args = ap.parse_args()
    model, tok = load(None, threads=args.threads)
    s = StreamSession(model, tok, "sink", sinks=4, window=1020)
    list(s.chat(FILLER * 40, max_new_tokens=1))
    runs = []
    for k in range(args.repeats):
        t0 = time.perf_counter()
        times = []
        for piece in s.chat(f"In one sentence, what was part {k} about?", max_new_tokens=32):
            times.append(time.perf_counter())
        runs.append({"ttft_s": round(times[0] - t0, 4),
                     "per_token_s": round((times[-1] - times[0]) / max(1, len(times) - 1), 4), "pieces": len(times)})
    result = {"what": "in-process StreamSession, sink 4+1020, full cache", "tokens_seen": s.stats()["tokens_seen"],
              "threads": args.threads, "loadavg": os.getloadavg(), "runs": runs,
              "ttft_s_median": sorted(r["ttft_s"] for r in runs)[len(runs) // 2],
              "per_token_s_median": sorted(r["per_token_s"] for r in runs)[len(runs) // 2]}
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
