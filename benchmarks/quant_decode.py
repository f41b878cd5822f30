"""Decode ms/token and prefill tokens/s for float32 vs bfloat16 vs int8 vs int4 weights (issue 10 figures).

Each setting runs in its own fresh process (in one process, torch's OpenMP thread pools of earlier runs
interfere with later ones) and the settings are alternated for --rounds rounds, in a rotated order each
round, so slow phases of a shared machine hit every setting. A child loads the embedded model with the
setting, warms up (one 600-token feed and 4 steps in a throwaway session: kernel JIT, first touch),
streams generated filler text through a `sink` cache (sinks=4, window=1020: 1,024 kept tokens), or with
`--policy memory` (or h2o, sirllm, duo: retrieval=memory) through that policy at its defaults, in 512-token chunks up to --position (prefill
tokens/s), then times --steps single-token decode steps there (teacher-forced: the same work as sampling
without the sampler). `memory` re-chooses its blocks every 4th step (eagerly, reading blocks back from
the store): its mean over the steps is what a user waits per token, and is reported beside the median. The JSON records lscpu (CPU model and
flags), torch version, threads and the load average around every child. With `llamacpp` in --settings the
peer runs too, in its own processes in the same rotation, and the summary gives each setting's ratio to it.
A setting may change the policy's parameters after a colon (`int4+compile:reselect=8`), so two variants of
one policy alternate in one run.

    nice -n 10 python benchmarks/quant_decode.py --rounds 3 --out docs/results/quant_decode.json \\
        --plot docs/results/quant_decode.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {  # label -> models.load keyword arguments
    "float32": {"dtype": "float32", "quantize": "none"},
    "bfloat16": {"dtype": "bfloat16", "quantize": "none"},
    "int8": {"dtype": "float32", "quantize": "int8"},
    "int4": {"dtype": "float32", "quantize": "int4"},
    # the same with the one-token step compiled (streamkv/compiled.py; compiled during the warm-up)
    "float32+compile": {"dtype": "float32", "quantize": "none", "compile": True},
    "int8+compile": {"dtype": "float32", "quantize": "int8", "compile": True},
    "int4+compile": {"dtype": "float32", "quantize": "int4", "compile": True},
}
# the peer: llama.cpp (llama-cpp-python, an optional extra that builds from source in ~15 min: never in CI)
# on the embedded model's own GGUF file (Q4_1 weights), with llama.cpp's context shift
PEER = "llamacpp"
PEER_CTX, PEER_KEEP = 1024, 4  # its KV cache size and the tokens its context shift keeps (as sink's 4 sinks)
POLICIES = {"sink": {"policy": "sink", "sinks": 4, "window": 1020},  # 1,024 kept tokens
            "memory": {"policy": "memory"},  # its defaults: 4 + 768..831 + 16 x 64 retrieved (up to 1,859 attended)
            "h2o": {"policy": "h2o"},  # its defaults: 4 sinks + 512 recent + 508 heavy per KV head (1,024 kept)
            "sirllm": {"policy": "sirllm"},  # the same budget, the heavy set by surprisal
            "duo": {"policy": "duo", "retrieval": "memory"}}  # bounded duo: 70% of the heads with a block store
CACHES = {"sink": "sink, sinks=4, window=1020 (1,024 kept tokens)",  # what the JSON says of each
          "memory": "memory, its defaults (4 sinks + 768..831 recent + 16 blocks of 64 retrieved)",
          "h2o": "h2o, its defaults (4 sinks + 512 recent + 508 heavy per KV head: 1,024 kept)",
          "sirllm": "sirllm, its defaults (4 sinks + 512 recent + 508 most surprising: 1,024 kept)",
          "duo": "duo, retrieval=memory, its defaults (every head 64 sinks + 256..319 recent; the retrieval heads, "
                 "70%, also 16 blocks of 64 retrieved)"}


def child(args) -> dict:
    import torch

    from streamkv import compiled
    from streamkv.evaluation.passkey import filler_text
    from streamkv.models import load
    from streamkv.session import StreamSession

    setting, overrides = split_setting(args.child)
    model, tok = load(None, threads=args.threads, **SETTINGS[setting])
    ids = torch.tensor(filler_text(tok, args.position + args.steps + 1), dtype=torch.long)
    policy = {**POLICIES[args.policy], **overrides}
    with torch.inference_mode():
        warm = StreamSession(model, tok, chunk_size=512, **policy)
        # first calls JIT oneDNN kernels and touch fresh memory: not what we measure; with compile, the
        # steps after the cache is full (sink: 1,024 tokens; memory: 16 blocks stored) compile the decode
        # step, also not measured
        n = {"sink": 1030, "memory": 1900, "h2o": 1100, "sirllm": 1100, "duo": 1700}[args.policy] if SETTINGS[setting].get("compile") else 600
        warm.feed(ids[:n])
        for i in range(n, n + 8):
            warm.feed(ids[i : i + 1])
        del warm
        session = StreamSession(model, tok, chunk_size=512, **policy)
        t0 = time.perf_counter()
        session.feed(ids[: args.position])
        prefill_s = time.perf_counter() - t0
        times = []
        for i in range(args.position, args.position + args.steps):
            t0 = time.perf_counter()
            session.feed(ids[i : i + 1])
            times.append(time.perf_counter() - t0)
    q = getattr(model, "streamkv_quantization", {})
    step = compiled.decode_step(model)
    return {"setting": args.child, **SETTINGS[setting], "policy": session.policy.describe(), "threads": torch.get_num_threads(),
            "compiled_steps": step.steps if step else 0, "compile_failed": step.failed if step else None,
            "position": args.position, "tokens_cached": session.stats()["tokens_cached"],
            "prefill_tokens": args.position, "prefill_seconds": prefill_s,
            "prefill_tokens_per_second": args.position / prefill_s,
            "decode_ms": [1000 * t for t in times], "decode_ms_median": 1000 * statistics.median(times),
            "decode_ms_mean": 1000 * statistics.fmean(times), "weight_bytes": q.get("weight_bytes"),
            "quantization": q}


def split_setting(label: str) -> tuple[str, dict]:
    """'int4+compile:reselect=8' -> ('int4+compile', {'reselect': 8}): a setting with policy parameters
    changed (as the CLI's `memory:reselect=8`), so two variants of one policy alternate in one run."""
    from streamkv.policies import parse_policy_spec

    try:  # the CLI's parser (its ',' between parameters is ';' here: --settings is a ','-separated list)
        setting, overrides = parse_policy_spec(label.replace(";", ","))
    except ValueError as e:
        raise SystemExit(f"setting {label!r}: {e}") from None
    if setting not in SETTINGS:
        raise SystemExit(f"unknown setting {setting!r}: choose from {', '.join(SETTINGS)} (then :key=value;...)")
    return setting, overrides


def child_llamacpp(args) -> dict:
    """The same token ids, position and timed steps through llama.cpp with its context shift
    (`streamkv.evaluation.peer.LlamaCppStream`, as `streamkv bench --peer llamacpp`): at the timed steps it
    holds between ~512 and 1,024 tokens (recorded), where `sink` holds 1,024."""
    from transformers import AutoTokenizer

    from streamkv.evaluation.passkey import filler_text
    from streamkv.evaluation.peer import LlamaCppStream
    from streamkv.models import embedded_gguf, resolve

    tok = AutoTokenizer.from_pretrained(resolve(None))
    ids = filler_text(tok, args.position + args.steps + 1)
    stream = LlamaCppStream(args.threads, ctx=PEER_CTX, keep=PEER_KEEP)
    for i in range(0, 600, 512):  # warm-up, as the streamkv children
        stream.feed(ids[i : min(600, i + 512)])
    stream.reset()
    t0 = time.perf_counter()
    for i in range(0, args.position, 512):
        stream.feed(ids[i : min(args.position, i + 512)])
    prefill_s = time.perf_counter() - t0
    times, cached = [], []
    for i in range(args.position, args.position + args.steps):
        t0 = time.perf_counter()
        stream.feed([ids[i]])
        times.append(time.perf_counter() - t0)
        cached.append(stream.n_cached)
    return {"setting": PEER, "engine": f"llama.cpp via llama-cpp-python {stream.version}",
            "weights": "the embedded GGUF (Q4_1)", "threads": args.threads, "position": args.position,
            "tokens_cached": cached[-1], "tokens_cached_min_max": [min(cached), max(cached)],
            "prefill_tokens": args.position, "prefill_seconds": prefill_s,
            "prefill_tokens_per_second": args.position / prefill_s,
            "decode_ms": [1000 * t for t in times], "decode_ms_median": 1000 * statistics.median(times),
            "decode_ms_mean": 1000 * statistics.fmean(times), "weight_bytes": embedded_gguf().stat().st_size,
            "quantization": {}}


def lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return {}
    rows = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Hypervisor vendor", "Flags")
    return {k: rows[k].strip() for k in keep if k in rows}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["summary"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for i, label in enumerate(labels):
        runs = [r for r in result["runs"] if r["setting"] == label]
        s = result["summary"][label]
        a.bar(i, s["decode_ms_median"], color="C0", label="median" if i == 0 else None)
        a.plot(i, s["decode_ms_mean"], "rv", ms=7, label="mean" if i == 0 else None)
        a.plot([i] * len(runs), [r["decode_ms_median"] for r in runs], "k.", ms=6)
        b.bar(i, s["prefill_tokens_per_second"], color="C1")
        b.plot([i] * len(runs), [r["prefill_tokens_per_second"] for r in runs], "k.", ms=6)
    a.legend(fontsize=8)
    for ax, title in ((a, f"decode ms/token, {result['cache'].split(' (')[0]}, position {result['position']}"),
                      (b, "prefill tokens/s (512-token chunks)")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title, fontsize=9)
    cpu = result["machine"]["lscpu"].get("Model name", "?")
    fig.suptitle(f"SmolLM2-135M, {cpu}, {result['threads']} threads; bar = median over rounds, dots = rounds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated subset of {', '.join(SETTINGS)}, and {PEER} (the peer, if llama-cpp-python "
                        "is installed: pip install llama-cpp-python, ~15 min to build); a setting may change the "
                        "policy's parameters after a colon, ';'-separated: int4+compile:reselect=8")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--position", type=int, default=2048, help="stream position of the decode steps")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--policy", default="sink", choices=list(POLICIES),
                   help="the cache the streamkv settings decode with (the peer always uses its context shift)")
    p.add_argument("--out", default="quant_decode.json")
    p.add_argument("--plot", default="", help="PNG (optional)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_llamacpp(args) if args.child == PEER else child(args)))
        return 0
    import torch
    import transformers

    settings = [s for s in args.settings.split(",") if s]
    for label in settings:
        if label != PEER:
            split_setting(label)  # an unknown setting or a malformed parameter: say so before any run
    result = {"command": " ".join(sys.argv), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "threads": args.threads, "position": args.position, "steps": args.steps, "rounds": args.rounds,
              "cache": CACHES[args.policy],
              "machine": {"lscpu": lscpu(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability()},
              "runs": []}
    for r in range(args.rounds):
        order = settings[r % len(settings):] + settings[: r % len(settings)]  # rotate who goes first
        for label in order:
            load0 = os.getloadavg()[0]
            cmd = [sys.executable, __file__, "--child", label, "--threads", str(args.threads),
                   "--position", str(args.position), "--steps", str(args.steps), "--policy", args.policy]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            run = json.loads(out.strip().splitlines()[-1])
            run.update(round=r, loadavg1_before=load0, loadavg1_after=os.getloadavg()[0])
            result["runs"].append(run)
            print(f"round {r} {label}: decode {run['decode_ms_median']:.1f} ms/token, prefill "
                  f"{run['prefill_tokens_per_second']:.0f} tok/s (load {load0:.1f})", file=sys.stderr, flush=True)
    result["summary"] = {}
    for label in settings:
        runs = [x for x in result["runs"] if x["setting"] == label]
        result["summary"][label] = {
            "decode_ms_median": statistics.median(x["decode_ms_median"] for x in runs),
            "decode_ms_mean": statistics.median(x["decode_ms_mean"] for x in runs),  # median over rounds of each run's mean
            "decode_ms_min_of_rounds": min(x["decode_ms_median"] for x in runs),
            "prefill_tokens_per_second": statistics.median(x["prefill_tokens_per_second"] for x in runs),
            "weight_bytes": runs[0]["weight_bytes"],
        }
    base = result["summary"].get("float32")
    if base:
        for s in result["summary"].values():
            s["decode_speedup_vs_float32"] = base["decode_ms_median"] / s["decode_ms_median"]
    peer = result["summary"].get(PEER)
    if peer:  # the ratios: streamkv decode ms / llama.cpp's, prefill tok/s / llama.cpp's (same run)
        for s in result["summary"].values():
            s["decode_ms_vs_llamacpp"] = s["decode_ms_median"] / peer["decode_ms_median"]
            s["decode_mean_vs_llamacpp"] = s["decode_ms_mean"] / peer["decode_ms_mean"]
            s["prefill_vs_llamacpp"] = s["prefill_tokens_per_second"] / peer["prefill_tokens_per_second"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.plot:
        plot(result, args.plot)
        result["plot"] = args.plot
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
