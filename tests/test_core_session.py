"""The session runtime on tiny models: chunked feeding, generation, snapshots, endless generation."""
import pytest
import torch
from tiny import VOCAB, make_tiny

from streamkv import make_policy
from streamkv.session import StreamSession

torch.set_grad_enabled(False)


def ids(n, seed=0):
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_chunked_feed_equals_token_by_token_for_dense():
    model = make_tiny("qwen2", layers=2)
    stream = ids(120)
    a = StreamSession(model, None, "dense", chunk_size=32).feed(stream, all_logits=True)
    b = StreamSession(model, None, "dense", chunk_size=1).feed(stream, all_logits=True)
    assert a.shape == (120, VOCAB) and (a - b).abs().max().item() < 1e-4


def test_recompute_matches_fresh_forward_over_last_window():
    model = make_tiny("llama", layers=2)
    stream = ids(40, seed=1)
    session = StreamSession(model, None, "recompute", window=8)
    logits = session.feed(stream, all_logits=True)
    for t in (3, 20, 39):
        context = torch.tensor(stream[max(0, t - 8) : t + 1]).unsqueeze(0)
        assert (logits[t] - model(context).logits[0, -1]).abs().max().item() < 1e-4
    assert session.stats()["tokens_cached"] == 8 and session.stats()["tokens_seen"] == 40


def test_snapshot_restores_exact_state():
    model = make_tiny("phi3", layers=2)
    a = StreamSession(model, None, "sink", sinks=2, window=10, chunk_size=4)
    a.feed(ids(37, seed=2))
    state = a.state_dict()
    b = StreamSession(model, None, "sink", sinks=2, window=10, chunk_size=4)
    b.load_state_dict(state)
    assert torch.equal(a.logits, b.logits)
    more = ids(25, seed=3)
    assert torch.equal(a.feed(more, all_logits=True), b.feed(more, all_logits=True))
    with pytest.raises(ValueError, match="snapshot is of"):
        StreamSession(model, None, "sink", sinks=2, window=11).load_state_dict(state)


def test_generation_far_beyond_trained_context():
    """A model trained for 64 positions generates 600 tokens: positions fed stay inside 64, cache stays bounded."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tiny import COMMON

    cfg = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, **{**COMMON, "max_position_embeddings": 64})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    session = StreamSession(model, None, "sink", sinks=4, window=28)
    session.feed(ids(10))
    highest = 0
    tokens = []
    for token, _ in session.generate_tokens(600, stop_on_eos=False):
        tokens.append(token)
        highest = max(highest, session.policy.next_pos)
    assert len(tokens) == 600 and session.last_finish_reason == "length"
    assert highest <= 64 and session.stats()["tokens_cached"] == 32 and session.stats()["tokens_seen"] == 610


def test_sampling_is_seeded_and_greedy_is_deterministic():
    model = make_tiny("llama", layers=2)
    def run(**kw):
        s = StreamSession(model, None, "sink", sinks=2, window=16)
        s.feed(ids(5))
        return [t for t, _ in s.generate_tokens(30, stop_on_eos=False, **kw)]
    assert run() == run()
    assert run(temperature=1.0, seed=7) == run(temperature=1.0, seed=7)
    assert run(temperature=1.0, seed=7) != run(temperature=1.0, seed=8)
    top1 = run(temperature=1.0, top_k=1, seed=3)
    assert top1 == run()  # top-k 1 is greedy


def test_policy_object_reused_by_name_and_stats_schema():
    model = make_tiny("gpt_neox", layers=2)
    session = StreamSession(model, None, make_policy("window", model, window=16))
    session.feed(ids(40))
    s = session.stats()
    assert {"policy", "tokens_seen", "tokens_cached", "cache_bytes"} <= set(s)
    assert s["policy"] == "window" and s["tokens_cached"] == 16 and s["tokens_seen"] == 40
