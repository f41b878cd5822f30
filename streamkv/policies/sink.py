"""`sink`: StreamingLLM. Keep the first S tokens (attention sinks) and the most recent W.

Everything else is the base class: `keep_mask` there already keeps `seq < sinks` plus the last
`budget - sinks` tokens, sinks are pinned (re-rotated from pristine copies to sit right before the
window) and the window keeps the rotation it was computed with.
"""
from .base import StreamingCache


class SinkCache(StreamingCache):
    name = "sink"

    def __init__(self, model, sinks: int = 4, window: int = 1020):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be a non-negative integer, got {sinks!r}")
        super().__init__(model, budget=sinks + window, sinks=sinks)
        self.window = window

    def describe(self) -> dict:
        return {"policy": self.name, "sinks": self.sinks, "window": self.window}
