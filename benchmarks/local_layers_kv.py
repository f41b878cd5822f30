"""KV bytes of a local/global model under `sink`, per layer: local layers keep their window, global ones the budget.

Gemma 3 1B's attention shapes (26 layers, 1 KV head of 256 dims, 5 local layers of window 512 per global one)
with tiny hidden/MLP/vocab sizes: a cache's bytes depend only on the attention shapes, so this measures what a
real Gemma 3 1B session holds without loading 1B random weights. Streams 6,000 tokens through sink 4+4092
(budget 4,096) and reads the cache's allocated bytes per layer kind.

    python benchmarks/local_layers_kv.py [--out docs/results/local_layers_kv.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamkv.evaluation.common import machine_info  # noqa: E402
from streamkv.policies import make_policy  # noqa: E402
from streamkv.session import StreamSession  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=6000)
    ap.add_argument("--window", type=int, default=4092)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    n_layers = 26
    types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    cfg = Gemma3TextConfig(num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                           hidden_size=64, intermediate_size=64, vocab_size=256, sliding_window=512, layer_types=types,
                           max_position_embeddings=32768)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    session = StreamSession(model, None, make_policy("sink", model, sinks=4, window=args.window), chunk_size=512)
    session.feed(torch.randint(0, 256, (args.tokens,)).tolist())
    cache = session.policy
    local = [i for i, t in enumerate(types) if t == "sliding_attention"]
    per_layer = [cache.layers[i].nbytes() for i in range(n_layers)]
    glob = [b for i, b in enumerate(per_layer) if i not in local]
    result = {
        "model": "Gemma 3 1B attention shapes (26 layers, 1 KV head x 256, window 512, 5 local : 1 global), tiny hidden sizes",
        "policy": f"sink:sinks=4,window={args.window}", "tokens": args.tokens,
        "local_layers": len(local), "global_layers": n_layers - len(local),
        "local_layer_bytes": per_layer[local[0]], "global_layer_bytes": glob[0],
        "cache_bytes": cache.nbytes(),
        "all_layers_at_budget_bytes": glob[0] * n_layers,  # what every layer held before local layers kept their window
        "machine": machine_info(),
    }
    result["ratio"] = round(result["all_layers_at_budget_bytes"] / result["cache_bytes"], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
