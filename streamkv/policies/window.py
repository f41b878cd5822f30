"""`window`: keep only the most recent W tokens. The baseline StreamingLLM shows failing: once the first
tokens are evicted the attention sink is gone and perplexity explodes."""
from .base import StreamingCache


class WindowCache(StreamingCache):
    name = "window"

    def __init__(self, model, window: int = 1024):
        super().__init__(model, budget=window)

    def describe(self) -> dict:
        return {"policy": self.name, "window": self.budget}
