"""Admission by cost: what a session or request would cost, decided before anything is allocated.

A session's price is the memory it may hold while resident and the compute one of its decode steps takes.
Both come from the policy name and parameters alone (`max_resident_tokens`, pure arithmetic), so a request
asking for a 20-million-token window is refused with a 400 naming the limit, not discovered by the kernel's
OOM killer one turn later.

    resident bytes = kv_tier_bytes(model, policy, max_resident_tokens(policy))  (the KV tier: that many
                     tokens per layer, local layers their window, a hybrid's recurrent state)
                   + sum(store_bytes(policy, params, cfg))                      (a block store's RAM tier and index)
                   + vocab * 4                                                 (the next-token logits)

A session also needs memory for a moment: a forward of one prefill chunk (activations, freed when it
returns: `forward_bytes`), a snapshot being written (a compact copy of what it keeps) and one being read
(its file's bytes). Those are not held by every resident session at once, only by the few threads that
run them, so the manager reserves them per thread, not per session (`transient_reserve`): with W compute
threads and 2 I/O threads, the W largest compute transients and the 2 largest snapshots of the resident
sessions. Before this, a load test went 0.7% over the memory budget by exactly these bytes.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

import psutil
import torch

from ..models import cache_footprint, kv_bytes_per_token
from ..rope import text_config
from ..policies import make_policy, max_resident_tokens, policy_params
from ..policies.base import layer_windows
from .config import MIB, ServerConfig
from .errors import BadRequest

_MEMORY_DEFAULTS = policy_params("memory")
SERVER_CHOSEN = {"store_dir", "pattern"}  # policy parameters the server sets (a client must not pick a path on its disk)


def server_params(cfg: ServerConfig, name: str, params: dict) -> dict:
    """The parameters a session is built with: the client's, plus those the server sets (duo's pattern)."""
    return {**params, "pattern": cfg.duo_pattern} if name == "duo" else params

def store_bytes(name: str, p: dict, cfg: ServerConfig) -> tuple[int, int]:
    """RAM a policy holds beyond the KV tier, as (block-store RAM tier, index of representative keys), for
    the policies that keep evicted KV in a block store (`memory`; `duo` with retrieval=memory, priced as if
    every head were a retrieval head); (0, 0) for the others.
    * The RAM tier: its cap (between steps it may hold one chunk's blocks more, not priced). A snapshot does
      not copy it (it is flushed to the store's own files).
    * The index grows with the store: reps/block of the keys in float16 (a quarter of float32 K+V per `reps`
      per `block`), bounded by this server's per-session disk quota. A snapshot copies it."""
    if not (name == "memory" or (name == "duo" and p.get("retrieval") == "memory")):
        return 0, 0
    get = lambda k: p.get(k) if p.get(k) is not None else _MEMORY_DEFAULTS[k]  # noqa: E731
    return get("ram_mb") * MIB, cfg.max_session_disk_bytes * get("reps") // (4 * get("block"))


@dataclass(frozen=True)
class Price:
    kv_bytes: int  # the KV tier at full budget
    extra_bytes: int  # other RAM tiers
    logits_bytes: int
    step_tokens: int  # tokens through the model per decode step
    forward_bytes: int = 0  # activations of one forward of a prefill chunk (transient)
    snapshot_extra_bytes: int = 0  # the part of extra_bytes a snapshot copies

    @property
    def resident_bytes(self) -> int:
        return self.kv_bytes + self.extra_bytes + self.logits_bytes

    @property
    def snapshot_bytes(self) -> int:
        """The most a snapshot of it holds: a compact copy of the KV tier, the logits, what else it saves."""
        return self.kv_bytes + self.logits_bytes + self.snapshot_extra_bytes

    @property
    def compute_transient(self) -> int:
        """What a compute thread may allocate for this session at once: a forward, or loading its snapshot
        (the file's bytes)."""
        return max(self.forward_bytes, self.snapshot_bytes)

    @property
    def io_transient(self) -> int:
        """What an I/O thread may allocate for it: the compact copy of its state a snapshot is written from."""
        return self.snapshot_bytes


@dataclass(frozen=True)
class _Dims:
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    elem: int  # bytes per activation element
    kv_token: int  # K+V bytes of one token, all layers (models.kv_bytes_per_token)


def _dims(model) -> _Dims:
    c = text_config(model.config)
    hq = c.num_attention_heads
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    if isinstance(inter, (list, tuple)):  # per-layer widths (e.g. Gemma 3n): the widest layer
        inter = max(inter)
    return _Dims(c.hidden_size, inter, hq, getattr(c, "num_key_value_heads", None) or hq,
                 getattr(c, "head_dim", None) or c.hidden_size // hq, c.vocab_size, c.num_hidden_layers,
                 torch.finfo(model.dtype).bits // 8, kv_bytes_per_token(model))


# Per-policy activations of one forward beyond the common part (bytes), for policies that compute more.
FORWARD_EXTRA_BYTES: dict[str, Callable[[_Dims, int, int], int]] = {
    # h2o: the attention each kept key received from every query of the chunk, float32 [Hq, chunk, keys]
    # (exponentiated in place, then summed per key)
    "h2o": lambda d, chunk, tokens: 4 * d.q_heads * chunk * (tokens + chunk),
    # sirllm: float32 logits at every position of the chunk (the surprisal of each fed token), their
    # log-softmax and the gathered values
    "sirllm": lambda d, chunk, tokens: 3 * 4 * chunk * d.vocab,
    # memory: the query seen by more groups (sinks, retrieved blocks, window, new: each its own rotated copy
    # and partial output), and the retrieved blocks read and rotated into place
    "memory": lambda d, chunk, tokens: _more_parts(d, chunk) + _rerotate(d, tokens) + _evicted(d, chunk),
    # duo: its head runs of two kinds each attend their own groups (with retrieval=memory, the blocks are
    # fetched for the retrieval heads only: within the common re-rotation term)
    "duo": lambda d, chunk, tokens: _more_parts(d, chunk) + _evicted(d, chunk),
}


def _evicted(d: _Dims, chunk: int) -> int:
    """The keys/values a chunk evicts, every layer's, held until the step ends and hands them to the store."""
    return chunk * d.kv_token


def _more_parts(d: _Dims, chunk: int) -> int:
    """Three more key groups than a sink cache attends: per group a rotated query, its rotation's
    temporaries and a partial output, [1, Hq, chunk, D] each."""
    return 3 * 4 * chunk * d.q_heads * d.head_dim * d.elem


def _rerotate(d: _Dims, tokens: int) -> int:
    """One layer's kept keys/values, three copies (read, rotate, concatenate)."""
    return 3 * tokens * d.kv_token // d.layers


def forward_bytes(model, name: str, tokens: int, chunk: int) -> int:
    """Upper bound on what one forward of `chunk` new tokens over `tokens` kept ones allocates beyond the
    caches, freed when it returns. Layers run one after another and free their intermediates, so it is one
    layer's working set: per new token the residual stream and norms (~6 x hidden), q/k/v, the MLP (3 x
    intermediate); the layer's kept keys/values re-rotated after a position restart (3 copies); what the
    policy adds (FORWARD_EXTRA_BYTES); 2 MiB of small tensors. Checked against torch's profiler on every
    policy (tests/test_server_admission.py)."""
    d = _dims(model)
    per_token = d.elem * (6 * d.hidden + 3 * d.intermediate + (d.q_heads + 2 * d.kv_heads) * d.head_dim)
    extra = FORWARD_EXTRA_BYTES.get(name, lambda *a: 0)(d, chunk, tokens)
    return chunk * per_token + _rerotate(d, tokens) + extra + 2 * MIB


def transient_reserve(prices: list[Price], compute_threads: int, io_threads: int) -> int:
    """Bytes to keep free for what the running threads may allocate at once (see the module docstring)."""
    top = lambda xs, k: sum(sorted(xs, reverse=True)[:k])  # noqa: E731
    return top([p.compute_transient for p in prices], compute_threads) + top([p.io_transient for p in prices], io_threads)


def price(model, name: str, params: dict, cfg: ServerConfig) -> Price:
    tokens = max_resident_tokens(name, params)  # ValueError for unknown policies/parameters
    if tokens is None:
        raise ValueError(f"policy {name!r} keeps every token: its memory is unbounded")
    ram_tier, index = store_bytes(name, params, cfg)
    step = params.get("window", 1024) + 1 if name == "recompute" else 1
    fwd = forward_bytes(model, name, tokens, max(cfg.chunk_size, step))
    return Price(kv_tier_bytes(model, name, params, tokens), ram_tier + index, model.config.vocab_size * 4, step, fwd, index)


def kv_tier_bytes(model, name: str, params: dict, tokens: int) -> int:
    """What a session's cache holds at most: `tokens` per layer that stores KV, at that layer's own size per
    token; a local (sliding-window) layer only its window W when the policy's recent window covers it (it
    keeps its own buffers then, `LocalLayer`); plus a hybrid's recurrent state (constant)."""
    per_layer, state = cache_footprint(model)  # bytes per token of each layer, the recurrent state
    recent = {**policy_params(name), **params}.get("window") if name != "recompute" else None
    windows = layer_windows(model, text_config(model.config))
    windows += [None] * (len(per_layer) - len(windows))

    def held(w):  # tokens one layer holds
        return min(tokens, w) if w is not None and recent is not None and recent >= w - 1 else tokens

    return sum(b * held(w) for b, w in zip(per_layer, windows)) + state


def resolve_budgets(cfg: ServerConfig) -> None:
    """Fill the budgets left unset from this machine: all resident sessions may use half the memory that is
    available now (the model is already loaded), one session its share of that, and one key half the free
    disk under the data folder (at most 16 GiB)."""
    if cfg.max_cache_bytes is None:
        cfg.max_cache_bytes = psutil.virtual_memory().available // 2
    if cfg.max_session_bytes is None:
        cfg.max_session_bytes = cfg.max_cache_bytes // max(1, cfg.max_resident)
    if cfg.max_disk_bytes_per_key is None:
        path = cfg.data_dir if os.path.exists(cfg.data_dir) else os.path.dirname(os.path.abspath(cfg.data_dir))
        cfg.max_disk_bytes_per_key = min(16 * 1024 * MIB, shutil.disk_usage(path).free // 2)


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def check_policy(cfg: ServerConfig, model, name: str, params: dict) -> Price:
    """Admit a policy a client asked for, or raise BadRequest naming the limit it breaks. Nothing is allocated
    before the price is known to fit."""
    if name not in cfg.allowed_policies:
        raise BadRequest(f"policy {name!r} is not served; choose one of: {', '.join(cfg.allowed_policies)}",
                         param="policy", code="policy_not_allowed")
    chosen = SERVER_CHOSEN & set(params)
    if chosen:
        raise BadRequest(f"policy parameter {', '.join(sorted(chosen))} is set by the server, not by clients",
                         param="policy", code="invalid_value")
    for key, limit in (("window", cfg.max_window), ("sinks", cfg.max_sinks)):
        value = params.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > limit:
            raise BadRequest(f"policy {key}={value} is above this server's limit of {limit} (--max-{key})",
                             param="policy", code="policy_limit")
    try:
        p = price(model, name, params, cfg)
    except ValueError as e:
        raise BadRequest(str(e), param="policy", code="invalid_value") from None
    if p.resident_bytes > cfg.max_session_bytes:
        raise BadRequest(f"policy {name} {params} needs up to {mib(p.resident_bytes)} of memory; this server allows "
                         f"{mib(cfg.max_session_bytes)} per session "
                         "(--max-session-mb): choose a smaller window", param="policy", code="policy_too_large")
    at_once = p.resident_bytes + transient_reserve([p], cfg.workers, cfg.io_threads)
    if cfg.max_cache_bytes is not None and at_once > cfg.max_cache_bytes:
        raise BadRequest(f"policy {name} {params} needs up to {mib(at_once)} of memory while a prefill chunk of "
                         f"{cfg.chunk_size} tokens runs or a snapshot is written ({mib(p.resident_bytes)} held); "
                         f"this server allows {mib(cfg.max_cache_bytes)} in all (--max-cache-mb): choose a "
                         "smaller window, or start the server with a smaller --chunk-size",
                         param="policy", code="policy_too_large")
    if p.step_tokens > cfg.max_step_tokens:
        raise BadRequest(f"policy {name} {params} runs {p.step_tokens} tokens through the model per generated token; "
                         f"this server allows {cfg.max_step_tokens} (--max-step-tokens)", param="policy",
                         code="policy_too_costly")
    try:  # the remaining checks (e.g. sinks < budget) are the policy's own; it is small enough to build now
        make_policy(name, model, **server_params(cfg, name, params))
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), param="policy", code="invalid_value") from None
    return p
