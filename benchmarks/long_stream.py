"""One long stream through one policy: recall at the end, and what it costs on the way.

The stream is the passkey prompt (streamkv.evaluation.passkey) of `--tokens` tokens with the key at
`--depth`. At each checkpoint the stream is paused and the script records:
  - prefill throughput over the segment since the last checkpoint (tokens/s, chunks of `--chunk-size`),
  - decode latency: `--decode-steps` greedy tokens, timed one by one (median and all). These tokens go
    into the stream, as they would in a chat; the filler then continues,
  - RSS (VmRSS) and its peak (VmHWM), the policy's resident KV bytes, and for `memory` its store
    (blocks in RAM / on disk, bytes per tier, index bytes) and the retrieval cost per step over the
    segment (time spent choosing and fetching blocks, all layers, per forward),
  - the load average (this machine is shared; seconds are only comparable inside one run).
At the end the question is fed and the answer generated.

Each policy runs in its own process (one engine per process: OpenMP threads of two engines in one
process starve each other). Run `sink` and `memory` one after the other and compare within a run:

    python benchmarks/long_stream.py --policy memory --tokens 262144 --out docs/results/long_stream_memory.json
    python benchmarks/long_stream.py --policy sink --tokens 65536 --out docs/results/long_stream_sink.json
    python benchmarks/long_stream.py --plot docs/results/long_stream.png docs/results/long_stream_*.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamkv.evaluation.common import cpu_model  # noqa: E402

CHECKPOINTS = (8192, 16384, 32768, 65536, 98304, 131072, 163840, 196608, 229376, 262144)


def _proc_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _malloc() -> dict:
    """glibc's heap accounting (mallinfo2), in MiB: what RSS growth is made of. `heap_in_use` is live small/medium
    allocations, `heap_free` memory malloc holds but does not use (fragmentation), `mmapped` large allocations
    (tensors above the mmap threshold). Empty where the C library has no mallinfo2 (not glibc >= 2.33)."""
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    from streamkv.policies.blockstore import glibc

    libc = glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return {}
    libc.mallinfo2.restype = Mallinfo2
    m = libc.mallinfo2()
    mib = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {"heap_mib": mib(m.arena), "heap_in_use_mib": mib(m.uordblks), "heap_free_mib": mib(m.fordblks),
            "mmapped_mib": mib(m.hblkhd), "mmapped_chunks": m.hblks}


def _cpu() -> dict:
    model, flags = cpu_model()
    return {"machine": platform.machine(), "cores": os.cpu_count(), "model": model, "flags": flags}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def run(args) -> dict:
    import torch

    from streamkv.evaluation.common import parse_policies
    from streamkv.evaluation.passkey import QUESTION, answer, make_key, make_prompt, score
    from streamkv.models import load
    from streamkv.session import StreamSession

    model, tok = load(None, threads=args.threads)
    spec = parse_policies([args.policy], default="memory")[0]
    key = make_key(args.seed, args.tokens, args.depth, 0)
    prompt = make_prompt(tok, args.tokens, args.depth, key)
    q = tok(" " + QUESTION, add_special_tokens=False).input_ids
    body = prompt.ids[: len(prompt.ids) - len(q)]
    store_root = Path(tempfile.mkdtemp(prefix="long_stream_", dir=args.store_parent))
    params = dict(spec.params)
    if spec.name in ("memory",) or params.get("retrieval") == "memory":
        params.setdefault("store_dir", str(store_root))
    from streamkv.policies import make_policy

    policy = make_policy(spec.name, model, **params)
    session = StreamSession(model, tok, policy, chunk_size=args.chunk_size)
    checkpoints = sorted(c for c in set(args.checkpoints) if c < len(body)) + [len(body)]
    rows, fed, t_seg, last_retr, last_steps = [], 0, time.perf_counter(), 0.0, 0
    steps = 0
    from tqdm import tqdm

    bar = tqdm(total=len(body), unit="tok", desc=spec.label, file=sys.stderr, mininterval=5.0, disable=args.quiet)
    with torch.inference_mode():
        for cp in checkpoints:
            seg_tokens = 0
            while fed < cp:
                n = min(args.chunk_size, cp - fed)
                session.feed(body[fed : fed + n])
                fed += n
                seg_tokens += n
                steps += 1
                bar.update(n)
            seg_s = time.perf_counter() - t_seg
            st = session.stats()
            retr = st.get("retrieval_seconds", 0.0)
            row = {"position": policy.seen, "fed": fed, "segment_tokens": seg_tokens, "segment_seconds": round(seg_s, 2),
                   "prefill_tok_s": round(seg_tokens / seg_s, 1) if seg_s > 0 else None,
                   "prefill_retrieval_ms_per_step": round(1000 * (retr - last_retr) / max(1, steps - last_steps), 3),
                   "rss_mib": round(_proc_kib("VmRSS") / 1024, 1), "rss_peak_mib": round(_proc_kib("VmHWM") / 1024, 1),
                   "rss_anon_mib": round(_proc_kib("RssAnon") / 1024, 1), "rss_file_mib": round(_proc_kib("RssFile") / 1024, 1),
                   **_malloc(),
                   "kv_resident_bytes": policy.used_bytes() if hasattr(policy, "used_bytes") else policy.nbytes(),
                   "store_dir_bytes": _dir_bytes(store_root), "loadavg": os.getloadavg(),
                   **{k: v for k, v in st.items() if k not in ("store_dir",)}}
            if cp < len(body) and args.decode_steps:
                times, r0, t = [], retr, time.perf_counter()
                for _tok, _piece in session.generate_tokens(args.decode_steps, stop_on_eos=False):
                    now = time.perf_counter()
                    times.append(1000 * (now - t))
                    t = now
                times = times[: args.decode_steps]
                st2 = session.stats()
                row["decode_ms"] = [round(x, 2) for x in times]
                row["decode_ms_median"] = round(sorted(times)[len(times) // 2], 2)
                row["decode_retrieval_ms_per_step"] = round(1000 * (st2.get("retrieval_seconds", 0.0) - r0) / len(times), 3)
                retr = st2.get("retrieval_seconds", 0.0)
            rows.append(row)
            print(json.dumps({k: row[k] for k in ("position", "prefill_tok_s", "decode_ms_median", "rss_mib", "store_dir_bytes")
                              if k in row}), file=sys.stderr, flush=True)
            last_retr, last_steps, t_seg = retr, steps, time.perf_counter()
        bar.close()
        session.feed(q)
        text = answer(session, 10)
    result = {
        "benchmark": "long_stream", "policy": spec.label, "params": policy.describe(), "tokens": len(prompt.ids),
        "depth": args.depth, "actual_depth": round(prompt.actual_depth, 4), "key": key,
        "key_distance": prompt.key_distance, "answer": text, "correct": score(text, key),
        "chunk_size": args.chunk_size, "decode_steps": args.decode_steps, "threads": args.threads,
        "torch": torch.__version__, "cpu": _cpu(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "checkpoints": rows,
    }
    shutil.rmtree(store_root, ignore_errors=True)
    return result


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for p in paths:
        r = json.loads(Path(p).read_text())
        rows = r["checkpoints"]
        x = [row["position"] / 1000 for row in rows]
        par = r.get("params", {})
        rule = f", {par.get('rep_rule', 'attention')} reps, reselect {par.get('reselect', 1)}" if r["policy"] == "memory" else ""
        lab = f"{r['policy']}{rule} ({'recalled' if r['correct'] else 'missed'} the key)"
        dec = [(xx, row["decode_ms_median"]) for xx, row in zip(x, rows) if "decode_ms_median" in row]
        axes[0, 0].plot(*zip(*dec), marker="o", label=lab)
        axes[0, 1].plot(x, [row["rss_mib"] for row in rows], marker="o", label=lab)
        axes[1, 0].plot(x, [row["store_dir_bytes"] / 2**30 for row in rows], marker="o", label=lab)
        if any(row.get("prefill_retrieval_ms_per_step") for row in rows):
            axes[1, 1].plot(x, [row["prefill_retrieval_ms_per_step"] for row in rows], marker="o", label=lab + ", prefill chunk")
            axes[1, 1].plot(*zip(*[(xx, row["decode_retrieval_ms_per_step"]) for xx, row in zip(x, rows)
                                   if "decode_retrieval_ms_per_step" in row]), marker="s", label=lab + ", decode step")
    for ax, title in zip(axes.flat, ("decode latency (ms/token, median)", "RSS (MiB)", "block store on disk (GiB)",
                                     "retrieval cost per forward (ms, all layers)")):
        ax.set_title(title)
        ax.set_xlabel("stream position (k tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="memory", help="policy spec, NAME or NAME:key=value,... (default: memory)")
    ap.add_argument("--tokens", type=int, default=262144, help="stream length (default: 262144)")
    ap.add_argument("--depth", type=float, default=0.5, help="depth of the pass key (default: 0.5)")
    ap.add_argument("--checkpoints", type=lambda s: [int(x) for x in s.split(",")], default=list(CHECKPOINTS))
    ap.add_argument("--decode-steps", type=int, default=16, help="tokens decoded (and timed) at each checkpoint")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-parent", default=None, help="where the memory store's temporary directory goes")
    ap.add_argument("--out", default=None, help="result JSON")
    ap.add_argument("--plot", default=None, help="plot these result JSONs (positional) into this PNG and exit")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("results", nargs="*")
    args = ap.parse_args()
    if args.plot:
        plot(args.results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    result = run(args)
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(json.dumps({k: result[k] for k in ("policy", "tokens", "key", "answer", "correct")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
