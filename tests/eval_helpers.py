"""Helpers of the evaluation tests: a tiny random Llama saved as a model folder with the embedded
tokenizer (vocab 49152, chat template), so every command runs end to end through `--model FOLDER`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention so position/context bugs show in the logits
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model


def embedded_tokenizer():
    from streamkv.models import resolve

    return AutoTokenizer.from_pretrained(resolve(None))


def save_tiny(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model().save_pretrained(folder)
    embedded_tokenizer().save_pretrained(folder)
    return folder


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `streamkv <args>` (via the evaluation entry point, which registers exactly what cli.py does)."""
    return subprocess.run([sys.executable, "-m", "streamkv.evaluation", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)
