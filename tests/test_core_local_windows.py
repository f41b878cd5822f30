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
from streamkv.policies.base import StreamingCache
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
    """Shared buffers (a policy window narrower than W-1, so a local layer may see sinks): at a decode step the
    local layer's mask admits exactly the keys whose place is less than W behind the new token."""
    model = mistral(layers=1)
    cache = make_policy("sink", model, sinks=2, window=6)
    assert cache.local_windows == {0: W} and not cache.local_own
    ids = _ids(40, seed=2)
    with torch.inference_mode():
        for t in range(40):
            model(input_ids=ids[:, t : t + 1], position_ids=cache.position_ids(1), past_key_values=cache, use_cache=True)
            plan = cache._plan
            mask = plan.local_masks[W, False, False][0, 0, 0]  # [keys]
            dist = plan.p0 - plan.key_pos
            assert torch.equal(mask, (dist >= 0) & (dist < W))
            assert int(mask.sum()) == min(t + 1, W)
            # once the cache is full the W places hold the 2 sinks (right before the window) and 6 window tokens
            if t >= 8:
                assert sorted(plan.key_pos[mask].tolist()) == list(range(plan.p0 - W + 1, plan.p0 + 1))
                assert int(mask.numel()) == 9


def test_local_layers_keep_only_their_window():
    """A policy window that covers the local window (>= W-1): each local layer keeps exactly the last W-1 tokens
    in W slots of its own (global layers keep the budget), at the places the shared table gives them."""
    model = gemma3(layers=4)
    cache = make_policy("sink", model, sinks=4, window=40)
    assert cache.local_own == {0: W, 2: W}
    ids = _ids(120, seed=4)
    with torch.inference_mode():
        for t in range(120):
            model(input_ids=ids[:, t : t + 1], position_ids=cache.position_ids(1), past_key_values=cache, use_cache=True)
            for i in (0, 2):
                layer = cache.layers[i]
                table = layer.table  # shared by the local layers of one window
                held = table.seq[: table.n_used]
                held = held[held >= 0].sort().values
                assert held.tolist() == list(range(max(0, t + 2 - W), t + 1))  # the last W-1 after this step
                assert layer.keys.shape[2] == W
            # their positions: the last places of the shared table (window tokens keep theirs)
            kept = cache.seq[: cache.n_used] >= 0
            last = dict(zip(cache.seq[: cache.n_used][kept].tolist(), cache.pos[: cache.n_used][kept].tolist()))
            layer = cache.layers[0]
            assert layer.table is cache.layers[2].table is cache.local_tables[W]
            for s_, p_ in zip(layer.table.seq[: layer.table.n_used].tolist(), layer.table.pos[: layer.table.n_used].tolist()):
                if s_ >= 0:
                    assert last[s_] == p_
    g = cache.layers[1]
    pins = g.pin_keys.numel() * g.pin_keys.element_size()
    assert cache.layers[0].nbytes() * 45 == (g.nbytes() - pins) * W  # W slots against budget + 1 = 45


@pytest.mark.parametrize("chunk", [1, 6])
def test_a_snapshot_of_local_layers_continues_identically(chunk):
    model = gemma3(layers=4)
    ids = _ids(150, seed=5)
    a = StreamSession(model, None, "sink", sinks=4, window=40, chunk_size=chunk)
    a.feed(ids[0, :97])
    state = a.policy.state_dict()
    assert set(state["local"]["layers"]) == {0, 2} and set(state["local"]["tables"]) == {W}
    b = StreamSession(model, None, "sink", sinks=4, window=40, chunk_size=chunk)
    b.policy.load_state_dict(state)
    b.logits = a.logits
    for t in range(97, 150):
        assert torch.equal(a.feed(ids[0, t : t + 1]), b.feed(ids[0, t : t + 1]))


def test_policies_that_attend_themselves_need_a_window_covering_the_local_one():
    model = gemma3(layers=2)
    for name, kw in (("h2o", {"sinks": 4, "window": W - 2, "heavy": 4}), ("sirllm", {"sinks": 4, "window": W - 2, "heavy": 4}),
                     ("memory", {"sinks": 4, "window": W - 2, "block": 4, "topk": 2})):
        with pytest.raises(Exception, match=f"choose window >= {W - 1}"):
            make_policy(name, model, **kw)
    with pytest.raises(Exception, match=f"choose window >= {W - 1}"):
        make_policy("duo", model, sinks=4, window=W - 2, pattern=torch.rand(2, 2), sparsity=0.5)

    class Custom(StreamingCache):  # a policy of one's own that attends itself and says nothing of local layers
        name = "custom"

        def attend(self, layer_idx, module, query, keys, values, scaling):  # pragma: no cover - refused before
            raise AssertionError

    with pytest.raises(Exception, match="does not mask local layers yet"):
        Custom(model, budget=20, sinks=4)


@pytest.mark.parametrize("chunks", [[1], [7, 1, 1, 13, 1, 30]], ids=["token-by-token", "chunked"])
def test_duo_with_every_head_retrieving_equals_dense_on_a_local_global_model(chunks):
    """duo on Gemma 3 past its local window, every head a retrieval head (sparsity 0): the global layers keep
    everything that left the window, the local layers their own window: equals dense."""
    model = gemma3(layers=4)
    ids = _ids(120, seed=10)
    with torch.inference_mode():
        dense = model(input_ids=ids).logits[0]
        cache = make_policy("duo", model, sinks=3, window=12, pattern=torch.rand(4, 2), sparsity=0.0)
        assert cache.local_own == {0: W, 2: W}
        out, t = [], 0
        while t < ids.shape[1]:
            n = min(chunks[len(out) % len(chunks)], ids.shape[1] - t)
            out.append(model(input_ids=ids[:, t : t + n], position_ids=cache.position_ids(n), past_key_values=cache,
                             use_cache=True).logits[0])
            t += n
    assert (torch.cat(out) - dense).abs().max().item() < 1e-4
    assert cache.evicted[0] is None and cache.evicted[1].n == 120 - 3 - 12  # only global layers store


@pytest.mark.parametrize("retrieval", ["dense", "memory"])
def test_duo_on_a_local_global_model_snapshots(retrieval):
    """Half the heads streaming, past the local window: a snapshot continues identically."""
    model = gemma3(layers=4)
    ids = _ids(200, seed=11)
    params = dict(sinks=4, window=16, pattern=torch.rand(4, 2, generator=torch.Generator().manual_seed(0)), sparsity=0.5,
                  retrieval=retrieval, chunk_size=5, **({"block": 4, "topk": 2} if retrieval == "memory" else {}))
    a = StreamSession(model, None, "duo", **params)
    a.feed(ids[0, :150])
    b = StreamSession(model, None, "duo", **params)
    b.load_state_dict(a.state_dict())
    for t in range(150, 180):
        assert torch.equal(a.feed(ids[0, t : t + 1]), b.feed(ids[0, t : t + 1]))


@pytest.mark.parametrize("policy", ["h2o", "sirllm"])
@pytest.mark.parametrize("chunks", [[1], [7, 1, 1, 13, 1, 30]], ids=["token-by-token", "chunked"])
def test_scored_policies_keeping_every_evicted_token_equal_dense_on_a_local_global_model(policy, chunks):
    """h2o and sirllm on Gemma 3 past its local window: local layers keep their own window, the global layers
    sinks + window + heavy tokens; with room for every evicted token (heavy >= evicted) that is everything, laid
    out in stream order: equals dense (the model's own forward, its own sliding masks)."""
    model = gemma3(layers=4)
    ids = _ids(120, seed=8)
    with torch.inference_mode():
        dense = model(input_ids=ids).logits[0]
    s = StreamSession(model, None, policy, sinks=3, window=12, heavy=120, chunk_size=max(chunks))
    assert s.policy.local_own == {0: W, 2: W}
    out, t = [], 0
    while t < ids.shape[1]:
        n = min(chunks[len(out) % len(chunks)], ids.shape[1] - t)
        out.append(s.feed(ids[0, t : t + n], all_logits=True))
        t += n
    got = torch.cat(out)
    assert (got - dense).abs().max().item() < 1e-4
    assert s.policy.n_heavy == 120 - 3 - 12


@pytest.mark.parametrize("policy", ["h2o", "sirllm"])
def test_scored_policies_on_a_local_global_model_evict_and_snapshot(policy):
    """Few heavy tokens: the global layers keep `heavy` per head, the local layers only their window, and a
    snapshot continues identically."""
    model = gemma3(layers=4)
    ids = _ids(200, seed=9)
    params = dict(sinks=4, window=16, heavy=6, chunk_size=5)
    a = StreamSession(model, None, policy, **params)
    a.feed(ids[0, :150])
    assert a.policy.n_heavy == 6 and a.policy.sets[0] is None and a.policy.sets[1].n == 6
    b = StreamSession(model, None, policy, **params)
    b.load_state_dict(a.state_dict())
    for t in range(150, 180):
        assert torch.equal(a.feed(ids[0, t : t + 1]), b.feed(ids[0, t : t + 1]))


@pytest.mark.parametrize("chunks", [[1], [7, 1, 1, 13, 1, 30]], ids=["token-by-token", "chunked"])
def test_memory_retrieving_every_block_equals_dense_on_a_local_global_model(chunks):
    """memory on Gemma 3 past its local window: local layers keep their own window (and store nothing), the
    global layers sinks + window + every block (K*B >= evicted, contiguous placement): equals dense."""
    model = gemma3(layers=4)
    ids = _ids(200, seed=6)
    with torch.inference_mode():
        dense = model(input_ids=ids).logits[0]
        cache = make_policy("memory", model, sinks=3, window=12, block=4, topk=60, reps=2, ram_mb=0, placement="contiguous")
        assert cache.local_own == {0: W, 2: W} and cache.stored_layers == [1, 3]
        out, t = [], 0
        while t < ids.shape[1]:
            n = chunks[len(out) % len(chunks)]
            out.append(model(input_ids=ids[:, t : t + n], position_ids=cache.position_ids(min(n, ids.shape[1] - t)),
                             past_key_values=cache, use_cache=True).logits[0])
            t += n
    got = torch.cat(out)
    assert (got - dense).abs().max().item() < 1e-4
    assert cache.store.n_blocks == (200 - 3 - 12) // 4
    assert set(cache.retrieved) == {1, 3}  # only the global layers retrieve
    assert cache.store._header(0)["layers"] == 2  # a block holds the global layers' parts only: 2 of 4 layers


def test_memory_on_a_local_global_model_remembers_and_snapshots():
    """Few blocks (K*B < evicted): it runs, retrieves for the global layers, and a snapshot continues identically."""
    model = gemma3(layers=4)
    ids = _ids(300, seed=7)
    a = StreamSession(model, None, "memory", sinks=4, window=16, block=4, topk=3, reps=2, chunk_size=5)
    a.feed(ids[0, :200])
    assert a.policy.store.n_blocks > 3 and all(len(v) == 3 for v in a.policy.retrieved.values())
    b = StreamSession(model, None, "memory", sinks=4, window=16, block=4, topk=3, reps=2, chunk_size=5,
                      store_dir=None)
    b.policy.load_state_dict(a.policy.state_dict())
    b.logits = a.logits
    for t in range(200, 240):
        assert torch.equal(a.feed(ids[0, t : t + 1]), b.feed(ids[0, t : t + 1]))


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
