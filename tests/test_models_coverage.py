"""Every causal-LM type of the installed transformers, streamed through `sink` and checked against an
independent multi-layer StreamingLLM reference (streamkv/coverage.py, the table in docs/models.md).

The reference (`coverage.reference_stream`) uses only the model's own forwards and a `DynamicCache`:

* What is exact on a multi-layer model: a token's KV at layer l > 0 depends on what the token attended at
  the layers below *when it was fed*. A fresh forward over the kept tokens would recompute a window token's
  deeper KV as if the evicted tokens had never been there, so it is not StreamingLLM beyond one layer (the
  one-layer check of tests/test_core_policies.py). StreamingLLM keeps each window token's KV as computed;
  so does the reference: every token's per-layer KV is captured from the DynamicCache right after the step
  that fed it (at its stream index as position) and reused untouched while it stays in the window.
* The sinks attended only to each other when fed, so their KV is a forward of the sink tokens alone;
  StreamingLLM places them right before the window, so every step re-runs them through the model at those
  positions. This is the model's own computation, not a rotation of stored keys, so it equals streamkv's
  re-rotated pristine sink keys only if the model's positional encoding is relative: that is what is tested.
* Each step: a fresh DynamicCache = the sinks' forward, the stored window KV appended layer by layer, then
  the chunk fed at its stream positions (it attends to sinks + window + itself; eviction comes after).

streamkv feeds the same stream with positions restarting every few tokens (`max_position` = 13), so its
absolute positions differ from the reference's: only distances may matter, as StreamingLLM assumes.

The sweep builds ~190 tiny models and streams 24 tokens through each, twice (token by token and in chunks),
plus the reference: about a minute on one core, so the whole sweep runs here (no subset).
"""
from pathlib import Path

import pytest
import torch
from tiny import make_tiny

from streamkv import coverage, make_policy
from streamkv import rope
from streamkv.rope import UnsupportedModelError, rope_layers

TABLE = Path(__file__).resolve().parent.parent / "docs" / "models.md"


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    return {r["model_type"]: r for r in coverage.sweep()}


def test_no_type_crashes_or_is_wrong(rows):
    bad = {t: f"{r['verdict']}: {r['reason']}" for t, r in rows.items() if r["verdict"] in ("CRASH", "WRONG")}
    assert not bad, "streamkv accepted these models and then failed them (refuse instead, or fix):\n" + "\n".join(
        f"  {t}: {why}" for t, why in bad.items())


def test_every_type_exact_in_the_committed_table_still_is(rows):
    committed = {r["model_type"]: r["verdict"] for r in coverage.read_table(TABLE)}
    assert committed, f"{TABLE} has no table: regenerate it (python -m streamkv.coverage --write docs/models.md)"
    lost = {t: f"{rows[t]['verdict']}: {rows[t]['reason'][:300]}" for t, v in committed.items()
            if v == "EXACT" and t in rows and rows[t]["verdict"] != "EXACT"}
    assert not lost, "types docs/models.md records EXACT no longer are:\n" + "\n".join(f"  {t}: {w}" for t, w in lost.items())


def test_every_type_exact_beyond_its_window_in_the_committed_table_still_is(rows):
    """Local/global types: the verdict with a sliding window narrower than the budget (local layers masked by
    place, through SDPA or the model's own eager attention)."""
    committed = coverage.read_beyond(TABLE)
    assert committed, f"{TABLE} has no local/global section: regenerate it (python -m streamkv.coverage --write docs/models.md)"
    lost = {t: rows[t].get("beyond", "") for t, v in committed.items()
            if v == "EXACT" and t in rows and not rows[t].get("beyond", "").startswith("EXACT")}
    assert not lost, "types docs/models.md records EXACT beyond their window no longer are:\n" + "\n".join(
        f"  {t}: {w[:300]}" for t, w in lost.items())


# families issue 11 names: each EXACT, or refused for the reason that is true of it
MUST_STREAM = ["llama", "mistral", "qwen2", "phi3", "gpt_neox", "gemma2", "gemma3", "gemma3_text", "gemma4_text", "olmo3",
               "mellum", "laguna", "mimo_v2_flash", "modernbert-decoder", "smollm3", "exaone4", "llama4_text", "glm",
               "glm4", "cohere", "cohere2", "ernie4_5", "helium", "gptj", "codegen", "fuyu", "got_ocr2",
               "deepseek_v2", "deepseek_v3", "minicpm3", "glm4_moe_lite", "nanochat",
               "qwen3_next", "qwen3_5_text", "lfm2", "bamba",  # hybrids: recurrent layers carried as they are
               "jamba", "nemotron_h", "granitemoehybrid", "kimi_linear",  # ... and attention without positions
               "falcon_h1", "zamba", "zamba2", "zaya"]  # ... and KV beside a recurrent state in one layer
MUST_REFUSE = {
    "gpt2": "learned or sinusoidal absolute positions",
    "opt": "learned or sinusoidal absolute positions",
    "bloom": "biases computed from each key's index in the cache (ALiBi",
    "mpt": "biases computed from each key's index in the cache (ALiBi",
    "bart": "numbers tokens by the length of its cache",
    "musicgen": "its first layer's input changes with the length of the cache",
    "deepseek_v32": "sparse-attention indexer",
    "inkling_text": "biases computed from each key's index in the cache",
    "mamba": "recurrent in every layer",
    "minimax": "standard transformers DynamicCache",
    "gemma3n_text": "shares KV between layers",
    "beam": "depends on the absolute position",
}


@pytest.mark.parametrize("model_type", MUST_STREAM)
def test_named_family_streams_exactly(rows, model_type):
    assert rows[model_type]["verdict"] == "EXACT", rows[model_type]["reason"]


@pytest.mark.parametrize("model_type,reason", MUST_REFUSE.items())
def test_named_family_refused_for_its_true_reason(rows, model_type, reason):
    assert rows[model_type]["verdict"] == "REFUSED", rows[model_type]
    assert reason in rows[model_type]["reason"], rows[model_type]["reason"]


def test_reference_without_eviction_is_a_plain_forward():
    """With room for the whole stream nothing is evicted or re-placed: the reference must be the model's own
    forward over the stream (checks the reference's KV capture and re-assembly)."""
    model = coverage.tiny_model("llama")
    ids = torch.randint(3, coverage.VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        plain = model(ids).logits[0]
    for chunks in coverage.CHUNKS.values():
        ref = coverage.reference_stream(model, ids, sinks=2, window=40, chunks=chunks)
        assert (ref - plain).abs().max().item() < 1e-4


def test_reference_on_one_layer_is_a_fresh_forward_over_the_kept_tokens():
    """One layer: a token's KV depends on that token alone, so StreamingLLM at every step is a fresh forward
    over (sinks + window + chunk) at contiguous positions: the reference must agree."""
    model = make_tiny("qwen2", layers=1)
    ids = torch.randint(3, coverage.VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    sinks, window = 2, 6
    ref = coverage.reference_stream(model, ids, sinks, window, [1])
    with torch.inference_mode():
        for t in range(30):
            context = coverage.kept_before(t, sinks, window) + [t]
            fresh = model(ids[:, context]).logits[0, -1]
            assert (ref[t] - fresh).abs().max().item() < 1e-4, t


def test_layers_rotate_with_their_own_frequencies():
    """Gemma 3: local layers rotate at sliding_attention_inv_freq, global ones at full_attention_inv_freq;
    SmolLM3: every NoPE layer keeps its keys as computed. One description per layer, shared by its kind."""
    specs = rope_layers(coverage.tiny_model("gemma3_text"))
    assert [s.source.rsplit(".", 1)[-1] for s in specs] == ["sliding_attention_inv_freq", "full_attention_inv_freq"]
    smol = rope_layers(coverage.tiny_model("smollm3"))
    assert smol[0].rotates and not smol[1].rotates
    cache = make_policy("sink", coverage.tiny_model("olmo3"), sinks=2, window=6)
    assert cache.rope is cache.rope_for_layer(0)


def test_position_free_attention_is_told_from_alibi_and_position_tables():
    """Keys that ignore position_ids: Jamba's attention has no positions (its Mamba layers give order), so
    every attention layer is NoPE and its recurrent layers have no description; BLOOM's ALiBi depends on the
    key's index in the buffer (reversing the cached keys changes its logits) and BART numbers tokens by the
    length of its cache: both refused, each for that reason, by the probe itself."""
    jamba = coverage.tiny_model("jamba")
    specs = rope_layers(jamba)
    attention = [s for s in specs if s is not None]
    assert attention and not any(s.rotates for s in attention) and None in specs
    assert rope._input_moves_with_cache_length(jamba, jamba.config) is False
    err, scale = rope._key_order_effect(jamba, jamba.config)
    assert err < 1e-5 * scale
    bloom = coverage.tiny_model("bloom")
    err, scale = rope._key_order_effect(bloom, bloom.config)
    assert err > 1e-3 * scale
    with pytest.raises(UnsupportedModelError, match="each key's index"):
        rope_layers(bloom)
    bart = coverage.tiny_model("bart")
    assert rope._input_moves_with_cache_length(bart, rope.text_config(bart.config)) is True
    with pytest.raises(UnsupportedModelError, match="numbers tokens by the length of its cache"):
        rope_layers(bart)


def test_multimodal_wrapper_streams_its_text_decoder():
    """Gemma 3's wrapper nests the text config (no hidden_size at the top): sizes are read from it."""
    model = coverage.tiny_model("gemma3")
    assert model.config.get_text_config() is not model.config
    cache = make_policy("sink", model, sinks=2, window=6)
    assert cache.n_layers == model.config.get_text_config().num_hidden_layers


def test_latent_mla_cache_streams_with_sink_and_is_refused_by_policies_that_attend_themselves():
    """DeepSeek V3 caches its latent (keys) and the shared rotated rope key (values): sink re-rotates the value
    slot; policies that rotate and attend cached keys themselves would see latents, and refuse."""
    model = coverage.tiny_model("deepseek_v3")
    assert {spec.slot for spec in rope_layers(model)} == {"values"}
    cfg = model.config
    every_head = torch.ones(cfg.num_hidden_layers, cfg.num_key_value_heads, dtype=torch.bool)
    for policy, params in (("memory", {}), ("h2o", dict(heavy=4)), ("duo", dict(pattern=every_head))):
        with pytest.raises(UnsupportedModelError, match="latent"):
            make_policy(policy, model, sinks=2, window=6, **params)


def test_refusal_says_what_to_do():
    with pytest.raises(UnsupportedModelError, match="Use a RoPE model"):
        make_policy("sink", coverage.tiny_model("gpt2"))


@pytest.mark.parametrize("model_type", ["qwen3_next", "lfm2", "falcon_h1", "zamba2"])
def test_hybrid_recurrent_state_is_saved_and_restored_exactly(model_type):
    """A hybrid's recurrent layers carry the whole stream's state: a session restored from a snapshot (through
    torch.save) continues with the same logits, and one restored with that state reset does not. Falcon-H1
    and Zamba2 hold KV and the recurrent state in one layer: both parts are saved."""
    import io

    from streamkv.session import StreamSession

    model = coverage.tiny_model(model_type)
    ids = torch.randint(3, coverage.VOCAB, (40,), generator=torch.Generator().manual_seed(0))
    a = StreamSession(model, None, "sink", chunk_size=5, sinks=2, window=6)
    a.feed(ids[:30])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["policy"]["recurrent"], "no recurrent state in the snapshot"
    b = StreamSession(model, None, "sink", chunk_size=5, sinks=2, window=6)
    b.load_state_dict(state)
    assert torch.equal(b.feed(ids[30:]), a.feed(ids[30:]))
    fresh = StreamSession(model, None, "sink", chunk_size=5, sinks=2, window=6)
    blank = fresh.state_dict()["policy"]["recurrent"]  # a never-fed cache's recurrent layers
    c = StreamSession(model, None, "sink", chunk_size=5, sinks=2, window=6)
    c.load_state_dict({**state, "policy": {**state["policy"], "recurrent": blank}})
    assert not torch.allclose(c.feed(ids[30:]), b.logits)  # the state matters: losing it changes the output


def _stream(model, cache, ids, chunks):
    outs, start, step = [], 0, 0
    with torch.inference_mode():
        while start < ids.shape[1]:
            q = min(chunks[step % len(chunks)], ids.shape[1] - start)
            out = model(input_ids=ids[:, start : start + q], position_ids=cache.position_ids(q), past_key_values=cache,
                        use_cache=True)
            outs.append(out.logits[0])
            start, step = start + q, step + 1
    return torch.cat(outs)


def _hybrid_policies(model):
    cfg = model.config.get_text_config()
    pattern = torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, generator=torch.Generator().manual_seed(0))
    return {"memory": dict(sinks=2, window=8, block=4, topk=64, reselect=1, placement="contiguous"),
            "h2o": dict(sinks=2, window=100, heavy=4), "sirllm": dict(sinks=2, window=100, heavy=4),
            "duo": dict(sinks=2, window=100, pattern=pattern, sparsity=0.5)}


@pytest.mark.parametrize("model_type", ["qwen3_next", "falcon_h1", "jamba"])
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 9, 1, 2]], ids=["token-by-token", "chunked"])
def test_policies_that_attend_themselves_manage_a_hybrids_attention_layers(model_type, chunks):
    """memory, h2o, sirllm and duo on hybrids (recurrent layers of their own: Qwen3-Next; KV beside a recurrent
    state in one layer: Falcon-H1; attention without positions: Jamba): they attend, score and store the
    attention layers only, and with room for the whole stream (memory: every block retrieved) they equal
    dense fed the same chunks (Jamba's own chunked prefill differs from its token-by-token one)."""
    model = coverage.tiny_model(model_type)
    ids = torch.randint(3, coverage.VOCAB, (1, 60), generator=torch.Generator().manual_seed(0))
    dense = _stream(model, make_policy("dense", model), ids, chunks)
    for policy, params in _hybrid_policies(model).items():
        cache = make_policy(policy, model, **params)
        got = _stream(model, cache, ids, chunks)
        assert (got - dense).abs().max().item() < 1e-5 * dense.abs().max().item(), policy
        if policy == "memory":
            attention = [i for i, spec in enumerate(cache.ropes) if spec is not None]
            assert cache.stored_layers == attention  # Falcon-H1: every layer; the others: not the recurrent ones
            assert len(attention) < cache.n_layers or model_type == "falcon_h1"
            assert cache.store.n_blocks > 0


def test_memory_on_a_hybrid_snapshots_its_blocks_and_recurrent_state(tmp_path):
    """Falcon-H1 through `memory` past its window: a session restored from a snapshot continues with the
    same logits (blocks on disk, the slot table, each layer's recurrent state)."""
    import io

    from streamkv.session import StreamSession

    model = coverage.tiny_model("falcon_h1")
    ids = torch.randint(3, coverage.VOCAB, (80,), generator=torch.Generator().manual_seed(1))
    params = dict(chunk_size=5, sinks=2, window=8, block=4, topk=2, store_dir=str(tmp_path))
    a = StreamSession(model, None, "memory", **params)
    a.feed(ids[:60])
    assert a.policy.store.n_blocks >= 10
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["policy"]["recurrent"]
    b = StreamSession(model, None, "memory", **params)
    b.load_state_dict(state)
    assert torch.equal(b.feed(ids[60:]), a.feed(ids[60:]))
