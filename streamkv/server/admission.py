"""Admission by cost: what a session or request would cost, decided before anything is allocated.

A session's price is the memory it may hold while resident and the compute one of its decode steps takes.
Both come from the policy name and parameters alone (`max_resident_tokens`, pure arithmetic), so a request
asking for a 20-million-token window is refused with a 400 naming the limit, not discovered by the kernel's
OOM killer one turn later.

    resident bytes = max_resident_tokens(policy) * kv_bytes_per_token(model)   (the KV tier)
                   + EXTRA_RESIDENT_BYTES[policy](model, params, cfg)          (other RAM tiers, e.g. a block store)
                   + vocab * 4                                                 (the next-token logits)
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Callable

import psutil

from ..models import kv_bytes_per_token
from ..policies import make_policy, max_resident_tokens, policy_params
from .config import MIB, ServerConfig
from .errors import BadRequest

_MEMORY_DEFAULTS = policy_params("memory")
SERVER_CHOSEN = {"store_dir", "pattern"}  # policy parameters the server sets (a client must not pick a path on its disk)


def server_params(cfg: ServerConfig, name: str, params: dict) -> dict:
    """The parameters a session is built with: the client's, plus those the server sets (duo's pattern)."""
    return {**params, "pattern": cfg.duo_pattern} if name == "duo" else params

# Per-policy RAM held beyond the KV tier (bytes), for policies that keep evicted KV in memory. A policy
# without an entry holds nothing else.
EXTRA_RESIDENT_BYTES: dict[str, Callable[[object, dict, ServerConfig], int]] = {
    # memory: its store's RAM tier (the cap; between steps it may hold one chunk's blocks more, not priced)
    # and the index of representative keys, which grows with the store: reps/block of the keys in float16
    # (a quarter of float32 K+V per `reps` per `block`), bounded by this server's per-session disk quota.
    "memory": lambda model, p, cfg: _store_bytes(p, cfg),
    # duo with retrieval=memory: the same store, for its retrieval heads only (priced as if all were)
    "duo": lambda model, p, cfg: _store_bytes(p, cfg) if p.get("retrieval") == "memory" else 0,
}


def _store_bytes(p: dict, cfg: ServerConfig) -> int:
    get = lambda k: p.get(k) if p.get(k) is not None else _MEMORY_DEFAULTS[k]  # noqa: E731
    return get("ram_mb") * MIB + cfg.max_session_disk_bytes * get("reps") // (4 * get("block"))


@dataclass(frozen=True)
class Price:
    kv_bytes: int  # the KV tier at full budget
    extra_bytes: int  # other RAM tiers
    logits_bytes: int
    step_tokens: int  # tokens through the model per decode step

    @property
    def resident_bytes(self) -> int:
        return self.kv_bytes + self.extra_bytes + self.logits_bytes


def price(model, name: str, params: dict, cfg: ServerConfig) -> Price:
    tokens = max_resident_tokens(name, params)  # ValueError for unknown policies/parameters
    if tokens is None:
        raise ValueError(f"policy {name!r} keeps every token: its memory is unbounded")
    extra = EXTRA_RESIDENT_BYTES.get(name, lambda m, p, c: 0)(model, params, cfg)
    step = params.get("window", 1024) + 1 if name == "recompute" else 1
    return Price(tokens * kv_bytes_per_token(model), extra, model.config.vocab_size * 4, step)


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
    if p.step_tokens > cfg.max_step_tokens:
        raise BadRequest(f"policy {name} {params} runs {p.step_tokens} tokens through the model per generated token; "
                         f"this server allows {cfg.max_step_tokens} (--max-step-tokens)", param="policy",
                         code="policy_too_costly")
    try:  # the remaining checks (e.g. sinks < budget) are the policy's own; it is small enough to build now
        make_policy(name, model, **server_params(cfg, name, params))
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), param="policy", code="invalid_value") from None
    return p
