"""Which causal LMs of the installed transformers streamkv streams exactly: a sweep over every model type.

For each type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` a tiny random model is built from its default config,
shrunk (2+ layers, hidden 64, 4 heads, vocab 128, few experts; per-layer patterns such as local/global or
NoPE layers kept, one layer of each kind), and streamed through the `sink` policy token by token and in
chunks. The logits are compared with an independent StreamingLLM reference (`reference_stream`) built
from plain forwards of the model and a `DynamicCache`, with no rotation arithmetic of streamkv's. Verdicts:

* EXACT: streamkv accepted the model and every step's logits equal the reference's.
* REFUSED: streamkv raised `UnsupportedModelError` (the reason is recorded; a refusal must be true).
* CRASH: streamkv accepted the model and then failed with some other error (a bug: refuse instead).
* WRONG: streamkv accepted the model and its logits differ from the reference (the worst outcome).
* SKIPPED: no tiny model of this type could be built or run with plain forwards (not streamkv's doing).

Regenerate the table (docs/models.md) after a transformers upgrade or a change to rope.py / the policies:

    PYTHONPATH=. python -m streamkv.coverage --write docs/models.md

The module only imports streamkv by absolute name, so the same file measures another checkout's streamkv
(`PYTHONPATH=/path/to/other/checkout python streamkv/coverage.py --json before.json`).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings

import torch

SINKS, WINDOW = 2, 6  # budget 8; a stream of 3x the budget
STREAM = 24
CHUNKS = {"token-by-token": [1], "chunked": [5, 1, 3, 2]}
LOCAL_WINDOW = 5  # local/global types run again with this sliding window, narrower than the budget (8 + 1)
MAX_POSITION = 13  # streamkv's positions restart past this: its absolute positions differ from the reference's
VOCAB = 128

# sizes every type shares, applied to whichever of these fields its config has
_SMALL = dict(
    vocab_size=VOCAB, hidden_size=64, d_model=64, n_embd=64, emb_dim=64, num_hidden_layers=2, n_layer=2,
    num_layers=2, n_layers=2, decoder_layers=2, num_decoder_layers=2, encoder_layers=2, num_encoder_layers=2,
    num_attention_heads=4, n_head=4, n_heads=4, decoder_attention_heads=4, num_decoder_attention_heads=4,
    encoder_attention_heads=4, num_encoder_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128, ffn_dim=128,
    decoder_ffn_dim=128, encoder_ffn_dim=128, n_inner=128, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, shared_experts_intermediate_size=32, shared_intermediate_size=32,
    ffn_hidden_size=128, num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, num_shared_experts=1, q_lora_rank=32,
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, rotary_dim=8,
    first_k_dense_replace=1, max_position_embeddings=4096, n_positions=4096, n_ctx=4096, max_seq_len=4096,
    max_target_positions=4096,
    sliding_window=32, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=16,
    linear_value_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=4, vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=16, pronunciation_embed_dim=16, pronunciation_vocab_size=32, shape_embed_dim=16,
    shape_vocab_size=32, hidden_size_global=64, encoder_hash_byte_group_vocab=64, mamba_d_state=8,
    mamba_n_heads=4, mamba_d_head=32, mamba_d_ssm=128, mamba_n_groups=1, mamba_chunk_size=16, chunk_size=16, state_size=8,
    num_nextn_predict_layers=0, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    # vision / audio towers of multimodal wrappers (only the text decoder streams, the rest must be small)
    image_size=32, patch_size=8, num_channels=3,
)
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers")

# fields of a type's config that this type needs set differently (keys: model_type; a dict value is applied
# to the sub-config of that name)
_OVERRIDES: dict[str, dict] = {
    # hybrids: one attention layer beside the recurrent one, so the probe meets both
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "zamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1),  # one attention block shared by two
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0)),
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "gemma3n_text": dict(num_hidden_layers=4, num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2,
                         intermediate_size=[128] * 4, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0]),
    # Gemma 4: global layers have twice the local head size (per_layer_config names them by index)
    "gemma4_text": dict(per_layer_config={"01": {"head_dim": 32}}),
    "gemma4": dict(text_config=dict(per_layer_config={"01": {"head_dim": 32}})),
    "gemma4_unified_text": dict(per_layer_config={"01": {"head_dim": 32}}),
    "gemma4_unified": dict(text_config=dict(per_layer_config={"01": {"head_dim": 32}})),
    "gemma4_unified_assistant": dict(text_config=dict(num_kv_shared_layers=0)),
    "gemma4_assistant": dict(text_config=dict(hidden_size_per_layer_input=0, num_kv_shared_layers=0)),
    "lfm2": dict(full_attn_idxs=[1], layer_types=["conv", "full_attention"]),  # the default has no conv layer
    "lfm2_moe": dict(layer_types=["conv", "full_attention"]),
    "zaya": dict(num_experts_per_tok=1),
    "xmod": dict(default_language="en_XX"),
    "prophetnet": dict(max_position_embeddings=64),  # its relative-position buckets cost seconds per forward at 4096
    "musicgen": dict(decoder=dict(num_codebooks=1)),
    "musicgen_melody": dict(decoder=dict(num_codebooks=1)),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4),
    "qwen4_exp": dict(text_config=dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                                       indexer_compress_ratio=4)),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1),
    "reformer": dict(is_decoder=True, axial_pos_shape=[8, 8], axial_pos_embds_dim=[32, 32], max_position_embeddings=64,
                     attn_layers=["local", "lsh"], num_buckets=4),
}


def _sub_configs(cfg) -> dict:
    from transformers import PretrainedConfig

    return {k: v for k, v in vars(cfg).items() if isinstance(v, PretrainedConfig)}


def _per_layer_list(value, length: int) -> list:
    """A per-layer list (layer types, NoPE flags, ...) for `length` layers that keeps each kind once."""
    kinds = list(dict.fromkeys(map(_hashable, value)))
    return [kinds[i % len(kinds)] for i in range(length)]


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _small_kwargs(default, overrides: dict) -> dict:
    """Constructor arguments that make `default` (a config instance) small: the shared small sizes for the
    fields it has, per-layer lists resampled to one layer of each kind, then the type's own overrides."""
    fields = default.to_dict()
    aliases = getattr(default, "attribute_map", {}) or {}  # e.g. num_experts_per_tok -> num_experts_per_token
    kwargs = {aliases.get(k, k): v for k, v in _SMALL.items() if aliases.get(k, k) in fields}
    heads, kv = fields.get("num_attention_heads"), fields.get("num_key_value_heads")
    if "num_key_value_heads" in kwargs and kv is not None:  # keep the attention kind: MHA, GQA or MQA
        kwargs["num_key_value_heads"] = 4 if kv == heads else 1 if kv == 1 else 2
    if "qk_rope_head_dim" in fields and "head_dim" in fields:  # MLA: head_dim is the rotary part's size
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    n_default = next((fields[k] for k in _LAYER_COUNTS if isinstance(fields.get(k), int)), None)
    per_layer = {k: v for k, v in fields.items() if n_default and n_default > 1 and isinstance(v, list) and len(v) == n_default}
    # a list of every layer's index (moe_layers, full_attn_idxs) is not a per-layer pattern
    indices = {k: v for k, v in per_layer.items() if v == list(range(n_default))}
    sizes = {k: v for k, v in per_layer.items() if k not in indices and all(type(x) is int and x > 64 for x in v)}
    kinds = {k: v for k, v in per_layer.items() if k not in indices and k not in sizes}
    n = overrides.get("num_hidden_layers") or max([2] + [len(set(map(_hashable, v))) for v in kinds.values()])
    for k in _LAYER_COUNTS:
        if k in kwargs:
            kwargs[k] = n
    kwargs.update({k: list(range(n)) for k in indices})
    kwargs.update({k: [128] * n for k in sizes})  # per-layer sizes (Gemma 3n's intermediate_size)
    kwargs.update({k: _per_layer_list(v, n) for k, v in kinds.items()})
    for name, sub in _sub_configs(default).items():
        kwargs[name] = _small_kwargs(sub, overrides.get(name, {}))
    for name, sub in overrides.items():  # sub-configs the default leaves unset (built from a dict)
        if isinstance(sub, dict) and name not in kwargs:
            kwargs[name] = sub
    kwargs.update({k: v for k, v in overrides.items() if not isinstance(v, dict)})
    return kwargs


def tiny_config(model_type: str, **overrides):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    return cfg_cls(**_small_kwargs(cfg_cls(), {**_OVERRIDES.get(model_type, {}), **overrides}))


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random model of `model_type` (float32, eval), its 2-D weights scaled up as in tests/tiny.py so
    attention is far from uniform and position errors show in the logits."""
    from transformers import AutoModelForCausalLM

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cfg = tiny_config(model_type, **overrides)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
    decoder = [sub for sub in _sub_configs(cfg).values() if isinstance(sub, model_cls.config_class)]
    if not isinstance(cfg, model_cls.config_class) and decoder:  # MusicgenForCausalLM takes the decoder's config
        cfg = decoder[0]
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model


# ---- the reference -------------------------------------------------------------------------------------

def kept_before(t: int, sinks: int, window: int) -> list[int]:
    """Stream indices a sinks + window cache holds before token t arrives (evict-after semantics)."""
    if t <= sinks + window:
        return list(range(t))
    return list(range(sinks)) + list(range(t - window, t))


@torch.inference_mode()
def reference_stream(model, ids: torch.Tensor, sinks: int, window: int, chunks: list[int]) -> torch.Tensor:
    """Logits [n, vocab] of StreamingLLM (sinks + window) over `ids` [1, n], fed in chunks of the given sizes
    (cycled), computed with the model's own forwards and `DynamicCache` only.

    What is exact on a multi-layer model: a token's KV at layer l > 0 depends on what the token attended at
    the layers below *when it was fed*, so a window token's KV cannot be recomputed later by a fresh
    forward over the kept tokens (the tokens it attended then may be gone now). StreamingLLM keeps it as
    computed; so does this reference: every token's per-layer KV is captured from the cache right after the
    step that fed it and reused, untouched, while the token stays in the window. Window tokens keep the
    positions they were fed at (their stream index), so the distances between them never change.
    The sinks (the first `sinks` tokens) are different: they attended only to each other when fed, so their
    KV is a plain forward of those tokens alone; StreamingLLM places them right before the window, so each
    step re-runs them through the model at those positions (w0 - S .. w0 - 1, w0 = the oldest window token's
    position). That is a fresh computation by the model itself, not a rotation of stored keys: it is only
    equal to streamkv's re-rotated pristine sink keys if the model's positional encoding is relative, which is
    what the comparison checks. Each step then builds a fresh `DynamicCache`: the sinks' forward, the
    stored window KV appended layer by layer, and the new chunk fed at its stream positions (attending to
    sinks + window + itself, evicting afterwards, as streamkv does).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin

    n = ids.shape[1]
    fed: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}  # stream index -> per-layer (k, v) as fed
    carried: dict[int, object] = {}  # hybrids: each recurrent layer's state after every token so far
    outs, start, step = [], 0, 0
    while start < n:
        q = min(chunks[step % len(chunks)], n - start)
        kept = kept_before(start, sinks, window)
        sink_ids = [t for t in kept if t < sinks]
        win = [t for t in kept if t >= sinks]
        w0 = win[0] if win else start
        cache = DynamicCache(config=model.config)
        # local layers: a full layer, not transformers' sliding one (which trims to the last window-1 tokens, so
        # a chunk's fed KV could not be read back); the model's own sliding mask, index arithmetic over this
        # cache in place order, still limits what each query sees
        cache.layers = [DynamicLayer() if isinstance(l, DynamicSlidingWindowLayer) else l for l in cache.layers]
        if sink_ids:
            pos = torch.arange(w0 - len(sink_ids), w0)[None]
            model(input_ids=ids[:, sink_ids], position_ids=pos, past_key_values=cache, use_cache=True)
        for i, layer in carried.items():  # the sinks' re-run must not touch a recurrent state: it saw the stream
            if getattr(cache.layers[i], "keys", None) is None:  # a recurrent layer: the carried one
                cache.layers[i] = layer
            else:  # KV and a recurrent state in one layer (Falcon-H1): the sinks' KV, the carried state
                for f in ("conv_states", "recurrent_states", "is_conv_states_initialized",
                          "is_recurrent_states_initialized", "has_previous_state", "conv_kernel_size", "dtype", "device"):
                    setattr(cache.layers[i], f, getattr(layer, f))
        if win:
            for layer_idx in range(len(fed[win[0]])):
                if fed[win[0]][layer_idx] is None:  # a recurrent layer: no keys
                    continue
                k = torch.cat([fed[t][layer_idx][0] for t in win], dim=2)
                v = torch.cat([fed[t][layer_idx][1] for t in win], dim=2)
                cache.update(k, v, layer_idx)
        pos = torch.arange(start, start + q)[None]
        out = model(input_ids=ids[:, start : start + q], position_ids=pos, past_key_values=cache, use_cache=True)
        outs.append(out.logits[0].float())
        carried = {i: layer for i, layer in enumerate(cache.layers) if isinstance(layer, LinearAttentionCacheLayerMixin)}
        layers = [None if getattr(layer, "keys", None) is None  # recurrent, or no attention at all
                  else (layer.keys[:, :, -q:], layer.values[:, :, -q:]) for i, layer in enumerate(cache.layers)]
        for j in range(q):
            fed[start + j] = [None if kv is None else (kv[0][:, :, j : j + 1].clone(), kv[1][:, :, j : j + 1].clone())
                              for kv in layers]
        start, step = start + q, step + 1
    return torch.cat(outs)


@torch.inference_mode()
def streamkv_stream(model, ids: torch.Tensor, sinks: int, window: int, chunks: list[int]) -> torch.Tensor:
    """The same stream through streamkv's `sink` policy, positions from the cache (restarting past
    MAX_POSITION, so streamkv's absolute positions differ from the reference's: only distances may count)."""
    from streamkv.policies import make_policy

    cache = make_policy("sink", model, sinks=sinks, window=window)
    cache.max_position = MAX_POSITION
    outs, start, step = [], 0, 0
    while start < ids.shape[1]:
        q = min(chunks[step % len(chunks)], ids.shape[1] - start)
        out = model(input_ids=ids[:, start : start + q], position_ids=cache.position_ids(q), past_key_values=cache, use_cache=True)
        outs.append(out.logits[0].float())
        start, step = start + q, step + 1
    return torch.cat(outs)


# ---- the sweep -----------------------------------------------------------------------------------------

TOLERANCE = 1e-4  # of the logits' scale: float32 reordering errs by ~1e-6, a wrong position by O(1)


def _first_line(e: BaseException) -> str:
    """The error in one line (a strict config's validation error says what failed on its second line)."""
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])
    return f"{type(e).__name__}: {text}"[:300]


def classify(model_type: str) -> dict:
    """One row of the table: {model_type, cls, verdict, reason, err, seconds}, and for local/global types
    `beyond`: the verdict with a sliding window narrower than the budget (a CRASH or WRONG there is the row's)."""
    t0 = time.perf_counter()
    row = {"model_type": model_type, "cls": "", "verdict": "", "reason": "", "err": None}
    try:
        model = tiny_model(model_type)
        row["cls"] = type(model).__name__
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, VOCAB, (1, STREAM), generator=g)
        with torch.inference_mode():
            logits = model(input_ids=ids[:, :6]).logits
        if not bool(logits.isfinite().all()):
            raise ValueError("the tiny model's logits are not finite")
    except Exception as e:  # noqa: BLE001 - any failure to build a tiny model is recorded, not raised
        row.update(verdict="SKIPPED", reason=f"no tiny model: {_first_line(e)}")
        return _done(row, t0)
    err = _compare(model, ids, row)
    if err is None:
        return _done(row, t0)
    row["err"] = err
    if _local_layers(model):  # local/global: again with a window narrower than the budget (per-layer masking)
        try:
            narrow = tiny_model(model_type, sliding_window=LOCAL_WINDOW)
        except Exception as e:  # noqa: BLE001
            row["beyond"] = f"SKIPPED: no tiny model with sliding_window={LOCAL_WINDOW}: {_first_line(e)}"
            return _done(row, t0)
        sub = {"verdict": "", "reason": ""}
        err = _compare(narrow, ids, sub)
        row["beyond"] = f"{sub['verdict']}: {sub['reason']}" if err is None else "EXACT"
        if sub["verdict"] in ("CRASH", "WRONG"):
            row.update(verdict=sub["verdict"], reason=f"beyond its sliding window ({LOCAL_WINDOW}): {sub['reason']}")
    return _done(row, t0)


def _local_layers(model) -> list[int]:
    """The layers streamkv treats as local (sliding-window) for this model."""
    from streamkv.policies.base import layer_windows
    from streamkv.rope import text_config

    return [i for i, w in enumerate(layer_windows(model, text_config(model.config))) if w is not None]


def _compare(model, ids, row: dict) -> float | None:
    """streamkv against the reference, both chunkings: the largest error, or None with row's verdict set
    (REFUSED / CRASH / WRONG)."""
    from streamkv.rope import UnsupportedModelError

    errs = []
    for mode, chunks in CHUNKS.items():
        try:
            got = streamkv_stream(model, ids, SINKS, WINDOW, chunks)
        except UnsupportedModelError as e:
            row.update(verdict="REFUSED", reason=str(e).strip().replace("\n", " "))
            return None
        except Exception as e:  # noqa: BLE001
            row.update(verdict="CRASH", reason=f"{mode}: {_first_line(e)}", trace=traceback.format_exc(limit=-4))
            return None
        try:
            ref = reference_stream(model, ids, SINKS, WINDOW, chunks)
        except Exception as e:  # noqa: BLE001 - accepted but unverifiable must not pass
            row.update(verdict="CRASH", reason=f"{mode}: the reference failed: {_first_line(e)}")
            return None
        errs.append((got - ref).abs().max().item() / (1.0 + ref.abs().max().item()))
    if not max(errs) <= TOLERANCE:
        row.update(verdict="WRONG", reason=f"logits differ from the reference by {max(errs):.2e} of their scale")
        return None
    row["verdict"] = "EXACT"
    return max(errs)


def _done(row: dict, t0: float) -> dict:
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def sweep(types: list[str] | None = None, progress=None) -> list[dict]:
    """Classify every causal-LM type (or `types`), one after the other."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in types or causal_lm_types():
            rows.append(classify(model_type))
            if progress:
                progress(rows[-1])
    return rows


VERDICTS = ("EXACT", "REFUSED", "CRASH", "WRONG", "SKIPPED")


def counts(rows: list[dict]) -> dict:
    return {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}


def _short_reason(reason: str) -> str:
    """The reason without the 'ClassName (model_type=...)' prefix every refusal starts with, one line, no pipes."""
    import re

    reason = re.sub(r"^\S+ \(model_type='[^']*'\):? ?", "", reason.strip())
    return " ".join(reason.split()).replace("|", "\\|")


def read_table(path) -> list[dict]:
    """The rows of a table written by `write_markdown` (the committed docs/models.md): model_type, cls, verdict."""
    rows = []
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return rows
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3 and cells[2].strip("*") in VERDICTS:
            rows.append({"model_type": cells[0].strip("`"), "cls": cells[1].strip("`"), "verdict": cells[2].strip("*")})
    return rows


def read_beyond(path) -> dict[str, str]:
    """The local/global section of a table written by `write_markdown`: model_type -> its verdict beyond the
    sliding window (EXACT, or the first word of REFUSED/SKIPPED)."""
    out, inside = {}, False
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        if line.startswith("## "):
            inside = line.startswith("## Local/global models")
        elif inside and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            out[cells[0].strip("`")] = cells[1].strip("*").split(":")[0]
    return out


# refusal reasons, grouped for the summary (the first phrase that occurs in a reason names its group)
_REASON_GROUPS = [
    ("is a hybrid whose", "hybrid: keys/values and a recurrent state in one cache layer"),
    ("is recurrent in every layer", "recurrent in every layer (SSM): constant-size already, no KV cache to bound"),
    ("keeps more than keys and values", "sparse-attention indexer or compressed KV in the cache"),
    ("shares KV between layers", "KV shared between layers"),
    ("does not run with a standard transformers DynamicCache", "needs a cache class of its own"),
    ("stores no keys or values", "keeps no KV cache"),
    ("has no rotary position embedding", "absolute positions (learned / sinusoidal), no RoPE"),
    ("fails with one at position", "absolute positions (a position table)"),
    ("in a way that is not a rotation", "absolute positions (learned / sinusoidal), no RoPE"),
    ("fails when a token is fed after cached ones", "its own forward fails with a standard cache"),
    ("numbers tokens by the length of its cache", "absolute positions numbered by the cache's length (a position table)"),
    ("biases computed from each key's index", "attention biases by the key's index, computed outside the attention interface (ALiBi, relative biases)"),
    ("give other logits", "outputs depend on the absolute position beyond RoPE"),
    ("values change with the token's position", "position-dependent values"),
    ("encoder-decoder", "encoder-decoder"),
    ("rope_type", "rope type with moving frequencies"),
]

# what the table cannot say by itself (kept here so that regenerating the table keeps it)
NOTES = [
    "Hybrids (Qwen3-Next, Qwen3.5, LFM2, Bamba, OLMo-hybrid, Bailing-hybrid): the layers that keep a recurrent "
    "state (SSM, convolution or linear attention) get transformers' own cache layer, carried unchanged through "
    "the stream and saved in snapshots; the slot table serves the attention layers. The reference carries each "
    "recurrent layer's state across its steps too (the sinks' re-run does not touch it). `memory`, `h2o`, "
    "`sirllm` and `duo` manage the attention layers only (attend, score, store blocks) and equal dense with "
    "room for the stream on Qwen3-Next, Falcon-H1 and Jamba (tests/test_models_coverage.py). Hybrids whose attention has no positional encoding at all (Jamba, "
    "Nemotron-H, Granite 4 hybrid, Kimi Linear: their recurrent layers give order) stream with every attention "
    "layer NoPE: the probe finds keys that ignore position_ids and checks that the first layer's input does not "
    "change with the cache's length (a position table numbered by it: BART-style, Musicgen). Layers holding KV "
    "*and* a recurrent state in one cache layer (Falcon-H1, Zamba, Zamba2, Zaya) get a slot-table layer that "
    "carries transformers' recurrent part beside it (`RecurrentStreamingLayer`); the reference re-runs the "
    "sinks for their KV and restores the carried state. For every model the probe also reverses the cached "
    "keys of a short prompt: a model whose next logits change computes position biases from each key's index "
    "in the buffer, outside transformers' attention interface (ALiBi in BLOOM and MPT, relative projections in "
    "Inkling), which streamkv's slots, not in stream order, cannot give by place: refused.",
    "Beam (`beam`): with its per-layer-type frequencies found, streaming it came within the tolerance (9e-5 of "
    "the logits' scale, 100x float noise), because its NoPE layers scale queries by `(1 + position / 2048) ** "
    "0.1`: a token's output depends on its absolute position, which streamkv chooses (positions restart). The "
    "probe feeds the same tokens 1000 positions later and refuses a model whose logits change (by 1e-2 here): "
    "Beam stays refused, now for its true reason.",
    "Local/global models (Gemma 2/3/4, gpt-oss, Granite SWA, MiMo-V2-Flash, ModernBERT-decoder, Mistral, ...): "
    f"the table's verdict is for a budget inside their sliding window (32 here). Each is also streamed with a "
    f"window of {LOCAL_WINDOW}, narrower than the budget: `sink` and `window` then mask the local layers by "
    "place (each query sees the keys less than the window behind it, through the model's own attention: "
    "SDPA, or its eager function with its soft-capping or learned sinks, Gemma 2 and gpt-oss), while the "
    "global layers keep sinks + window; the section below gives that verdict. A local layer keeps only its "
    "window (the last W-1 tokens, in buffers of its own) when the policy's window covers it, as here (6 >= "
    "4); with a narrower policy window it is masked over the shared buffers. `memory` does the same for "
    "local layers (its window must cover theirs) and keeps its blocks for the global layers "
    "(tests/test_core_local_windows.py: equals dense on Gemma 3 with every block retrieved), and so do `h2o` "
    "and `sirllm`, whose heavy tokens go to the global layers (equal dense with room for every evicted token), "
    "and `duo`, whose retrieval heads of the global layers keep what left the window (equals dense with every "
    "head retrieving). `memory`, `h2o`, `sirllm` and `duo` refuse models that attend with their own "
    "eager function at any budget (they compute attention as SDPA does, which would drop the soft-capping "
    "or sinks).",
    "Latent multi-head attention (DeepSeek V2/V3, MiniCPM3, GLM-4 MoE Lite, LongCat, Youtu, AXK1) caches the "
    "position-free latent as keys and the rotated rope key as values; `sink`, `window` and `dense` rotate the "
    "value slot. `memory`, `h2o`, `sirllm` and `duo` rotate and attend cached keys themselves and refuse these "
    "models.",
    "Llama 4's NoPE layers scale queries by `log(floor((n + 1) / 8192) + 1)`, n counting the tokens already in "
    "the cache: under streamkv n is the token's place in the cache (as StreamingLLM places tokens), not in the "
    "stream, so the scale is 1 for budgets below 8,191 tokens, as in the table, and follows the cache above.",
    "SKIPPED types have no tiny model here: `gemma3n` needs the `timm` package for its vision tower (its text "
    "decoder `gemma3n_text` is covered), the others' default configs do not validate or run when shrunk. "
    "`dots3_note` is covered by `dots3_note_text`.",
]


def _group(reason: str) -> str:
    return next((label for phrase, label in _REASON_GROUPS if phrase in reason), "other")


def write_markdown(rows: list[dict], path, before: list[dict] | None = None, before_label: str = "before") -> None:
    """docs/models.md: counts (before / now), what changed, then one row per model type."""
    import platform

    import transformers

    now = counts(rows)
    prev = {r["model_type"]: r["verdict"] for r in before or []}
    changed = [(r["model_type"], prev[r["model_type"]], r["verdict"]) for r in rows
               if r["model_type"] in prev and prev[r["model_type"]] != r["verdict"]]
    out = [
        "# Which transformers causal LMs streamkv streams exactly",
        "",
        "<!-- written by `python -m streamkv.coverage --write docs/models.md`; tests/test_models_coverage.py reads it -->",
        "",
        f"Every causal-LM model type of transformers {transformers.__version__} "
        f"(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, {len(rows)} types; torch {torch.__version__}, Python "
        f"{platform.python_version()}), as a tiny random model (2+ layers, hidden 64, vocab {VOCAB}; local/global, NoPE "
        "or hybrid layer patterns kept, one layer of each kind), streamed through the `sink` policy "
        f"(sinks={SINKS}, window={WINDOW}) over {STREAM} tokens, token by token and in chunks {CHUNKS['chunked']}, "
        f"with positions restarting past {MAX_POSITION} (so streamkv's absolute positions differ from the reference's). "
        "The logits are compared with an independent StreamingLLM reference built from the model's own forwards "
        "and a `DynamicCache` (`streamkv.coverage.reference_stream`: window tokens keep the KV computed when "
        "they were fed, the sinks are re-run at their new positions every step; no rotation arithmetic of "
        "streamkv's).",
        "",
        "* **EXACT**: accepted, and every step's logits equal the reference's (within "
        f"{TOLERANCE:g} of the logits' scale; float32 reordering errs by ~1e-6, a wrong position by O(1)).",
        "* **REFUSED**: `UnsupportedModelError`, with the reason below (refusing beats garbage: every reason is the true one).",
        "* **CRASH** / **WRONG**: accepted, then an exception / other logits. The suite fails on either.",
        "* **SKIPPED**: no tiny model of this type could be built or run (not streamkv's doing).",
        "",
        "Regenerate after a transformers upgrade or a change to `streamkv/rope.py` or the policies (about a minute "
        "on one core):",
        "",
        "    PYTHONPATH=. python -m streamkv.coverage --write docs/models.md",
        "",
        "The previous table's verdicts are read before it is overwritten, and the changes are listed below. "
        "`tests/test_models_coverage.py` runs the same sweep and fails on any CRASH or WRONG and on any type "
        "this table records EXACT that no longer is.",
        "",
        "## Counts",
        "",
        f"| verdict | {before_label} | now |" if before else "| verdict | now |",
        "|---|---|---|" if before else "|---|---|",
    ]
    then = counts(before) if before else None
    for v in VERDICTS:
        out.append(f"| {v} | {then[v]} | {now[v]} |" if before else f"| {v} | {now[v]} |")
    if before:
        out += ["", f"## Changes ({before_label} → now)", ""]
        out += [f"* `{t}`: {a} → {b}" for t, a, b in changed] or ["* none"]
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["verdict"] == "REFUSED":
            groups.setdefault(_group(r["reason"]), []).append(r["model_type"])
    out += ["", "## Refused, by reason", "", "| reason | types |", "|---|---|"]
    for label, types in sorted(groups.items(), key=lambda g: -len(g[1])):
        out.append(f"| {label} ({len(types)}) | {', '.join(f'`{t}`' for t in types)} |")
    out += ["", "## Notes", ""] + [f"* {note}" for note in NOTES]
    local = [r for r in rows if r.get("beyond")]
    if local:
        out += ["", f"## Local/global models with a sliding window ({LOCAL_WINDOW}) narrower than the budget", "",
                "| model type | verdict beyond the window |", "|---|---|"]
        out += [f"| `{r['model_type']}` | {_short_reason(r['beyond'])} |" for r in local]
    out += ["", "## Every type", "", "| model type | class | verdict | reason |", "|---|---|---|---|"]
    for r in rows:
        verdict = r["verdict"] if r["verdict"] in ("REFUSED", "SKIPPED") else f"**{r['verdict']}**"
        out.append(f"| `{r['model_type']}` | `{r['cls'] or '-'}` | {verdict} | {_short_reason(r['reason'])} |")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every causal-LM type)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--write", help="write the markdown table here (docs/models.md); its previous verdicts are compared")
    parser.add_argument("--before", help="compare with the rows of this JSON (e.g. a run on another checkout) instead")
    parser.add_argument("--before-label", default="previous table", help="what --before is, for the counts table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    def progress(r):
        print(f"{r['verdict']:8s} {r['model_type']:28s} {r['seconds']:5.2f}s {r['reason'][:150]}", flush=True)

    t0 = time.perf_counter()
    rows = sweep(args.types or None, progress)
    print(f"{counts(rows)} in {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.write:
        before = json.load(open(args.before)) if args.before else read_table(args.write)
        write_markdown(rows, args.write, before or None, args.before_label)


if __name__ == "__main__":
    main()
