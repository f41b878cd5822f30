"""Tiny randomly initialised models of several architectures, built in code (no downloads)."""
import torch
from transformers import (CohereConfig, CohereForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM, SmolLM3Config, SmolLM3ForCausalLM)

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)

ARCHS = {
    # grouped-query attention: 4 query heads share 2 KV heads
    "llama": lambda n: LlamaForCausalLM(LlamaConfig(num_hidden_layers=n, num_key_value_heads=2, **COMMON)),
    "mistral": lambda n: MistralForCausalLM(MistralConfig(num_hidden_layers=n, num_key_value_heads=2, sliding_window=None, **COMMON)),
    "qwen2": lambda n: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=n, num_key_value_heads=2, **COMMON)),
    # partial rotary: half of each head rotates (Phi-style)
    "phi3": lambda n: Phi3ForCausalLM(Phi3Config(num_hidden_layers=n, num_key_value_heads=2, partial_rotary_factor=0.5, **COMMON)),
    # GPT-NeoX: fused QKV, rotary on 25% of each head
    "gpt_neox": lambda n: GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=n, **COMMON)),
    # layers that rotate differently (rope.py: one description per layer)
    # Gemma 3: local layers at sliding_attention_inv_freq, global ones at full_attention_inv_freq; the window
    # is wider than any budget the tests use (window layouts per layer are not streamkv's yet)
    "gemma3": lambda n: Gemma3ForCausalLM(Gemma3TextConfig(
        num_hidden_layers=n, num_key_value_heads=2, head_dim=16, sliding_window=512,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)], **COMMON)),
    # SmolLM3: every 2nd layer is NoPE (keys never rotated)
    "smollm3": lambda n: SmolLM3ForCausalLM(SmolLM3Config(num_hidden_layers=n, num_key_value_heads=2, no_rope_layer_interval=2, **COMMON)),
    # Cohere: interleaved rotary pairs (2i, 2i+1)
    "cohere": lambda n: CohereForCausalLM(CohereConfig(num_hidden_layers=n, num_key_value_heads=2, **COMMON)),
}


def make_tiny(arch: str = "llama", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHS[arch](layers).eval()
    # random init has tiny weights; scale up so attention is far from uniform and position bugs show in logits
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model
