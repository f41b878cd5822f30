"""Bad input gets a clear error: invalid policy parameters, empty input, unsupported architectures."""
import pytest
import torch
from tiny import COMMON, make_tiny
from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from streamkv import UnsupportedModelError, make_policy, parse_policy_spec
from streamkv.session import StreamSession

torch.set_grad_enabled(False)


@pytest.fixture(scope="module")
def model():
    return make_tiny("llama", layers=1)


@pytest.mark.parametrize("name,params,message", [
    ("sink", dict(window=0), "window must be a positive integer"),
    ("sink", dict(window=-5), "window must be a positive integer"),
    ("sink", dict(sinks=-1), "sinks must be a non-negative integer"),
    ("sink", dict(sinks=2.5), "sinks must be a non-negative integer"),
    ("sink", dict(window="10"), "window must be a positive integer"),
    ("window", dict(window=0), "budget must be a positive integer"),
    ("recompute", dict(window=0), "window must be a positive integer"),
    ("sink", dict(budget=10), "takes sinks, window; got unknown budget"),
    ("dense", dict(window=10), "takes no parameters; got unknown window"),
    ("lru", {}, "unknown policy 'lru'; choose one of: dense, window, sink, memory, h2o, sirllm, duo, recompute"),
])
def test_invalid_policy_parameters(model, name, params, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, model, **params)


@pytest.mark.parametrize("spec,message", [("sink:window", "expected key=value"), ("sink:window=abc", "must be an integer")])
def test_bad_policy_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_policy_spec(spec)


def test_policy_spec_parses():
    assert parse_policy_spec("sink:sinks=4,window=1020") == ("sink", {"sinks": 4, "window": 1020})
    assert parse_policy_spec("dense") == ("dense", {})


@pytest.mark.parametrize("bad,message", [
    ([], "empty input"),
    ("", "empty input"),
    ([5, 10_000], "token ids must be integers in"),
    ([-1], "token ids must be integers in"),
])
def test_bad_stream_input_loses_nothing(model, bad, message):
    session = StreamSession(model, None, "sink", sinks=2, window=8)
    session.feed([5, 6, 7])
    before = (session.stats(), session.logits.clone())
    with pytest.raises(ValueError, match=message):
        session.feed(bad)
    assert session.stats() == before[0] and torch.equal(session.logits, before[1])  # nothing lost, nothing half-fed


def test_text_without_tokenizer_and_generation_without_prompt(model):
    session = StreamSession(model, None, "sink", sinks=2, window=8)
    with pytest.raises(ValueError, match="no tokenizer"):
        session.feed("hello")
    with pytest.raises(ValueError, match="feed a prompt first"):
        next(session.generate_tokens(5))
    session.feed([5])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        next(session.generate_tokens(0))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        next(session.generate_tokens(3, temperature=-1))
    with pytest.raises(ValueError, match="top_p must be in"):
        next(session.generate_tokens(3, top_p=0))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        StreamSession(model, None, "sink", chunk_size=0)


def test_learned_absolute_positions_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).eval()
    with pytest.raises(UnsupportedModelError, match="no rotary position embedding"):
        make_policy("sink", gpt2)


def test_interleaved_rotary_found_by_probe():
    """GPT-J rotates interleaved pairs of the first rotary_dim dims, at frequencies it keeps only as a sin/cos
    table: the probe finds that description (it used to refuse GPT-J; streaming it exactly is checked in
    test_models_coverage.py)."""
    gptj = GPTJForCausalLM(GPTJConfig(vocab_size=64, n_embd=64, n_layer=1, n_head=4, rotary_dim=8, n_positions=2048)).eval()
    rope = make_policy("sink", gptj).rope
    assert (rope.rotary_dim, rope.offset, rope.interleaved, rope.head_dim) == (8, 0, True, 16)


def test_dynamic_rope_refused():
    cfg = LlamaConfig(num_hidden_layers=1, num_key_value_heads=2,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, **COMMON)
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        make_policy("sink", LlamaForCausalLM(cfg).eval())


def test_budget_beyond_a_sliding_window():
    """Every built-in policy keeps a local layer's window (tests/test_core_local_windows.py); those that attend
    by themselves refuse a window narrower than the local one, saying which to choose; a budget inside the
    window needs no mask."""
    cfg = MistralConfig(num_hidden_layers=1, num_key_value_heads=2, sliding_window=16, **COMMON)
    m = MistralForCausalLM(cfg).eval()
    assert make_policy("sink", m, sinks=4, window=60).local_windows == {0: 16}
    for name in ("memory", "h2o", "sirllm"):
        assert make_policy(name, m, sinks=4, window=60).local_own == {0: 16}
        with pytest.raises(UnsupportedModelError, match="sliding window of 16 tokens.*choose window >= 15"):
            make_policy(name, m, sinks=4, window=12)
    assert make_policy("sink", m, sinks=4, window=10).local_windows == {}  # fits inside the model's own window


def test_unsupported_generate_features(model):
    cache = make_policy("sink", model, sinks=2, window=8)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([0]))
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)
