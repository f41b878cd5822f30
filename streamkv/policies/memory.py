"""`memory`: sinks + a recent window + the few evicted blocks most relevant to the current queries (InfLLM, ReKV).

Resident per layer: S sinks, the most recent W..W+B-1 tokens, and up to K retrieved blocks of B tokens.
Everything evicted is kept, in blocks, in a `BlockStore` (RAM with a byte cap, then disk), so a fact far
back in the stream can come back when the queries ask for it; resident memory stays bounded however long
the stream: RAM holds the resident tokens, the store's RAM tier (capped) and a small index.

How a step works (see `attend`):
1. The shared slot table (base.py) holds sinks + window and evicts from the window in whole blocks of B
   tokens (`keep_mask`); the evicted keys/values of every layer go to the store as one block.
2. Each block gets `reps` representative keys per KV head. Default (`rep_rule=mean`): the block is cut
   into `reps` equal parts and each part's keys, rotated to position 0, are averaged. InfLLM's rule
   (`rep_rule=attention`): the tokens that received the most attention while they were in the window,
   observed in this very attention function, which then costs every step the attention each kept key
   received. The cheaper rule is also the better one here: passkey on the embedded model, the same prompts
   and keys (docs/RESULTS.md section 6): 16k 15/15 (attention rule 11/15), 32k 15/15 (14/15), 64k 6/6
   (4/6). A guess at why, not tested: the filler around the key repeats, so the keys it attends most are
   filler-like; a part's mean keeps the key sentence's trace. The index of
   representatives (rotated to position 0, float16: it only ranks blocks) always stays resident, so it is
   the one thing that grows in RAM with the stream: 2 * layers * kv_heads * head_dim * reps / block bytes
   per token (SmolLM2-135M with the defaults: 360 B per token, 360 MB per million tokens). The default
   density, 2 per 64-token block, is InfLLM's (4 per 128).
3. At every step (each prefill chunk, each decoded token) every layer scores the blocks with its current
   queries (mean of the step's last 16 queries, per query head, max over a block's representatives, summed
   over heads: one choice shared by the heads of a layer, as InfLLM) and takes the top K, in stream order.
   Scoring is one batched matmul per layer over the index; with fixed placement a changed choice reads only
   the blocks new to it, and a read is a copy: the store keeps every key rotated to position 0, where fixed
   placement attends it (rotating at each read cost 4-9 ms of a choosing step at 16k: eager int4, 2 threads).
   Decode steps re-choose only every `reselect` (4) steps and keep the last choice in between; prefill
   chunks always choose. Why: on near-identical filler 5-6 of the 16 blocks change at every decode step
   and the ones that come back are read from disk, so re-choosing at every step made decode 87 -> 136 ms a
   token from 8k to 64k; with 4 the median is 57 -> 59 ms (sink: 42; on another CPU, 128 steps a point,
   the mean stays within 8.4% from 8k to 64k), and the passkey answers at 16k/32k (10 prompts) were
   identical, character for character, to those of reselect=1 (docs/RESULTS.md section 6). `reselect=1`
   restores every-step choice.
   With `choose=ahead` a decode step that chooses does it *after* its attention, with its own query, for
   the steps that follow (it attends the standing choice itself, as the steps between choices do). Why:
   then no decode step chooses in mid-forward, so with `--compile` every steady step runs the compiled
   graph and the choice runs after it, eagerly (`finish_static`); the default (`current`) leaves the
   choosing steps eager (a whole eager forward). What it saves and costs in prediction: docs/RESULTS.md
   section 5 ("Choosing ahead").
   With `selection=head` each KV head takes its own top K (LongHeads); a layer's retrieved part stays one
   [1, H, K*B, D] tensor, slot j holding each head's j-th block. Shared is the default because it measured
   far better: passkey at 16k and 32k (5 depths, trial 0 of the grid, embedded SmolLM2-135M), shared 9/10,
   per head 4/10 (0/5 at 16k). (A guess at why, not measured: a head's own choice rests on 3 query heads
   instead of 9, so filler blocks win it more often.)
4. Placement by place, between the sinks and the window (the base reserves `gap()` positions; sinks move
   before it), in one of two ways. Retrieved keys sit at canonical positions (rotated once, when the block
   is stored, to position 0; contiguous placement rotates them once more, from the store's copy, at each
   read), and the *query* is rotated for that part: RoPE is relative, so this equals re-rotating every
   retrieved key every step, at the cost of one query rotation.
   * `fixed` (default, InfLLM's choice): every retrieved token at one position, right before the window.
   * `contiguous`: retrieved tokens laid out in stream order over K*B positions (keys at 0..G-1, query
     rotated by G - window_start), as if they had never left the cache.
   Measured on the passkey prompt (embedded SmolLM2-135M, 1 trial per cell, docs/RESULTS.md section 6):
   at 8k (depths .1/.5/.9) fixed 3/3, contiguous 2/3; at 16k (depths .1-.9) fixed 4/5, contiguous 3/5;
   contiguous at 32k 4/5. Fixed wins where both ran (7/8 vs 5/8), so it is the default; the samples are
   small and the difference may not hold on other models.

Local/global models (Gemma 2/3/4, gpt-oss, Mistral with a window, ...): the local layers keep only their own
window (`base.LocalLayer`, when `window` >= W-1) and store nothing; the global layers keep sinks + window +
retrieved blocks, and blocks hold the global layers' parts only.

Exactness: with `contiguous` placement and K*B at least the evicted tokens, every block is retrieved, in
order, contiguously: the cache then attends exactly what a dense cache does at the same distances (tests:
equals `dense` to 1e-4). On one
layer every step equals a fresh forward over sinks + retrieved blocks + window + new tokens at contiguous
positions (`retrieved[layer]` says which blocks it attended at the last step).
"""
from __future__ import annotations

import time
import uuid

import torch

from ..attention import attend_one, attend_one_traced, attend_parts, local_parts, one_query, received_attention
from .base import StreamingCache
from .blockstore import BlockStore

PLACEMENTS = ("contiguous", "fixed")
REP_RULES = ("attention", "mean")  # a block's representatives: its most attended keys (InfLLM), or part means
SELECTIONS = ("shared", "head")  # one choice of blocks for all KV heads of a layer (InfLLM), or one per head (LongHeads)
CHOOSE = ("current", "ahead")  # a choosing decode step chooses for itself, or after its attention for the next steps
SCORING_QUERIES = 16  # blocks are chosen with the mean of a step's last 16 queries (see `_select`)


def _positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class MemoryCache(StreamingCache):
    name = "memory"
    observe = True
    keeps_evicted = True
    # local/global models (Gemma 2/3/4, gpt-oss, ...): local layers keep their own window (base.LocalLayer) and
    # store nothing; the global layers keep sinks + window + retrieved blocks
    serves_local_layers = True

    def __init__(self, model, sinks: int = 4, window: int = 768, block: int = 64, topk: int = 16, reps: int = 2,
                 ram_mb: int = 256, store_dir: str | None = None, placement: str = "fixed", selection: str = "shared",
                 reselect: int = 4, rep_rule: str = "mean", choose: str = "current"):
        for n, v in (("window", window), ("block", block), ("topk", topk), ("reps", reps), ("reselect", reselect)):
            _positive(n, v)
        if not isinstance(ram_mb, int) or isinstance(ram_mb, bool) or ram_mb < 0:
            raise ValueError(f"ram_mb must be a non-negative integer, got {ram_mb!r}")
        if reps > block:
            raise ValueError(f"reps ({reps}) cannot exceed block ({block})")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        if rep_rule not in REP_RULES:
            raise ValueError(f"rep_rule must be one of {', '.join(REP_RULES)}, got {rep_rule!r}")
        if choose not in CHOOSE:
            raise ValueError(f"choose must be one of {', '.join(CHOOSE)}, got {choose!r}")
        self.choose = choose
        self.rep_rule = rep_rule
        self.observe = rep_rule == "attention"  # the mean rule needs no attention observed: cheaper steps
        self.selection, self.reselect = selection, reselect
        self._decode_run = 0  # decode steps (one token) since the last prefill chunk
        self.window, self.block, self.topk, self.reps, self.placement = window, block, topk, reps, placement
        self.ram_mb, self.store_dir = ram_mb, store_dir
        self.reserved = topk * block if placement == "contiguous" else 1
        super().__init__(model, budget=sinks + window + block - 1, sinks=sinks)
        # the layers whose evicted tokens go to the store: all but local layers, which keep their own window;
        # a stored block holds their parts in this order
        self.stored_layers = [i for i in self.attention_layers if i not in self.local_own]
        self._parts = {layer: j for j, layer in enumerate(self.stored_layers)}
        self.model_config = model.config.get_text_config()
        self.store = BlockStore(store_dir, ram_mb * 2**20, tag=uuid.uuid4().hex)
        self.index: list[torch.Tensor | None] = []  # per layer: representatives [H, capacity, reps, D] at position 0
        self._fetched: dict[int, tuple] = {}  # per layer: (block ids, keys [1,H,G,D] at canonical places, values)
        self.hits = {"reused": 0, "fetched": 0}  # per layer-step: retrieved set unchanged / (re)built
        self.retrieved: dict[int, list] = {}  # per layer: block ids attended at the last step (per KV head: lists)
        self.ahead: dict[int, list] = {}  # choose=ahead: per layer, the blocks the next decode steps attend
        self._query_buffers: list = [None] * self.n_layers  # per layer: the static step's query (`_static_extras`)
        # the store's keys are rotated to position 0 (`_store_evicted`); False only for a store written before that
        # (a snapshot without "keys_at_zero"), whose keys sit at the positions `pos` records
        self.keys_at_zero = True
        self.retrieval_seconds = 0.0  # spent choosing and fetching blocks (all layers), for the cost-per-step plot

    # ---- what is kept -------------------------------------------------------------------------------
    def recent_tokens(self, budget: int, sinks: int) -> int:
        return self.window  # evicting in whole blocks leaves W..W+B-1 recent tokens

    def keep_mask(self, seq: torch.Tensor) -> torch.Tensor:
        """Sinks, and the recent tokens: evict the oldest in whole blocks, leaving W..W+B-1 of them."""
        keep = torch.ones_like(seq, dtype=torch.bool)
        recent = (seq >= self.sinks).nonzero().squeeze(1)
        if recent.numel() > self.window + self.block - 1:
            keep[recent[: (recent.numel() - self.window) // self.block * self.block]] = False
        return keep

    @property
    def max_resident(self) -> int:
        return self.budget + self.topk * self.block  # `reserved` counts positions; fixed placement stacks tokens on one

    def _n_retrieved(self) -> int:
        return min(self.topk, self.store.n_blocks)

    def gap(self) -> int:
        k = self._n_retrieved()
        return (k * self.block if self.placement == "contiguous" else 1) if k else 0

    def _make_plan(self, q: int):
        self.store.spill()  # before anything changes: a failed write leaves the stream as it was
        self._decode_run = self._decode_run + 1 if q == 1 else 0
        return super()._make_plan(q)

    # ---- the compiled decode step (streamkv/compiled.py) ------------------------------------------------
    # Between two choices of blocks (3 decode steps in 4 with reselect=4) a step changes nothing but the new
    # token's slot: no eviction, the same blocks, the same places. Those steps take the fixed-shape path:
    # every layer attends its whole slot buffer (the slots not in use masked: after a block is evicted the
    # window refills over 64 steps) plus its K*B retrieved tokens, with the query rotated for them, as
    # `attend` does. Steps that choose, fetch, evict or store stay eager: the same state, one code path each.
    @property
    def static_decode_capable(self) -> bool:  # not with the attention rule: it observes attention at every step
        return self._static_layout() and not self.observe

    def _static_steady(self, plan) -> bool:
        if not self._one_slot_step(plan) or plan.evict_src is not None:  # (its buffer need not be full: masked)
            return False
        k = self._n_retrieved()
        if not self._mem_gap(plan) or k < self.topk or (self.choose == "current" and self._decode_run % self.reselect == 0):
            return False  # the store is still small, or this step chooses its blocks before attending
        for i in self._choosing_layers():  # every layer holds the K blocks it attends now, read in full
            prev, f = self._standing(i), self._fetched.get(i)
            if not prev or f is None or f[0] != prev or f[1].shape[2] != k * self.block:
                return False
        return True

    def _choosing_layers(self) -> list[int]:
        """The layers that choose and attend blocks (duo: those with retrieval heads)."""
        return self.stored_layers

    def _mem_gap(self, plan) -> int:
        """Positions the retrieved blocks occupy right before the window this step (duo places them itself)."""
        return plan.gap

    def _scoring_query(self, layer_idx: int, query: torch.Tensor) -> torch.Tensor:
        """The query heads that score the layer's blocks: all (duo: its retrieval heads' only)."""
        return query

    def _standing(self, layer_idx: int):
        """The blocks a decode step attends when it does not choose before attending."""
        return self.ahead.get(layer_idx) if self.choose == "ahead" else self.retrieved.get(layer_idx)

    def _static_extras(self, plan, step) -> None:
        device = step.slot.device
        n = plan.capacity
        step.bias = torch.zeros(n, device=device).masked_fill_(torch.arange(n, device=device) >= plan.n_view,
                                                              float("-inf"))  # [capacity]
        step.parts = [None] * self.n_layers
        step.queries = self._query_buffers  # choose=ahead: each layer's query, kept for `finish_static`
        for i in self._choosing_layers():  # (cos, sin) of the query's rotation, once per distinct rope
            f, rope = self._fetched[i], self.rope_for_layer(i)
            step.parts[i] = (f[1], f[2], *self._query_rotation(plan, rope))
            if step.queries[i] is None:  # allocated once per layer, reused by every static step
                step.queries[i] = f[1].new_empty((1, self.model_config.num_attention_heads, 1, f[1].shape[-1]))
            self.retrieved[i] = f[0]
        step.attend = self._attend_static
        self.hits["reused"] += len(self._choosing_layers())

    def finish_static(self) -> None:
        """After a static step (choose=ahead): a step that chooses does it now, with each layer's query."""
        if self.choose == "ahead" and self._decode_run % self.reselect == 0:
            plan, step = self._plan, self._static
            for i in self._choosing_layers():
                self._choose_ahead(i, step.queries[i], plan)

    def _attend_static(self, module, query, keys, values, scaling):
        """A static step's attention (traced): what `attend` computes when it reuses the last choice, over the
        whole buffer [1, H, capacity, D] with its unused slots masked."""
        step = self._static
        mem_k, mem_v, cos, sin = step.parts[module.layer_idx]
        q_mem = self.rope_for_layer(module.layer_idx).apply(query, cos, sin)  # [1, Hq, 1, D]
        step.queries[module.layer_idx].copy_(query)  # (one graph whether this step chooses ahead or not)
        step.calls += 1
        return attend_one_traced(query, [(query, keys, values, False), (q_mem, mem_k, mem_v, False)], scaling, step.bias)

    # ---- attention ----------------------------------------------------------------------------------
    def attend(self, layer_idx, module, query, keys, values, scaling):
        plan, layer, rope = self._plan, self.layers[layer_idx], self.rope_for_layer(layer_idx)
        q = query.shape[2]
        parts = local_parts(query, keys, values)
        ids = []
        if plan.gap:
            t0 = time.perf_counter()
            prev, k = self._standing(layer_idx), self._n_retrieved()
            if (q == 1 and (self._decode_run % self.reselect or self.choose == "ahead") and prev
                    and len(prev[0] if self.selection == "head" else prev) == k):
                ids = prev  # a decode step between choices (reselect > 1), or one that chooses ahead: the last choice stands
            else:
                ids = self._select(layer_idx, query, plan.gap, plan.window_start)
            mem_k, mem_v = self._fetch(layer_idx, ids)
            self.retrieval_seconds += time.perf_counter() - t0
            q_mem = rope.apply(query, *self._query_rotation(plan, rope))
            parts.append((q_mem, mem_k, mem_v, False))
        self.retrieved[layer_idx] = self.ahead[layer_idx] = ids
        if one_query(query, parts):  # decoding: the keys' received attention comes with the output
            out, _, received = attend_one(query, parts, scaling)
            if self.observe:
                layer.received_view += received[0]
        else:
            out, lse = attend_parts(query, parts, scaling)
            if self.observe:
                layer.received_view += received_attention(query, keys, q if q > 1 else 0, scaling, lse)
        if plan.gap and q == 1 and self.choose == "ahead" and self._decode_run % self.reselect == 0:
            self._choose_ahead(layer_idx, query, plan)
        evicted_scores = layer.finish_step(plan)
        if layer.evicted is not None:
            self._store_evicted(layer_idx, layer.evicted, evicted_scores, plan)
            layer.evicted = None
        return out

    def _query_rotation(self, plan, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the query's rotation for the retrieved part, once per step and rope (the layers share
        it). Contiguous: retrieved token j at window_start - G + j, its key at j; fixed: every retrieved token
        at window_start - 1, its key at 0."""
        return plan.cos_sin_of(rope, "mem", (self._mem_gap(plan) if self.placement == "contiguous" else 1) - plan.window_start)

    def _choose_ahead(self, layer_idx: int, query: torch.Tensor, plan) -> None:
        """choose=ahead: after this step's attention, choose (and read) the blocks the next steps attend."""
        t0 = time.perf_counter()
        self.ahead[layer_idx] = self._select(layer_idx, self._scoring_query(layer_idx, query), self._mem_gap(plan),
                                             plan.window_start)
        self._fetch(layer_idx, self.ahead[layer_idx])
        self.retrieval_seconds += time.perf_counter() - t0

    def _select(self, layer_idx: int, query: torch.Tensor, gap: int, window_start: int) -> list[int]:
        """The K blocks whose representatives best match this step's last `SCORING_QUERIES` queries
        (ascending block ids). `query` holds the query heads of the KV heads the index has, in order; `gap`
        positions sit right before `window_start` (the window's first position).

        Why the last few and not the whole chunk (InfLLM averages the chunk): the prediction that matters
        next comes from the last tokens, and the mean over a 512-token prefill chunk is dominated by what
        the chunk is mostly about. Measured on the passkey prompts that missed with the chunk mean (embedded
        SmolLM2-135M): with the last 16, 5 of those 6 were answered (16k depths .5/.7/.9, 32k .5, 8k .5)."""
        n_blocks, k = self.store.n_blocks, self._n_retrieved()
        if n_blocks <= k:
            every = list(range(n_blocks))
            return [every] * self.index[layer_idx].shape[0] if self.selection == "head" else every
        scores = self.block_scores(layer_idx, query, gap, window_start)  # [Hkv, n]
        if self.selection == "head":  # each KV head its own K blocks
            return [sorted(row) for row in scores.topk(k, dim=1).indices.tolist()]
        return sorted(scores.sum(dim=0).topk(k).indices.tolist())  # one choice, by the sum over heads

    def block_scores(self, layer_idx: int, query: torch.Tensor, gap: int, window_start: int) -> torch.Tensor:
        """How well every stored block matches this step's last queries, per KV head [Hkv, n_blocks] (what
        `_select` ranks; benchmarks/recall_rank.py reads the rank of a given block from it)."""
        n_blocks = self.store.n_blocks
        reps = self.index[layer_idx][:, :n_blocks]  # [H, n, r, D] at position 0 (float16)
        hkv, _, r, d = reps.shape
        query = query[:, :, -SCORING_QUERIES:]  # [1, Hq, <=16, D]
        # the queries, moved so that position 0 (the representatives) sits mid-way in the gap; (cos, sin) once per
        # step and rotation, shared by the layers
        rope, delta = self.rope_for_layer(layer_idx), gap // 2 - window_start
        qbar = rope.apply(query, *self._plan.cos_sin_of(rope, f"score {delta}", delta)).mean(dim=2)[0]  # [Hq, D]
        qbar = qbar.view(hkv, -1, d).float()  # [Hkv, g, D]
        # one batched matmul per layer, in float32: [Hkv, n*r, D] @ [Hkv, D, g] -> [Hkv, n*r, g]. (An einsum over
        # the old [n, H, r, D] layout cost 10x more: 400 ms a step for 30 layers at 4,096 blocks, a 256k stream.)
        scores = torch.bmm(reps.reshape(hkv, n_blocks * r, d).float(), qbar.transpose(1, 2))
        return scores.view(hkv, n_blocks, r, -1).amax(dim=2).sum(dim=2)  # best representative, summed over a group: [Hkv, n]

    def _fetch(self, layer_idx: int, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the retrieved blocks [1, H, G, D], keys rotated once from the store's copy to their
        canonical places (0..G-1, or all 0 with fixed placement). Reused while the choice does not change."""
        cached = self._fetched.get(layer_idx)
        if cached is not None and cached[0] == ids:
            self.hits["reused"] += 1
            return cached[1], cached[2]
        self.hits["fetched"] += 1
        if self.selection == "head":
            return self._fetch_per_head(layer_idx, ids)
        if self.placement == "fixed":
            return self._fetch_into_slots(layer_idx, ids, cached)
        parts = [self.store.get(i, self._part(layer_idx)) for i in ids]
        k = torch.cat([p[0] for p in parts], dim=1)  # [H, G, D]
        v = torch.cat([p[1] for p in parts], dim=1)
        pos = torch.cat([p[2] for p in parts])  # [G]
        target = torch.arange(pos.numel()) if self.placement == "contiguous" else torch.zeros_like(pos)
        k = self.rope_for_layer(layer_idx).rotate(k, target - self._stored_at(pos)).unsqueeze(0)
        v = v.unsqueeze(0)
        self._fetched[layer_idx] = (ids, k, v)
        return k, v

    def _fetch_per_head(self, layer_idx: int, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """selection=head: KV head h attends its own blocks ids[h], in the same number of slots as every other
        head, so a layer's retrieved part stays one [1, H, K*B, D] tensor (one kernel call); slot j holds, for
        each head, its j-th block, at the same canonical places as with a shared choice."""
        blocks = {i: self.store.get(i, self._part(layer_idx)) for i in sorted({i for row in ids for i in row})}
        ks, vs, ps = [], [], []
        for h, row in enumerate(ids):
            ks.append(torch.cat([blocks[i][0][h] for i in row]))  # [G, D]
            vs.append(torch.cat([blocks[i][1][h] for i in row]))
            ps.append(torch.cat([blocks[i][2] for i in row]))  # [G]
        k, v, pos = torch.stack(ks), torch.stack(vs), torch.stack(ps)  # [H, G, D], [H, G, Dv], [H, G]
        h, g, d = k.shape
        target = torch.arange(g).expand(h, g) if self.placement == "contiguous" else torch.zeros_like(pos)
        k = self.rope_for_layer(layer_idx).rotate(k.reshape(h * g, d), (target - self._stored_at(pos)).reshape(-1)).view(1, h, g, d)
        v = v.unsqueeze(0)
        self._fetched[layer_idx] = (ids, k, v)
        return k, v

    def _fetch_into_slots(self, layer_idx: int, ids: list[int], cached) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed placement: every retrieved token sits at one position, so a block's rotated keys do not depend on
        which other blocks are retrieved, and attention does not depend on their order. Each layer keeps one
        buffer of K slots of B tokens; when the choice changes only the blocks new to it are read, each copied
        from the store's tensors into the slot of a block that left. (Rebuilding all K blocks whenever one changed
        was 40% of a decode step at 8k: the choice changes at most steps, by a block or two. Concatenating the new
        blocks for one `index_copy_` per buffer moved every byte twice: 3-4 ms of a choosing step at 16k.)"""
        B = self.block
        slots, kbuf, vbuf = (list(cached[3]), cached[4], cached[5]) if cached is not None and len(cached) > 3 else ([], None, None)
        if len(ids) < len(slots):  # fewer blocks than before (never while streaming): start over
            slots = []
        want = set(ids)
        free = [j for j, b in enumerate(slots) if b not in want]
        have = set(slots)
        new = [i for i in ids if i not in have]
        rope = self.rope_for_layer(layer_idx)
        for i in new:
            k, v, pos = self.store.get(i, self._part(layer_idx))  # keys [H, B, D] at position 0, values [H, B, Dv], pos [B]
            if not self.keys_at_zero:  # an older store: keys at `pos`, rotated to 0 from the store's copy
                k = rope.rotate(k, -pos)
            if kbuf is None:  # [1, H, K*B, D]: allocated once per layer
                kbuf = k.new_zeros((1, k.shape[0], self.topk * B, k.shape[2]))
                vbuf = v.new_zeros((1, v.shape[0], self.topk * B, v.shape[2]))
            j = free.pop() if free else len(slots)  # the slot of a block that left, or the next one
            if j == len(slots):
                slots.append(i)
            slots[j] = i
            kbuf[0, :, j * B : (j + 1) * B] = k  # straight from the store's tensors into the slot: one copy
            vbuf[0, :, j * B : (j + 1) * B] = v
        g = len(slots) * B
        k, v = kbuf[:, :, :g], vbuf[:, :, :g]
        self._fetched[layer_idx] = (ids, k, v, slots, kbuf, vbuf)
        return k, v

    def _stored_at(self, pos: torch.Tensor) -> torch.Tensor | int:
        """Where the store's keys of tokens at positions `pos` are rotated: 0, or `pos` in an older store."""
        return 0 if self.keys_at_zero else pos

    def _store_evicted(self, layer_idx: int, evicted, scores: torch.Tensor, plan) -> None:
        """Hand this step's evicted tokens (whole blocks) to the store, every key rotated to position 0, and index
        their representatives (at position 0 too). Why at 0: fixed placement attends retrieved keys there, so a
        read back is a plain copy, and rotating a block once here replaces rotating it at every read."""
        keys, values = evicted[0][0], evicted[1][0]  # [H, e, D]
        h, e, d = keys.shape
        B = self.block
        for j in range(0, e, B):
            block_id = (int(plan.evict_seq[j]) - self.sinks) // B
            k, v, pos = keys[:, j : j + B], values[:, j : j + B], plan.evict_pos[j : j + B]
            rope, n = self.rope_for_layer(layer_idx), k.shape[1]
            at0 = rope.rotate(k.reshape(h * n, d), -pos.repeat(h)).view(h, n, d)  # [H, B, D] every key at position 0
            if self.rep_rule == "mean":  # the block cut in `reps` parts, each part's keys at position 0, averaged
                rep = torch.stack([part.mean(dim=1) for part in at0.tensor_split(self.reps, dim=1)], dim=1)  # [H, r, D]
            else:  # InfLLM: the keys that received the most attention while in the window
                top = scores[:, j : j + B].topk(self.reps, dim=1).indices  # [H, r]
                rep = torch.gather(at0, 1, top[..., None].expand(h, self.reps, d))  # [H, r, D]
            rep = rep[None].half()  # [1, H, r, D]
            self._index_append(layer_idx, block_id, rep)
            self.store.add_layer(block_id, self._part(layer_idx), len(self.stored_layers),
                                 at0 if self.keys_at_zero else k.clone(), v.clone(), pos)

    def _part(self, layer_idx: int) -> int:
        """Which part of a stored block is layer `layer_idx`'s (blocks hold the stored layers only)."""
        return self._parts[layer_idx]

    def _index_append(self, layer_idx: int, block_id: int, rep: torch.Tensor) -> None:
        while len(self.index) <= layer_idx:
            self.index.append(None)
        idx = self.index[layer_idx]  # [H, capacity, r, D]
        if idx is None:
            h, r, d = rep.shape[1:]
            idx = rep.new_zeros((h, 16, r, d))
        if block_id >= idx.shape[1]:  # grow by doubling
            grown = idx.new_zeros((idx.shape[0], max(16, 2 * idx.shape[1], block_id + 1), *idx.shape[2:]))
            grown[:, : idx.shape[1]] = idx
            idx = grown
        idx[:, block_id] = rep[0]
        self.index[layer_idx] = idx

    # ---- introspection ------------------------------------------------------------------------------
    def nbytes(self) -> int:  # allocated: the slot buffers of fixed placement whole
        fetched = sum(sum(t.numel() * t.element_size() for t in (f[4], f[5]) if t is not None) if len(f) > 3
                      else f[1].numel() * f[1].element_size() + f[2].numel() * f[2].element_size() for f in self._fetched.values())
        return super().nbytes() + fetched

    def used_bytes(self) -> int:  # the retrieved tokens attended at the last step
        fetched = sum(f[1].numel() * f[1].element_size() + f[2].numel() * f[2].element_size() for f in self._fetched.values())
        return super().used_bytes() + fetched

    stored_fraction = 1.0  # of the KV heads, those whose evicted keys/values go to the store (duo: retrieval heads)

    def index_bytes_per_token(self) -> float:
        """RAM the index of representatives costs per evicted token (float16, `reps` keys per block)."""
        cfg = self.model_config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dims = sum(self.ropes[i].head_dim for i in self.stored_layers if self.ropes[i] is not None)  # layers may differ (Gemma 4)
        return 2 * kv_heads * head_dims * self.reps / self.block * self.stored_fraction

    def index_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.index if t is not None)

    def memory_stats(self) -> dict:
        return {"resident_tokens": self.n_kept + self._n_retrieved() * self.block, "index_bytes": self.index_bytes(),
                "retrieval_reused": self.hits["reused"], "retrieval_fetched": self.hits["fetched"],
                "retrieval_seconds": round(self.retrieval_seconds, 6), **self.store.stats()}

    def describe(self) -> dict:
        d = {"policy": self.name, "sinks": self.sinks, "window": self.window, "block": self.block, "topk": self.topk,
             "reps": self.reps, "placement": self.placement}
        if self.selection != "shared":  # (snapshots of default caches keep the description they always had)
            d["selection"] = self.selection
        if self.reselect != 1:  # (a snapshot of a cache that re-chose at every step, the old default, says nothing)
            d["reselect"] = self.reselect
        if self.rep_rule != "attention":
            d["rep_rule"] = self.rep_rule
        if self.choose != "current":
            d["choose"] = self.choose
        return d

    # ---- persistence --------------------------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict:
        """Every block is flushed to the store directory first: the snapshot refers to them by count."""
        self.store.flush()
        state = super().state_dict(copy)
        state["memory"] = {"n_blocks": self.store.n_blocks, "store_dir": str(self.store.directory), "tag": self.store.tag,
                           # saved as [n_blocks, H, r, D] (the layout snapshots have always had)
                           "index": [t[:, : self.store.n_blocks].transpose(0, 1).clone() if t is not None else None
                                     for t in self.index],
                           "received": [l.received[:, : self.n_used].clone() if getattr(l, "received", None) is not None
                                        else None for l in self.layers],
                           # fixed placement: which block sits in which slot, so a restored cache attends in the same
                           # order and continues with bit-identical logits
                           "slots": {l: (list(f[0]), list(f[3])) for l, f in self._fetched.items() if len(f) > 3},
                           "retrieved": dict(self.retrieved), "ahead": dict(self.ahead), "decode_run": self._decode_run,
                           "keys_at_zero": self.keys_at_zero}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        mem = state["memory"]
        if self.store_dir is None:  # a temporary store continues in the snapshot's directory
            self.store.directory = type(self.store.directory)(mem["store_dir"])
        self.store.tag = mem["tag"]
        self.store.adopt(mem["n_blocks"])
        self.index = [t.transpose(0, 1).contiguous() if t is not None else None for t in mem["index"]]
        for layer, rec in zip(self.layers, mem["received"]):
            if rec is not None:
                layer.observe = True
                layer.received = torch.zeros((rec.shape[0], self.seq.numel()), dtype=torch.float32)
                layer.received[:, : rec.shape[1]] = rec
        self._fetched.clear()
        self.keys_at_zero = mem.get("keys_at_zero", False)  # a snapshot from before it: keys at their positions
        self.retrieved = dict(mem.get("retrieved", {}))
        self.ahead = dict(mem.get("ahead", {}))
        self._decode_run = mem.get("decode_run", 0)
        for l, (ids, slots) in mem.get("slots", {}).items():
            self._fetch_into_slots(l, slots, None)  # the blocks, read again, in the saved slot order
            self._fetched[l] = (list(ids), *self._fetched[l][1:])
