"""The evaluation suite: streaming perplexity, passkey retrieval, streaming chat, benchmarks.

Commands: `streamkv eval ppl|passkey|chat` and `streamkv bench` (registered by `commands.register`).
Every command takes policies by the same names as the rest of streamkv (`POLICIES` registry), so a new
policy is evaluated with `--policy newname:param=...` and no change here.
"""
