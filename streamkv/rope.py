"""Rotary position embeddings (RoPE), seen from the outside of the model.

streamkv never touches modeling code. The model rotates every key at the position it was fed at and hands
it to our Cache; we only need to *re-rotate* kept keys when their place in the cache changes. RoPE makes
that exact: rotating a key by `a` then by `b` is rotating it by `a + b`, and attention scores depend only
on the difference between query and key positions.

`rope_for(model)` finds the model's rotary module (its `inv_freq` buffer), then *proves* by a probe that
re-rotation reproduces what the model itself computes: a single token is fed at position 0 and at position
d; with a single token every layer's key is the same vector rotated by d. If that fails on any layer (learned
absolute positions, ALiBi, an interleaved rotary layout, per-layer rotary variants) the model is refused
with `UnsupportedModelError` instead of producing garbage.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


class UnsupportedModelError(ValueError):
    """The model cannot be streamed correctly by streamkv (and is refused rather than run into garbage)."""


# rope types whose frequencies do not depend on the sequence length, so a rotation by d is the same
# everywhere. "dynamic" NTK scaling changes inv_freq with the longest position seen and is refused.
_STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn", "longrope", "proportional"}


@dataclass
class RopeSpec:
    """How to rotate a key by a position delta, for one model."""

    rotary: torch.nn.Module  # the model's rotary module: `inv_freq` is read live (longrope may swap it)
    rotary_dim: int  # leading dims of the head that rotate (partial rotary: Phi, GPT-NeoX)
    head_dim: int

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, rotary_dim] of a rotation by `delta` [n] positions.

        Computed in float64 from the model's own float32 frequencies, so a rotation adds only the rounding
        of the final multiply: keys never drift however often positions move."""
        inv_freq = self.rotary.inv_freq.detach().to(device="cpu", dtype=torch.float64)
        angles = delta.to(torch.float64)[:, None] * inv_freq[None, :]  # [n, rd/2]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()

    def apply(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate keys [..., n, head_dim] by precomputed cos/sin [n, rotary_dim] (rotate-half layout)."""
        cos = cos.to(device=keys.device, dtype=keys.dtype)
        sin = sin.to(device=keys.device, dtype=keys.dtype)
        rd, half = self.rotary_dim, self.rotary_dim // 2
        rot, rest = keys[..., :rd], keys[..., rd:]
        rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated_half * sin
        return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """Rotate `keys` [..., n, head_dim] by `delta` positions ([n] or a scalar). Returns a new tensor."""
        if not torch.is_tensor(delta):  # one delta for every row: one cos/sin row, broadcast
            delta = torch.tensor([int(delta)], dtype=torch.long)
        return self.apply(keys, *self.cos_sin(delta))


_SPECS: "weakref.WeakKeyDictionary[torch.nn.Module, RopeSpec]" = weakref.WeakKeyDictionary()


def rope_for(model: torch.nn.Module) -> RopeSpec:
    """The verified RopeSpec of `model` (probed once per model object, then remembered)."""
    if model in _SPECS:
        return _SPECS[model]
    spec = _probe(model)
    _SPECS[model] = spec
    return spec


def _describe(model) -> str:
    cfg = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', '?')!r})"


def _probe(model: torch.nn.Module) -> RopeSpec:
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{_describe(model)} is an encoder-decoder; streamkv streams decoder-only causal LMs.")
    rotaries = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    if not rotaries:
        raise UnsupportedModelError(
            f"{_describe(model)} has no rotary position embedding (RoPE). streamkv gives cached tokens their place in "
            "the cache by re-rotating keys, which needs RoPE; models with learned absolute positions (GPT-2, OPT) or "
            "ALiBi (BLOOM, MPT) cannot be streamed correctly. Use a RoPE model (Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, ...)."
        )
    first = rotaries[0].inv_freq
    if any(r.inv_freq.shape != first.shape or not torch.equal(r.inv_freq, first) for r in rotaries[1:]):
        raise UnsupportedModelError(
            f"{_describe(model)} uses several different rotary embeddings (e.g. local/global layers); not supported yet."
        )
    rope_params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = (rope_params or {}).get("rope_type", (rope_params or {}).get("type", "default")) or "default"
    if rope_type not in _STATIC_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{_describe(model)} uses rope_type={rope_type!r}, whose frequencies change with sequence length; "
            "re-positioning cached keys would be inexact. Supported: " + ", ".join(sorted(_STATIC_ROPE_TYPES))
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    spec = RopeSpec(rotary=rotaries[0], rotary_dim=2 * first.numel(), head_dim=head_dim)
    _check_probe(model, spec)
    return spec


@torch.inference_mode()
def _single_token_keys(model, position: int) -> list[torch.Tensor]:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    token = torch.tensor([[min(7, model.config.vocab_size - 1)]], device=model.device)
    model(input_ids=token, position_ids=torch.tensor([[position]], device=model.device), past_key_values=cache, use_cache=True)
    keys = [layer.keys for layer in cache.layers if getattr(layer, "keys", None) is not None]
    if len(keys) != model.config.num_hidden_layers:
        raise UnsupportedModelError(
            f"{_describe(model)}: only {len(keys)} of {model.config.num_hidden_layers} layers store keys in the cache "
            "(shared or linear-attention layers); not supported."
        )
    return keys


def _check_probe(model, spec: RopeSpec) -> None:
    base = _single_token_keys(model, 0)
    # the model computes keys in its own dtype: allow a few ulps of it (a wrong layout errs by O(1))
    tolerance = max(1e-3, 4 * torch.finfo(base[0].dtype).eps)
    for d in (1, 37, 1000):
        shifted = _single_token_keys(model, d)
        for layer, (k0, kd) in enumerate(zip(base, shifted)):
            if k0.shape[-1] != spec.head_dim and k0.shape[-1] < spec.rotary_dim:
                raise UnsupportedModelError(f"{_describe(model)}: unexpected key shape {tuple(k0.shape)}.")
            expected = spec.rotate(k0.float(), d)
            err = (expected - kd.float()).abs().max().item()
            scale = k0.float().abs().max().item() + 1e-6
            if err > tolerance * scale + 1e-5:
                raise UnsupportedModelError(
                    f"{_describe(model)}: layer {layer}'s keys at position {d} are not the position-0 keys rotated by "
                    f"{d} (max error {err:.3g}, key scale {scale:.3g}). Its positional encoding is not standard RoPE "
                    "(interleaved rotary, absolute or per-layer positions); streamkv refuses to stream it."
                )
