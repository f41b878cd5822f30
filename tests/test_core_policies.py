"""Every cache policy against an exact reference: dense attention, or a fresh forward over the kept tokens."""
import pytest
import torch
from tiny import ARCHS, VOCAB, make_tiny

from streamkv import make_policy
from streamkv.session import StreamSession

torch.set_grad_enabled(False)


def random_ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, n), generator=g)


def stream(model, cache, ids, chunk_sizes):
    """Feed ids through the cache in chunks of the given sizes (cycled); return logits of every token."""
    outs, start, i = [], 0, 0
    while start < ids.shape[1]:
        q = chunk_sizes[i % len(chunk_sizes)]
        chunk = ids[:, start : start + q]
        out = model(input_ids=chunk, position_ids=cache.position_ids(chunk.shape[1]), past_key_values=cache, use_cache=True)
        outs.append(out.logits[0])
        start, i = start + q, i + 1
    return torch.cat(outs)


POLICIES_WITH_ROOM = [("sink", dict(sinks=4, window=200)), ("window", dict(window=200)), ("dense", {})]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy,params", POLICIES_WITH_ROOM)
def test_budget_larger_than_stream_equals_dense(arch, policy, params):
    model = make_tiny(arch, layers=2)
    ids = random_ids(90)
    reference = model(ids).logits[0]
    cache = make_policy(policy, model, **params)
    got = stream(model, cache, ids, [7, 1, 1, 13, 1])
    assert (got - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_as_past_key_values_in_generate(arch):
    model = make_tiny(arch, layers=2)
    prompt = random_ids(12, seed=1)
    kwargs = dict(max_new_tokens=40, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    dense = model.generate(prompt, **kwargs)
    for policy, params in POLICIES_WITH_ROOM:
        out = model.generate(prompt, past_key_values=make_policy(policy, model, **params), **kwargs)
        assert torch.equal(out.sequences, dense.sequences), policy
        diff = max((a - b).abs().max().item() for a, b in zip(out.logits, dense.logits))
        assert diff < 1e-4, (policy, diff)


def kept_before(t, sinks, window):
    """Stream indices a sinks+window cache holds before token t arrives (evict-after semantics)."""
    earlier = list(range(t))
    if len(earlier) <= sinks + window:
        return earlier
    return earlier[:sinks] + earlier[-window:]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 9, 1, 2]], ids=["token-by-token", "chunked"])
@pytest.mark.parametrize("sinks", [3, 0], ids=["sink", "window"])
def test_positions_equal_fresh_forward_over_kept_tokens(arch, chunks, sinks):
    """One layer: a token's key and value depend on that token alone, so streaming must give, at every step,
    exactly the logits of a fresh forward over (kept tokens + new tokens) at contiguous positions 0..n."""
    window = 6
    model = make_tiny(arch, layers=1)
    cache = make_policy("sink", model, sinks=sinks, window=window) if sinks else make_policy("window", model, window=window)
    cache.max_position = 24  # force many position restarts (re-rotation of the whole window) in a short stream
    ids = random_ids(150, seed=2)
    start, i, restarts, max_pos = 0, 0, 0, 0
    while start < ids.shape[1]:
        q = chunks[i % len(chunks)]
        chunk = ids[:, start : start + q]
        q = chunk.shape[1]
        before = cache.next_pos
        pos = cache.position_ids(q)
        restarts += int(pos[0, 0].item() != before)
        max_pos = max(max_pos, int(pos.max()))
        got = model(input_ids=chunk, position_ids=pos, past_key_values=cache, use_cache=True).logits[0]
        context = kept_before(start, sinks, window) + list(range(start, start + q))
        reference = model(ids[:, context]).logits[0, -q:]  # positions 0..len(context)-1
        assert (got - reference).abs().max().item() < 1e-4, f"step at token {start}"
        assert cache.n_kept == min(start + q, sinks + window)
        start, i = start + q, i + 1
    assert restarts >= 3, "the test should exercise position restarts"
    assert max_pos < max(24, sinks + window + max(chunks))


def test_memory_bounded_after_50k_tokens():
    model = make_tiny("llama", layers=2)
    session = StreamSession(model, None, "sink", sinks=4, window=252, chunk_size=500)
    ids = random_ids(50_000, seed=3)[0]
    session.feed(ids[:2000])
    at_2k = session.stats()
    session.feed(ids[2000:49_800])
    for t in ids[49_800:].tolist():  # the decode path (one token per step) too
        session.feed([t])
    at_50k = session.stats()
    assert at_2k["tokens_cached"] == at_50k["tokens_cached"] == 256
    assert at_50k["tokens_seen"] == 50_000
    assert at_2k["cache_bytes"] == at_50k["cache_bytes"] > 0
    dense_bytes_per_token = at_2k["cache_bytes"] / 257
    assert at_50k["cache_bytes"] < 300 * dense_bytes_per_token


def test_positions_bounded_after_one_million_tokens():
    """1,000,000 tokens through a one-layer model in chunks: positions never pass the bound, and the final
    logits still equal a fresh forward over sinks + window (no drift of re-rotated sink keys)."""
    sinks, window, chunk = 4, 124, 2048
    model = make_tiny("llama", layers=1)
    cache = make_policy("sink", model, sinks=sinks, window=window)
    session = StreamSession(model, None, cache, chunk_size=chunk)
    total = 1_000_000
    g = torch.Generator().manual_seed(4)
    bound = max(cache.max_position, sinks + window + chunk)
    highest = 0
    first = None
    fed = 0
    while fed < total - 1:
        q = min(chunk, total - 1 - fed)
        ids = torch.randint(3, VOCAB, (q,), generator=g)
        if first is None:
            first = ids[:sinks].clone()
        session.feed(ids)
        highest = max(highest, cache.next_pos)
        fed += q
        last_window = ids[-window:] if q >= window else None
    assert highest <= bound, (highest, bound)
    final = torch.tensor([5])
    got = session.feed(final)
    context = torch.cat([first, last_window, final]).unsqueeze(0)
    reference = model(context).logits[0, -1]
    assert (got - reference).abs().max().item() < 1e-4
    assert cache.seen == total and cache.n_kept == sinks + window
    # the position table itself: window keys sit at contiguous positions ending right before the next token;
    # sinks precede them (they are moved up to the window, from pristine copies, when the next step is planned)
    kept = cache.seq[: cache.n_used] >= 0
    order = cache.seq[: cache.n_used][kept].argsort()
    positions = cache.pos[: cache.n_used][kept][order]
    assert torch.equal(positions[sinks:], torch.arange(cache.next_pos - window, cache.next_pos))
    assert bool((positions[1:] > positions[:-1]).all()) and int(positions[0]) >= 0


def test_batched_input_refused():
    model = make_tiny("llama", layers=1)
    cache = make_policy("sink", model, sinks=2, window=8)
    with pytest.raises(ValueError, match="batch size 1"):
        model(random_ids(4).repeat(2, 1), past_key_values=cache, use_cache=True)


def test_one_query_attention_equals_softmax_over_every_part():
    """`attention.attend_one` (decode steps of memory/h2o/sirllm) against a plain softmax over the
    concatenated scores, and its received attention against `received_attention` (the chunk path's)."""
    from streamkv.attention import attend_one, one_query, received_attention

    g = torch.Generator().manual_seed(0)
    hq, hkv, d = 6, 2, 16
    query = torch.randn(1, hq, 1, d, generator=g)
    q2 = torch.randn(1, hq, 1, d, generator=g)  # another rotation of the query for the second part
    k1, v1 = torch.randn(1, hkv, 37, d, generator=g), torch.randn(1, hkv, 37, d, generator=g)
    k2, v2 = torch.randn(1, hkv, 11, d, generator=g), torch.randn(1, hkv, 11, d, generator=g)
    parts = [(query, k1, v1, False), (q2, k2, v2, False)]
    assert one_query(query, parts)
    out, lse, received = attend_one(query, parts, 0.25)
    rep = lambda t: t.repeat_interleave(hq // hkv, dim=1)  # noqa: E731 - [1, Hq, n, D]
    s = torch.cat([query @ rep(k1).transpose(-1, -2), q2 @ rep(k2).transpose(-1, -2)], dim=-1) * 0.25  # [1, Hq, 1, 48]
    p = s.softmax(-1)
    ref = (p[..., :37] @ rep(v1) + p[..., 37:] @ rep(v2)).transpose(1, 2)  # [1, 1, Hq, D]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), atol=1e-5, rtol=0)
    torch.testing.assert_close(received[0], received_attention(query, k1, 0, 0.25, lse, max_rows=None), atol=1e-6, rtol=0)
    torch.testing.assert_close(received[1], p[..., 37:].view(1, hkv, hq // hkv, 1, 11).sum(dim=(0, 2, 3)), atol=1e-6, rtol=0)
    assert not one_query(torch.randn(1, hq, 2, d), parts)  # two queries: the fused kernel


def test_chunk_attention_takes_the_unmasked_path_and_honours_other_masks():
    """A chunk through the slot table (sink) attends kept + new tokens without a mask (`_attend_chunk`:
    attend_parts), equal to SDPA with transformers' causal mask (a DynamicCache). A mask that is not that
    causal one (here a prefix-LM's: the chunk's first 6 tokens see each other both ways) is honoured as the
    model's SDPA would: the same logits as a DynamicCache given that mask, not the causal ones."""
    from transformers import DynamicCache

    from streamkv.policies.base import StreamingCache

    model = make_tiny("llama", layers=2)
    ids = random_ids(50, seed=5)
    calls = []
    real = StreamingCache._attend_chunk

    def counting(self, *a, **kw):
        calls.append(kw.get("attention_mask") is None)
        return real(self, *a, **kw)

    StreamingCache._attend_chunk = counting
    try:
        for prefix in (False, True):
            cache, ref = make_policy("sink", model, sinks=2, window=100), DynamicCache()
            with torch.no_grad():
                for c in (cache, ref):
                    model(ids[:, :30], past_key_values=c, use_cache=True)
                mask = None
                if prefix:  # [1, 1, q, k] bool: causal over 30 kept + 20 new, the first 6 new see each other
                    mask = torch.ones(20, 50, dtype=torch.bool).tril(30)
                    mask[:6, 30:36] = True
                    mask = mask[None, None]
                got = model(ids[:, 30:], past_key_values=cache, attention_mask=mask, use_cache=True).logits
                want = model(ids[:, 30:], past_key_values=ref, attention_mask=mask, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            if prefix:
                causal = model(ids[:, 30:], past_key_values=make_policy("sink", model, sinks=2, window=100)).logits
                assert not torch.allclose(got, causal, atol=1e-3)
    finally:
        StreamingCache._attend_chunk = real
    assert len(calls) == 2 * 2 * 2 + 2  # every layer of every chunk took the hook (2 layers, 2 chunks, 2 runs; + 1 chunk)
