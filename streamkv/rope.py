"""Rotary position embeddings (RoPE), seen from the outside of the model, one description per layer.

streamkv never touches modeling code. The model rotates every key at the position it was fed at and hands
it to our Cache; we only need to *re-rotate* kept keys when their place in the cache changes. RoPE makes
that exact: rotating a key by `a` then by `b` is rotating it by `a + b`, and attention scores depend only
on the difference between query and key positions.

Models differ in how they rotate, and layers of one model may differ too, so every layer gets its own
`RopeSpec`:
* which frequencies: the model's `inv_freq` buffer, or one of several per layer type
  (`full_attention_inv_freq`, `sliding_attention_inv_freq`: Gemma 3, OLMo 3, ModernBERT-decoder), or a
  sinusoid table (`embed_positions`: GPT-J, CodeGen) whose frequencies are read back from it;
* which dims rotate: all, the leading ones (partial rotary: Phi, GPT-NeoX) or the trailing ones;
* which cached tensor rotates: the keys, or the values: multi-head latent attention (DeepSeek V2/V3,
  MiniCPM3, GLM-4 MoE Lite) caches its position-free latent in the key slot and the shared rotated rope
  key in the value slot, and expands both inside attention;
* how dims pair up: rotate-half (i, i + r/2) (Llama) or interleaved (2i, 2i + 1) (GPT-J, GLM, Cohere);
* or no rotation at all: a NoPE layer (SmolLM3's every 4th layer, the global layers of EXAONE 4, every
  attention layer of Jamba, Nemotron-H, Granite 4 hybrids) keeps its keys as computed.

Nothing of this is read from the modeling code. `rope_layers(model)` collects the candidate frequencies,
then *proves* each layer's description by a probe: a single token is fed at position 0 and at positions d
(1, 37, 1000); with a single token every layer's key at d must be its key at 0 rotated by d. The first
description that reproduces every layer's keys is kept; a layer that no description fits (learned absolute
positions, ALiBi, a rotation streamkv does not know) gets the model refused with `UnsupportedModelError`
and the reason, instead of producing garbage. Layers that keep a recurrent state instead of keys and values
(SSM, convolution or linear attention: the hybrids) have no description (None) and are carried unchanged by
the caches, and so is the recurrent part of layers holding both (Falcon-H1, Zamba); models whose cache
layers hold more than keys and values (sparse-attention indexers, compressed KV) or share KV between layers
are refused by the same probe, as is any model that cannot run with a standard transformers `DynamicCache`.
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
PROBE_DELTAS = (1, 37, 1000)


@dataclass(eq=False)
class RopeSpec:
    """How one layer's keys rotate with position (shared by the layers that rotate alike).

    The key dims [offset, offset + rotary_dim) rotate at the frequencies `inv_freq`, in pairs (i, i + r/2)
    (rotate-half) or (2i, 2i + 1) (interleaved); the other dims never move. rotary_dim == 0: a NoPE layer."""

    head_dim: int  # size of this layer's keys
    rotary_dim: int = 0  # dims that rotate; 0 = no rotation (NoPE layer)
    offset: int = 0  # first rotating dim: 0 (leading, partial rotary) or head_dim - rotary_dim (MLA's rope part)
    interleaved: bool = False  # pairs (2i, 2i+1) instead of (i, i + rotary_dim/2)
    sign: int = 1  # -1: the model rotates the other way (NanoChat's rotate_half)
    slot: str = "keys"  # the cached tensor that rotates: "values" for latent MLA caches (DeepSeek V2/V3)
    source: str = ""  # where the frequencies come from (a buffer's name), for messages
    module: torch.nn.Module | None = None  # frequencies read live from getattr(module, attr) (longrope may swap them) ...
    attr: str = "inv_freq"
    fixed: torch.Tensor | None = None  # ... or fixed ones (read back from a sinusoid table)

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.fixed if self.fixed is not None else getattr(self.module, self.attr)

    @property
    def rotates(self) -> bool:
        return self.rotary_dim > 0

    def describe(self) -> str:
        if not self.rotates:
            return "no rotation (NoPE)"
        a, b = self.offset, self.offset + self.rotary_dim
        where = f"dims {a}:{b} of {self.head_dim}" if (a, b) != (0, self.head_dim) else f"all {self.head_dim} dims"
        layout = "interleaved pairs" if self.interleaved else "rotate-half"
        what = "" if self.slot == "keys" else " of the cached values (the rope keys of a latent MLA cache)"
        return f"{where}{what} rotate ({layout}{', reversed' if self.sign < 0 else ''}) at {self.source}"

    def cos_sin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [n, rotary_dim] of a rotation by `delta` [n] positions.

        Computed in float64 from the model's own float32 frequencies, so a rotation adds only the rounding
        of the final multiply: keys never drift however often positions move."""
        if not self.rotates:
            empty = torch.zeros((delta.shape[0], 0))
            return empty, empty
        inv_freq = self.inv_freq.detach().to(device="cpu", dtype=torch.float64) * self.sign
        angles = delta.to(torch.float64)[:, None] * inv_freq[None, :]  # [n, rd/2]
        angles = angles.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat([angles, angles], dim=-1)
        return angles.cos().float(), angles.sin().float()

    def apply(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate keys [..., n, head_dim] by precomputed cos/sin [..., n, rotary_dim] (from `cos_sin`).
        A NoPE layer returns `keys` itself."""
        if not self.rotates:
            return keys
        cos = cos.to(device=keys.device, dtype=keys.dtype)
        sin = sin.to(device=keys.device, dtype=keys.dtype)
        a, b = self.offset, self.offset + self.rotary_dim
        rot = keys[..., a:b]
        if self.interleaved:
            pairs = rot.unflatten(-1, (-1, 2))
            rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        else:
            half = self.rotary_dim // 2
            rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * cos + rotated * sin
        parts = [p for p in (keys[..., :a], out, keys[..., b:]) if p.shape[-1]]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else out

    def rotate(self, keys: torch.Tensor, delta: torch.Tensor | int) -> torch.Tensor:
        """Rotate `keys` [..., n, head_dim] by `delta` positions ([n] or a scalar). Returns a new tensor."""
        if not self.rotates:
            return keys.clone()
        if not torch.is_tensor(delta):  # one delta for every row: one cos/sin row, broadcast
            delta = torch.tensor([int(delta)], dtype=torch.long)
        return self.apply(keys, *self.cos_sin(delta))


_SPECS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def rope_layers(model: torch.nn.Module) -> list[RopeSpec | None]:
    """The verified RopeSpec of every layer of `model` (None: a layer without attention), probed once per
    model object, then remembered. Raises UnsupportedModelError, with the reason, for a model streamkv
    cannot stream exactly."""
    if model not in _SPECS:
        _SPECS[model] = _probe(model)
    return _SPECS[model]


def rope_for(model: torch.nn.Module) -> RopeSpec:
    """The first attention layer's RopeSpec (the whole model is verified). Enough for models whose layers
    all rotate alike; code that rotates one layer's keys or queries should use `rope_layers(model)[i]`."""
    return next(spec for spec in rope_layers(model) if spec is not None)


def describe_rope(model: torch.nn.Module) -> str:
    """One line per distinct layer description: 'layers 0-3, 5: dims 0:64 of 64 rotate ...'."""
    groups: dict[int, tuple[RopeSpec, list[int]]] = {}
    for i, spec in enumerate(rope_layers(model)):
        if spec is not None:
            groups.setdefault(id(spec), (spec, []))[1].append(i)
    return "; ".join(f"{_layer_list(layers)}: {spec.describe()}" for spec, layers in groups.values())


def _layer_list(layers: list[int]) -> str:
    """'layer 3', 'layers 0-5' or 'layers 1, 3, 5'."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def text_config(config):
    """The config of the text decoder (multimodal wrappers: Fuyu, GOT-OCR2, Gemma 3/4 nest it)."""
    try:
        return config.get_text_config(decoder=True)
    except (AttributeError, ValueError):
        return config


def _describe(model) -> str:
    cfg = text_config(getattr(model, "config", None))
    return f"{type(model).__name__} (model_type={getattr(cfg, 'model_type', '?')!r})"


# ---- the probe -------------------------------------------------------------------------------------------

def _probe(model: torch.nn.Module) -> list[RopeSpec | None]:
    """Every layer's RopeSpec, proven on the model itself; UnsupportedModelError with the true reason if not."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{_describe(model)} is an encoder-decoder; streamkv streams decoder-only causal LMs.")
    cfg = text_config(model.config)
    _check_rope_types(model, cfg)
    base_kv = _single_token_kv(model, 0)
    shifted_kv = {d: _single_token_kv(model, d) for d in PROBE_DELTAS}
    attention = [i for i, kv in enumerate(base_kv) if kv is not None]
    base = [kv[0] if kv is not None else None for kv in base_kv]
    shifted = {d: [kv[0] if kv is not None else None for kv in shifted_kv[d]] for d in PROBE_DELTAS}

    def moves(i, which):  # does layer i's cached key (0) or value (1) change with the token's position?
        x0 = base_kv[i][which]
        return any(x0.shape != shifted_kv[d][i][which].shape or not _close(x0, shifted_kv[d][i][which], x0) for d in PROBE_DELTAS)

    sources = _frequency_sources(model)
    if not sources:
        if any(moves(i, 0) or moves(i, 1) for i in attention):
            raise UnsupportedModelError(
                f"{_describe(model)} has no rotary position embedding (RoPE): its keys change with position without one "
                "(learned or sinusoidal absolute positions added to the hidden states: GPT-2, OPT, BERT-style). streamkv "
                "gives cached tokens their place in the cache by re-rotating keys, which needs RoPE driven by "
                "position_ids. Use a RoPE model (Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, Gemma, ...)."
            )
        return _position_free(model, cfg, base)
    layer_types = getattr(cfg, "layer_types", None) or []
    made: dict[tuple, RopeSpec] = {}  # one spec object per distinct description, shared by its layers
    specs: list[RopeSpec | None] = [None] * len(base)
    for i in attention:
        kind = layer_types[i] if i < len(layer_types) else None
        specs[i] = _fit_layer(model, i, kind, base[i], [shifted[d][i] for d in PROBE_DELTAS], sources, made)
        if not moves(i, 1):
            continue
        # the values move: a latent MLA cache (position-free latent as keys, rotated rope key as values), or
        # absolute positions
        v0, vd = base_kv[i][1], [shifted_kv[d][i][1] for d in PROBE_DELTAS]
        fit = None if specs[i].rotates else _fit(kind, v0, vd, sources, made, slot="values")
        if fit is None or not fit.rotates:
            raise UnsupportedModelError(
                f"{_describe(model)}: layer {i}'s cached values change with the token's position, "
                + ("and its keys too" if specs[i].rotates else "not by a rotation streamkv knows")
                + ": positions reach the values (absolute positions added to the hidden states?). streamkv re-places "
                "cached tokens by rotating them, so it cannot stream this model."
            )
        specs[i] = fit
    if not any(spec.rotates for spec in specs if spec is not None):  # frequencies held but never used on keys
        return _position_free(model, cfg, base)
    _check_key_order(model, cfg)
    _check_translation(model, cfg)
    return specs


def _position_free(model, cfg, base: list[torch.Tensor | None]) -> list[RopeSpec | None]:
    """No layer's keys or values depend on the position_ids. Three kinds of model look like that from the cache:

    * no positional encoding in attention at all (the attention layers of Jamba, Nemotron-H, Granite 4
      hybrids, Kimi Linear: their recurrent layers give order). Attention is then a function of the *set* of
      cached keys, so kept tokens need no re-placing and the slot table's order does not matter: every
      attention layer is NoPE to streamkv;
    * biases computed inside attention from each key's index in the cache (ALiBi: BLOOM, MPT; relative
      buckets: CPM-Ant). StreamingLLM streamed MPT by place, but these models compute the bias themselves,
      outside transformers' attention interface, from the index of a key in the buffer, and streamkv's slot
      table keeps tokens in slots, not in stream order. Refused;
    * the model numbers tokens by the length of its cache and adds a position embedding to the hidden states
      (BART-style decoders, Musicgen): a kept token would carry its old number forever and every new token
      the same one once the cache is full. Refused.

    Told apart by behaviour: the hidden state entering the first decoder layer for one token fed alone and
    after three copies of itself (the same unless positions are numbered by the cache's length), and the next
    token's logits with every layer's cached keys and values reversed (the same unless a bias depends on the
    key's index)."""
    absolute = [name for name, m in model.named_modules()
                if isinstance(m, torch.nn.Embedding) and any(w in name.rsplit(".", 1)[-1] for w in ("pos", "wpe"))]
    moved = _after_cached_tokens(model, _input_moves_with_cache_length, cfg)
    if absolute or moved is None or moved:
        where = (f"looking positions up in a table ({absolute[0]})" if absolute else
                 "its first layer's input changes with the length of the cache" if moved else
                 "and streamkv could not find its first decoder layer to check that positions do not reach it")
        raise UnsupportedModelError(
            f"{_describe(model)} has keys that do not depend on the position_ids it is fed: it numbers tokens by the "
            f"length of its cache, {where}. A bounded cache would leave every kept token its old number and give "
            "every new token the same one once full; streamkv places tokens by re-rotating keys, which needs RoPE "
            "driven by position_ids (or no positions at all: NoPE). Use a RoPE model "
            "(Llama, Mistral, Qwen2, Phi-3, GPT-NeoX, Gemma, ...)."
        )
    _check_key_order(model, cfg)
    _check_translation(model, cfg)
    return [RopeSpec(head_dim=k.shape[-1]) if k is not None else None for k in base]


def _after_cached_tokens(model, check, *args):
    """Run a check that feeds tokens after cached ones (the single-token probe never does): a model whose own
    forward fails there with a standard cache is refused."""
    try:
        return check(model, *args)
    except Exception as e:  # noqa: BLE001 - the model's own forward failed with a standard cache
        raise UnsupportedModelError(
            f"{_describe(model)} fails when a token is fed after cached ones with a standard transformers DynamicCache "
            f"({_first_line(e)}); streamkv's caches are standard Caches, so it cannot stream this model."
        ) from None


def _check_key_order(model, cfg) -> None:
    """streamkv's slot table keeps tokens in slots, not in stream order: refuse a model whose attention
    depends on the order of its cached keys (a bias from each key's index, computed by the model itself)."""
    err, scale = _after_cached_tokens(model, _key_order_effect, cfg)
    if err > _tolerance(torch.tensor([scale], dtype=model.dtype)) * (scale + 1e-6) + 1e-5:
        raise UnsupportedModelError(
            f"{_describe(model)}: positions enter its attention as biases computed from each key's index in the cache "
            "(ALiBi: BLOOM, MPT; relative position buckets or projections: CPM-Ant, Inkling): reordering the cached "
            f"keys changes its logits by {err:.3g} (scale {scale:.3g}). streamkv keeps tokens in slots, not in stream "
            "order, and such a model computes the biases itself, outside transformers' attention interface, so "
            "streamkv cannot give them by place; refused rather than streamed wrongly. Use a RoPE model (Llama, "
            "Mistral, Qwen2, Phi-3, GPT-NeoX, Gemma, ...)."
        )


@torch.inference_mode()
def _key_order_effect(model, cfg) -> tuple[float, float]:
    """How much the next token's logits change when every attention layer's cached keys and values are put
    in reverse order (and the logits' scale). Zero for attention without positions (a set of keys), large
    when a bias depends on the key's index in the cache: streamkv's slot table keeps tokens in slots, so a
    position-free model streams only if the order of its cached keys does not matter."""
    import copy

    from transformers import DynamicCache

    ids = torch.tensor([[min(t, cfg.vocab_size - 1) for t in (7, 11, 13, 17, 19)]], device=model.device)
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
    flipped = copy.deepcopy(cache)
    for layer in flipped.layers:  # the KV of attention layers (a recurrent state beside it stays as it is)
        if getattr(layer, "keys", None) is not None:
            layer.keys, layer.values = layer.keys.flip(-2), layer.values.flip(-2)  # [B, H, T, D], T reversed
    ref = model(input_ids=ids[:, 4:], past_key_values=cache, use_cache=True).logits.float()
    got = model(input_ids=ids[:, 4:], past_key_values=flipped, use_cache=True).logits.float()
    return (got - ref).abs().max().item(), ref.abs().max().item()


def _first_decoder_layer(model, cfg) -> torch.nn.Module | None:
    """The first module of the first ModuleList holding one module per hidden layer (the decoder layers)."""
    n = getattr(cfg, "num_hidden_layers", None)
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and not isinstance(m[0], (torch.nn.Linear, torch.nn.Embedding)):
            return m[0]
    return None


@torch.inference_mode()
def _input_moves_with_cache_length(model, cfg) -> bool | None:
    """Does the hidden state entering the first decoder layer for a token depend on how many tokens the
    cache already holds? (None: no decoder layer found.) Observed with a forward pre-hook, removed after."""
    from transformers import DynamicCache

    first = _first_decoder_layer(model, cfg)
    if first is None:
        return None
    seen: list[torch.Tensor] = []

    def grab(_module, args, kwargs):  # [batch, q, hidden] -> the last token's [batch, hidden]
        h = args[0] if args else kwargs.get("hidden_states")
        ok = isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[1] > 0
        seen.append(h[:, -1].float().clone() if ok else None)

    token = min(7, cfg.vocab_size - 1)
    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for n_before in (0, 3):
            cache = DynamicCache(config=model.config)
            if n_before:
                model(input_ids=torch.full((1, n_before), token, device=model.device), past_key_values=cache, use_cache=True)
            seen.clear()
            model(input_ids=torch.full((1, 1), token, device=model.device), past_key_values=cache, use_cache=True)
            if n_before == 0:
                alone = seen[-1]
    finally:
        handle.remove()
    if alone is None or seen[-1] is None or alone.shape != seen[-1].shape:
        return None  # not the [batch, tokens, hidden] this check reads: cannot tell
    return not _close(alone, seen[-1], alone)


@torch.inference_mode()
def _check_translation(model, cfg) -> None:
    """The same three tokens fed at positions 0..2 and d..d+2 must give the same logits. Keys that rotate as
    RoPE are not enough: anything else that depends on absolute positions (a query scale growing with the
    position in NoPE layers: Beam) makes a token's output depend on where streamkv happens to place it.

    "The same" allows the model's own rounding: rotating at other angles rounds differently, and bfloat16
    activations amplify that (moving SmolLM2 by one position changes its bfloat16 logits by up to ~15 % of
    their scale; `load` probes a quantised model before its weights are replaced). A dependence on the absolute position
    grows with the shift, rounding does not: the logits 37 and 1000 positions later may differ from those at
    0 by the float tolerance or by 8x what shifts of 1 and 2 change, whichever is larger. (In float32
    Beam's query scale changes its logits by ~1e-4 of their scale at a shift of 2 and ~1e-2 at 1000.)"""
    from transformers import DynamicCache

    ids = torch.tensor([[min(t, cfg.vocab_size - 1) for t in (7, 11, 13)]], device=model.device)

    def logits(p0):
        pos = torch.arange(p0, p0 + 3, device=model.device)[None]
        out = model(input_ids=ids, position_ids=pos, past_key_values=DynamicCache(config=model.config), use_cache=True)
        return out.logits.float()

    ref = logits(0)
    scale = ref.abs().max().item()
    noise = max((logits(s) - ref).abs().max().item() for s in (1, 2))
    allowed = max(_tolerance(ref.to(model.dtype)) * (scale + 1e-6) + 1e-5, 8 * noise)
    for d in PROBE_DELTAS[1:]:
        err = (logits(d) - ref).abs().max().item()
        if err > allowed:
            raise UnsupportedModelError(
                f"{_describe(model)}: every layer's keys rotate as RoPE, but the same tokens fed {d} positions later give "
                f"other logits (by {err:.3g}, scale {scale:.3g}, while shifts of 1 and 2 change them by {noise:.3g}): "
                "something else depends on the absolute "
                "position (e.g. a query scale that grows with the position in NoPE layers). streamkv places tokens by "
                "their place in the cache, not their place in the stream, so it cannot stream this model exactly."
            )


def _check_rope_types(model, cfg) -> None:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    # one dict, or one per layer type ({"full_attention": {...}, "sliding_attention": {...}})
    per_type = {k: v for k, v in params.items() if isinstance(v, dict)} if isinstance(params, dict) else {}
    for name, p in (per_type or {"": params or {}}).items():
        rope_type = p.get("rope_type", p.get("type", "default")) or "default"
        if rope_type in _STATIC_ROPE_TYPES:
            continue
        where = f" on its {name} layers" if name else ""
        why = ("whose frequencies change with the sequence length, so re-positioning cached keys would be inexact"
               if rope_type == "dynamic" else "which streamkv does not know to keep its frequencies fixed")
        raise UnsupportedModelError(
            f"{_describe(model)} uses rope_type={rope_type!r}{where}, {why}. Supported: " + ", ".join(sorted(_STATIC_ROPE_TYPES))
        )


def _frequency_sources(model) -> list[tuple[str, torch.nn.Module | None, str, torch.Tensor | None]]:
    """Every distinct set of rotary frequencies the model holds: (name, module, attribute, fixed tensor).

    `*inv_freq` buffers (`inv_freq`, `full_attention_inv_freq`, ...; not the `original_inv_freq` copies kept
    for dynamic scaling), and sinusoid tables [positions, 2 * n] = [sin | cos] (GPT-J's `embed_positions`),
    whose frequencies are read back from the row of position 1."""
    found, seen = [], []
    for name, buf in model.named_buffers():
        mod_name, _, attr = name.rpartition(".")
        freqs, module, fixed = None, None, None
        if attr.endswith("inv_freq") and not attr.endswith("original_inv_freq") and buf.dim() == 1:
            freqs, module = buf, model.get_submodule(mod_name)
        elif buf.dim() == 2 and buf.is_floating_point() and _is_sinusoid_table(buf):
            half = buf.shape[1] // 2
            row = buf[1].detach().to(torch.float64)
            fixed = torch.atan2(row[:half], row[half:]).float()
            freqs = fixed
        if freqs is None or any(f.shape == freqs.shape and torch.equal(f, freqs) for f in seen):
            continue
        seen.append(freqs)
        found.append((name, module, attr, fixed))
    return found


def _is_sinusoid_table(t: torch.Tensor) -> bool:
    """[positions, 2n]: row p = [sin(p f) | cos(p f)] (position 0: zeros then ones)."""
    if t.shape[0] < 2 or t.shape[1] < 2 or t.shape[1] % 2 or t.shape[1] > 4096:
        return False
    half = t.shape[1] // 2
    first = t[0].float()
    if not (torch.allclose(first[:half], torch.zeros(half)) and torch.allclose(first[half:], torch.ones(half))):
        return False
    rows = t[: min(64, t.shape[0])].float()
    return torch.allclose(rows[:, :half] ** 2 + rows[:, half:] ** 2, torch.ones(1), atol=1e-4)


def _tolerance(k: torch.Tensor) -> float:
    # the model computes keys in its own dtype: allow a few ulps of it (a wrong layout errs by O(1))
    return max(1e-3, 4 * torch.finfo(k.dtype).eps)


def _close(expected: torch.Tensor, got: torch.Tensor, k0: torch.Tensor) -> bool:
    err = (expected.float() - got.float()).abs().max().item()
    return err <= _tolerance(k0) * (k0.float().abs().max().item() + 1e-6) + 1e-5


def _candidates(kind, head_dim, sources, made, slot="keys"):
    """Descriptions to try for a layer: the frequencies named after its layer type first, then the others;
    each as rotate-half or interleaved pairs, on the leading or trailing dims, either direction; then NoPE."""
    ordered = sorted(sources, key=lambda s: not (kind and s[2].startswith(f"{kind}_")))
    for name, module, attr, fixed in ordered:
        n = (fixed if fixed is not None else getattr(module, attr)).numel()
        rd = 2 * n
        if rd > head_dim:
            continue
        for interleaved in (False, True):
            for sign in (1, -1):
                for offset in dict.fromkeys((0, head_dim - rd)):
                    key = (name, head_dim, rd, offset, interleaved, sign, slot)
                    if key not in made:
                        made[key] = RopeSpec(head_dim, rd, offset, interleaved, sign, slot, name, module, attr, fixed)
                    yield made[key]
    key = ("nope", head_dim)
    if key not in made:
        made[key] = RopeSpec(head_dim)
    yield made[key]


def _fit(kind, x0, shifted, sources, made, slot="keys") -> RopeSpec | None:
    """The first description under which `x0` (a layer's cached tensor at position 0) re-placed by d is
    its tensor at position d, for every probe delta; None if none fits."""
    for spec in _candidates(kind, x0.shape[-1], sources, made, slot):
        if all(_close(spec.rotate(x0.float(), d), xd, x0) for d, xd in zip(PROBE_DELTAS, shifted)):
            return spec
    return None


def _fit_layer(model, layer, kind, k0, shifted, sources, made) -> RopeSpec:
    """The description of layer `layer`'s keys, or the refusal saying why none fits."""
    spec = _fit(kind, k0, shifted, sources, made)
    if spec is not None:
        return spec
    d, kd = PROBE_DELTAS[0], shifted[0]
    norm0, normd = k0.float().norm(dim=-1), kd.float().norm(dim=-1)  # a rotation keeps each head's key norm
    tried = ", ".join(name for name, *_ in sources)
    if not torch.allclose(norm0, normd, rtol=10 * _tolerance(k0), atol=1e-5):
        how = ("its keys change with position in a way that is not a rotation (absolute positions added to the "
               "hidden states, or position-dependent scaling)")
    else:
        how = (f"its keys rotate with position, but not at any of the model's rotary frequencies ({tried}) in a "
               "layout streamkv knows (rotate-half or interleaved pairs, leading or trailing dims)")
    err = (k0.float() - kd.float()).abs().max().item()
    raise UnsupportedModelError(
        f"{_describe(model)}: layer {layer}'s keys at position {d} are not its position-0 keys re-placed by any "
        f"rotation streamkv knows (they differ by {err:.3g}): {how}. streamkv refuses to stream it rather than "
        "produce wrong attention."
    )


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


@torch.inference_mode()
def _single_token_kv(model, position: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Every layer's cached (key, value) for one token fed at `position` (None: a layer that stores none,
    having no attention). Refuses models whose cache must hold more than keys and values."""
    from transformers import DynamicCache
    from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

    cfg = text_config(model.config)
    cache = DynamicCache(config=model.config)
    token = torch.tensor([[min(7, cfg.vocab_size - 1)]], device=model.device)
    try:
        model(input_ids=token, position_ids=torch.tensor([[position]], device=model.device), past_key_values=cache, use_cache=True)
    except Exception as e:  # noqa: BLE001 - any failure here means: not drivable through a standard Cache
        first = _first_line(e)
        if position:
            raise UnsupportedModelError(
                f"{_describe(model)} runs with a token at position 0 but fails with one at position {position} ({first}): "
                "its positions index a table of absolute positions, not a rotation (RoPE) streamkv can re-place."
            ) from None
        raise UnsupportedModelError(
            f"{_describe(model)} does not run with a standard transformers DynamicCache ({first}); streamkv's caches "
            "are standard Caches, so it cannot stream this model (it needs a cache class of its own)."
        ) from None
    # layers holding a recurrent state and no KV; those holding both (Falcon-H1, Zamba) stream their KV
    recurrent = [i for i, layer in enumerate(cache.layers)
                 if isinstance(layer, LinearAttentionCacheLayerMixin) and getattr(layer, "keys", None) is None]
    if recurrent and len(recurrent) == len(cache.layers):
        raise UnsupportedModelError(
            f"{_describe(model)} is recurrent in every layer (SSM, convolution or linear attention): its state is "
            "constant-size already, so there is no KV cache to bound; run it with its own cache."
        )
    other = {type(layer).__name__ for layer in cache.layers
             if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer, DummyLayer) and not isinstance(
                 layer, LinearAttentionCacheLayerMixin)}
    if other:
        raise UnsupportedModelError(
            f"{_describe(model)} keeps more than keys and values in its cache ({', '.join(sorted(other))}: the keys of "
            "a sparse-attention indexer, or compressed KV); streamkv's caches cannot carry that state."
        )
    shared = getattr(cfg, "num_kv_shared_layers", 0) or "reuse" in (getattr(cfg, "kv_sharing_modes", None) or [])
    if shared:
        raise UnsupportedModelError(
            f"{_describe(model)} shares KV between layers (later layers reuse earlier layers' keys and values, as in "
            "Gemma 3n/4); streamkv's caches keep each layer's own KV and cannot hand it to another layer yet."
        )
    kv = [(layer.keys, layer.values) if getattr(layer, "keys", None) is not None else None for layer in cache.layers]
    missing = [i for i, (x, layer) in enumerate(zip(kv, cache.layers))
               if x is None and not isinstance(layer, (DummyLayer, LinearAttentionCacheLayerMixin))]
    if not any(x is not None for x in kv):
        raise UnsupportedModelError(
            f"{_describe(model)} stores no keys or values in the cache it is given: it keeps no KV cache of the standard "
            "kind (no cache support, or a recurrent model), so there is nothing streamkv could keep or re-place."
        )
    if missing:
        raise UnsupportedModelError(
            f"{_describe(model)}: only {len(kv) - len(missing)} of {len(kv)} layers store keys in the cache "
            f"({_layer_list(missing)} store none); streamkv needs every attention layer's KV in its cache."
        )
    return kv
