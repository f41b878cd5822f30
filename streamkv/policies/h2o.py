"""`h2o`: Heavy-Hitter Oracle (Zhang et al., 2023). Sinks + recent window + per KV head the tokens that
received the most attention so far ("heavy hitters"), observed in streamkv's attention function.

The score is H2O's: the attention a token has received, accumulated over every query since it entered the
cache, per KV head averaged over its query heads. Everything else (per-head sets, placement, re-rotation
from as-computed keys) is `scored.py`. Defaults split a 1,024-token budget as H2O does, half recent, half
heavy: 4 sinks + 512 recent + 508 heavy per head.
"""
from .scored import ScoredCache


class H2OCache(ScoredCache):
    name = "h2o"
    observe = True

    def __init__(self, model, sinks: int = 4, window: int = 512, heavy: int = 508):
        super().__init__(model, sinks=sinks, window=window, heavy=heavy)
        cfg = model.config.get_text_config()
        self.group = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)

    def score(self, layer_idx, keys, values, received, value):
        return received / self.group  # [H, m]: accumulated attention, mean over the query heads of each KV head
