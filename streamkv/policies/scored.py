"""Scored retention, per KV head: sinks + a recent window + the `heavy` best-scored older tokens of each head.

The shared code of `h2o` and `sirllm` (one screen each: they only define `score`). Why per head: H2O's heavy
hitters differ from head to head (a head that tracks syntax and a head that tracks a name attend to
different tokens), so each KV head keeps its own set, at equal size, which keeps every layer's keys one
dense tensor [1, kv_heads, n, head_dim] and the attention one fused kernel call per part.

Layout of one layer (positions by place, as every policy here; p0 = the first new token's position):

    sinks (shared slot table) | heavy set of head h (its own tokens) | window (shared slot table) | new
    pinned, from pristine       N_h positions, reserved by `gap()`    keeps its rotation

* The shared slot table (base.py) holds sinks + the most recent `window` tokens, for all heads, exactly as
  `sink` does. A token leaving the window is handed over (`keeps_evicted`) to every layer with its keys,
  values and the attention it received while in the window (`observe`).
* Each layer keeps per KV head the `heavy` best tokens among (its heavy set + the tokens evicted this step)
  by `score(...)`, in stream order. A key entering a heavy set is rotated once, from the copy the model
  computed (at the position recorded in `pos`), back to position 0, and kept so: nothing is ever rotated
  from a previous rotation. At every step each heavy key is rotated from that copy to its place
  `window_start - N + i` (i = its rank in stream order). Every head has the same count N, so one set of
  places, and one cos/sin of N positions per step, serves all heads and layers; `gap()` = N moves the
  sinks right before them. (Kept as computed instead, each layer would need the cos/sin of its own
  [H, N] position differences at every step.)
* Compiled decoding (compiled.py): in steady state (window full, every heavy set full) a decode step
  evicts exactly one token, the oldest of the window, and each head's heavy set trades at most one token
  for it. That is fixed-shape: `_attend_static` attends, adds the attention received, rotates the evicted
  key to 0, scores the N+1 candidates and drops each head's lowest with tensor ops only, so the step is
  traced once; choosing the slots, the places' cos/sin and a SirLLM token's value stay eager, before it.
* Attention over [local keys, heavy keys] is exact (`attention.attend_parts`, merged by log-sum-exp), and
  the attention each heavy token received is added to its `received` score as it is for window tokens.

What a policy writes: `score(layer_idx, keys [H, m, D], values, received [H, m] or None, value [H, m] or
None) -> [H, m]`, called at every eviction on the candidates (heavy set + newly evicted): keys rotated to
position 0, values as computed, `received` = attention received so far (summed over the query heads of each KV head; None
unless `observe`), `value` = the per-token score the policy set with `set_token_values` (None if it sets
none). Higher = kept. Ties keep the older token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import attend_one, attend_one_traced, attend_parts, local_parts, one_query, received_attention
from .base import StreamingCache


def positive_int(name, value, minimum: int = 1):
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")


@dataclass
class HeavySet:
    """One layer's per-KV-head kept tokens (all heads hold `n` of them, each its own, in stream order)."""

    keys: torch.Tensor  # [1, H, cap, D] rotated to position 0 (from the copy computed at `pos`)
    values: torch.Tensor  # [1, H, cap, Dv]
    pos: torch.Tensor  # [H, cap] position each key is rotated at
    seq: torch.Tensor  # [H, cap] stream index (ascending within a head)
    received: torch.Tensor  # [H, cap] attention received so far (observe)
    value: torch.Tensor  # [H, cap] the policy's per-token score (set_token_values)
    n: int = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class ScoredCache(StreamingCache):
    name = "scored"
    keeps_evicted = True
    observe = False  # h2o turns it on: scores from attention received
    # local layers whose window the recent tokens cover keep only that window (heavy tokens are older than it)
    serves_local_layers = True
    uses_values = False  # sirllm turns it on: scores from a per-token value (set_token_values)

    def __init__(self, model, *, sinks: int, window: int, heavy: int):
        positive_int("window", window)
        positive_int("sinks", sinks, 0)
        positive_int("heavy", heavy, 0)
        self.window, self.heavy = window, heavy
        self.reserved = heavy
        super().__init__(model, budget=sinks + window, sinks=sinks)
        self.sets: list[HeavySet | None] = []
        self.n_heavy = 0  # tokens each head's heavy set holds (same for every layer and head)
        self._values: dict[int, float] = {}  # per-token scores of tokens not yet evicted (set_token_values)
        # a steady compiled step's constants: ties keep the older token (a bonus decreasing with the rank)
        self._tie_order = torch.arange(heavy + 1, 0, -1, dtype=torch.float64) * 1e-9  # [heavy + 1]
        self._ranks = torch.arange(heavy)  # [heavy]

    # ---- what a policy defines ----------------------------------------------------------------------
    def score(self, layer_idx: int, keys, values, received, value) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def set_token_values(self, first_seq: int, values: torch.Tensor) -> None:
        """Give tokens first_seq, first_seq+1, ... a per-token score (SirLLM: surprisal). It travels with
        each token into the heavy sets; `scale_values` multiplies every score kept so far."""
        self._values.update(zip(range(first_seq, first_seq + values.numel()), values.float().tolist()))

    @torch.inference_mode()
    def scale_values(self, factor: float) -> None:
        self._values = {s: v * factor for s, v in self._values.items()}
        for hs in self.sets:
            if hs is not None:
                hs.value[:, : hs.n] *= factor

    # ---- layout -----------------------------------------------------------------------------------
    def gap(self) -> int:
        return self.n_heavy

    @property
    def n_cached(self) -> int:
        return self.n_kept + self.n_heavy

    @property
    def max_resident(self) -> int:
        return self.budget + self.heavy

    # ---- attention ----------------------------------------------------------------------------------
    def attend(self, layer_idx, module, query, keys, values, scaling):
        plan, layer = self._plan, self.layers[layer_idx]
        q = query.shape[2]
        parts = local_parts(query, keys, values)
        hs = self.sets[layer_idx] if layer_idx < len(self.sets) else None
        heavy_k = None
        if hs is not None and hs.n:
            N = hs.n
            rope = self.rope_for_layer(layer_idx)  # this layer's own rotation (layers may differ)
            cos, sin = self._places(plan, rope, N)  # [N, rd], the same for every head
            heavy_k = rope.apply(hs.keys[:, :, :N], cos, sin)  # [1, H, N, D] at their places
            parts.append((query, heavy_k, hs.values[:, :, :N], False))
        if one_query(query, parts):  # decoding: each part's received attention comes with the output
            out, _, received = attend_one(query, parts, scaling)
            if self.observe:
                layer.received_view += received[0]
                if heavy_k is not None:
                    hs.received[:, : hs.n] += received[1]
        else:
            out, lse = attend_parts(query, parts, scaling)
            if self.observe:  # exact: every query row (H2O accumulates the attention each token received)
                layer.received_view += received_attention(query, keys, q if q > 1 else 0, scaling, lse, max_rows=None)
                if heavy_k is not None:
                    hs.received[:, : hs.n] += received_attention(query, heavy_k, 0, scaling, lse, max_rows=None)
        evicted_received = layer.finish_step(plan)
        if layer.evicted is not None:
            self._offer(layer_idx, layer.evicted, evicted_received, plan)
            layer.evicted = None
        return out

    # ---- the compiled decode step (streamkv/compiled.py) ------------------------------------------------
    @property
    def static_decode_capable(self) -> bool:
        return self._static_layout()

    def _static_steady(self, plan) -> bool:
        """Steady: the window full and every heavy set full, so the step evicts one token, the window's oldest
        (not the new one), and each head's heavy set trades at most one of its N tokens for it."""
        n = self.heavy
        return (n > 0 and self.n_heavy == n and plan.gap == n and self._one_slot_step(plan)
                and plan.n_view == plan.capacity and plan.evict_src is not None and plan.evict_src.numel() == 1
                and int(plan.evict_src[0]) != plan.append_slot
                and all(i < len(self.sets) and self.sets[i] is not None and self.sets[i].n == n for i in self.attention_layers))

    def _static_extras(self, plan, step) -> None:
        device = step.slot.device
        step.parts = [None] * self.n_layers
        for i in self.attention_layers:  # once per distinct rope: the places' cos/sin, and the evicted key's to 0
            rope = self.rope_for_layer(i)
            step.parts[i] = (*self._places(plan, rope, self.heavy), *self._to_zero(plan, rope))
        value = self._evicted_values(plan.evict_seq)  # (sirllm; every layer reads it in this step, so it is forgotten)
        step.evicted = (plan.evict_src.to(device), plan.evict_seq, plan.evict_pos, value)
        step.attend = self._attend_static

    def _attend_static(self, module, query, keys, values, scaling):
        """A steady step's attention and eviction (traced): what `attend` and `_offer` do when one token leaves
        the window, with tensor ops only. keys/values: the whole slot buffer [1, H, cap, D]."""
        i, step = module.layer_idx, self._static
        layer, hs, rope, n = self.layers[i], self.sets[i], self.rope_for_layer(i), self.heavy
        cos_p, sin_p, cos_z, sin_z = step.parts[i]
        slot, seq_e, pos_e, val_e = step.evicted
        h = keys.shape[1]
        heavy_k = rope.apply(hs.keys[:, :, :n], cos_p, sin_p)  # [1, H, n, D] at their places
        out, received = attend_one_traced(query, [(query, keys, values, False), (query, heavy_k, hs.values[:, :, :n], False)],
                                          scaling, received=True)
        step.calls += 1
        if self.observe:  # the new token's slot starts from 0, as in `apply`
            layer.received.index_fill_(1, step.slot, 0.0).add_(received[0])  # [H, cap]
            hs.received[:, :n] += received[1]
        # the candidates: each head's n heavy tokens, then the evicted one (the newest in stream order)
        cand_k = torch.cat([hs.keys[:, :, :n], rope.apply(keys.index_select(2, slot), cos_z, sin_z)], dim=2)  # [1, H, n+1, D]
        cand_v = torch.cat([hs.values[:, :, :n], values.index_select(2, slot)], dim=2)
        rec = torch.cat([hs.received[:, :n], layer.received.index_select(1, slot) if self.observe
                         else torch.zeros_like(hs.received[:, :1])], dim=1)  # [H, n+1]
        val = torch.cat([hs.value[:, :n], val_e.expand(h, 1)], dim=1)
        scores = self.score(i, cand_k[0], cand_v[0], rec if self.observe else None, val if self.uses_values else None)  # [H, n+1]
        drop = (scores.double() + self._tie_order).argmin(dim=1)  # [H]: each head's lowest (ties: the newer goes)
        rank = self._ranks[None, :]  # [1, n]
        keep = rank + (rank >= drop[:, None]).long()  # [H, n]: the survivors' indices, in stream order
        seq = torch.cat([hs.seq[:, :n], seq_e.expand(h, 1)], dim=1)  # [H, n+1]
        pos = torch.cat([hs.pos[:, :n], pos_e.expand(h, 1)], dim=1)
        self._keep(hs, keep, cand_k, cand_v, seq, pos, rec, val)
        return out

    @staticmethod
    def _places(plan, rope, n: int) -> tuple:
        """cos/sin [n, rd] of the heavy tokens' places, right before the window (once per step and rope)."""
        return plan.cos_sin_of(rope, "heavy", torch.arange(plan.window_start - n, plan.window_start))

    @staticmethod
    def _to_zero(plan, rope) -> tuple:
        """cos/sin [e, rd] that rotate this step's evicted keys from their positions back to 0."""
        return plan.cos_sin_of(rope, "heavy in", -plan.evict_pos)

    def _new_set(self, k: torch.Tensor, v: torch.Tensor) -> HeavySet:
        _, h, _, d = k.shape
        cap = max(self.heavy, 1)
        return HeavySet(k.new_zeros((1, h, cap, d)), v.new_zeros((1, h, cap, v.shape[-1])),
                        torch.zeros((h, cap), dtype=torch.long), torch.zeros((h, cap), dtype=torch.long),
                        torch.zeros((h, cap)), torch.zeros((h, cap)))

    def _offer(self, layer_idx: int, evicted, received, plan) -> None:
        """The heavy set of each head becomes the `heavy` best of (heavy set + this step's evicted tokens)."""
        ek, ev = evicted  # [1, H, e, D] as computed, at plan.evict_pos
        h, e = ek.shape[1], ek.shape[2]
        rope = self.rope_for_layer(layer_idx)
        ek = rope.apply(ek, *self._to_zero(plan, rope))  # [1, H, e, D] at position 0
        while len(self.sets) <= layer_idx:
            self.sets.append(None)
        if self.sets[layer_idx] is None:
            self.sets[layer_idx] = self._new_set(ek, ev)
        hs = self.sets[layer_idx]
        N = hs.n
        seq = torch.cat([hs.seq[:, :N], plan.evict_seq.expand(h, e)], dim=1)  # [H, m], ascending per head
        pos = torch.cat([hs.pos[:, :N], plan.evict_pos.expand(h, e)], dim=1)
        rec = torch.cat([hs.received[:, :N], received if received is not None else ek.new_zeros((h, e))], dim=1)
        new_vals = self._evicted_values(plan.evict_seq)
        val = torch.cat([hs.value[:, :N], new_vals.expand(h, e)], dim=1)
        cand_k = torch.cat([hs.keys[:, :, :N], ek], dim=2)  # [1, H, m, D]
        cand_v = torch.cat([hs.values[:, :, :N], ev], dim=2)
        m = N + e
        keep = min(self.heavy, m)
        if keep < m:
            scores = self.score(layer_idx, cand_k[0], cand_v[0], rec if self.observe else None,
                                val if self.uses_values else None)  # [H, m]
            # ties keep the older token: a tiny bonus decreasing with the rank in stream order
            order = torch.arange(m, 0, -1, dtype=torch.float64) * 1e-9  # (`_tie_order` when m = heavy + 1)
            idx = (scores.double() + order).topk(keep, dim=1).indices.sort(dim=1).values  # [H, keep], stream order
        else:
            idx = torch.arange(m).expand(h, m)
        self._keep(hs, idx, cand_k, cand_v, seq, pos, rec, val)
        hs.n = keep
        self.n_heavy = keep  # the same on every layer: every layer is offered the same tokens

    @staticmethod
    def _keep(hs: HeavySet, idx, cand_k, cand_v, seq, pos, rec, val) -> None:
        """Each head's heavy set becomes its candidates at `idx` [H, keep] (stream order): cand_k/cand_v
        [1, H, m, D], seq/pos/rec/val [H, m]. Eager trades and the compiled steady step write it alike."""
        keep = idx.shape[1]
        hs.seq[:, :keep] = seq.gather(1, idx)
        hs.pos[:, :keep] = pos.gather(1, idx)
        hs.received[:, :keep] = rec.gather(1, idx)
        hs.value[:, :keep] = val.gather(1, idx)
        gi = idx[None, :, :, None]  # [1, H, keep, 1]
        hs.keys[:, :, :keep] = cand_k.gather(2, gi.expand(-1, -1, -1, cand_k.shape[-1]))
        hs.values[:, :, :keep] = cand_v.gather(2, gi.expand(-1, -1, -1, cand_v.shape[-1]))

    def _evicted_values(self, seqs: torch.Tensor) -> torch.Tensor:
        if not self.uses_values:
            return torch.zeros(seqs.numel())
        try:
            out = torch.tensor([self._values[int(s)] for s in seqs])
        except KeyError as missing:
            raise RuntimeError(
                f"policy {self.name!r} scores tokens by a per-token value, but token {missing} left the window "
                "before it got one; feed through StreamSession (it gives the values from the logits), or call "
                "set_token_values for every token, with chunks no longer than the window"
            ) from None
        if self._last_layer_of_step():  # every layer has read them: forget
            for s in seqs.tolist():
                self._values.pop(s, None)
        return out

    def _last_layer_of_step(self) -> bool:
        return len(self._attended) == len(self.attention_layers) - len(self.local_own)  # local layers: not attended here

    # ---- introspection and persistence ---------------------------------------------------------------
    def heavy_tokens(self, layer_idx: int) -> list[list[int]]:
        """Per KV head: the stream indices of its heavy set (ascending)."""
        hs = self.sets[layer_idx] if layer_idx < len(self.sets) else None
        if hs is None:
            return []
        return [hs.seq[i, : hs.n].tolist() for i in range(hs.seq.shape[0])]

    def nbytes(self) -> int:
        return super().nbytes() + sum(hs.nbytes() for hs in self.sets if hs is not None)

    def used_bytes(self) -> int:
        return super().used_bytes() + sum(hs.nbytes() * hs.n // hs.keys.shape[2] for hs in self.sets if hs is not None)

    def describe(self) -> dict:
        return {"policy": self.name, "sinks": self.sinks, "window": self.window, "heavy": self.heavy}

    def state_dict(self, copy: bool = True) -> dict:
        state = super().state_dict(copy)
        state["scored"] = {
            "n_heavy": self.n_heavy, "values": dict(self._values),
            "sets": [None if hs is None else {k: getattr(hs, k).clone() for k in ("keys", "values", "pos", "seq", "received", "value")} | {"n": hs.n}
                     for hs in self.sets],
            "received": [l.received.clone() if l.received is not None else None for l in self.layers],
            "keys_at": "zero",  # heavy keys rotated to position 0 (snapshots before 25 Nov 2026 kept them as computed)
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        sc = state["scored"]
        self.n_heavy, self._values = sc["n_heavy"], dict(sc["values"])
        self.sets = [None if s is None else HeavySet(**{k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()})
                     for s in sc["sets"]]
        if sc.get("keys_at") != "zero":  # an older snapshot: its heavy keys as computed, at `pos`; rotate them to 0 once
            for i, hs in enumerate(self.sets):
                if hs is not None and hs.n:
                    rope, h, n = self.rope_for_layer(i), hs.keys.shape[1], hs.n
                    cos, sin = rope.cos_sin(-hs.pos[:, :n].reshape(-1))  # [H*n, rd]
                    hs.keys[:, :, :n] = rope.apply(hs.keys[:, :, :n], cos.view(h, n, -1), sin.view(h, n, -1))
        for layer, rec in zip(self.layers, sc["received"]):
            if rec is not None:
                layer.received = rec.clone()
