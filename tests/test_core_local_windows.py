"""Local (sliding-window) layers with a budget wider than their window: `sink`/`window` mask them by place,
through the model's own attention: SDPA, or its eager function where SDPA cannot express it (Gemma 2's
logit soft-capping, gpt-oss's learned sinks).

References: with a budget larger than the stream, the model's own forward over the whole stream (dense,
its own sliding masks); with evictions and position restarts, the independent multi-layer StreamingLLM
reference of streamkv/coverage.py (the model's own forwards, masks and DynamicCache); and the masking
itself, directly: which places a local layer's query may see."""
import pytest
import torch
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM
from tiny import COMMON, VOCAB

from streamkv import coverage, make_policy
from streamkv.session import StreamSession

W = 8


def _scaled(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def gemma3(layers=4):  # local and global layers alternate, each at its own RoPE frequencies
    torch.manual_seed(0)
    return _scaled(Gemma3ForCausalLM(Gemma3TextConfig(
        num_hidden_layers=layers, num_key_value_heads=2, head_dim=16, sliding_window=W,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), **COMMON)))


def mistral(layers=2):  # every layer local
    torch.manual_seed(0)
    return _scaled(MistralForCausalLM(MistralConfig(num_hidden_layers=layers, num_key_value_heads=2, sliding_window=W, **COMMON)))


def gemma2(layers=2):  # eager attention: logit soft-capping (a cap this low changes every score)
    return coverage.tiny_model("gemma2", sliding_window=W, attn_logit_softcapping=0.5)


def gpt_oss(layers=2):  # eager attention: a learned sink logit per head
    model = coverage.tiny_model("gpt_oss", sliding_window=W)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)  # zeros at init: make the sinks matter
    return model


MODELS = {"gemma3": gemma3, "mistral": mistral, "gemma2": gemma2, "gpt_oss": gpt_oss}
EAGER = ("gemma2", "gpt_oss")


def _ids(n, seed=0):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("chunk", [1, 7])
def test_budget_beyond_the_stream_equals_dense(arch, chunk):
    model = MODELS[arch]()
    ids = _ids(60)
    with torch.inference_mode():
        dense = model(input_ids=ids, past_key_values=DynamicCache(config=model.config), use_cache=True).logits[0]
    session = StreamSession(model, None, "sink", sinks=4, window=100, chunk_size=chunk)
    assert session.policy.local_windows  # the budget (104) is wider than the local window (8): masked
    assert session.policy._eager_attention == (arch in EAGER)
    got = session.feed(ids[0], all_logits=True)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("sinks,window", [(2, 20), (4, 5), (0, 12)])
def test_evictions_and_restarts_equal_the_reference(arch, sinks, window):
    """Window wider and narrower than the local window, with and without sinks; positions restart every
    ~13 tokens in streamkv and never in the reference, so only places can matter."""
    model = MODELS[arch]()
    ids = _ids(80, seed=1)
    for chunks in ([1], [5, 1, 3, 2, 9]):
        got = coverage.streamkv_stream(model, ids, sinks, window, chunks)
        ref = coverage.reference_stream(model, ids, sinks, window, chunks)
        assert (got - ref).abs().max() / (1 + ref.abs().max()) < 1e-4, (chunks, sinks, window)


def test_the_mask_is_by_place():
    """At a decode step the local layer's mask admits exactly the keys whose place is less than W behind the
    new token: the last W-1 window tokens and itself; sinks (placed right before the window) only when within W."""
    model = mistral(layers=1)
    cache = make_policy("sink", model, sinks=2, window=20)
    ids = _ids(40, seed=2)
    with torch.inference_mode():
        for t in range(40):
            model(input_ids=ids[:, t : t + 1], position_ids=cache.position_ids(1), past_key_values=cache, use_cache=True)
            plan = cache._plan
            mask = plan.local_masks[W, False][0, 0, 0]  # [keys]
            dist = plan.p0 - plan.key_pos
            assert torch.equal(mask, (dist >= 0) & (dist < W))
            assert int(mask.sum()) == min(t + 1, W)
            # the keys it admits are the most recent tokens of the stream, never a sink once the window is full
            seq = cache.seq[: plan.n_view] if t < 22 else None
            if seq is not None:
                assert sorted(seq[mask].tolist()) == list(range(max(0, t + 1 - W), t + 1))


def test_memory_scored_and_duo_refuse_beyond_a_local_window():
    model = gemma3(layers=2)
    for name, kw in (("memory", {"sinks": 4, "window": 16}), ("h2o", {"sinks": 4, "window": 16, "heavy": 4}),
                     ("sirllm", {"sinks": 4, "window": 16, "heavy": 4})):
        with pytest.raises(Exception, match="does not mask local layers yet"):
            make_policy(name, model, **kw)


def test_the_eager_functions_arguments_reach_local_layers():
    """Soft-capping is an argument of Gemma 2's eager attention: a local layer masked by streamkv must get it
    (without it the logits move by far more than the tolerance), and so must the global layers' fall-through."""
    model = gemma2()
    ids = _ids(40, seed=3)
    with torch.inference_mode():
        dense = model(input_ids=ids).logits[0]
        attn = [layer.self_attn for layer in model.model.layers]
        for a in attn:
            a.attn_logit_softcapping = None
        uncapped = model(input_ids=ids).logits[0]
        for a in attn:
            a.attn_logit_softcapping = 0.5
    assert (dense - uncapped).abs().max() > 1e-3  # the cap matters on this model (10x the tolerance below)
    got = StreamSession(model, None, "sink", sinks=4, window=100, chunk_size=5).feed(ids[0], all_logits=True)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", EAGER)
def test_policies_that_attend_themselves_refuse_eager_attention(arch):
    """memory, h2o, sirllm and duo compute attention as SDPA does: on a model whose own attention soft-caps
    or has learned sinks that would be silently wrong, even inside the window, so they refuse."""
    model = MODELS[arch]()
    for name, kw in (("memory", {"sinks": 4, "window": 4, "block": 2, "topk": 1}),
                     ("h2o", {"sinks": 1, "window": 2, "heavy": 2}), ("sirllm", {"sinks": 1, "window": 2, "heavy": 2})):
        with pytest.raises(Exception, match="attends with its own eager function"):
            make_policy(name, model, **kw)
