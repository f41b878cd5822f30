"""Cache policies, chosen by name. One small file per policy; the shared mechanism is in `base.py`.

    cache = make_policy("sink", model, sinks=4, window=1020)
    model.generate(input_ids, past_key_values=cache)        # a transformers Cache
    StreamSession(model, tokenizer, cache)                  # or the streaming runtime

Adding a policy: write `policies/<name>.py` with a `StreamingCache` subclass and add it to POLICIES.
"""
from __future__ import annotations

import inspect

from .base import StreamingCache
from .dense import DenseCache
from .duo import DuoCache
from .h2o import H2OCache
from .memory import MemoryCache
from .recompute import Recompute
from .sink import SinkCache
from .sirllm import SirLLMCache
from .window import WindowCache

POLICIES = {"dense": DenseCache, "window": WindowCache, "sink": SinkCache, "memory": MemoryCache, "h2o": H2OCache,
            "sirllm": SirLLMCache, "duo": DuoCache, "recompute": Recompute}


def policy_params(name: str) -> dict:
    """The parameters a policy takes, with their defaults (for --help and error messages)."""
    cls = POLICIES[name]
    sig = inspect.signature(cls.__init__)
    return {p: v.default for p, v in sig.parameters.items() if p not in ("self", "model")}


def check_policy_name(name: str, params: dict) -> dict:
    """The one check of a policy's name and parameter names (values are each policy's own to check).
    Returns its parameters with their defaults; ValueError saying what exists otherwise."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of: {', '.join(POLICIES)}")
    allowed = policy_params(name)
    unknown = set(params) - set(allowed)
    if unknown:
        raise ValueError(
            f"policy {name!r} takes {', '.join(allowed) or 'no parameters'}; got unknown {', '.join(sorted(unknown))}"
        )
    return allowed


def make_policy(name: str, model, **params):
    """Build the policy `name` for `model`. Unknown names or parameters raise ValueError saying what exists."""
    check_policy_name(name, params)
    return POLICIES[name](model, **params)


STRING_PARAMS = {"placement", "store_dir", "pattern", "retrieval", "selection", "rep_rule", "choose"}
FLOAT_PARAMS = {"decay", "sparsity"}  # every other policy parameter is an integer


def check_param_types(params: dict) -> None:
    """The one check of policy parameter *types* for values that come from outside (JSON, a spec string):
    strings for STRING_PARAMS (at most 256 characters), numbers for FLOAT_PARAMS, integers otherwise."""
    for k, v in params.items():
        if k in STRING_PARAMS:
            ok = isinstance(v, str) and len(v) <= 256
        elif k in FLOAT_PARAMS:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool)
        if not ok:
            raise ValueError(f"policy parameter {k}={v!r}: parameters are integers, except numbers for "
                             f"{', '.join(sorted(FLOAT_PARAMS))} and strings for {', '.join(sorted(STRING_PARAMS))}")


def split_policy_list(text: str) -> list[str]:
    """'sink:sinks=4,window=1020,window,dense' -> ['sink:sinks=4,window=1020', 'window', 'dense'].
    An item with '=' but no ':' continues the parameters of the previous policy."""
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item:
            if not specs or ":" not in specs[-1]:
                raise ValueError(f"policy parameter {item!r} in {text!r} does not follow a 'name:key=value' policy")
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def max_resident_tokens(name: str, params: dict) -> int | None:
    """Upper bound on the tokens whose keys/values one policy holds in memory at once (buffer slots plus
    pristine sink copies, counted as whole tokens), from its parameters alone: a server prices a session
    with it before building anything. None = unbounded (`dense`). Raises ValueError for unknown names or
    parameters and for non-integer values."""
    p = {**check_policy_name(name, params), **params}
    if any(not isinstance(v, int) or isinstance(v, bool) for k, v in p.items() if k not in STRING_PARAMS | FLOAT_PARAMS and v is not None):
        raise ValueError(f"policy {name!r} parameters must be integers, got {params}")
    if name == "duo":
        if p["retrieval"] == "memory":  # as `memory` (its defaults where not given)
            mem = policy_params("memory")
            block, topk = p["block"] or mem["block"], p["topk"] or mem["topk"]
            return 2 * p["sinks"] + p["window"] + block + topk * block
        if p["sparsity"] < 1:  # retrieval heads keep every token
            return None
    if name == "dense":
        return None
    if name in ("sink", "duo"):
        return p["window"] + 2 * p["sinks"] + 1  # budget + the step's extra slot + pristine sink keys
    if name == "memory":  # slot table (sinks + W..W+B-1 + 1) + pristine sinks + K fetched blocks per layer
        return 2 * p["sinks"] + p["window"] + p["block"] + p["topk"] * p["block"]
    if name in ("h2o", "sirllm"):  # slot table (sinks + window + 1) + pristine sinks + each head's heavy set
        return 2 * p["sinks"] + p["window"] + 1 + p["heavy"]
    return p["window"] + 1  # window: budget + 1 slot; recompute: the window re-encoded at every step


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """'sink:sinks=4,window=1020' -> ('sink', {'sinks': 4, 'window': 1020}). Values are integers, except for
    the parameters a policy declares as strings (`memory`: placement, store_dir)."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad policy parameter {item!r} in {spec!r}; expected key=value")
        key = key.strip()
        if key in STRING_PARAMS:
            params[key] = value.strip()
            continue
        kind = float if key in FLOAT_PARAMS else int
        try:
            params[key] = kind(value)
        except ValueError:
            raise ValueError(f"policy parameter {key}={value!r} must be {'a number' if kind is float else 'an integer'}") from None
    return name.strip(), params


__all__ = ["POLICIES", "StreamingCache", "DenseCache", "MemoryCache", "H2OCache", "SirLLMCache", "DuoCache", "WindowCache", "SinkCache", "Recompute", "make_policy",
           "parse_policy_spec", "policy_params", "split_policy_list", "check_policy_name"]
