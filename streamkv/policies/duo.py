"""`duo`: DuoAttention (Xiao et al., 2024). Retrieval heads keep long context, streaming heads keep S sinks + W
recent tokens; which head is which comes from a pattern file (`streamkv duo identify`, or DuoAttention's own
`full_attention_heads.tsv`), cut at a `sparsity` (the fraction of heads that stream).

Layout of one layer (positions by place in *each head's own* cache):

    streaming heads:  sinks | window | new                     (the shared slot table: exactly `sink`)
    retrieval heads:  sinks | everything evicted | window | new (dense: the same distances as a full cache)

* The shared slot table (base.py) holds sinks + window for every head, and hands each step's evicted tokens
  over (`keeps_evicted`); only the retrieval heads' keys/values of them are kept, in a per-layer buffer
  [1, H_retrieval, E, D]: a streaming head really holds S + W tokens (bytes, not a mask over more).
* A layer's heads are attended in runs of neighbouring heads of one kind (views, no copies): streaming runs
  over the slot table as `sink` does; retrieval runs over the window from the slot table, the evicted
  buffer, and the sinks from their pristine copies, each group seen by its own rotation of the query
  (`attend_parts`, merged exactly by log-sum-exp). In the slot table the sinks are rotated to sit right
  before the window (streaming placement); a retrieval head sees them E positions earlier instead, rotated
  from the pristine copy, never from the slot table's rotation.
* The evicted buffer keeps each key as computed; keys are stored at contiguous canonical positions (a key
  computed elsewhere, after a position restart, is rotated once on arrival), so the whole buffer moves to
  its place, right before the window, by one rotation of the query per step.

Two kinds of retrieval heads (`retrieval=`):
* `dense` (DuoAttention's own): they keep *everything* evicted. Memory still grows with the stream, on the
  retrieval fraction of the heads only; their distances are a dense cache's, so past the model's trained
  context those heads degrade as dense does.
* `memory`: they keep a block store (`memory.py`: RAM, then disk) and attend the `topk` blocks most
  relevant to the current queries, between their sinks and the window; only the retrieval heads' keys and
  values go to the store. Memory stays bounded however long the stream, and every distance stays inside
  the trained context. The window then evicts in whole blocks (W..W+B-1 recent tokens, as `memory`).
  Decode steps choose their blocks every `reselect` steps, as `memory`'s do (its default, 4; until 7 Dec
  2026 duo chose at every step): the steps between two choices then change nothing but the new token's
  slot, so with `--compile` they run the compiled graph (`DuoMemoryCache._attend_static`). `choose=ahead`
  (memory's too) makes a choosing step attend the standing choice and choose after its attention, for the
  next steps, so that every decode step runs compiled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import attend_one_traced, attend_parts, local_parts, received_attention
from .base import StreamingCache
from .memory import MemoryCache
from .scored import positive_int

RETRIEVAL = ("dense", "memory")
# The fraction of KV heads that stream by default. 0.3 because on the embedded model's shipped pattern it is
# the largest tried that keeps dense's passkey accuracy within its trained context (2k-8k, 45 prompts:
# 0.3 -> 42/45 = dense's 42/45 at 0.72-0.76 of its KV bytes; 0.4 -> 38/45; 0.5 -> 39/45 at 0.52-0.59).
# DuoAttention picks this per model too; a user's own pattern may stream more (`sparsity=`).
DEFAULT_SPARSITY = 0.3


@dataclass
class _Evicted:
    """One layer's retrieval heads' evicted tokens, in stream order at contiguous positions start.. start+n-1."""

    keys: torch.Tensor  # [1, H_retrieval, cap, D]
    values: torch.Tensor  # [1, H_retrieval, cap, Dv]
    start: int = 0  # position of the first stored key (canonical; the rest follow contiguously)
    n: int = 0

    def nbytes(self) -> int:  # allocated, as every cache reports
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def _runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """[True, True, False, True] -> [(0, 2, True), (2, 3, False), (3, 4, True)]: neighbouring heads of one kind."""
    runs, a = [], 0
    flags = mask.tolist()
    for b in range(1, len(flags) + 1):
        if b == len(flags) or flags[b] != flags[a]:
            runs.append((a, b, flags[a]))
            a = b
    return runs


def retrieval_mask(model, pattern, sparsity: float) -> torch.Tensor:
    """[layers, kv_heads] bool, True = retrieval head. `pattern`: a bool tensor (used as is), a gate tensor,
    a pattern file path, or "embedded" (the pattern shipped for the embedded model)."""
    if torch.is_tensor(pattern) and pattern.dtype == torch.bool:
        mask = pattern
    else:
        from .. import heads

        gates = pattern if torch.is_tensor(pattern) else heads.pattern_for(model, pattern)
        mask = heads.retrieval_heads(gates, sparsity=sparsity)
    cfg = model.config.get_text_config()
    shape = (cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    if tuple(mask.shape) != shape:
        raise ValueError(f"head pattern has shape {tuple(mask.shape)}, but the model has {shape[0]} layers x {shape[1]} KV heads")
    return mask.clone()


def _check_duo(sinks, window, sparsity) -> float:
    positive_int("window", window)
    positive_int("sinks", sinks, 0)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity (the fraction of streaming heads) must be a number in [0, 1], got {sparsity!r}")
    return float(sparsity)


class _HeadRuns:
    """Attention of one layer in runs of neighbouring KV heads of one kind (shared by both duo caches)."""

    def _attend_runs(self, layer_idx, query, keys, values, scaling, span: int, far):
        """Streaming runs attend the slot table as `sink` does. Retrieval runs attend the window (slot table,
        without its sinks), `far(r0, r1, qr)` (the parts of their long context, `span` positions right
        before the window) and the sinks, rotated from their pristine copies to sit right before that.
        Returns (output [1, q, Hq, Dv], log-sum-exp [1, Hq, q])."""
        plan, layer, rope = self._plan, self.layers[layer_idx], self.rope_for_layer(layer_idx)
        q = query.shape[2]
        g = query.shape[1] // keys.shape[1]
        n_s = min(self.sinks, self.seen - q)  # sinks kept before this step: slots 0..n_s-1 (kept in stream order)
        outs, lses, r = [], [], 0  # r: index of the run's first head among the layer's retrieval heads
        for a, b, retrieval in self.runs[layer_idx]:
            qr = query[:, a * g : b * g]  # [1, (b-a)*g, q, D]
            k, v = keys[:, a:b], values[:, a:b]  # views
            parts = local_parts(qr, k, v, first=n_s if retrieval else 0)  # retrieval heads see the sinks elsewhere (below)
            if retrieval:
                parts += far(r, r + b - a, qr)
                if n_s:  # pristine sink keys, rotated once to sit before the long context
                    wanted = torch.arange(plan.window_start - span - n_s, plan.window_start - span)
                    sk = rope.rotate(layer.pin_keys[:, a:b, :n_s], wanted - self.pin_pos[:n_s])
                    parts.append((qr, sk, v[:, :, :n_s], False))
                r += b - a
            out, lse = attend_parts(qr, parts, scaling)  # [1, q, (b-a)*g, Dv], [1, (b-a)*g, q]
            outs.append(out)
            lses.append(lse)
        if len(outs) == 1:
            return outs[0], lses[0]
        return torch.cat(outs, dim=2), torch.cat(lses, dim=1)

    def _duo_describe(self) -> dict:
        return {"pattern": self.pattern, "sparsity": self.sparsity, "retrieval": self.retrieval,
                "retrieval_heads": int(self.heads.sum())}

    def head_bytes(self) -> dict:
        """KV bytes held per kind of head (whole model, RAM): the measured memory saving."""
        table = StreamingCache.nbytes(self)  # the slot table: every head holds the same there
        n_heads, n_r = self.heads.numel(), int(self.heads.sum())
        extra = self.nbytes() - table  # everything beyond the slot table belongs to retrieval heads
        return {"retrieval_heads": n_r, "streaming_heads": n_heads - n_r,
                "retrieval_bytes": int(table * n_r / n_heads + extra), "streaming_bytes": int(table * (n_heads - n_r) / n_heads)}


class DuoCache(_HeadRuns, StreamingCache):
    name = "duo"
    keeps_evicted = True
    retrieval = "dense"
    serves_local_layers = True  # local layers keep their own window (no head there can see past it)

    def __new__(cls, model=None, *args, retrieval: str = "dense", **kwargs):
        if retrieval not in RETRIEVAL:
            raise ValueError(f"retrieval must be one of {', '.join(RETRIEVAL)}, got {retrieval!r}")
        if cls is DuoCache and retrieval == "memory":  # one policy name, two layouts of the retrieval heads
            obj = super().__new__(DuoMemoryCache)
            obj.__init__(model, *args, **kwargs)
            return obj
        return super().__new__(cls)

    def __init__(self, model, sinks: int = 64, window: int = 256, pattern: str = "embedded", sparsity: float = DEFAULT_SPARSITY,
                 retrieval: str = "dense", block: int | None = None, topk: int | None = None,
                 ram_mb: int | None = None, store_dir: str | None = None, reselect: int | None = None,
                 choose: str | None = None, rep_rule: str | None = None):
        """retrieval="memory" takes `block`, `topk`, `ram_mb`, `store_dir`, `reselect`, `choose`, `rep_rule` (as
        the `memory` policy; its defaults when not given); with "dense" they do not apply."""
        given = [n for n, v in (("block", block), ("topk", topk), ("ram_mb", ram_mb), ("store_dir", store_dir),
                                ("reselect", reselect), ("choose", choose), ("rep_rule", rep_rule)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to duo with retrieval=memory only")
        self.window, self.sparsity = window, _check_duo(sinks, window, sparsity)
        self.pattern = pattern if isinstance(pattern, str) else "tensor"
        self.heads = retrieval_mask(model, pattern, self.sparsity)  # [L, Hkv]
        super().__init__(model, budget=sinks + window, sinks=sinks)
        self.runs = [_runs(m) for m in self.heads]
        self.evicted: list[_Evicted | None] = [None] * self.n_layers

    @property
    def max_resident(self) -> int | None:
        return None if bool(self.heads.any()) else self.budget  # retrieval heads grow with the stream

    # ---- attention ----------------------------------------------------------------------------------
    def attend(self, layer_idx, module, query, keys, values, scaling):
        plan, layer = self._plan, self.layers[layer_idx]
        store = self.evicted[layer_idx]
        E = store.n if store is not None else 0

        def far(r0, r1, qr):  # every evicted token, stored at start..start+E-1: move the query instead
            if not E:
                return []
            shift = plan.window_start - E - store.start
            return [(self.rope_for_layer(layer_idx).rotate(qr, -shift), store.keys[:, r0:r1, :E], store.values[:, r0:r1, :E], False)]

        out, _ = self._attend_runs(layer_idx, query, keys, values, scaling, E, far)
        layer.finish_step(plan)
        if layer.evicted is not None:
            self._store(layer_idx, layer.evicted, plan)
            layer.evicted = None
        return out

    def _store(self, layer_idx: int, evicted, plan) -> None:
        """Keep the retrieval heads' keys/values of this step's evicted tokens (contiguous positions)."""
        mask = self.heads[layer_idx]
        if not bool(mask.any()):
            return
        ek, ev = evicted[0][:, mask], evicted[1][:, mask]  # [1, H_r, e, D]
        e = ek.shape[2]
        store = self.evicted[layer_idx]
        if store is None:
            store = self.evicted[layer_idx] = _Evicted(ek.new_zeros((1, ek.shape[1], max(64, e), ek.shape[3])),
                                                       ev.new_zeros((1, ev.shape[1], max(64, e), ev.shape[3])),
                                                       start=int(plan.evict_pos[0]))
        target = torch.arange(store.start + store.n, store.start + store.n + e)
        delta = target - plan.evict_pos
        if bool(delta.any()):  # computed after a position restart: rotated once, to continue the sequence
            ek = self.rope_for_layer(layer_idx).rotate(ek, delta)
        need = store.n + e
        if need > store.keys.shape[2]:  # grow by doubling
            cap = max(need, 2 * store.keys.shape[2])
            for name in ("keys", "values"):
                old = getattr(store, name)
                new = old.new_zeros((*old.shape[:2], cap, old.shape[3]))
                new[:, :, : store.n] = old[:, :, : store.n]
                setattr(store, name, new)
        store.keys[:, :, store.n : need] = ek
        store.values[:, :, store.n : need] = ev
        store.n = need

    # ---- introspection and persistence -------------------------------------------------------------
    @property
    def n_cached(self) -> int:
        """Tokens a retrieval head holds (a streaming head holds n_kept)."""
        return self.n_kept + max((s.n for s in self.evicted if s is not None), default=0)

    def nbytes(self) -> int:
        return super().nbytes() + sum(s.nbytes() for s in self.evicted if s is not None)

    def used_bytes(self) -> int:
        return super().used_bytes() + sum(s.nbytes() * s.n // s.keys.shape[2] for s in self.evicted if s is not None)

    def describe(self) -> dict:
        return {"policy": self.name, "sinks": self.sinks, "window": self.window, **self._duo_describe()}

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["duo"] = {"heads": self.heads.clone(), "evicted": [
            None if s is None else {"keys": s.keys[:, :, : s.n].clone(), "values": s.values[:, :, : s.n].clone(), "start": s.start}
            for s in self.evicted]}
        return state

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["duo"]["heads"], self.heads):
            raise ValueError("snapshot was taken with another head pattern than this duo cache's")
        super().load_state_dict(state)
        self.evicted = [None if s is None else _Evicted(s["keys"].clone(), s["values"].clone(), s["start"], s["keys"].shape[2])
                        for s in state["duo"]["evicted"]]


class DuoMemoryCache(_HeadRuns, MemoryCache):
    serves_local_layers = True  # local layers keep their own window (no head there can see past it)
    """`duo` with retrieval="memory": streaming heads keep sinks + window, retrieval heads a block store
    (built by `make_policy("duo", ..., retrieval="memory")`)."""

    name = "duo"
    retrieval = "memory"

    def __init__(self, model, sinks: int = 64, window: int = 256, pattern: str = "embedded", sparsity: float = DEFAULT_SPARSITY,
                 block: int | None = None, topk: int | None = None, ram_mb: int | None = None, store_dir: str | None = None,
                 reselect: int | None = None, choose: str | None = None, rep_rule: str | None = None):
        self.sparsity = _check_duo(sinks, window, sparsity)
        self.pattern = pattern if isinstance(pattern, str) else "tensor"
        self.heads = retrieval_mask(model, pattern, self.sparsity)  # [L, Hkv]
        mem = {k: v for k, v in (("block", block), ("topk", topk), ("ram_mb", ram_mb), ("store_dir", store_dir),
                                 ("reselect", reselect), ("choose", choose), ("rep_rule", rep_rule)) if v is not None}
        # the retrieval heads' blocks are indexed as memory's are: by default the mean of each part of a block
        # (until 8 Dec 2026 duo used InfLLM's rule, the keys attended most: `rep_rule=attention`; docs/RESULTS.md
        # section 5 compares the two for duo: the mean rule predicts as well and decodes 13% faster)
        super().__init__(model, sinks=sinks, window=window, **mem)
        self.runs = [_runs(m) for m in self.heads]
        self.stored_fraction = float(self.heads.float().mean())

    def gap(self) -> int:
        return 0  # the slot table places sinks for the streaming heads; retrieval heads place theirs (below)

    def _span(self) -> int:
        """Positions the retrieved blocks occupy right before the window (memory's `gap`)."""
        return MemoryCache.gap(self)

    def attend(self, layer_idx, module, query, keys, values, scaling):
        plan, layer = self._plan, self.layers[layer_idx]
        mask = self.heads[layer_idx]
        q = query.shape[2]
        span, ids = self._span(), []
        chooses_ahead = False  # choose=ahead: this step chooses after its attention, for the steps that follow
        if span and bool(mask.any()):
            prev = self._standing(layer_idx)
            chooses_ahead = q == 1 and self.choose == "ahead" and self._decode_run % self.reselect == 0
            if (q == 1 and (self._decode_run % self.reselect or self.choose == "ahead") and prev
                    and len(prev) == self._n_retrieved()):
                ids = prev  # a decode step between two choices (memory's `reselect`), or choosing ahead: the last choice stands
            else:
                ids = self._select(layer_idx, self._scoring_query(layer_idx, query), span, plan.window_start)
            mem_k, mem_v = self._fetch(layer_idx, ids)  # [1, H_r, G, D]
        self.retrieved[layer_idx] = self.ahead[layer_idx] = ids

        def far(r0, r1, qr):
            if not ids:
                return []
            rope = self.rope_for_layer(layer_idx)  # the query rotated for the blocks, `span` places before the window
            return [(rope.apply(qr, *self._query_rotation(plan, rope)), mem_k[:, r0:r1], mem_v[:, r0:r1], False)]

        out, lse = self._attend_runs(layer_idx, query, keys, values, scaling, span if ids else 0, far)
        if self.observe:
            layer.received_view += received_attention(query, keys, q if q > 1 else 0, scaling, lse)
        if chooses_ahead:
            self._choose_ahead(layer_idx, query, plan)
        scores = layer.finish_step(plan)
        if layer.evicted is not None:  # only the retrieval heads' part of each block is kept
            ek, ev = layer.evicted
            self._store_evicted(layer_idx, (ek[:, mask], ev[:, mask]), scores[mask] if scores is not None else None, plan)
            layer.evicted = None
        return out

    # ---- the compiled decode step (streamkv/compiled.py) ------------------------------------------------
    # As memory's: a step between two choices of blocks changes nothing but the new token's slot, so it takes
    # the fixed-shape path (`MemoryCache._static_steady`). Its attention (`_attend_static`) is `attend`'s with
    # tensor ops only: each run of heads as `_attend_runs` attends it, over the whole slot buffer (unused slots
    # masked), and, with rep_rule=attention, the attention the keys received added to the layer's scores (the
    # retrieval heads' blocks are then indexed by it). Steps that choose, evict or store stay eager.
    @property
    def static_decode_capable(self) -> bool:  # (memory's excludes rep_rule=attention; duo observes it in the trace)
        return self._static_layout()

    def _choosing_layers(self) -> list[int]:
        return [i for i in self.stored_layers if bool(self.heads[i].any())]

    def _mem_gap(self, plan) -> int:
        return self._span()

    def _static_extras(self, plan, step) -> None:
        super()._static_extras(plan, step)  # the mask of unused slots, each layer's blocks and its query's rotation
        span, n_s = self._span(), self.sinks  # steady: every sink is kept, the blocks sit `span` places before the window
        # the retrieval heads' sinks, from their pristine copies to right before the blocks (as `_attend_runs`)
        delta = torch.arange(plan.window_start - span - n_s, plan.window_start - span) - self.pin_pos[:n_s]  # [S]
        for i in self._choosing_layers():
            step.parts[i] = (*step.parts[i], *plan.cos_sin_of(self.rope_for_layer(i), "duo sinks", delta))
        step.attend = self._attend_static

    def _attend_static(self, module, query, keys, values, scaling):
        """A static step's attention (traced): `attend` reusing the last choice, over the whole slot buffer
        [1, H, capacity, D] (unused slots masked by `step.bias`). Streaming runs attend the buffer; retrieval
        runs its window slots, their blocks (the query rotated for them) and their sinks rotated from the
        pristine copies. With rep_rule=attention, adds each slot's received attention to the layer's scores, the
        new slot's from 0."""
        i, step = module.layer_idx, self._static
        layer, rope, n_s = self.layers[i], self.rope_for_layer(i), self.sinks
        g = query.shape[1] // keys.shape[1]
        outs, received, r = [], [], 0  # r: the run's first head among the layer's retrieval heads
        for a, b, retrieval in self.runs[i]:
            qr = query[:, a * g : b * g]  # [1, (b-a)*g, 1, D]
            k, v = keys[:, a:b], values[:, a:b]  # [1, b-a, capacity, D]
            if not retrieval:
                res = attend_one_traced(qr, [(qr, k, v, False)], scaling, step.bias, received=self.observe)
                out, rec = (res[0], res[1][0]) if self.observe else (res, None)
            else:
                mem_k, mem_v, cos, sin, sink_cos, sink_sin = step.parts[i]
                parts = [(qr, k[:, :, n_s:], v[:, :, n_s:], False),
                         (rope.apply(qr, cos, sin), mem_k[:, r : r + b - a], mem_v[:, r : r + b - a], False)]
                if n_s:
                    parts.append((qr, rope.apply(layer.pin_keys[:, a:b, :n_s], sink_cos, sink_sin), v[:, :, :n_s], False))
                res = attend_one_traced(qr, parts, scaling, step.bias[n_s:], received=self.observe)
                out, rec = res if self.observe else (res, None)
                if rec is not None:  # [b-a, capacity]: the sink slots get what the sinks received where these heads
                    # see them (eager sums it over the buffer's copies, placed for the streaming heads; never read)
                    rec = torch.cat([rec[2], rec[0]], dim=1) if n_s else rec[0]
                r += b - a
            outs.append(out)  # [1, 1, (b-a)*g, Dv]
            received.append(rec)
        if step.queries[i] is not None:  # (a layer with retrieval heads) choose=ahead: `finish_static` chooses with it
            step.queries[i].copy_(query)
        step.calls += 1
        if self.observe:
            layer.received.index_fill_(1, step.slot, 0.0).add_(torch.cat(received) if len(received) > 1 else received[0])
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [1, 1, Hq, Dv]

    def _scoring_query(self, layer_idx: int, query: torch.Tensor) -> torch.Tensor:
        """The query heads of the layer's retrieval heads [1, H_r*g, q, D] (its index holds those heads only)."""
        mask = self.heads[layer_idx]
        g = query.shape[1] // mask.numel()
        return query[:, (mask.nonzero()[:, 0, None] * g + torch.arange(g)).reshape(-1)]

    def describe(self) -> dict:
        return {**MemoryCache.describe(self), **self._duo_describe()}

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["duo"] = {"heads": self.heads.clone()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if not torch.equal(state["duo"]["heads"], self.heads):
            raise ValueError("snapshot was taken with another head pattern than this duo cache's")
        super().load_state_dict(state)
