"""llama.cpp as a peer: the same GGUF, the same tokens, its own context shift (`streamkv bench --peer llamacpp`).

Why a peer: a CPU user who wants an endless stream can run llama.cpp with its context shift, so that is the
speed to compare against. llama-cpp-python is an optional extra (`pip install 'streamkv[peer]'`; it builds
llama.cpp from source, ~5-15 min, never in CI). Only the embedded model has a GGUF file here (the one
streamkv converts), so the peer runs that model.

The context shift is llama.cpp's own CLI's: when the next batch does not fit its cache of `ctx` tokens, the
oldest half after the first `keep` tokens is removed and the rest shifted down (llama.cpp re-rotates their
keys). So the peer holds between ~ctx/2 and ctx tokens where `sink` holds its budget; the JSON records how
many it held at every measured point.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

PEERS = ("llamacpp",)
INSTALL = ("pip install 'streamkv[peer]' (llama-cpp-python; it builds llama.cpp from source, ~5-15 min; on a VM "
           "whose llama.cpp build crashes, build with CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON "
           "-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF\", see docs/RESULTS.md section 5)")


class PeerError(RuntimeError):
    pass


def check(peer: str, model_name: str | None) -> None:
    """Refuse before any work: an unknown peer, llama-cpp-python missing, or a model without a GGUF here."""
    if peer not in PEERS:
        raise PeerError(f"unknown --peer {peer!r}; choose one of: {', '.join(PEERS)}")
    if model_name is not None:
        raise PeerError("--peer llamacpp runs the embedded model's GGUF file; drop --model (other models have no GGUF here)")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise PeerError(f"--peer llamacpp needs llama-cpp-python, which is not installed: {INSTALL}") from None


class LlamaCppStream:
    """One endless stream through llama.cpp with its context shift."""

    def __init__(self, threads: int, ctx: int = 1024, keep: int = 4, batch: int = 512):
        import llama_cpp

        from ..models import embedded_gguf

        self.ctx, self.keep = ctx, keep
        self.version = llama_cpp.__version__
        self.gguf = embedded_gguf()
        self.llm = llama_cpp.Llama(model_path=str(self.gguf), n_ctx=ctx, n_batch=batch, n_ubatch=batch,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)

    @property
    def n_cached(self) -> int:
        return self.llm.n_tokens

    def feed(self, chunk: list[int]) -> None:
        llm = self.llm
        while llm.n_tokens + len(chunk) > self.ctx:  # context shift
            n_discard = (llm.n_tokens - self.keep) // 2
            llm._ctx.kv_cache_seq_rm(0, self.keep, self.keep + n_discard)
            llm._ctx.kv_cache_seq_shift(0, self.keep + n_discard, llm.n_tokens, -n_discard)
            llm.input_ids[self.keep : llm.n_tokens - n_discard] = llm.input_ids[self.keep + n_discard : llm.n_tokens].copy()
            llm.n_tokens -= n_discard
        llm.eval(chunk)

    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_seq_rm(0, 0, -1)


def bench_llamacpp(ids: list[int], points: list[int], *, steps: int, chunk_size: int, threads: int,
                   ctx: int = 1024, keep: int = 4) -> dict:
    """`bench_policy`'s measurement for llama.cpp: prefill in chunks to each point, then `steps` timed
    single-token steps; an entry in the same format (label 'llamacpp')."""
    stream = LlamaCppStream(threads, ctx=ctx, keep=keep, batch=min(chunk_size, ctx))
    batch = min(chunk_size, ctx // 2)
    for i in range(0, 600, batch):  # warm-up (first calls), not measured
        stream.feed(ids[i : min(600, i + batch)])
    stream.reset()
    load0 = os.getloadavg()
    fed, prefill_tokens, prefill_seconds, out = 0, 0, 0.0, []
    for point in points:
        t0, before = time.perf_counter(), fed
        while fed < point - 1:
            n = min(batch, point - 1 - fed)
            stream.feed(ids[fed : fed + n])
            fed += n
        prefill_tokens += fed - before
        prefill_seconds += time.perf_counter() - t0
        times, cached = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            stream.feed([ids[fed]])
            times.append(time.perf_counter() - t0)
            cached.append(stream.n_cached)
            fed += 1
        out.append({"position": fed, "ms_per_token": 1000 * statistics.fmean(times),
                    "ms_per_token_median": 1000 * statistics.median(times), "ms_per_token_min": 1000 * min(times),
                    "steps": steps, "tokens_cached": cached[-1], "tokens_cached_min_max": [min(cached), max(cached)],
                    "loadavg1": os.getloadavg()[0]})
        print(f"peer llamacpp: {out[-1]['ms_per_token']:.1f} ms/token at {fed}", file=sys.stderr, flush=True)
    return {"label": "llamacpp", "policy": "llamacpp", "engine": f"llama.cpp via llama-cpp-python {stream.version}",
            "params": {"ctx": ctx, "keep": keep, "gguf": stream.gguf.name}, "budget": ctx, "chunk_size": batch,
            "points": out, "stopped": None, "loadavg_before": list(load0), "loadavg_after": list(os.getloadavg()),
            "prefill": {"tokens": prefill_tokens, "seconds": round(prefill_seconds, 3),
                        "tokens_per_second": prefill_tokens / prefill_seconds if prefill_seconds else None}}
