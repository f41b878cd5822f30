"""`sirllm`: SirLLM (Yao et al., 2024), streaming infinite retentive LLM. Sinks + recent window + the tokens
with the highest surprisal ("token entropy": -log p of the token the text actually had), decayed after
every chat turn so that older turns give way.

The surprisal comes from the logits the session computes anyway (`StreamSession` asks for every position's
logits when a policy `wants_logits`, and hands them to `observe_logits`). Chunks are capped at the window
(`max_chunk`) so every token has its score before it can leave the window. The score is the same for every
head and layer, so every head keeps the same tokens; the per-head machinery of `scored.py` is shared with
`h2o`, which keeps different ones.
"""
import torch

from .scored import ScoredCache


class SirLLMCache(ScoredCache):
    name = "sirllm"
    wants_logits = True
    uses_values = True

    def __init__(self, model, sinks: int = 4, window: int = 512, heavy: int = 508, decay: float = 0.95):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be a number in (0, 1], got {decay!r}")
        super().__init__(model, sinks=sinks, window=window, heavy=heavy)
        self.decay = float(decay)
        self.max_chunk = window

    def observe_logits(self, ids: torch.Tensor, logits: torch.Tensor, previous: torch.Tensor | None) -> None:
        """ids [q] just fed, logits [q, V] after each of them, previous [V] the logits before the first (None
        at the start of the stream: the first token gets surprisal 0)."""
        q = ids.numel()
        pred = logits[:-1] if previous is None else torch.cat([previous[None].to(logits), logits[:-1]])  # [q or q-1, V] (q-1: none for a first chunk of one token)
        surprisal = -torch.log_softmax(pred.float(), dim=-1).gather(1, ids[q - pred.shape[0]:, None].to(pred.device))[:, 0]
        if previous is None:
            surprisal = torch.cat([surprisal.new_zeros(1), surprisal])
        self.set_token_values(self.seen - q, surprisal.cpu())

    def end_turn(self) -> None:
        """After every chat turn: every score kept so far is multiplied by `decay`."""
        self.scale_values(self.decay)

    def score(self, layer_idx, keys, values, received, value):
        return value  # [H, m]: the token's (decayed) surprisal

    def describe(self) -> dict:
        return {**super().describe(), "decay": self.decay}
