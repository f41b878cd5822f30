"""`recompute`: sliding window with re-computation, the quality reference for `sink`.

Not a KV cache: it keeps the last W token *ids* and, whenever logits are needed, re-encodes those W tokens
plus the new one from scratch at positions 0..W. Every prediction sees exactly the last W tokens with
fresh positions; the price is a full forward over W tokens per predicted token (slow by design).
It works with `StreamSession` (and the evaluation suite), not as `past_key_values` of `model.generate`.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from ..rope import rope_for


class Recompute:
    name = "recompute"
    sinks = 0

    def __init__(self, model, window: int = 1024):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        rope_for(model)  # same architecture check as the caches: refuse what we cannot run correctly
        self.window = self.budget = window
        self.ids = torch.empty(0, dtype=torch.long)  # the last `window` tokens of the stream
        self.seen = 0

    @property
    def n_kept(self) -> int:
        return self.ids.numel()

    n_cached = n_kept

    def nbytes(self) -> int:
        return 0  # no KV is kept between steps (the ids are a few KB)

    def describe(self) -> dict:
        return {"policy": self.name, "window": self.window}

    @torch.inference_mode()
    def forward(self, model, input_ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Feed `input_ids` [1, q]; returns logits [q, V] (all_logits) or [1, V] for the last token."""
        ids = input_ids.reshape(-1).cpu()
        outs = []
        for i in range(ids.numel()):
            if all_logits or i == ids.numel() - 1:
                ctx = torch.cat([self.ids, ids[i : i + 1]])[-(self.window + 1) :].unsqueeze(0).to(model.device)
                out = model(input_ids=ctx, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)
                outs.append(out.logits[0, -1:])
            self.ids = torch.cat([self.ids, ids[i : i + 1]])[-self.window :]
        self.seen += ids.numel()
        return torch.cat(outs, dim=0)

    def state_dict(self, copy: bool = True) -> dict:
        return {"describe": self.describe(), "ids": self.ids.clone(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        if state["describe"] != self.describe():
            raise ValueError(f"snapshot is of {state['describe']}, this policy is {self.describe()}")
        self.ids, self.seen = state["ids"].clone(), state["seen"]
