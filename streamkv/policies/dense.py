"""`dense`: keep every token. The exact reference; memory grows without bound."""
from .base import StreamingCache


class DenseCache(StreamingCache):
    name = "dense"

    def __init__(self, model):
        super().__init__(model, budget=None)
