"""How a cache policy sees the queries: an attention function registered with transformers' attention interface.

Why: a `Cache` only sees keys and values (`update()` runs before attention). Policies that must *choose* with
the queries (retrieval memory picks blocks with them, H2O scores tokens by the attention they receive) need
the step in which attention is computed. transformers routes every modern decoder's attention through
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, so streamkv registers one more implementation,
"streamkv", and switches a model to it with the official `model.set_attn_implementation` (no patching).

How the function finds its cache: when a policy that wants the queries returns keys from `update()`, it
leaves a hook `(returned_key_tensor, callback)` in a thread-local slot. The model passes exactly that tensor
on to the attention function a few lines later; the function checks the *identity* (`key is returned`)
and calls the policy. Anything else (another cache, no cache, a policy without a hook) falls through to
PyTorch's SDPA, the model's default on CPU, with transformers' own SDPA masks (registered for "streamkv"
too), so a model switched to "streamkv" computes exactly what it did before for every other use.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "streamkv"
_slot = threading.local()


def set_hook(key: torch.Tensor, callback: Callable) -> None:
    """Called by a cache's `update()`: the next attention over `key` is computed by `callback(module, query,
    key, value, scaling)`, which returns attn_output [batch, q, heads, head_dim]."""
    _slot.hook = (key, callback)


def streamkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    hook = getattr(_slot, "hook", None)
    if hook is not None and hook[0] is key:
        _slot.hook = None
        return hook[1](module, query, key, value, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, streamkv_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_streamkv_attention(model) -> None:
    """Route the model's attention through `streamkv_attention` (idempotent)."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        model.set_attn_implementation(NAME)


def attend_parts(query: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]],
                 scaling: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Exact softmax attention of `query` over several key/value groups, each seen by its own rotation of the
    query (RoPE is relative: rotating the query instead of every key moves a whole group to another place).

    query [1, Hq, q, D]; each part: (rotated query [1, Hq, q, D] or the query itself, keys [1, Hkv, n, D],
    values [1, Hkv, n, Dv], bool mask [q, n] or None). Returns (output [1, q, Hq, Dv], per part the attention
    probabilities summed over the query heads of each KV head and over queries: [Hkv, n])."""
    b, hq, q, d = query.shape
    hkv = parts[0][1].shape[1]
    g = hq // hkv
    scores = []
    for q_rot, k, _v, mask in parts:
        qg = q_rot.reshape(b, hkv, g * q, d)  # [1, Hkv, g*q, D]: the query heads sharing one KV head
        s = torch.matmul(qg, k.transpose(-1, -2)).mul_(scaling).view(b, hkv, g, q, k.shape[2])  # [1,Hkv,g,q,n]
        if mask is not None:
            s.masked_fill_(~mask, float("-inf"))
        scores.append(s)
    probs = torch.softmax(torch.cat(scores, dim=-1), dim=-1, dtype=torch.float32).to(query.dtype)
    out, received, start = None, [], 0
    for s, (_q, _k, v, _m) in zip(scores, parts):
        p = probs[..., start : start + s.shape[-1]]  # [1, Hkv, g, q, n]
        start += s.shape[-1]
        o = torch.matmul(p.reshape(b, hkv, g * q, -1), v)  # [1, Hkv, g*q, Dv]
        out = o if out is None else out + o
        received.append(p.sum(dim=(0, 2, 3)).float())  # [Hkv, n]
    out = out.view(b, hkv * g, q, -1).transpose(1, 2)  # [1, q, Hq, Dv], as transformers expects
    return out.contiguous(), received
