"""The one mechanism every cache policy shares: a slot-table KV cache that is a transformers `Cache`.

How it works (read this first)
------------------------------
* Every layer owns two preallocated buffers `keys`/`values` of shape [batch, kv_heads, capacity, head_dim].
  A *slot* is one column of those buffers. Which token sits in which slot is one table shared by all
  layers: `seq[slot]` = the token's index in the stream (-1 = free), `pos[slot]` = the position its stored
  key is rotated at.
* A step feeds q new tokens. The first layer's `update` makes a `_Plan` (where the new tokens go, which
  keys must be re-rotated, which tokens the policy evicts); every layer then applies the same plan to its
  own buffers. Eviction happens *after* attention: the new tokens attend to everything kept plus
  themselves, then the cache is trimmed back to the budget.
* Decoding (q == 1) is copy-free: the new token is written into the slot freed by the last eviction and the
  model attends over a view of the buffer. Order inside the buffer does not matter for one query (softmax
  is permutation-invariant); only positions do. Several tokens at once (prefill chunks) gather the kept
  tokens in stream order, append the chunk and compact the survivors. Every new token sees every kept one,
  so a chunk attends without a mask (`_attend_chunk`): the kept part in one unmasked flash call, the new
  tokens causally among themselves, merged by log-sum-exp.
* Compiled decoding (streamkv/compiled.py) needs fixed shapes: `prepare_decode` makes the next one-token
  plan *before* the forward, and in steady state (every slot in use, no re-rotation but the sinks') hands
  the layers a `_StaticStep` of index tensors; `apply_static` writes the new token's slot and the pinned
  keys with `index_copy_` and returns the whole buffer. The table bookkeeping stays eager Python, outside
  the traced region; steps that are not steady take the ordinary path with the plan already made. A policy
  that attends itself says which of its steps are steady (`_static_steady`) and attends them itself over
  the whole buffer, unused slots masked (`_static_extras`: memory between two choices of blocks; h2o and
  sirllm, whose steady step also trades one token of each head's heavy set).

Positions ("by place in the cache", as StreamingLLM)
-----------------------------------------------------
Kept tokens are laid out contiguously in stream order, ending right before the first new token:
the i-th kept token (0-based, of n) sits at position `p0 - n + i` where p0 is the new token's position.
Because RoPE is relative, a key only needs re-rotation when its *distance* to the new token changes:
* Tokens evicted from the middle (sinks + window: the oldest window token) leave the window contiguous, so
  window keys keep the rotation they were computed with: no work per step.
* Pinned tokens (attention sinks) sit right before the window, so their position moves every step. They
  are re-rotated from a pristine copy every step (S keys per layer), never from a previous re-rotation,
  so no rounding accumulates over millions of steps.
* The session feeds positions from `position_ids()`; when they would pass `max_position` it restarts them
  at n_kept and every kept key is rotated once by the (negative) shift. Positions stay below
  `max(max_position, budget + chunk)` however long the stream: no float drift at 1,000,000 tokens.
* Without `position_ids()` (plain `model.generate`), the cache assumes contiguous text positions 0, 1,
  2, ... which is what generate feeds. Use a fresh cache per `generate` call.
* Positions are one table, rotations are per layer: every layer re-rotates its keys with its own
  `RopeSpec` (`rope_for_layer(i)`, proven by the probe in rope.py): local and global layers at their own
  frequencies (Gemma 3), interleaved pairs (GLM, Cohere), and NoPE layers (SmolLM3) not at all. The plan
  holds the position deltas; each distinct description computes its cos/sin once per step.
* Local (sliding-window) layers whose window is narrower than the budget (Gemma 2/3/4, Mistral, gpt-oss,
  OLMo 3, ...) attend through `_local_attention`: the same buffers, each query masked to the keys less than
  the window behind it *by place* (`plan.key_pos`), which is what the model's own mask does over a cache
  laid out in stream order. The masked attention is the model's own: SDPA, or, for models that attend
  with their eager function (Gemma 2's soft-capping, gpt-oss's learned sinks), that function with the
  attention's own arguments (attention.py, "streamkv_eager"). The global layers keep sinks + window as usual.
  Per-layer buffer sizes: when the policy's recent tokens cover a local window (window >= W-1), what that
  layer can see is exactly the last W-1 tokens, so it keeps only those, in its own `LocalLayer` buffers of W
  slots, instead of the whole budget (Gemma 3 1B at a 4,096-token budget: 22 of its 26 layers hold 512
  tokens). A narrower policy window (the layer may then see sinks) keeps the shared buffers, masked.

Writing a policy
----------------
A policy is a subclass that sets `budget`/`sinks` and may override `keep_mask(candidate_seq)`: given the
stream indices of kept tokens plus the new ones (ascending), return which to keep. That is all `window`
and `sink` do, and they stay on the fast path above (one plan for every layer; a one-token step attends
through the model's own SDPA, a chunk through `_attend_chunk`, a compiled step with
`attention.attend_one_traced`).

Policies that remember or score need three more things; the base gives them, off unless asked for:
* **An eviction hand-off.** The plan lists the tokens this step evicts (`evict_seq`, `evict_pos`); each
  layer copies their keys/values (`layer.evicted`) before its buffers are compacted, so a policy can
  store them instead of dropping them (`memory.py`: a block store in RAM, then on disk).
* **The queries.** A policy that defines `attend(layer_idx, module, query, key, value, scaling)` gets every
  layer's attention step through the function registered with transformers' attention interface
  (`attention.py`; no model patching). It computes attention itself, e.g. over the kept tokens plus
  blocks it fetched, with `attention.attend_parts`.
* **Observed attention and places other than "sinks + window".** With `observe = True` every layer keeps
  `received` [kv_heads, slot]: the attention each kept token received (summed over queries and the query
  heads of its KV head), moved with the slots; `attend` adds to it. `gap()` reserves that many positions
  between the pinned tokens and the window: the pinned tokens are re-rotated (from pristine copies) to sit
  before the gap, and the policy places what it fetched inside it, by rotating the queries (exact: RoPE
  is relative), so nothing is rotated from a previous rotation and every distance stays what it would be
  if those tokens were laid out contiguously in the cache.

Per-KV-head layouts build on these three, and leave the slot table as it is (shared by every head: sinks
+ window, the fast path). What differs per head lives beside it, in each layer, placed in the gap:
* `scored.py` (h2o, sirllm): every KV head keeps its own `heavy` best-scored older tokens, the same count
  per head, so a layer's keys stay one dense tensor; a scored policy only writes `score()`.
* `duo.py`: retrieval heads keep everything that left the window (or a block store), streaming heads keep
  only the slot table: head groups of different sizes, attended group by group, so a streaming head holds
  S + W tokens in bytes, not a mask over more.
"""
from __future__ import annotations

import copy
import sys

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin, LinearAttentionLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..attention import NAME, NAMES, attend_one_traced, attend_parts, local_parts, attends_eagerly, module_eager_attention, set_hook, use_streamkv_attention
from ..rope import RopeSpec, UnsupportedModelError, rope_layers, text_config


@dataclass
class _Plan:
    """What every layer does for the current step (computed once, on the first layer)."""

    capacity: int
    rot_slots: torch.Tensor  # kept non-pinned slots whose key must be re-rotated (committed) ...
    rot_delta: torch.Tensor  # ... by this many positions
    pin_slots: torch.Tensor  # slots of pinned tokens, rewritten from their pristine copy ...
    pin_idx: torch.Tensor  # ... which pristine copy ...
    pin_delta: torch.Tensor  # ... rotated from its pristine position to the wanted one
    new_pins: list = field(default_factory=list)  # (offset in the new chunk, pristine index)
    append_slot: int | None = None  # decode fast path: write the new token here ...
    n_view: int = 0  # ... and attend over buffer[:n_view]
    gather_slots: torch.Tensor | None = None  # chunk path: kept slots in stream order
    keep_idx: torch.Tensor | None = None  # chunk path: survivors among cat(gathered, new)
    evict_src: torch.Tensor | None = None  # tokens evicted after this step: slots (decode) or cat indices (chunk)
    evict_seq: torch.Tensor | None = None  # ... their stream indices (ascending) ...
    evict_pos: torch.Tensor | None = None  # ... and the positions their keys are rotated at
    window_start: int = 0  # position of the oldest kept unpinned token (the gap ends right before it)
    p0: int = 0  # position of the step's first new token
    seq0: int = 0  # ... and its index in the stream
    key_pos: torch.Tensor | None = None  # position of every key attended this step, in the returned order
    local_masks: dict = field(default_factory=dict)  # (local window, eager, own buffers) -> its mask this step [1, 1, q, k]
    local_plans: dict = field(default_factory=dict)  # local window -> the step of the local layers with their own buffers
    gap: int = 0  # positions reserved between the pinned tokens and the window
    causal_mask: torch.Tensor | None = None  # the chunk's attention mask, once checked to be plainly causal
    _cs: dict = field(default_factory=dict)  # (id(rope), which) -> (cos, sin), computed once per step

    def cos_sin(self, rope: RopeSpec, which: str) -> tuple:
        """(cos, sin) of this step's 'rot' or 'pin' deltas for the layers rotating like `rope`: computed once
        per step and distinct layer description, shared by the layers that have it."""
        return self.cos_sin_of(rope, which, self.rot_delta if which == "rot" else self.pin_delta)

    def cos_sin_of(self, rope: RopeSpec, which: str, delta: torch.Tensor | int) -> tuple:
        """`cos_sin` of another rotation of this step (`which` names it, e.g. a policy's query rotation): by
        `delta` [n], or one int (its tensor built only the first time)."""
        key = (id(rope), which)
        if key not in self._cs:
            self._cs[key] = rope.cos_sin(delta if torch.is_tensor(delta) else torch.tensor([delta]))
        return self._cs[key]


@dataclass
class _StaticStep:
    """A decode step in steady state, as tensors only (what a compiled step reads; see `prepare_decode`)."""

    slot: torch.Tensor  # [1]: the slot the new token is written to (the one the last step evicted)
    pin_slots: torch.Tensor  # [S]: slots of the pinned tokens ...
    pin_idx: torch.Tensor  # [S]: ... their pristine copies ...
    pin_cos_sin: list  # ... per layer (cos, sin) [S, rotary_dim] of their rotation
    # a policy that attends itself (memory) also gets its attention traced: the model's attention function
    # calls `attend(module, query, keys, values, scaling)` (passed through the forward's kwargs, attention.py)
    attend: object = None
    bias: torch.Tensor | None = None  # [capacity]: 0 for the slots in use, -inf for the rest (the buffer is not full)
    parts: list = field(default_factory=list)  # per layer: what `attend` reads besides the buffers (memory: blocks)
    queries: list = field(default_factory=list)  # per layer: a buffer `attend` copies the query into (memory, choose=ahead)
    evicted: tuple | None = None  # the one token the step evicts (h2o, sirllm): its slot, seq, pos, value, each [1]
    calls: int = 0  # layers `attend` served (checked after the step: a model that drops the kwargs is refused)


class StreamingLayer(CacheLayerMixin):
    """One transformer layer's KV buffers. All bookkeeping lives in the owning `StreamingCache`."""

    is_sliding = False
    is_compileable = False

    def __init__(self, observe: bool = False):
        super().__init__()
        self.pin_keys: torch.Tensor | None = None  # pristine copies of pinned tokens' rotating tensor [B, H, sinks, D]
        # (their keys; their values for a latent MLA cache, whose value slot holds the rotated rope keys)
        self.observe = observe
        self.received: torch.Tensor | None = None  # observe: attention received per slot [H, capacity]
        self.received_view: torch.Tensor | None = None  # ... in the order of the keys returned this step
        self.evicted: tuple | None = None  # copies of this step's evicted keys/values [B, H, e, D]

    def lazy_initialization(self, key_states, value_states, capacity: int = 0, sinks: int = 0, slot: str = "keys") -> None:
        b, h, _, d = key_states.shape
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((b, h, capacity, d))
        self.values = value_states.new_zeros((b, value_states.shape[1], capacity, value_states.shape[-1]))
        rotating = value_states if slot == "values" else key_states
        self.pin_keys = rotating.new_zeros((b, rotating.shape[1], sinks, rotating.shape[-1]))
        if self.observe:
            self.received = torch.zeros((h, capacity), dtype=torch.float32, device=key_states.device)
        self.is_initialized = True

    def grow(self, capacity: int) -> None:
        if self.keys.shape[2] >= capacity:
            return
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)
        if self.received is not None:
            old = self.received
            self.received = old.new_zeros((old.shape[0], capacity))
            self.received[:, : old.shape[1]] = old

    def apply(self, k: torch.Tensor, v: torch.Tensor, plan: _Plan, rope: RopeSpec, sinks: int):
        """Apply the step's plan to this layer's buffers; `rope` is this layer's own description (a NoPE
        layer's keys are never rotated, only moved)."""
        if not self.is_initialized:
            self.lazy_initialization(k, v, plan.capacity, sinks, rope.slot)
        self.grow(plan.capacity)
        self.evicted = None
        # the tensor whose rows carry the rotation: the keys, or (latent MLA cache) the values
        rotating, new = (self.values, v) if rope.slot == "values" else (self.keys, k)
        if plan.rot_slots.numel() and rope.rotates:
            rotating[:, :, plan.rot_slots] = rope.apply(rotating[:, :, plan.rot_slots], *plan.cos_sin(rope, "rot"))
        for offset, j in plan.new_pins:
            self.pin_keys[:, :, j] = new[:, :, offset]
        if plan.pin_slots.numel():
            rotating[:, :, plan.pin_slots] = rope.apply(self.pin_keys[:, :, plan.pin_idx], *plan.cos_sin(rope, "pin"))
        if plan.append_slot is not None:  # decode: no copy, attend over a view
            self.keys[:, :, plan.append_slot] = k[:, :, 0]
            self.values[:, :, plan.append_slot] = v[:, :, 0]
            if plan.evict_src is not None:
                self.evicted = (self.keys[:, :, plan.evict_src], self.values[:, :, plan.evict_src])
            if self.received is not None:
                self.received[:, plan.append_slot] = 0
                self.received_view = self.received[:, : plan.n_view]
            return self.keys[:, :, : plan.n_view], self.values[:, :, : plan.n_view]
        keys = torch.cat([self.keys[:, :, plan.gather_slots], k], dim=2)
        values = torch.cat([self.values[:, :, plan.gather_slots], v], dim=2)
        if plan.evict_src is not None:
            self.evicted = (keys[:, :, plan.evict_src], values[:, :, plan.evict_src])
        if self.received is not None:  # compacted after attention has added to it (finish_step)
            self.received_view = torch.cat([self.received[:, plan.gather_slots], self.received.new_zeros((self.received.shape[0], k.shape[2]))], dim=1)
        n = plan.keep_idx.numel()
        self.keys[:, :, :n] = keys[:, :, plan.keep_idx]
        self.values[:, :, :n] = values[:, :, plan.keep_idx]
        return keys, values

    def apply_static(self, k: torch.Tensor, v: torch.Tensor, step: "_StaticStep", layer_idx: int, rope: RopeSpec):
        """The fixed-shape decode step (see `StreamingCache.prepare_decode`): write the new token into its slot,
        re-rotate the pinned tokens from their pristine copies, attend over the whole buffer. Only tensor
        ops with tensor indices, so a compiled step traces it once and replays it at every position."""
        self.keys.index_copy_(2, step.slot, k)  # [1, H, cap, D] <- [1, H, 1, D]
        self.values.index_copy_(2, step.slot, v)
        if step.pin_slots.numel() and rope.rotates:
            rotating = self.values if rope.slot == "values" else self.keys
            cos, sin = step.pin_cos_sin[layer_idx]
            rotating.index_copy_(2, step.pin_slots, rope.apply(self.pin_keys[:, :, step.pin_idx], cos, sin))
        return self.keys, self.values

    def finish_step(self, plan: _Plan) -> torch.Tensor | None:
        """After attention: move the received-attention scores along with the compacted slots. Returns the
        scores of this step's evicted tokens [H, e] (observe only)."""
        if self.received is None:
            return None
        evicted = self.received_view[:, plan.evict_src] if plan.evict_src is not None else None
        if plan.append_slot is None:
            n = plan.keep_idx.numel()
            self.received[:, :n] = self.received_view[:, plan.keep_idx]
            self.received[:, n:] = 0
        self.received_view = None
        return evicted

    # CacheLayerMixin interface (the owning cache answers for the shared table)
    def update(self, key_states, value_states, *args, **kwargs):  # pragma: no cover - called via the cache
        raise RuntimeError("StreamingLayer is updated through StreamingCache.update")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # pragma: no cover
        raise RuntimeError("asked through StreamingCache.get_mask_sizes")

    def get_seq_length(self) -> int:  # pragma: no cover
        raise RuntimeError("asked through StreamingCache.get_seq_length")

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.pin_keys))

    def used_bytes(self, n_used: int) -> int:
        """Bytes of the filled slots [0, n_used) and the pristine pinned copies."""
        return sum(t[:, :, :n_used].numel() * t.element_size() for t in (self.keys, self.values)) \
            + self.pin_keys.numel() * self.pin_keys.element_size()


class RecurrentStreamingLayer(StreamingLayer, LinearAttentionLayer):
    """A hybrid layer that holds keys and values *and* a recurrent state in one cache layer (Falcon-H1, Zamba,
    Zaya: attention and an SSM side by side in one block). Its KV is a slot-table layer like any other; its
    recurrent state (constant-size) is transformers' own `LinearAttentionLayer` part, carried unchanged, so
    `update_conv_state`/`update_recurrent_state` reach it as they would a `DynamicCache`'s layer."""

    def __init__(self, number_of_states: int = 1, observe: bool = False):
        StreamingLayer.__init__(self, observe)
        LinearAttentionCacheLayerMixin.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        # the slot table calls it with (keys, values, capacity, sinks, slot); the recurrent part with keywords only
        if args:
            StreamingLayer.lazy_initialization(self, *args, **kwargs)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)


@dataclass
class _LocalPlan:
    """One step of the local layers of one window (made once per step, on the first of them)."""

    held: torch.Tensor  # held slots, in stream order
    moved: torch.Tensor  # held slots whose key a position restart shifts ...
    delta: torch.Tensor  # ... by this many positions
    slot: int | None = None  # decode: the new token's slot; attend over slots [0, n_view)
    n_view: int = 0
    key_pos: torch.Tensor | None = None  # chunk: positions of the returned keys (held, then new): masked by place
    start: int = 0  # chunk: the survivors are the returned keys from `start` on, into slots [0, m)
    m: int = 0
    _cs: dict = field(default_factory=dict)  # id(rope) -> (cos, sin) of `delta`

    def cos_sin(self, rope: RopeSpec) -> tuple:
        if id(rope) not in self._cs:
            self._cs[id(rope)] = rope.cos_sin(self.delta)
        return self._cs[id(rope)]


class _LocalTable:
    """Which token each slot of the local layers of one window W holds: the last W-1 tokens of the stream,
    at the W-1 places right before the new one. One table for all the local layers of that window (they
    apply the same steps), as the slot table is shared by every layer."""

    def __init__(self, window: int):
        self.window = window
        self.seq = torch.full((window,), -1, dtype=torch.long)  # per slot: stream index (-1 = free)
        self.pos = torch.zeros(window, dtype=torch.long)  # per slot: position its key is rotated at
        self.n_used = 0  # slots [0, n_used) in use (at most one hole)

    def plan(self, p0: int, seq0: int, q: int) -> _LocalPlan:
        used = self.seq[: self.n_used]
        held = (used >= 0).nonzero().squeeze(1)
        held_seq, order = used[held].sort()
        held = held[order]
        n, w = held.numel(), self.window
        wanted = torch.arange(p0 - n, p0, dtype=torch.long)  # the last n places before the new tokens
        stale = self.pos[held] != wanted  # a position restart: shift every held key once
        lp = _LocalPlan(held, held[stale], (wanted - self.pos[held])[stale])
        self.pos[held] = wanted
        if q == 1:  # decode: into the free slot (or the next one); every held token is inside the window
            holes = (used < 0).nonzero().squeeze(1)
            lp.slot = int(holes[0]) if holes.numel() else self.n_used
            self.n_used = lp.n_view = max(self.n_used, lp.slot + 1)
            self.seq[lp.slot], self.pos[lp.slot] = seq0, p0
            if n + 1 > w - 1:  # after this step the oldest is out of the window
                self.seq[held[0] if n else lp.slot] = -1
            return lp
        lp.key_pos = torch.cat([wanted, torch.arange(p0, p0 + q, dtype=torch.long)])
        seq = torch.cat([held_seq, torch.arange(seq0, seq0 + q, dtype=torch.long)])
        lp.m = min(w - 1, n + q)  # keep the last W-1
        lp.start = n + q - lp.m
        self.seq[:] = -1
        self.seq[: lp.m], self.pos[: lp.m] = seq[lp.start :], lp.key_pos[lp.start :]
        self.n_used = lp.m
        return lp

    def state(self) -> dict:
        return {"seq": self.seq.clone(), "pos": self.pos.clone(), "n_used": self.n_used}

    def load(self, saved: dict) -> None:
        self.seq, self.pos, self.n_used = saved["seq"].clone(), saved["pos"].clone(), saved["n_used"]


class LocalLayer(StreamingLayer):
    """A local (sliding-window) layer's own buffers: the last W-1 tokens of the stream, in [B, H, W, D] (W-1
    held + the new token), instead of the whole budget. Used when the policy's recent tokens cover the window
    (window >= W-1): then what such a layer can see, by place, is exactly the last W-1 tokens, laid out right
    before the new one as in the shared table, so their places follow from p0 alone (`_LocalTable`).

    Decoding writes the new token into the slot its oldest token left (every held token is inside the window:
    no mask); a chunk gathers the held tokens in stream order, appends the chunk (masked by place) and keeps
    the last W-1. A position restart shifts the held keys once, as the shared table does."""

    def __init__(self, table: _LocalTable):
        super().__init__(observe=False)
        self.table = table

    def apply_local(self, k: torch.Tensor, v: torch.Tensor, lp: _LocalPlan, rope: RopeSpec):
        if not self.is_initialized:
            self.lazy_initialization(k, v, self.table.window, 0, rope.slot)
        if lp.moved.numel() and rope.rotates:
            rotating = self.values if rope.slot == "values" else self.keys
            rotating[:, :, lp.moved] = rope.apply(rotating[:, :, lp.moved], *lp.cos_sin(rope))
        if lp.slot is not None:  # decode
            self.keys[:, :, lp.slot] = k[:, :, 0]
            self.values[:, :, lp.slot] = v[:, :, 0]
            return self.keys[:, :, : lp.n_view], self.values[:, :, : lp.n_view]
        keys = torch.cat([self.keys[:, :, lp.held], k], dim=2)  # [B, H, n + q, D]: held, then the chunk
        values = torch.cat([self.values[:, :, lp.held], v], dim=2)
        self.keys[:, :, : lp.m] = keys[:, :, lp.start :]
        self.values[:, :, : lp.m] = values[:, :, lp.start :]
        return keys, values

    def used_bytes(self, n_used: int) -> int:  # the slots its table uses (not the shared table's n_used)
        return sum(t[:, :, : self.table.n_used].numel() * t.element_size() for t in (self.keys, self.values))


class StreamingCache(Cache):
    """Base class of the cache policies: keeps at most `budget` tokens between steps (None = no limit),
    the first `sinks` of the stream pinned. Subclasses choose what to keep with `keep_mask`."""

    name = "base"
    observe = False  # layers keep the attention each kept token received (needs `attend`)
    keeps_evicted = False  # layers copy out the keys/values each step evicts (`layer.evicted`)
    reserved = 0  # the most positions `gap()` can ever reserve (position restarts leave room for them)
    serves_local_layers = False  # a policy that attends itself leaves local layers with their own window to the base

    def __init__(self, model, *, budget: int | None, sinks: int = 0, max_position: int | None = None):
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ValueError(f"cache budget must be a positive integer, got {budget!r}")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {sinks!r}")
        if budget is not None and sinks >= budget:
            raise ValueError(f"sinks ({sinks}) must be smaller than the cache budget ({budget}): no room for recent tokens")
        # every layer's rotation, verified by the probe (None: a layer without attention); `rope` is the first
        # attention layer's, enough for models whose layers all rotate alike: per-layer code uses rope_for_layer
        self.ropes = rope_layers(model)
        self.rope = next(spec for spec in self.ropes if spec is not None)
        # a policy that attends, observes, keeps evicted tokens or reserves a gap: more than the shared slot table
        custom = self._custom = bool(hasattr(self, "attend") or self.observe or self.keeps_evicted or self.reserved)
        if custom and any(spec is not None and spec.slot != "keys" for spec in self.ropes):
            raise UnsupportedModelError(
                f"policy {self.name!r} rotates and attends cached keys itself, but this model caches a multi-head "
                "latent attention latent (its keys are expanded inside attention, the rotating rope keys sit in the "
                "value slot); use sink, window or dense for it."
            )
        # hybrids: layers that keep a recurrent state (SSM, convolution, linear attention) instead of KV get
        # transformers' own cache layer, carried unchanged (constant-size); the slot table serves the rest, and
        # a policy that attends, scores or stores manages those attention layers only
        self._recurrent_protos = _recurrent_layers(model)
        # ... and layers holding KV *and* a recurrent state (Falcon-H1, Zamba): a slot-table layer that also
        # carries the recurrent part ({layer: number of recurrent states})
        self._combined = {i: l.number_of_states for i, l in self._recurrent_protos.items() if isinstance(l, CacheLayerMixin)}
        # the layers that attend (and store KV): a policy that attends or keeps evicted tokens manages these only
        self.attention_layers = [i for i, spec in enumerate(self.ropes) if spec is not None]
        config = text_config(model.config)  # multimodal wrappers nest the decoder's config
        self.n_layers = config.num_hidden_layers
        # Local (sliding-window) layers. While the cache holds no more than a layer's window, everything kept
        # is inside it. Past that, the model's own sliding mask is index arithmetic over a buffer whose order a
        # bounded cache does not keep, so those layers attend through `_local_attention` instead: the same
        # tokens, masked by *place* (the positions this cache gives them), so a local layer sees the last W
        # places as it would in a cache laid out in stream order. Dense keeps stream order: its mask is right.
        self.local_windows: dict[int, int] = {}  # layer -> its window, for local layers narrower than the budget
        if budget is not None:
            self.local_windows = {i: w for i, w in enumerate(layer_windows(model, config)) if w is not None and budget + 1 > w}
        # local layers whose window the policy's recent tokens cover keep only that window (LocalLayer); the
        # others (a window narrower than W-1: they may see sinks) are masked over the shared buffers
        recent = self.recent_tokens(budget, sinks) if budget is not None else 0
        self.local_own = {i: w for i, w in self.local_windows.items()
                          if (not custom or self.serves_local_layers) and recent >= w - 1}
        self.local_tables = {w: _LocalTable(w) for w in sorted(set(self.local_own.values()))}
        impl = getattr(model.config, "_attn_implementation", None)
        if self.local_windows and impl not in ("sdpa", "eager", *NAMES):
            w = min(self.local_windows.values())
            raise UnsupportedModelError(
                f"layers {sorted(self.local_windows)[:5]} of this model attend within a sliding window of {w} tokens and "
                f"this cache keeps {budget + 1}: streamkv masks such layers through SDPA or the model's eager attention, "
                f"but this model attends with {impl!r}; load it with attn_implementation='sdpa' or 'eager', or choose a "
                f"budget below {w}."
            )
        if hasattr(self, "attend") and attends_eagerly(model):
            raise UnsupportedModelError(
                f"policy {self.name!r} computes attention itself, as SDPA does, but this model attends with its own eager "
                "function (e.g. attention logit soft-capping in Gemma 2, learned attention sinks in gpt-oss), which that "
                "would silently drop; use sink or window for it (they attend through the model's own function)."
            )
        if custom and len(self.local_own) < len(self.local_windows):
            w = max(w for i, w in self.local_windows.items() if i not in self.local_own)
            if self.serves_local_layers:
                raise UnsupportedModelError(
                    f"layers {sorted(self.local_windows)[:5]} of this model attend within a sliding window of {w} tokens; "
                    f"policy {self.name!r} keeps their window in buffers of their own when its recent window covers it: "
                    f"choose window >= {w - 1} (or a budget below {w})."
                )
            raise UnsupportedModelError(
                f"layers {sorted(self.local_windows)[:5]} of this model attend within a sliding window of {w} tokens, "
                f"but this cache keeps {budget + 1}; policy {self.name!r} attends by itself and does not mask local "
                f"layers yet (set serves_local_layers if it leaves them to the base): choose a budget below {w}, or a "
                "built-in policy (sink, window, memory, h2o, sirllm, duo: their local layers keep their own window)."
            )
        super().__init__(layers=[])
        if self._recurrent_protos:  # every index exists from the start: a recurrent layer may be called first
            self.layers = self._fresh_layers()
        self.budget, self.sinks = budget, sinks
        if max_position is None and budget is not None:
            # restart positions every ~budget+256 tokens; stay inside the trained context when it is small
            span = budget + self.reserved  # kept tokens plus the positions a policy may reserve between them
            max_position = 2 * span + 256
            trained = getattr(config, "max_position_embeddings", None)
            if trained:
                max_position = min(max_position, max(trained, span + 1))
        self.max_position = max_position
        cap = budget + 1 if budget is not None else 256
        self.seq = torch.full((cap,), -1, dtype=torch.long)  # per slot: index of the token in the stream
        self.pos = torch.zeros(cap, dtype=torch.long)  # per slot: position its stored key is rotated at
        self.pin_pos = torch.zeros(sinks, dtype=torch.long)  # position of each pristine pinned key
        self.n_used = 0  # slots [0, n_used) are in use (at most one hole, filled by the next token)
        self.seen = 0  # tokens fed so far
        self.next_pos = 0  # position the next token gets unless position_ids() rebases
        self._requested_p0: int | None = None
        self._plan: _Plan | None = None
        self._ready: _Plan | None = None  # a plan `prepare_decode` made for a step it could not make static
        self._static: _StaticStep | None = None  # set for one fixed-shape decode step (`prepare_decode`)
        self._n_kept_before: int | None = None  # what n_kept was before a plan `prepare_decode` made in advance
        self._first_layer: int | None = None
        self._eager_attention = attends_eagerly(model)  # local layers attend through the model's eager function
        if hasattr(self, "attend") or self.local_windows:
            use_streamkv_attention(model)
        elif impl == "sdpa" and self._static_layout():  # sink/window: a compiled step attends through streamkv's function
            use_streamkv_attention(model)
        self._attn_config = model.config  # its `_attn_implementation`: the attention function the model calls now
        self._attended: set[int] = set()  # layers whose attention went through `attend` this step

    def _fresh_layers(self) -> list:
        """One layer per index for a hybrid: its own recurrent-state layer, or an empty slot-table layer."""
        return [copy.deepcopy(self._recurrent_protos[i]) if i in self._recurrent_protos and i not in self._combined
                else self._new_layer(i) for i in range(self.n_layers)]

    def _new_layer(self, i: int) -> "StreamingLayer":
        if i in self._combined:  # KV and a recurrent state in one layer (Falcon-H1, Zamba)
            return RecurrentStreamingLayer(self._combined[i], self.observe)
        return LocalLayer(self.local_tables[self.local_own[i]]) if i in self.local_own else StreamingLayer(self.observe)

    @property
    def kv_layers(self) -> list["StreamingLayer"]:
        """The layers the slot table serves (all of them, except a hybrid's recurrent layers)."""
        return [l for l in self.layers if isinstance(l, StreamingLayer)]

    def rope_for_layer(self, layer_idx: int) -> RopeSpec:
        """How layer `layer_idx` rotates its keys (and queries): layers may differ (local/global frequencies,
        NoPE layers), so anything that rotates one layer's keys or queries asks here."""
        return self.ropes[layer_idx]

    # ---- what a policy decides ------------------------------------------------------------------------
    def recent_tokens(self, budget: int, sinks: int) -> int:
        """How many of the most recent tokens the policy always keeps (`keep_mask`'s window): a local layer
        whose window this covers keeps only that window, in buffers of its own."""
        return budget - sinks

    def keep_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """Which candidates to keep. `seq`: stream indices of kept + new tokens, ascending."""
        keep = torch.ones_like(seq, dtype=torch.bool)
        if self.budget is None or seq.numel() <= self.budget:
            return keep
        recent = self.budget - self.sinks
        keep[:] = False
        keep[seq < self.sinks] = True
        keep[-recent:] = True
        return keep

    @property
    def max_resident(self) -> int | None:
        """The most tokens attended besides the new ones: kept tokens plus what `gap()` may bring in."""
        return None if self.budget is None else self.budget + self.reserved

    def gap(self) -> int:
        """Positions to reserve between the pinned tokens and the window this step (see `memory.py`)."""
        return 0

    # ---- positions --------------------------------------------------------------------------------------
    def position_ids(self, q: int) -> torch.Tensor:
        """Positions for the next q tokens (what a streaming runtime feeds). Restarts them when they would
        pass max_position, so they stay bounded on an endless stream."""
        p0 = self.next_pos
        if self.max_position is not None and p0 + q > self.max_position:
            p0 = self.n_kept + self.reserved
        self._requested_p0 = p0
        return torch.arange(p0, p0 + q, dtype=torch.long).unsqueeze(0)

    # ---- transformers Cache interface ---------------------------------------------------------------
    @property
    def n_kept(self) -> int:
        if self._n_kept_before is not None:  # a plan made in advance: the model asks what was kept before it
            return self._n_kept_before  # (a Python int: a compiled step must not turn a tensor into an int)
        return int((self.seq[: self.n_used] >= 0).sum())

    @property
    def n_cached(self) -> int:
        """Tokens each head holds between steps (the slot table's, plus what a policy keeps outside it)."""
        return self.n_kept

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n_kept

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.n_kept + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(
                f"a streamkv cache holds one stream (batch size 1), got batch size {key_states.shape[0]}; "
                "use one cache (or StreamSession) per stream"
            )
        if self._static is not None:
            return self.layers[layer_idx].apply_static(key_states, value_states, self._static, layer_idx, self.ropes[layer_idx])
        if self._first_layer is None:
            self._first_layer = layer_idx
        if layer_idx == self._first_layer:
            self._check_attended()
            self._plan, self._ready, self._n_kept_before = self._ready or self._make_plan(key_states.shape[2]), None, None
            self._attended = set()
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        layer = self.layers[layer_idx]
        if isinstance(layer, LocalLayer):
            w, plan = layer.table.window, self._plan
            if w not in plan.local_plans:  # the first local layer of this window in this step
                plan.local_plans[w] = layer.table.plan(plan.p0, plan.seq0, key_states.shape[2])
            keys, values = layer.apply_local(key_states, value_states, plan.local_plans[w], self.ropes[layer_idx])
        else:
            keys, values = layer.apply(key_states, value_states, self._plan, self.ropes[layer_idx], self.sinks)
        if hasattr(self, "attend") and not isinstance(layer, LocalLayer):
            set_hook(keys, lambda module, query, k, v, scaling, **_: self._attend_layer(layer_idx, module, query, k, v, scaling))
        elif layer_idx in self.local_windows:
            set_hook(keys, lambda module, query, k, v, scaling, attention_mask=None, **kw:  # (a mask by place instead)
                     self._local_attention(layer_idx, module, query, k, v, scaling, kw))
        elif key_states.shape[2] > 1 and getattr(self._attn_config, "_attn_implementation", None) == NAME:
            set_hook(keys, self._attend_chunk)
        return keys, values

    def _attend_chunk(self, module, query, keys, values, scaling, attention_mask=None, **kwargs):
        """A chunk's attention for the slot table alone (sink, window, dense): the returned keys are the kept
        tokens, which every new token sees, then the q new ones, seen causally. So no mask is needed: the kept
        part is one unmasked flash call (the g query heads of a KV head as g*q rows, no copy of the keys) and
        the new part a square causal one, merged by log-sum-exp (`attend_parts`). Against SDPA with
        transformers' [q, k] mask, on the embedded model, int8, 2 threads, AMD EPYC: prefill 839 -> 950
        tokens/s (building and applying the mask cost ~90 ms per 1,024 tokens, the key copies of GQA ~120 ms).
        A mask that is not that causal one (a prefix-LM's bidirectional prefix) goes to SDPA as before."""
        plan = self._plan
        if attention_mask is None and not getattr(module, "is_causal", True):  # (no mask, not causal: sees all)
            return sdpa_attention_forward(module, query, keys, values, None, scaling=scaling, **kwargs)[0]
        if attention_mask is not None and plan.causal_mask is not attention_mask:
            q, k = query.shape[2], keys.shape[2]
            causal = torch.arange(k, device=query.device)[None, :] <= torch.arange(k - q, k, device=query.device)[:, None]
            if attention_mask.dtype != torch.bool or not torch.equal(attention_mask.expand(1, 1, q, k)[0, 0], causal):
                return sdpa_attention_forward(module, query, keys, values, attention_mask, scaling=scaling, **kwargs)[0]
            plan.causal_mask = attention_mask  # checked once per step: every layer gets the same mask object
        return attend_parts(query, local_parts(query, keys, values), scaling)[0]

    def _local_attention(self, layer_idx, module, query, keys, values, scaling, kwargs):
        """A local layer's attention: the model's own attention (SDPA, or its eager function with soft-capping,
        learned sinks, ... passed on in `kwargs`) over the returned keys, each query seeing the keys whose
        place is less than the layer's window behind it (and not ahead of it)."""
        plan, w, layer = self._plan, self.local_windows[layer_idx], self.layers[layer_idx]
        masks, eager = plan.local_masks, self._eager_attention
        own = isinstance(layer, LocalLayer)  # its own keys (key_pos None: all inside the window), or the shared ones
        key = (w, eager, own)
        if key not in masks:
            key_pos = plan.local_plans[w].key_pos if own else plan.key_pos
            if key_pos is None:
                masks[key] = None
            else:
                q_pos = torch.arange(plan.p0, plan.p0 + query.shape[2])  # [q]
                dist = q_pos[:, None] - key_pos[None, :]  # [q, k]: places between each query and each key
                seen = ((dist >= 0) & (dist < w))[None, None].to(query.device)  # [1, 1, q, k]
                # eager functions add their mask to the scores: 0 where seen, the dtype's minimum elsewhere
                masks[key] = torch.zeros(seen.shape, dtype=query.dtype, device=query.device).masked_fill_(
                    ~seen, torch.finfo(query.dtype).min) if eager else seen
        if eager:
            out, _ = module_eager_attention(module)(module, query, keys, values, masks[key], scaling=scaling, **kwargs)
        else:
            out, _ = sdpa_attention_forward(module, query, keys, values, masks[key], scaling=scaling, **kwargs)
        return out

    def _attend_layer(self, layer_idx, module, query, keys, values, scaling):
        self._attended.add(layer_idx)
        return self.attend(layer_idx, module, query, keys, values, scaling)

    def _check_attended(self) -> None:
        """A policy with `attend` must see every layer's attention (else evicted tokens would be lost
        silently): refuse a model whose attention does not go through transformers' attention interface."""
        if not hasattr(self, "attend") or self._plan is None:
            return
        missing = [i for i, layer in enumerate(self.layers)
                   if getattr(layer, "is_initialized", False) and i not in self._attended and not isinstance(layer, LocalLayer)]
        if missing:
            raise UnsupportedModelError(
                f"policy {self.name!r} computes attention itself, but layers {missing[:5]} of this model did not call "
                "the attention function registered with transformers' attention interface (is the model's "
                "attn_implementation 'streamkv'? a custom attention module?); use sink or window for this model."
            )

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a streaming cache cannot be cropped (assisted/speculative decoding is not supported)")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("beam search is not supported with a streaming cache")

    def batch_repeat_interleave(self, repeats: int):
        if repeats != 1:
            raise NotImplementedError("streamkv caches hold one stream (num_return_sequences must be 1)")

    # ---- the fixed-shape decode step (compiled decoding, see streamkv/compiled.py) --------------------------
    @property
    def static_decode_capable(self) -> bool:
        """Whether this policy's decode steps can take the fixed-shape path: the slot table alone (sink,
        window), or a policy that says which of its steps are steady and attends them itself
        (`_static_steady`, `_static_extras`: memory, h2o, sirllm, duo with retrieval=memory). duo with dense
        retrieval heads stays eager (their buffer grows); so do hybrids (their
        recurrent layers) and models with local layers."""
        return self._static_layout() and not self._custom

    def _static_layout(self) -> bool:
        """A bounded cache of slot-table layers only (no local layers' own buffers, no recurrent layers)."""
        return self.budget is not None and not self.local_windows and not self._recurrent_protos

    def _static_steady(self, plan: _Plan) -> bool:
        """Whether the one-token step `plan` is steady: a one-slot step (below) with the cache full."""
        return self._one_slot_step(plan) and plan.n_view == plan.capacity

    def _one_slot_step(self, plan: _Plan) -> bool:
        """The step writes the new token into one slot and moves nothing but the pinned tokens (no other
        re-rotation, no new pin), and every layer has its buffers."""
        return (plan.append_slot is not None and not plan.rot_slots.numel() and not plan.new_pins
                and len(self.layers) == self.n_layers and all(l.is_initialized for l in self.layers))

    def _static_extras(self, plan: _Plan, step: _StaticStep) -> None:
        """A policy that attends its static steps itself fills in `step.attend`, `bias` and `parts` here. The
        slot table alone (sink, window): the full buffer through `attend_one_traced`, which inductor fuses,
        instead of the model's SDPA call (one fused-kernel call per layer: 191 us at 1,024 keys, measured);
        a model that attends with its own eager function (soft-capping, learned sinks) or another
        implementation (flash attention on a GPU) keeps it."""
        if getattr(self._attn_config, "_attn_implementation", None) == NAME:
            step.attend = self._attend_static_full

    def _attend_static_full(self, module, query, keys, values, scaling):
        """A static step's attention for the slot table alone (traced): one query over the whole, full buffer."""
        self._static.calls += 1
        return attend_one_traced(query, [(query, keys, values, False)], scaling)

    def prepare_decode(self) -> bool:
        """Make the plan of the next one-token step now, outside the model's forward. True when it is a
        steady-state step (cache full, the new token goes into the slot the last step freed, no re-rotation
        but the pinned tokens', no new pin): then every layer's `update` runs `apply_static`, whose shapes
        never change, until `end_decode`. Otherwise the plan is kept for the forward's first `update` (the
        ordinary path) and False is returned. Call `position_ids(1)` first, as for any step."""
        if not self.static_decode_capable or self._first_layer is None:
            return False
        n_kept = self.n_kept
        plan = self._make_plan(1)
        self._n_kept_before = n_kept
        layers = self.layers
        if not self._static_steady(plan):
            self._ready = plan
            return False
        # the model asks the cache's length (for a mask the static step does not use, and a cache_position):
        # a constant, or the traced graph would specialise on it (a policy whose buffer is not always full)
        self._n_kept_before = self.budget
        self._plan, self._attended = plan, set(range(self.n_layers))  # the static step checks its own calls
        # every pinned key, moved this step or not, from its pristine copy to where the plan put it: the same
        # shapes at every step (sink moves them all at each step; memory only after a block left, and a
        # graph per count would compile again)
        seq = self.seq[: plan.n_view]
        pin_slots = ((seq >= 0) & (seq < self.sinks)).nonzero().squeeze(1)  # [S]
        pin_idx = seq[pin_slots]
        pin_delta = self.pos[pin_slots] - self.pin_pos[pin_idx]
        cos_sin = []
        for layer, rope in zip(layers, self.ropes):
            cos, sin = plan.cos_sin_of(rope, "static pin", pin_delta)  # once per distinct layer description
            cos_sin.append((cos.to(layer.keys.device, layer.keys.dtype), sin.to(layer.keys.device, layer.keys.dtype)))
        device = layers[0].keys.device
        self._static = _StaticStep(torch.tensor([plan.append_slot], device=device), pin_slots.to(device),
                                   pin_idx.to(device), cos_sin)
        self._static_extras(plan, self._static)
        return True

    def check_static(self) -> None:
        """After a static step's forward: a policy that attends itself must have served every attention
        layer (the model passes its forward's kwargs on to the attention function; one that did not would
        have attended the whole buffer, unused slots and all, through SDPA)."""
        step = self._static
        if step is not None and step.attend is not None and step.calls != len(self.attention_layers):
            raise UnsupportedModelError(
                f"policy {self.name!r}: {step.calls} of this model's {len(self.attention_layers)} attention layers "
                "reached streamkv's compiled step (the model does not pass its forward's keyword arguments on to "
                "its attention function); decode without --compile for this model."
            )

    def finish_static(self) -> None:
        """After a static step's forward, outside the traced region: a policy's own work (memory: choose ahead)."""

    def end_decode(self) -> None:
        """After the step's forward (also when it failed)."""
        self._static = self._n_kept_before = self._ready = None

    # ---- the plan ---------------------------------------------------------------------------------
    def _ensure_capacity(self, needed: int) -> int:
        cap = self.seq.numel()
        if needed > cap:
            new_cap = max(needed, 2 * cap) if self.budget is None else needed
            self.seq = torch.cat([self.seq, torch.full((new_cap - cap,), -1, dtype=torch.long)])
            self.pos = torch.cat([self.pos, torch.zeros(new_cap - cap, dtype=torch.long)])
        return self.seq.numel()

    def _make_plan(self, q: int) -> _Plan:
        p0 = self._requested_p0 if self._requested_p0 is not None else self.next_pos
        self._requested_p0 = None
        used = self.seq[: self.n_used]
        kept_slots = (used >= 0).nonzero().squeeze(1)
        kept_seq, order = used[kept_slots].sort()
        kept_slots = kept_slots[order]
        n_kept = kept_slots.numel()

        # lay kept tokens out contiguously before p0, the pinned ones `gap` positions earlier; re-rotate those
        # whose distance to p0 changed
        gap = self.gap()
        wanted = torch.arange(p0 - n_kept, p0, dtype=torch.long)
        pinned = kept_seq < self.sinks
        wanted[pinned] -= gap
        stale = self.pos[kept_slots] != wanted
        rot = stale & ~pinned
        rot_slots, rot_delta = kept_slots[rot], (wanted - self.pos[kept_slots])[rot]
        pin = stale & pinned
        pin_slots, pin_idx = kept_slots[pin], kept_seq[pin]
        pin_delta = wanted[pin] - self.pin_pos[pin_idx]
        self.pos[kept_slots] = wanted

        new_seq = torch.arange(self.seen, self.seen + q, dtype=torch.long)
        new_pos = torch.arange(p0, p0 + q, dtype=torch.long)
        new_pins = [(i, int(s)) for i, s in enumerate(new_seq.tolist()) if s < self.sinks]
        for i, j in new_pins:
            self.pin_pos[j] = p0 + i
        keep = self.keep_mask(torch.cat([kept_seq, new_seq]))
        self.seen += q
        self.next_pos = p0 + q
        plan = _Plan(self.seq.numel(), rot_slots, rot_delta, pin_slots, pin_idx, pin_delta, new_pins)
        plan.gap = gap
        plan.window_start = p0 - n_kept + int(pinned.sum())
        plan.p0, plan.seq0 = p0, self.seen - q

        holes = (used < 0).nonzero().squeeze(1)
        if q == 1 and holes.numel() <= 1:  # decode fast path
            if holes.numel():
                slot, plan.n_view = int(holes[0]), self.n_used
            else:
                slot, plan.n_view = self.n_used, self.n_used + 1
                plan.capacity = self._ensure_capacity(plan.n_view)
            self.seq[slot], self.pos[slot] = new_seq[0], p0
            if self.local_windows:
                plan.key_pos = self.pos[: plan.n_view].clone()
            gone = ~keep[:n_kept]
            if self.keeps_evicted and (bool(gone.any()) or not keep[-1]):
                plan.evict_src = torch.cat([kept_slots[gone], torch.tensor([slot] if not keep[-1] else [], dtype=torch.long)])
                plan.evict_seq = torch.cat([kept_seq, new_seq])[~keep]
                plan.evict_pos = torch.cat([wanted, new_pos])[~keep]
            self.seq[kept_slots[gone]] = -1  # evicted after this step's attention
            if not keep[-1]:
                self.seq[slot] = -1
            self.n_used = plan.n_view
            plan.append_slot = slot
            return plan

        # several tokens: gather kept in stream order, append, compact the survivors into slots [0, n)
        keep_idx = keep.nonzero().squeeze(1)
        n = keep_idx.numel()
        plan.capacity = self._ensure_capacity(n + 1)
        self.seq[:] = -1
        self.seq[:n] = torch.cat([kept_seq, new_seq])[keep_idx]
        self.pos[:n] = torch.cat([wanted, new_pos])[keep_idx]
        self.n_used = n
        plan.gather_slots, plan.keep_idx = kept_slots, keep_idx
        if self.local_windows:
            plan.key_pos = torch.cat([wanted, new_pos])
        if self.keeps_evicted and n < keep.numel():
            plan.evict_src = (~keep).nonzero().squeeze(1)
            plan.evict_seq = torch.cat([kept_seq, new_seq])[plan.evict_src]
            plan.evict_pos = torch.cat([wanted, new_pos])[plan.evict_src]
        return plan

    # ---- introspection and persistence ---------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the KV buffers (allocated, not just filled)."""
        return sum(layer.nbytes() for layer in self.kv_layers) + _recurrent_bytes(self.layers)

    def used_bytes(self) -> int:
        """Bytes of the keys/values actually kept (filled slots, pristine sink copies): what a policy needs,
        whatever its buffers' spare capacity. Policies that keep KV outside the slot table add theirs."""
        return sum(l.used_bytes(self.n_used) for l in self.kv_layers if l.is_initialized) + _recurrent_bytes(self.layers)

    def describe(self) -> dict:
        return {"policy": self.name, "budget": self.budget, "sinks": self.sinks}

    def state_dict(self, copy: bool = True) -> dict:
        """Everything needed to continue the stream exactly (for snapshots to disk). copy=False gives views
        of the live buffers: no copy, but only valid until the cache is fed again."""
        grab = (lambda t: t.clone()) if copy else (lambda t: t)
        return {
            "describe": self.describe(),
            "seq": self.seq.clone(), "pos": self.pos.clone(), "pin_pos": self.pin_pos.clone(),
            "n_used": self.n_used, "seen": self.seen, "next_pos": self.next_pos, "first_layer": self._first_layer,
            "layers": [
                {"keys": grab(l.keys[:, :, : self.n_used]), "values": grab(l.values[:, :, : self.n_used]),
                 "pin_keys": grab(l.pin_keys)} if type(l) in (StreamingLayer, RecurrentStreamingLayer) and l.is_initialized
                else None
                for l in self.layers
            ],
            # local layers' own buffers (LocalLayer), written whole (W tokens: incremental snapshots skip them)
            **({"local": {"tables": {w: t.state() for w, t in self.local_tables.items()},
                          "layers": {i: {"keys": grab(l.keys[:, :, : l.table.n_used]), "values": grab(l.values[:, :, : l.table.n_used])}
                                     for i, l in enumerate(self.layers) if isinstance(l, LocalLayer) and l.is_initialized}}}
               if self.local_own else {}),
            **({"recurrent": {i: _recurrent_state(self.layers[i]) for i in self._recurrent_protos}}
               if self._recurrent_protos else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["describe"] != self.describe():
            raise ValueError(f"snapshot is of {state['describe']}, this cache is {self.describe()}")
        self.seq, self.pos, self.pin_pos = state["seq"].clone(), state["pos"].clone(), state["pin_pos"].clone()
        self.n_used, self.seen, self.next_pos = state["n_used"], state["seen"], state["next_pos"]
        self._first_layer = state["first_layer"]
        self.layers = []
        cap = self.seq.numel()
        for w, saved_table in state.get("local", {}).get("tables", {}).items():
            self.local_tables[w].load(saved_table)
        for i, saved in enumerate(state["layers"]):
            if i in self._recurrent_protos and i not in self._combined:
                layer = copy.deepcopy(self._recurrent_protos[i])
                _load_recurrent(layer, state["recurrent"][i])
                self.layers.append(layer)
                continue
            layer = self._new_layer(i)
            if isinstance(layer, LocalLayer):
                if saved is not None:
                    raise ValueError(f"snapshot holds layer {i} in the shared buffers, this cache keeps it local (W tokens): "
                                     "it was written by an older streamkv; start the session again from its text")
                saved_local = state.get("local", {}).get("layers", {}).get(i)
                if saved_local is not None:
                    layer.lazy_initialization(saved_local["keys"], saved_local["values"], layer.table.window, 0, self.ropes[i].slot)
                    n = saved_local["keys"].shape[2]
                    layer.keys[:, :, :n], layer.values[:, :, :n] = saved_local["keys"], saved_local["values"]
                self.layers.append(layer)
                continue
            if saved is not None:
                slot = self.ropes[len(self.layers)].slot
                layer.lazy_initialization(saved["keys"], saved["values"], cap, self.sinks, slot)
                layer.keys[:, :, : self.n_used] = saved["keys"]
                layer.values[:, :, : self.n_used] = saved["values"]
                layer.pin_keys.copy_(saved["pin_keys"])
            if i in self._combined:
                _load_recurrent(layer, state["recurrent"][i])
            self.layers.append(layer)


def layer_windows(model, config) -> list[int | None]:
    """Each layer's sliding window (None: attends everything), as transformers builds its masks: per layer
    type where the config lists them (Gemma 2/3, gpt-oss, OLMo 3: "sliding_attention"), else the model-wide
    `sliding_window` for every layer (Mistral, Qwen2 with use_sliding_window). A config may carry a
    `sliding_window` its model never applies (Moshi): only models whose modeling code builds sliding masks
    (imports transformers' `create_sliding_window_causal_mask`) count; the coverage sweep checks each type."""
    n, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return [None] * n
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    if not any(hasattr(mod, "create_sliding_window_causal_mask") for mod in modules if mod is not None):
        return [None] * n
    types = getattr(config, "layer_types", None)
    if types:
        return [window if t == "sliding_attention" else None for t in types[:n]]
    return [window] * n


# ---- hybrids: recurrent-state layers -------------------------------------------------------------------------

def _recurrent_layers(model) -> dict:
    """{layer index: an empty transformers cache layer} for the layers of `model` that keep a recurrent state
    (those that also hold KV, Falcon-H1's, are `CacheLayerMixin`s too: the cache serves them with a
    `RecurrentStreamingLayer`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    layers = DynamicCache(config=model.config).layers
    return {i: l for i, l in enumerate(layers) if isinstance(l, LinearAttentionCacheLayerMixin)}


_RECURRENT_FIELDS = ("conv_states", "recurrent_states", "is_conv_states_initialized", "is_recurrent_states_initialized",
                     "has_previous_state", "conv_kernel_size")


def _recurrent_state(layer) -> dict:
    """A recurrent layer's state, copied (its fields are dicts by state index)."""
    return {f: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in getattr(layer, f).items()} for f in _RECURRENT_FIELDS}


def _load_recurrent(layer, saved: dict) -> None:
    for f in _RECURRENT_FIELDS:
        setattr(layer, f, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in saved[f].items()})
    first = next((t for t in layer.conv_states.values() if t is not None), None)
    first = first if first is not None else next((t for t in layer.recurrent_states.values() if t is not None), None)
    if first is not None:
        layer.dtype, layer.device = first.dtype, first.device


def _recurrent_bytes(layers) -> int:
    return sum(t.numel() * t.element_size() for l in layers
               for f in ("conv_states", "recurrent_states") for t in getattr(l, f, {}).values() if t is not None)


# ---- incremental snapshots ------------------------------------------------------------------------------
# Why they can be small: a window token's key keeps the rotation it was computed with until a position
# restart (see "Positions" above), and values never change. So a token that an earlier snapshot holds at
# the same stream index *and* rotation (`seq`, `pos`) is bit-identical there, and a later snapshot can point
# at it instead of writing it again. Only the slot table is deduplicated; what a subclass adds to the state
# (heavy sets, block-store index, ...) is written in full.

def snapshot_index(state: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(seq, pos) of the kept slots of a `StreamingCache.state_dict`, or None for another kind of state."""
    if not isinstance(state, dict) or "layers" not in state or "seq" not in state:
        return None
    n = state["n_used"]
    return state["seq"][:n].clone(), state["pos"][:n].clone()


def delta_state(state: dict, base: tuple[torch.Tensor, torch.Tensor], max_new: float = 0.5) -> dict | None:
    """`state` with the keys/values of every slot whose token the base snapshot holds at the same rotation
    replaced by that slot's index there (`merge_delta` undoes it). None when more than `max_new` of the kept
    tokens are new: the full state is then the better base for the snapshots after it."""
    if snapshot_index(state) is None:
        return None
    n = state["n_used"]
    where = {sp: j for j, sp in enumerate(zip(base[0].tolist(), base[1].tolist()))}
    from_base = torch.tensor([where.get(sp, -1) for sp in zip(state["seq"][:n].tolist(), state["pos"][:n].tolist())],
                             dtype=torch.long)  # [n]: slot in the base, -1 = not there (written here)
    new = from_base < 0
    if int(new.sum()) > max_new * n:
        return None
    layers = [None if l is None else {"keys": l["keys"][:, :, new], "values": l["values"][:, :, new],  # [1, H, n_new, D]
                                      "pin_keys": l["pin_keys"]} for l in state["layers"]]
    return {**state, "layers": layers, "from_base": from_base}


def merge_delta(base: dict, delta: dict) -> dict:
    """The full state a `delta_state` was made from, given the state of its base snapshot."""
    from_base = delta["from_base"]
    old = from_base >= 0
    if old.any() and int(from_base.max()) >= base["n_used"]:
        raise ValueError("incremental snapshot points past its base's slots: not its base")
    layers = []
    for b, d in zip(base["layers"], delta["layers"], strict=True):
        if d is None:
            layers.append(None)
            continue
        if b is None and bool(old.any()):
            raise ValueError("incremental snapshot refers to a layer its base does not hold")
        full = {}
        for name in ("keys", "values"):
            t = d[name]
            out = t.new_empty((*t.shape[:2], from_base.numel(), t.shape[3]))  # [1, H, n_used, D]
            out[:, :, ~old] = t
            if bool(old.any()):
                out[:, :, old] = b[name][:, :, from_base[old]]
            full[name] = out
        layers.append({**full, "pin_keys": d["pin_keys"]})
    return {**{k: v for k, v in delta.items() if k != "from_base"}, "layers": layers}
