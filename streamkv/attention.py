"""How a cache policy sees the queries: an attention function registered with transformers' attention interface.

Why: a `Cache` only sees keys and values (`update()` runs before attention). Policies that must *choose* with
the queries (retrieval memory picks blocks with them, H2O scores tokens by the attention they receive) need
the step in which attention is computed. transformers routes every modern decoder's attention through
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`, so streamkv registers one more implementation,
"streamkv", and switches a model to it with the official `model.set_attn_implementation` (no patching).

How the function finds its cache: when a policy that wants the queries returns keys from `update()`, it
leaves a hook `(returned_key_tensor, callback)` in a thread-local slot. The model passes exactly that tensor
on to the attention function a few lines later; the function checks the *identity* (`key is returned`)
and calls the policy (with the model's mask as `attention_mask`: a hook may check it). Anything else (another cache, no cache, a policy without a hook) falls through to
PyTorch's SDPA, the model's default on CPU, with transformers' own SDPA masks (registered for "streamkv"
too), so a model switched to "streamkv" computes exactly what it did before for every other use.

A compiled decode step (compiled.py) cannot go through a thread-local slot, so there the policy's fixed-shape
step travels the other way transformers passes things to attention functions: as a keyword argument of the
model's forward (`streamkv_static`), which every decoder hands on, layer by layer, to its attention function.
The cache counts the layers it served and refuses a model that dropped it (`StreamingCache.check_static`).

Models whose attention SDPA cannot express (Gemma 2's logit soft-capping, gpt-oss's learned sinks) attend
with their module's own `eager_attention_forward`; they are switched to "streamkv_eager" instead, whose
fall-through is that same function with transformers' eager (additive) masks, and whose hooks receive the
attention's keyword arguments (softcap, ...) to pass on to it.
"""
from __future__ import annotations

import sys
import threading
from typing import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

NAME = "streamkv"
NAME_EAGER = "streamkv_eager"  # for models that attend with their own eager function (see the module docstring)
NAMES = (NAME, NAME_EAGER)
_slot = threading.local()


def set_hook(key: torch.Tensor, callback: Callable) -> None:
    """Called by a cache's `update()`: the next attention over `key` is computed by `callback(module, query,
    key, value, scaling, **kwargs)` (kwargs: the rest of the attention's keyword arguments, e.g. softcap),
    which returns attn_output [batch, q, heads, head_dim]."""
    _slot.hook = (key, callback)


def _take_hook(key: torch.Tensor):
    hook = getattr(_slot, "hook", None)
    if hook is not None and hook[0] is key:
        _slot.hook = None
        return hook[1]
    return None


def streamkv_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    static = kwargs.pop("streamkv_static", None)  # a compiled decode step (compiled.py): no hook, no thread-local
    if static is not None:
        return static.attend(module, query, key, value, scaling), None
    hook = _take_hook(key)
    if hook is not None:
        return hook(module, query, key, value, scaling, attention_mask=attention_mask, dropout=dropout, **kwargs), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def module_eager_attention(module) -> Callable:
    """The `eager_attention_forward` of the modeling file `module` comes from (soft-capping, sinks and all)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward to fall back to")
    return fn


def streamkv_eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    hook = _take_hook(key)
    if hook is not None:
        return hook(module, query, key, value, scaling, attention_mask=attention_mask, dropout=dropout, **kwargs), None
    return module_eager_attention(module)(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(NAME, streamkv_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
AttentionInterface.register(NAME_EAGER, streamkv_eager_attention)
AttentionMaskInterface.register(NAME_EAGER, eager_mask)


def attends_eagerly(model) -> bool:
    """Whether the model attends with its own eager function (not SDPA, possibly through streamkv)."""
    return getattr(model.config, "_attn_implementation", None) in ("eager", NAME_EAGER)


def use_streamkv_attention(model) -> None:
    """Route the model's attention through streamkv's function (idempotent): "streamkv" over SDPA, or
    "streamkv_eager" for a model that attends with its own eager function."""
    name = NAME_EAGER if attends_eagerly(model) else NAME
    if getattr(model.config, "_attn_implementation", None) != name:
        model.set_attn_implementation(name)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # fused; also returns the log-sum-exp


def attend_parts(query: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]],
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of `query` over several key/value groups, each seen by its own rotation of the
    query (RoPE is relative: rotating the query instead of every key moves a whole group to another place).

    Each group is attended with PyTorch's fused CPU flash-attention kernel, which also gives the log-sum-exp
    of its scores; the groups are then merged exactly: out = sum_i exp(lse_i - lse) * out_i. No score matrix
    over all keys is ever materialised (measured: an eager softmax over the concatenated scores took half of
    a prefill step).

    query [1, Hq, q, D]; each part: (query rotated for this group [1, Hq, q, D], keys [1, Hkv, n, D], values
    [1, Hkv, n, Dv], causal). `causal` parts are the q new tokens themselves (n == q, token i sees 0..i).
    Returns (output [1, q, Hq, Dv] as transformers expects, log-sum-exp over all parts [1, Hq, q])."""
    b, hq, q, d = query.shape
    if one_query(query, parts):
        return attend_one(query, parts, scaling)[:2]
    outs, lses = [], []
    for q_rot, k, v, causal in parts:
        hkv = k.shape[1]
        g = hq // hkv
        if causal:  # square causal block: give every query head its own copy of its KV head
            o, lse = _flash(q_rot, k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), 0.0, True, scale=scaling)
        else:  # no mask: the g query heads of a KV head attend as g*q rows of one head (no copy of the keys)
            o, lse = _flash(q_rot.reshape(b, hkv, g * q, d), k, v, 0.0, False, scale=scaling)  # [1, Hkv, g*q, .]
            o, lse = o.reshape(b, hq, q, -1), lse.reshape(b, hq, q)
        outs.append(o)
        lses.append(lse)
    total = torch.logsumexp(torch.stack(lses), dim=0) if len(lses) > 1 else lses[0]  # [1, Hq, q]
    out = outs[0] if len(outs) == 1 else sum(o * torch.exp(l - total).unsqueeze(-1).to(o.dtype) for o, l in zip(outs, lses))
    return out.transpose(1, 2).contiguous(), total  # [1, q, Hq, Dv]


def one_query(query: torch.Tensor, parts: list[tuple]) -> bool:
    """Whether `attend_one` serves this step: one query (decoding), no causal part, one KV-head layout."""
    return query.shape[2] == 1 and not any(c for *_, c in parts) and len({k.shape[1] for _, k, _, _ in parts}) == 1


def attend_one(query: torch.Tensor, parts: list[tuple], scaling: float,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`attend_parts` for one query (a decode step; see `one_query`): plain matmuls over the parts' scores
    side by side, one softmax. Also returns each part's probabilities summed over the query heads of each
    KV head, [Hkv, n_i] (what `received_attention` computes), so a policy that observes attention does not
    score the keys twice. Why: the fused kernel's blocking costs ~175 us a call for one query over ~1k keys
    (2 calls per layer: 10 ms of a 40 ms `memory` step on 2 cores), and the scores of one query are small.
    Scores and softmax in float32 whatever the model's dtype, as the fused kernel does. `bias` [n_0] is added
    to the first part's scores (a compiled step's buffer: -inf for its unused slots)."""
    b, hq, _, d = query.shape
    hkv = parts[0][1].shape[1]
    g = hq // hkv
    scores = [torch.matmul(q_rot.reshape(b, hkv, g, d).float(), k.float().transpose(-1, -2)).mul_(scaling)
              for q_rot, k, _, _ in parts]  # each [1, Hkv, g, n_i]: the g query heads of a KV head as rows
    if bias is not None:
        scores[0] = scores[0] + bias
    s = torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]  # [1, Hkv, g, n]
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # [1, Hkv, g, 1]
    p = s.sub_(lse).exp_()
    out, off = None, 0
    for (_, _, v, _), sc in zip(parts, scores):
        n = sc.shape[-1]
        o = torch.matmul(p[..., off : off + n], v.float())  # [1, Hkv, g, Dv]
        out, off = o if out is None else out.add_(o), off + n
    out = out.to(query.dtype).reshape(b, hq, 1, -1)  # [1, Hq, 1, Dv]
    received, off = [], 0
    for sc in scores:
        received.append(p[..., off : off + sc.shape[-1]].sum(dim=(0, 2)))  # [Hkv, n_i]
        off += sc.shape[-1]
    return out.transpose(1, 2).contiguous(), lse.reshape(b, hq, 1), received  # [1, 1, Hq, Dv], [1, Hq, 1]


def attend_one_traced(query: torch.Tensor, parts: list[tuple], scaling: float,
                      bias: torch.Tensor | None = None, received: bool = False):
    """`attend_one` as a compiled decode step wants it: the scores and the weighted sum of values written as
    broadcast products and reductions, which inductor fuses into a few C++ loops, instead of matmuls.

    Why: one query's matmuls are [g x D] @ [D x n] per KV head (g = 3 query heads on SmolLM2), too small for
    a BLAS call to pay its way; SDPA's fused kernel costs ~190 us a layer at 1,024 keys (profiled). Measured
    on the embedded model, int4, 2 threads, AMD EPYC, in one process (old and new alternated 9 times, 32
    steps each): sink at 2k 16.9 -> 15.9 ms a step, memory at 8k 21.7 -> 21.2 ms (median). The same
    arithmetic as `attend_one` (float32 scores, one softmax over all parts, `bias` [n_0] added to the first
    part), summed in another order: equal within float32 rounding. Returns attn_output [1, 1, Hq, Dv], and
    with `received` also each part's probabilities summed over the query heads of each KV head [Hkv, n_i],
    as `attend_one` does (h2o's score)."""
    b, hq, _, d = query.shape
    hkv = parts[0][1].shape[1]
    g = hq // hkv
    scores = []
    for q_rot, k, _, _ in parts:
        q_rot = (q_rot.reshape(hkv, 1, g, d).float() * scaling).contiguous()  # a new tensor, never a view
        # as_strided makes inductor compute it once into a buffer: else it inlines the query's rotation (its
        # cos/sin) into the loop over the keys and recomputes it for every key (measured: 0.47 ms a layer, ~3x)
        q_rot = q_rot.as_strided(q_rot.shape, q_rot.stride())
        qk = q_rot * k[0].float()[:, :, None]  # [Hkv, n_i, g, D]: a key read once for its g heads
        scores.append(qk.sum(-1).transpose(1, 2))  # [Hkv, g, n_i]
    if bias is not None:
        scores[0] = scores[0] + bias
    top = torch.stack([s.amax(dim=-1) for s in scores]).amax(dim=0).unsqueeze(-1)  # [Hkv, g, 1]
    probs = [(s - top).exp() for s in scores]  # [Hkv, g, n_i], unnormalised
    total = sum(p.sum(dim=-1, keepdim=True) for p in probs)  # [Hkv, g, 1]
    out = sum((p.unsqueeze(-1) * v[0].float()[:, None]).sum(dim=-2) for p, (_, _, v, _) in zip(probs, parts))  # [Hkv, g, Dv]
    out = (out / total).to(query.dtype).reshape(b, 1, hq, -1)  # [1, 1, Hq, Dv]: query head h*g + j
    if received:
        return out, [(p / total).sum(dim=1) for p in probs]  # each [Hkv, n_i]
    return out


def local_parts(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int = 0) -> list[tuple]:
    """The `attend_parts` parts of a step over the keys a cache's `update()` returned, from index `first` on
    (a policy may show its sinks elsewhere). Decode (one query): the new token sits somewhere in the view
    and sees all of it. A chunk of q tokens: the q new ones are the last keys, attended causally, after
    the earlier ones, which every new token sees."""
    q, n = query.shape[2], keys.shape[2]
    if q == 1:
        return [(query, keys[:, :, first:], values[:, :, first:], False)]
    earlier = [(query, keys[:, :, first : n - q], values[:, :, first : n - q], False)] if n - q > first else []
    return earlier + [(query, keys[:, :, n - q :], values[:, :, n - q :], True)]


def received_attention(query: torch.Tensor, keys: torch.Tensor, n_new: int, scaling: float, total_lse: torch.Tensor,
                       max_rows: int | None = 64) -> torch.Tensor:
    """The attention each of `keys` [1, Hkv, n, D] received from the queries, summed over the query heads of its
    KV head: [Hkv, n]. The probabilities are exact (normalised by the full log-sum-exp of every part); for a
    long chunk only `max_rows` evenly spaced queries are summed (an estimate, 1/8 of the cost at 512 tokens:
    enough to rank tokens of one block against each other; None sums every query, as H2O needs). The last `n_new` keys are the new tokens (causal)."""
    b, hq, q, d = query.shape
    hkv = keys.shape[1]
    g = hq // hkv
    rows = torch.arange(q) if max_rows is None or q <= max_rows else torch.linspace(0, q - 1, max_rows).round().long()
    qs = query[:, :, rows].reshape(b, hkv, g * rows.numel(), d)  # [1, Hkv, g*r, D]
    s = torch.matmul(qs, keys.transpose(-1, -2)).mul_(scaling).view(b, hkv, g, rows.numel(), -1)  # [1,Hkv,g,r,n]
    s.sub_(total_lse[:, :, rows].view(b, hkv, g, rows.numel(), 1)).exp_()
    if n_new > 1:  # new key j is seen by query i only if j <= i
        n = keys.shape[2]
        hidden = torch.arange(n_new)[None, :] > rows[:, None]  # [r, n_new]
        s[..., n - n_new :].masked_fill_(hidden, 0.0)
    return s.sum(dim=(0, 2, 3)).float()
