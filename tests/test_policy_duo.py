"""`duo` (DuoAttention: retrieval heads keep everything, streaming heads keep sinks + window) against exact
references: dense, sink, and per head a fresh forward over exactly that head's tokens."""
import pytest
import torch
from test_core_policies import random_ids, stream
from test_policy_scored import capture
from tiny import ARCHS, make_tiny

from streamkv import make_policy
from streamkv.session import StreamSession

torch.set_grad_enabled(False)


def kv_heads(model):
    return getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [[1], [7, 1, 1, 13, 1]], ids=["token-by-token", "chunked"])
def test_every_head_retrieval_equals_dense(arch, chunks):
    model = make_tiny(arch, layers=2)
    ids = random_ids(150)
    reference = model(ids).logits[0]
    cache = make_policy("duo", model, sinks=3, window=10, pattern=torch.ones(2, kv_heads(model), dtype=torch.bool))
    cache.max_position = 40  # position restarts: retrieval heads must still see dense distances
    got = stream(model, cache, ids, chunks)
    assert (got - reference).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_every_head_streaming_equals_sink(arch):
    model = make_tiny(arch, layers=2)
    ids = random_ids(150)
    sink = make_policy("sink", model, sinks=3, window=10)
    duo = make_policy("duo", model, sinks=3, window=10, pattern=torch.zeros(2, kv_heads(model), dtype=torch.bool))
    sink.max_position = duo.max_position = 40
    a, b = stream(model, sink, ids, [7, 1, 1, 13, 1]), stream(model, duo, ids, [7, 1, 1, 13, 1])
    assert (a - b).abs().max().item() < 1e-4
    assert duo.nbytes() == sink.nbytes()  # nothing kept beyond the slot table


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox", "cohere", "smollm3", "gemma3"])
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 9, 1, 2]], ids=["token-by-token", "chunked"])
def test_one_layer_each_head_equals_fresh_forward_over_its_tokens(arch, chunks):
    """One layer, heads of both kinds: at every step a streaming head's output equals a fresh forward over
    sinks + window + new at positions 0..n-1, and a retrieval head's that of a forward over every token so
    far (dense), through evictions and position restarts."""
    sinks, window = 2, 6
    model = make_tiny(arch, layers=1)
    hkv = kv_heads(model)
    width = model.config.hidden_size // model.config.num_attention_heads * (model.config.num_attention_heads // hkv)
    mask = torch.tensor([[h % 2 == 0 for h in range(hkv)]])  # alternate kinds: runs of one head
    cache = make_policy("duo", model, sinks=sinks, window=window, pattern=mask)
    cache.max_position = 40
    ids = random_ids(130, seed=3)
    start, i, restarts = 0, 0, 0
    while start < ids.shape[1]:
        q = min(chunks[i % len(chunks)], ids.shape[1] - start)
        kept = sorted(int(s) for s in cache.seq[: cache.n_used] if s >= 0)
        before = cache.next_pos
        pos = cache.position_ids(q)
        restarts += int(pos[0, 0].item() != before)
        got = capture(model, lambda: model(input_ids=ids[:, start : start + q], position_ids=pos, past_key_values=cache, use_cache=True))
        refs = {True: capture(model, lambda: model(input_ids=ids[:, : start + q]))[-q:],
                False: capture(model, lambda: model(input_ids=ids[:, kept + list(range(start, start + q))]))[-q:]}
        for h in range(hkv):
            cols = slice(h * width, (h + 1) * width)
            ref = refs[bool(mask[0, h])]
            assert (got[:, cols] - ref[:, cols]).abs().max().item() < 1e-4, f"head {h}, step at token {start}"
        start, i = start + q, i + 1
    assert restarts >= 3


def test_streaming_heads_hold_only_sinks_and_window():
    """Memory is saved in bytes: the evicted tokens are kept for retrieval heads only."""
    model = make_tiny("llama", layers=2)
    n = 400
    ids = random_ids(n)
    half = torch.tensor([[True, False], [False, True]])
    duo = make_policy("duo", model, sinks=3, window=10, pattern=half)
    dense = make_policy("dense", model)
    stream(model, duo, ids, [50])
    stream(model, dense, ids, [50])
    per_token_head = 2 * model.config.hidden_size // model.config.num_attention_heads * 4  # K+V float32, one head
    stored = sum(s.n for s in duo.evicted)
    assert stored == 2 * (n - 13)  # one retrieval head per layer, every evicted token once
    assert all(s.keys.shape[1] == 1 for s in duo.evicted)
    assert duo.nbytes() < 0.6 * dense.nbytes()
    hb = duo.head_bytes()
    assert hb["streaming_bytes"] <= 2 * (3 + 10 + 1 + 3) * per_token_head


def test_snapshot_continues_exactly():
    model = make_tiny("llama", layers=2)
    ids = random_ids(120, seed=9)
    mask = torch.tensor([[True, False], [False, False]])
    a = StreamSession(model, None, "duo", sinks=2, window=8, pattern=mask)
    a.feed(ids[0, :70])
    b = StreamSession(model, None, "duo", sinks=2, window=8, pattern=mask)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.feed(ids[0, 70:], all_logits=True), b.feed(ids[0, 70:], all_logits=True))
    c = StreamSession(model, None, "duo", sinks=2, window=8, pattern=~mask)
    with pytest.raises(ValueError, match="pattern"):
        c.load_state_dict(a.state_dict())


def test_parameters_are_checked():
    model = make_tiny("llama", layers=2)
    with pytest.raises(ValueError, match="shape"):
        make_policy("duo", model, pattern=torch.ones(3, 2, dtype=torch.bool))
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="sparsity"):
            make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), sparsity=bad)


# ---- retrieval heads with a block store (retrieval=memory) ------------------------------------------------

def test_memory_retrieval_every_block_equals_dense():
    """Every head retrieval, K*B >= everything evicted, contiguous placement: dense, through the store on disk."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(200)
    reference = model(ids).logits[0]
    cache = make_policy("duo", model, sinks=3, window=12, pattern=torch.ones(2, 2, dtype=torch.bool), retrieval="memory",
                        block=4, topk=60, ram_mb=0)
    cache.placement = "contiguous"
    got = stream(model, cache, ids, [7, 1, 1, 13, 1])
    assert (got - reference).abs().max().item() < 1e-4
    assert cache.store.stats()["reads_disk"] > 0


@pytest.mark.parametrize("arch,choose", [("llama", "current"), ("gpt_neox", "current"), ("llama", "ahead")])
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 9, 1, 2]], ids=["token-by-token", "chunked"])
def test_memory_retrieval_one_layer_each_head_equals_fresh_forward(arch, choose, chunks):
    """One layer, both kinds: a streaming head sees sinks + window + new; a retrieval head sees sinks + the
    blocks it retrieved (few of many) + window + new, contiguous (the cache says which blocks). With
    choose=ahead a choosing decode step attends the blocks the step before chose."""
    sinks, window, block, topk = 2, 6, 3, 2
    model = make_tiny(arch, layers=1)
    hkv = kv_heads(model)
    width = model.config.hidden_size // model.config.num_attention_heads * (model.config.num_attention_heads // hkv)
    mask = torch.tensor([[h % 2 == 1 for h in range(hkv)]])
    cache = make_policy("duo", model, sinks=sinks, window=window, pattern=mask, retrieval="memory", block=block, topk=topk, ram_mb=0,
                        choose=choose)
    cache.placement = "contiguous"
    cache.max_position = 40
    ids = random_ids(160, seed=2)
    start, i, choices, chosen = 0, 0, set(), None
    while start < ids.shape[1]:
        q = min(chunks[i % len(chunks)], ids.shape[1] - start)
        kept = sorted(int(s) for s in cache.seq[: cache.n_used] if s >= 0)
        pos = cache.position_ids(q)
        got = capture(model, lambda: model(input_ids=ids[:, start : start + q], position_ids=pos, past_key_values=cache, use_cache=True))
        blocks = cache.retrieved[0]
        mem = [t for b in blocks for t in range(sinks + b * block, sinks + (b + 1) * block)]
        new = list(range(start, start + q))
        streaming = capture(model, lambda: model(input_ids=ids[:, kept + new]))[-q:]
        context = [t for t in kept if t < sinks] + mem + [t for t in kept if t >= sinks] + new
        retrieval = capture(model, lambda: model(input_ids=ids[:, context]))[-q:]
        for h in range(hkv):
            cols = slice(h * width, (h + 1) * width)
            ref = retrieval if mask[0, h] else streaming
            assert (got[:, cols] - ref[:, cols]).abs().max().item() < 1e-4, f"head {h}, step at token {start}"
        choices.add(tuple(blocks))
        if choose == "ahead" and q == 1 and chosen is not None and len(chosen) == len(blocks):
            assert blocks == chosen  # a decode step attends what the step before chose for it
        chosen = cache.ahead.get(0)
        start, i = start + q, i + 1
    assert len(choices) > 5


def test_memory_retrieval_stores_retrieval_heads_only(tmp_path):
    """The store holds the retrieval heads' keys/values only (layers may keep none), on disk and back."""
    model = make_tiny("llama", layers=2)
    mask = torch.tensor([[True, False], [False, False]])
    cache = make_policy("duo", model, sinks=2, window=8, pattern=mask, retrieval="memory", block=4, topk=2, ram_mb=0,
                        store_dir=str(tmp_path))
    stream(model, cache, random_ids(120), [16])
    k0, _, _ = cache.store.get(0, 0)
    k1, _, _ = cache.store.get(0, 1)
    assert k0.shape[0] == 1 and k1.shape[0] == 0
    b = make_policy("duo", model, sinks=2, window=8, pattern=mask, retrieval="memory", block=4, topk=2, ram_mb=0,
                    store_dir=str(tmp_path))
    b.load_state_dict(cache.state_dict())
    ids = random_ids(30, seed=5)
    assert torch.equal(stream(model, cache, ids, [3]), stream(model, b, ids, [3]))


@pytest.mark.parametrize("reselect", [1, 4])
def test_memory_retrieval_decode_steps_choose_every_reselect_steps(reselect):
    """As `memory`: a decode step chooses its blocks only every `reselect` steps (the others attend the last
    choice); a prefill chunk always chooses. With reselect=1 the choice changes between those steps too."""
    model = make_tiny("llama", layers=1)
    mask = torch.tensor([[True, False]])
    cache = make_policy("duo", model, sinks=2, window=8, pattern=mask, retrieval="memory", block=4, topk=2, ram_mb=0,
                        reselect=reselect)
    stream(model, cache, random_ids(48), [40, 8])  # (the first chunk met an empty store: the second chose)
    ids = random_ids(120, seed=3)
    last, changed_between = cache.retrieved[0], 0
    assert len(last) == 2
    for t in range(120):
        stream(model, cache, ids[:, t : t + 1], [1])
        now = cache.retrieved[0]
        if cache._decode_run % 4 and now != last:
            changed_between += 1
        last = now
    assert (changed_between > 0) == (reselect == 1), changed_between


def test_retrieval_parameters_are_checked():
    model = make_tiny("llama", layers=2)
    with pytest.raises(ValueError, match="retrieval=memory"):
        make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), topk=4)
    with pytest.raises(ValueError, match="reselect, choose apply to duo with retrieval=memory only"):
        make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), reselect=2, choose="ahead")
    with pytest.raises(ValueError, match="rep_rule apply to duo with retrieval=memory only"):
        make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), rep_rule="mean")
    with pytest.raises(ValueError, match="choose must be one of current, ahead"):
        make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), retrieval="memory", choose="later")
    with pytest.raises(ValueError, match="reselect must be a positive integer"):
        make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), retrieval="memory", reselect=0)
    with pytest.raises(ValueError, match="retrieval must be"):
        make_policy("duo", model, pattern=torch.ones(2, 2, dtype=torch.bool), retrieval="disk")
