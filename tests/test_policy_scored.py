"""Scored retention per KV head (`h2o`, `sirllm`, and the shared `scored.py`) against exact references."""
import pytest
import torch
from test_core_policies import random_ids, stream
from tiny import ARCHS, make_tiny

from streamkv import make_policy
from streamkv.policies.scored import ScoredCache
from streamkv.session import StreamSession

torch.set_grad_enabled(False)


class ByValue(ScoredCache):
    """A test policy whose heads disagree: head h keeps the tokens with the largest value[..., h]."""

    name = "by_value"

    def __init__(self, model, sinks=2, window=6, heavy=4):
        super().__init__(model, sinks=sinks, window=window, heavy=heavy)

    def score(self, layer_idx, keys, values, received, value):
        return torch.stack([values[h, :, h] for h in range(values.shape[0])])  # [H, m]


def attention_output_proj(model):
    """The one layer's output projection: its input is every query head's attention output [1, q, Hq*D]."""
    attn = model.model.layers[0].self_attn if hasattr(model, "model") else model.gpt_neox.layers[0].attention
    return attn.o_proj if hasattr(attn, "o_proj") else attn.dense


def capture(model, fn):
    got = []
    handle = attention_output_proj(model).register_forward_pre_hook(lambda m, args: got.append(args[0][0].clone()))
    try:
        fn()
    finally:
        handle.remove()
    return got[-1]  # [q, Hq*D]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy,params", [("h2o", dict(sinks=4, window=200, heavy=10)),
                                           ("sirllm", dict(sinks=4, window=200, heavy=10))])
def test_budget_larger_than_stream_equals_dense(arch, policy, params):
    model = make_tiny(arch, layers=2)
    ids = random_ids(90)
    reference = model(ids).logits[0]
    cache = make_policy(policy, model, **params)
    session = StreamSession(model, None, cache, chunk_size=13)  # sirllm needs the session's logits
    got = session.feed(ids[0], all_logits=True)
    assert (got - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox", "cohere", "smollm3", "gemma3"])
@pytest.mark.parametrize("policy", ["by_value", "h2o"])
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 9, 1, 2]], ids=["token-by-token", "chunked"])
def test_one_layer_each_head_equals_fresh_forward_over_its_tokens(arch, policy, chunks):
    """One layer: a key/value depends on its token and position only. So each KV head's attention output
    must equal, at every step, that of a fresh forward over exactly the tokens *that head* keeps (sinks +
    its own heavy set + window + new) at contiguous positions 0..n-1. Heads keep different tokens
    (checked), through evictions and position restarts."""
    sinks, window, heavy = 2, 6, 4
    model = make_tiny(arch, layers=1)
    cfg = model.config
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    width = cfg.hidden_size // cfg.num_attention_heads * (cfg.num_attention_heads // hkv)  # one KV head's query heads
    cache = ByValue(model, sinks, window, heavy) if policy == "by_value" else make_policy("h2o", model, sinks=sinks, window=window, heavy=heavy)
    cache.max_position = 40
    ids = random_ids(160, seed=3)
    start, i, restarts, differ = 0, 0, 0, 0
    while start < ids.shape[1]:
        q = min(chunks[i % len(chunks)], ids.shape[1] - start)
        kept = sorted(int(s) for s in cache.seq[: cache.n_used] if s >= 0)
        heavy_sets = cache.heavy_tokens(0) or [[] for _ in range(hkv)]
        differ += len({tuple(h) for h in heavy_sets}) > 1
        before = cache.next_pos
        pos = cache.position_ids(q)
        restarts += int(pos[0, 0].item() != before)
        chunk = ids[:, start : start + q]
        got = capture(model, lambda: model(input_ids=chunk, position_ids=pos, past_key_values=cache, use_cache=True))
        for h in range(hkv):
            context = [t for t in kept if t < sinks] + heavy_sets[h] + [t for t in kept if t >= sinks] + list(range(start, start + q))
            ref = capture(model, lambda: model(input_ids=ids[:, context]))[-q:]
            cols = slice(h * width, (h + 1) * width)
            assert (got[:, cols] - ref[:, cols]).abs().max().item() < 1e-4, f"head {h}, step at token {start}"
        start, i = start + q, i + 1
    assert restarts >= 3, restarts
    if policy == "by_value":
        assert differ > 10, "the heads should keep different tokens"


def test_h2o_scores_equal_eager_attention_column_sums():
    """No eviction (budget > stream): every token's score must be the attention it received from every
    query so far (summed over queries, averaged over the query heads of its KV head), as a reference eager
    forward with output_attentions computes it."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(60, seed=4)
    cache = make_policy("h2o", model, sinks=2, window=100, heavy=8)
    stream(model, cache, ids, [9, 1, 1, 17, 1])
    eager = make_tiny("llama", layers=2)
    eager.set_attn_implementation("eager")
    att = eager(ids, output_attentions=True).attentions  # per layer [1, Hq, n, n]
    g = model.config.num_attention_heads // model.config.num_key_value_heads
    for layer, a in enumerate(att):
        ref = a[0].sum(dim=1).view(model.config.num_key_value_heads, g, -1).mean(dim=1)  # [Hkv, n]
        got = cache.layers[layer].received[:, : cache.n_used] / g  # slots are in stream order after a chunk
        seq = cache.seq[: cache.n_used]
        assert (got - ref[:, seq]).abs().max().item() < 1e-4


def test_h2o_scores_follow_tokens_into_the_heavy_set():
    """With evictions, on one layer: accumulate, per head, the exact attention each token received at every
    step from a reference eager forward over that head's tokens; the heavy set's scores must match."""
    sinks, window, heavy = 2, 5, 3
    model = make_tiny("llama", layers=1)
    eager = make_tiny("llama", layers=1)
    eager.set_attn_implementation("eager")
    hkv, g = model.config.num_key_value_heads, model.config.num_attention_heads // model.config.num_key_value_heads
    cache = make_policy("h2o", model, sinks=sinks, window=window, heavy=heavy)
    ids = random_ids(70, seed=5)
    totals = [dict() for _ in range(hkv)]
    for start in range(ids.shape[1]):
        kept = sorted(int(s) for s in cache.seq[: cache.n_used] if s >= 0)
        heavy_sets = cache.heavy_tokens(0) or [[] for _ in range(hkv)]
        for h in range(hkv):
            context = [t for t in kept if t < sinks] + heavy_sets[h] + [t for t in kept if t >= sinks] + [start]
            a = eager(ids[:, context], output_attentions=True).attentions[0][0, h * g : (h + 1) * g, -1]  # [g, n]
            for t, w in zip(context, a.mean(dim=0).tolist()):
                totals[h][t] = totals[h].get(t, 0.0) + w
        model(input_ids=ids[:, start : start + 1], position_ids=cache.position_ids(1), past_key_values=cache, use_cache=True)
    hs = cache.sets[0]
    for h in range(hkv):
        for j in range(hs.n):
            t = int(hs.seq[h, j])
            assert abs(hs.received[h, j].item() / g - totals[h][t]) < 1e-4, (h, t)
        # and they are the best of what was offered: nothing evicted from this head scored higher at its eviction
    assert hs.n == heavy


def test_sirllm_scores_are_surprisal_decayed_per_turn():
    """The per-token value is -log p(token | text before it) from the model's own logits (a reference dense
    forward), multiplied by `decay` once per finished chat turn."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(40, seed=6)
    cache = make_policy("sirllm", model, sinks=2, window=8, heavy=30, decay=0.5)
    session = StreamSession(model, None, cache, chunk_size=5)
    session.feed(ids[0])
    logp = torch.log_softmax(model(ids).logits[0], dim=-1)
    surprisal = {t: -logp[t - 1, ids[0, t]].item() for t in range(1, 40)}
    hs = cache.sets[0]
    assert hs.n == 40 - 2 - 8
    for j in range(hs.n):
        t = int(hs.seq[0, j])
        assert abs(hs.value[0, j].item() - surprisal[t]) < 1e-4
    cache.end_turn()
    cache.end_turn()
    for j in range(hs.n):
        assert abs(hs.value[0, j].item() - 0.25 * surprisal[int(hs.seq[0, j])]) < 1e-4
    # tokens still in the window are decayed too, and carry it when they are evicted
    session.feed(ids[0, :8])
    vals = {int(hs.seq[0, j]): hs.value[0, j].item() for j in range(hs.n)}
    for t in range(32, 40):
        if t in vals:
            assert abs(vals[t] - 0.25 * surprisal[t]) < 1e-4


def test_sirllm_scores_a_stream_fed_one_token_at_a_time():
    """A first chunk of a single token has no prediction before it (surprisal 0); every later token's value is
    still its surprisal (this crashed once: the empty prediction was taken for the whole chunk)."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(20, seed=7)
    cache = make_policy("sirllm", model, sinks=2, window=4, heavy=14)
    StreamSession(model, None, cache, chunk_size=1).feed(ids[0])
    logp = torch.log_softmax(model(ids).logits[0], dim=-1)
    hs = cache.sets[0]
    assert hs.n == 20 - 2 - 4
    for j in range(hs.n):
        t = int(hs.seq[0, j])
        assert abs(hs.value[0, j].item() + logp[t - 1, ids[0, t]].item()) < 1e-4


def test_sirllm_keeps_the_most_surprising_tokens():
    model = make_tiny("llama", layers=2)
    ids = random_ids(80, seed=7)
    cache = make_policy("sirllm", model, sinks=2, window=6, heavy=5)
    session = StreamSession(model, None, cache, chunk_size=64)  # capped at the window
    logp = torch.log_softmax(session.feed(ids[0], all_logits=True), dim=-1)  # the stream's own logits
    evicted = range(2, 80 - 6)
    surprisal = {t: -logp[t - 1, ids[0, t]].item() for t in evicted}
    best = sorted(sorted(evicted, key=lambda t: -surprisal[t])[:5])
    for layer in range(2):
        assert cache.heavy_tokens(layer) == [best] * model.config.num_key_value_heads


def test_sirllm_without_logits_refuses_clearly():
    model = make_tiny("llama", layers=1)
    cache = make_policy("sirllm", model, sinks=2, window=6, heavy=5)
    with pytest.raises(RuntimeError, match="StreamSession"):
        stream(model, cache, random_ids(20), [4])


def test_heavy_keys_are_rotated_once_from_the_computed_copy():
    """Heavy keys are rotated from the copy the model computed, never from a previous rotation: after
    hundreds of steps with restarts, a kept key is bit-identical to the model's key at its fed position
    rotated once, back to position 0."""
    model = make_tiny("llama", layers=1)
    cache = make_policy("h2o", model, sinks=2, window=6, heavy=4)
    cache.max_position = 30
    ids = random_ids(600, seed=8)
    stream(model, cache, ids, [1])
    hs = cache.sets[0]
    from transformers import DynamicCache
    for h in range(hs.keys.shape[1]):
        for j in range(hs.n):
            t, p = int(hs.seq[h, j]), int(hs.pos[h, j])
            d = DynamicCache(config=model.config)
            model(input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[p]]), past_key_values=d, use_cache=True)
            cos, sin = cache.rope.cos_sin(torch.tensor([-p]))
            assert torch.equal(cache.rope.apply(d.layers[0].keys[0, h, :1], cos, sin)[0], hs.keys[0, h, j])


def test_snapshot_continues_exactly():
    model = make_tiny("llama", layers=2)
    ids = random_ids(120, seed=9)
    for name in ("h2o", "sirllm"):
        a = StreamSession(model, None, name, sinks=2, window=8, heavy=6)
        a.feed(ids[0, :70])
        b = StreamSession(model, None, name, sinks=2, window=8, heavy=6)
        b.load_state_dict(a.state_dict())
        la, lb = a.feed(ids[0, 70:], all_logits=True), b.feed(ids[0, 70:], all_logits=True)
        assert torch.equal(la, lb), name


def test_a_snapshot_with_heavy_keys_as_computed_still_loads():
    """Snapshots made before the heavy keys were kept at position 0 held them as computed, at `pos`: loading
    one rotates them once, so the stream goes on as if it had never been saved."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(120, seed=10)
    a = StreamSession(model, None, "h2o", sinks=2, window=8, heavy=6)
    a.feed(ids[0, :70])
    old = a.state_dict()
    sc = old["policy"]["scored"]
    del sc["keys_at"]
    for i, s in enumerate(sc["sets"]):  # back to the keys as the model computed them
        h, n, rope = s["keys"].shape[1], s["n"], a.policy.rope_for_layer(i)
        cos, sin = rope.cos_sin(s["pos"][:, :n].reshape(-1))
        s["keys"][:, :, :n] = rope.apply(s["keys"][:, :, :n], cos.view(h, n, -1), sin.view(h, n, -1))
    b = StreamSession(model, None, "h2o", sinks=2, window=8, heavy=6)
    b.load_state_dict(old)
    torch.testing.assert_close(b.feed(ids[0, 70:], all_logits=True), a.feed(ids[0, 70:], all_logits=True), atol=1e-5, rtol=0)


def test_parameters_are_checked():
    model = make_tiny("llama", layers=1)
    for bad in (dict(heavy=-1), dict(window=0), dict(sinks=-2), dict(heavy=1.5)):
        with pytest.raises(ValueError):
            make_policy("h2o", model, **bad)
    for bad in (0.0, 1.5, "x", True):
        with pytest.raises(ValueError, match="decay"):
            make_policy("sirllm", model, decay=bad)
