"""The compiled decode step (streamkv/compiled.py) against the eager one: same logits (float32, 1e-4) at every
step, through the cache filling, steady state and position restarts; the compiled path is really taken; a
model that cannot compile falls back to eager with a warning."""
import warnings

import pytest
import torch
from tiny import VOCAB, make_tiny

from streamkv import compiled
from streamkv.attention import attend_one, attend_one_traced
from streamkv.session import StreamSession


def _stream(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g)


@pytest.mark.parametrize("arch,policy,params", [
    ("llama", "sink", {"sinks": 4, "window": 60}),
    ("cohere", "sink", {"sinks": 2, "window": 40}),  # interleaved rotary pairs
    ("smollm3", "window", {"window": 48}),  # NoPE layers, no sinks
])
def test_compiled_decode_equals_eager(arch, policy, params):
    model = make_tiny(arch, layers=2)
    ids = _stream(400)
    eager = StreamSession(model, None, policy, chunk_size=32, **params)
    ref = [eager.feed(ids[:40]).clone()] + [eager.feed(ids[i : i + 1]).clone() for i in range(40, 400)]
    compiled.enable(model)
    try:
        session = StreamSession(model, None, policy, chunk_size=32, **params)
        step = compiled.decode_step(model)
        out = [session.feed(ids[:40]).clone()] + [session.feed(ids[i : i + 1]).clone() for i in range(40, 400)]
    finally:
        compiled.disable(model)
    assert step.failed is None
    # 360 one-token steps: the first ~20 fill the cache (eager), position restarts run eagerly, the rest compiled
    assert step.steps > 250, step.steps
    for i, (a, b) in enumerate(zip(ref, out)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"step {i}")
    # the caches hold the same tokens at the same positions afterwards
    assert torch.equal(session.policy.seq, eager.policy.seq) and torch.equal(session.policy.pos, eager.policy.pos)
    assert session.policy.max_position < 400  # the stream crossed at least one position restart


def test_restart_steps_run_eagerly_and_sessions_share_the_graph():
    model = make_tiny("llama", layers=1)
    ids = _stream(700, seed=1)
    compiled.enable(model)
    try:
        step = compiled.decode_step(model)
        a = StreamSession(model, None, "sink", sinks=2, window=30)
        b = StreamSession(model, None, "sink", sinks=2, window=30)
        a.feed(ids[:32])
        b.feed(ids[:32])
        restarts = 0
        for i in range(32, 700):
            before = a.policy.next_pos
            la, lb = a.feed(ids[i : i + 1]), b.feed(ids[i : i + 1])
            restarts += a.policy.next_pos != before + 1
            torch.testing.assert_close(la, lb, atol=0, rtol=0)
        assert restarts >= 2
    finally:
        compiled.disable(model)
    assert step.failed is None and step.steps > 1200


@pytest.mark.parametrize("arch,params", [
    ("llama", {}),  # the defaults: fixed placement, one choice per layer
    ("cohere", {"placement": "contiguous"}),  # interleaved rotary pairs; retrieved tokens over K*B places
    ("llama", {"selection": "head"}),  # each KV head its own blocks
    ("smollm3", {}),  # NoPE layers
    ("llama", {"choose": "ahead"}),  # the steps that choose do it after the forward: they compile too
])
def test_memory_compiled_decode_equals_eager(arch, params):
    """memory's steps between two choices of blocks run compiled (its slot buffer is not full: masked) and
    equal the eager steps; steps that choose, evict or store stay eager; the blocks attended are the same.
    A chunk in mid-stream (a chat turn) moves the sinks at the next step: still the one compiled graph."""
    from torch._dynamo.utils import counters

    model = make_tiny(arch, layers=2)
    ids = _stream(500, seed=4)
    feeds = [(0, 40)] + [(i, i + 1) for i in range(40, 240)] + [(240, 277)] + [(i, i + 1) for i in range(277, 500)]
    kw = dict(sinks=4, window=24, block=8, topk=3, ram_mb=0, chunk_size=32, **params)
    eager = StreamSession(model, None, "memory", **kw)
    ref, ref_blocks = [], []
    for a, b in feeds:
        ref.append(eager.feed(ids[a:b]).clone())
        ref_blocks.append(dict(eager.policy.retrieved))
    compiled.enable(model)
    graphs = counters["stats"]["unique_graphs"]
    try:
        session = StreamSession(model, None, "memory", **kw)
        step = compiled.decode_step(model)
        out, blocks = [], []
        for a, b in feeds:
            out.append(session.feed(ids[a:b]).clone())
            blocks.append(dict(session.policy.retrieved))
    finally:
        compiled.disable(model)
    assert step.failed is None
    assert counters["stats"]["unique_graphs"] - graphs <= 1  # one shape at every compiled step (0: a graph of an earlier test fits)
    # 423 one-token steps: every 4th chooses its blocks, one in 8 evicts a block (then the next compacts), the
    # store needs 3 blocks first; the rest (~60%) are compiled
    lo, hi = (290, 400) if params.get("choose") == "ahead" else (230, 320)
    assert lo < step.steps < hi, step.steps
    for i, (a, b) in enumerate(zip(ref, out)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"step {i}")
    assert blocks == ref_blocks
    assert session.policy.hits == eager.policy.hits
    assert torch.equal(session.policy.seq, eager.policy.seq) and torch.equal(session.policy.pos, eager.policy.pos)
    assert session.policy.max_position < 500  # through position restarts


@pytest.mark.parametrize("arch,pattern,params", [
    # 2 KV heads: a layer of both kinds, one of streaming heads only (it keeps no blocks), one of retrieval heads
    # (InfLLM's representatives: the attention every slot received is traced too)
    ("llama", [[True, False], [False, False], [True, True]], {"rep_rule": "attention"}),
    # 4 KV heads in alternating runs (several runs of each kind in a layer), a quarter of each head rotating
    ("gpt_neox", [[False, True, False, True], [True, False, True, True]], {"rep_rule": "attention"}),
    ("cohere", [[False, True], [True, False]], {"sinks": 0}),  # interleaved rotary pairs; no sinks
    ("llama", [[True, False], [False, False], [True, True]], {"choose": "ahead"}),  # choosing steps compile too
    ("llama", [[True, False], [False, True]], {}),  # the defaults (memory's representatives: nothing observed)
])
def test_duo_memory_compiled_decode_equals_eager(arch, pattern, params):
    """duo with retrieval=memory (bounded): its steps between two choices of blocks run compiled, each layer's
    runs of heads as the eager step attends them, and equal the eager steps; afterwards both caches hold the
    same tokens, blocks and the same attention received by every window token (the retrieval heads' blocks
    are indexed by it)."""
    mask = torch.tensor(pattern)
    model = make_tiny(arch, layers=mask.shape[0])
    ids = _stream(400, seed=5)
    feeds = [(0, 40)] + [(i, i + 1) for i in range(40, 200)] + [(200, 229)] + [(i, i + 1) for i in range(229, 400)]
    kw = {**dict(sinks=3, window=20, block=6, topk=3, ram_mb=0, chunk_size=32, pattern=mask, retrieval="memory"), **params}

    def run(compile_it):
        if compile_it:
            compiled.enable(model)
        try:
            s = StreamSession(model, None, "duo", **kw)
            out, blocks = [], []
            for a, b in feeds:
                out.append(s.feed(ids[a:b]).clone())
                blocks.append(dict(s.policy.retrieved))
            steps = compiled.decode_step(model).steps if compile_it else 0
        finally:
            compiled.disable(model)
        return s.policy, out, blocks, steps

    eager, ref, ref_blocks, _ = run(False)
    policy, out, blocks, steps = run(True)
    # 331 one-token steps: every 4th chooses (before attending: eager), one in 6 evicts a block, the store
    # needs 3 blocks first
    lo, hi = (195, 260) if params.get("choose") == "ahead" else (140, 210)  # (llama: 220 and 165)
    assert lo < steps < hi, steps
    for i, (a, b) in enumerate(zip(ref, out)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"step {i}")
    assert blocks == ref_blocks
    assert policy.hits == eager.hits
    assert torch.equal(policy.seq, eager.seq) and torch.equal(policy.pos, eager.pos)
    assert policy.max_position < 400  # through position restarts
    window = policy.seq[: policy.n_used] >= policy.sinks  # (a sink's received attention is never read)
    for i in policy.attention_layers if policy.observe else []:
        a, b = policy.layers[i], eager.layers[i]
        torch.testing.assert_close(a.received[:, : policy.n_used][:, window], b.received[:, : eager.n_used][:, window],
                                   atol=1e-4, rtol=1e-4, msg=f"layer {i}")
    assert policy.store.n_blocks == eager.store.n_blocks > 10
    for i in policy._choosing_layers():  # the same representatives (the keys received most; float16, one ulp)
        n = policy.store.n_blocks
        torch.testing.assert_close(policy.index[i][:, :n], eager.index[i][:, :n], atol=2e-3, rtol=0, msg=f"layer {i}")


def _memory_run(model, ids, kw, compile_it: bool) -> list[torch.Tensor]:
    if compile_it:
        compiled.enable(model)
    try:
        s = StreamSession(model, None, "memory", **kw)
        out = [s.feed(ids[:40]).clone()] + [s.feed(ids[i : i + 1]).clone() for i in range(40, ids.numel())]
        if compile_it:
            assert compiled.decode_step(model).steps > 100
    finally:
        compiled.disable(model)
    return out


def test_each_model_has_its_own_graphs():
    """A compiled step's guards do not check the model's modules (compiled.py: they cost ~1.4 ms a step), so
    graphs are never shared between models: two models of one architecture and shape, and one with another
    number of layers, each compile their own, and each equals its own eager run."""
    from torch._dynamo.utils import counters

    ids = _stream(300, seed=7)
    kw = dict(sinks=4, window=24, block=8, topk=3, ram_mb=0, chunk_size=32)
    graphs = [counters["stats"]["unique_graphs"]]
    for seed, layers in ((11, 2), (12, 2), (13, 3)):
        model = make_tiny("llama", layers=layers, seed=seed)
        expected = _memory_run(model, ids, kw, False)
        got = _memory_run(model, ids, kw, True)
        graphs.append(counters["stats"]["unique_graphs"])
        for i, (a, b) in enumerate(zip(expected, got)):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"seed {seed}, step {i}")
    assert all(b > a for a, b in zip(graphs, graphs[1:])), graphs  # every model compiled graphs of its own


def test_weights_replaced_after_compiling_compile_anew():
    """The guards that no longer check the model's weights are replaced by a check of every weight's storage
    at each step: weights swapped in place (`p.data = ...`, as `model.to(dtype)` does) make the step compile
    anew, and the compiled step equals the eager one with the new weights."""
    ids = _stream(260, seed=8)
    kw = dict(sinks=4, window=24, block=8, topk=3, ram_mb=0, chunk_size=32)
    model = make_tiny("llama", layers=2, seed=14)
    compiled.enable(model)
    try:
        s = StreamSession(model, None, "memory", **kw)
        s.feed(ids[:40])
        for i in range(40, 160):
            s.feed(ids[i : i + 1])
        step = compiled.decode_step(model)
        assert step.steps > 50 and step.recompiles == 0
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data * 1.25  # new storage, same shapes
        got = [s.feed(ids[i : i + 1]).clone() for i in range(160, 260)]
        assert step.recompiles == 1
    finally:
        compiled.disable(model)
    twin = make_tiny("llama", layers=2, seed=14)  # the same stream, eager, with the same swap at step 160
    ref = StreamSession(twin, None, "memory", **kw)
    ref.feed(ids[:40])
    for i in range(40, 160):
        ref.feed(ids[i : i + 1])
    with torch.no_grad():
        for p in twin.parameters():
            p.data = p.data * 1.25
    expected = [ref.feed(ids[i : i + 1]).clone() for i in range(160, 260)]
    for i, (a, b) in enumerate(zip(expected, got)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"step {160 + i}")


def test_memory_compiled_step_refuses_a_model_that_drops_attention_kwargs(monkeypatch):
    """The compiled memory step reaches attention through the forward's kwargs. A model that does not pass
    them on (simulated: an attention function that drops them and attends the buffer itself) would attend
    the unused slots and miss the retrieved blocks: refused with a clear error, not garbage."""
    from transformers import AttentionInterface

    from streamkv.attention import streamkv_attention
    from streamkv.rope import UnsupportedModelError

    def drops_kwargs(module, query, key, value, attention_mask, **kwargs):  # the eager steps' hooks still work
        kwargs.pop("streamkv_static", None)
        return streamkv_attention(module, query, key, value, attention_mask, **kwargs)

    model = make_tiny("llama", layers=1)
    ids = _stream(200, seed=6)
    session = StreamSession(model, None, "memory", sinks=2, window=16, block=4, topk=2, ram_mb=0)
    session.feed(ids[:100])  # choose, evict and store eagerly first
    monkeypatch.setitem(AttentionInterface._global_mapping, "streamkv", drops_kwargs)
    compiled.enable(model)
    try:
        with pytest.raises(UnsupportedModelError, match="does not pass its forward's keyword arguments"):
            for i in range(100, 200):
                session.feed(ids[i : i + 1])
    finally:
        compiled.disable(model)


@pytest.mark.parametrize("arch,policy,params", [
    ("llama", "h2o", {"sinks": 2, "window": 20, "heavy": 8}),  # attention received, per KV head
    ("cohere", "h2o", {"sinks": 2, "window": 16, "heavy": 6}),  # interleaved rotary pairs
    ("smollm3", "h2o", {"sinks": 0, "window": 16, "heavy": 6}),  # NoPE layers, no sinks
    ("llama", "sirllm", {"sinks": 2, "window": 20, "heavy": 8}),  # surprisal, from the session's logits
])
def test_scored_compiled_decode_equals_eager(arch, policy, params):
    """h2o and sirllm in steady state (window and heavy sets full): each step evicts the window's oldest token
    and each KV head's heavy set trades at most one token for it, traced with tensor ops only. Compiled equals
    eager at every step, through position restarts and a chunk in mid-stream (a chat turn); afterwards every
    head of every layer holds the same heavy tokens at the same positions, with the same scores."""
    model = make_tiny(arch, layers=2)
    ids = _stream(420, seed=8)
    feeds = [(0, 40)] + [(i, i + 1) for i in range(40, 220)] + [(220, 251)] + [(i, i + 1) for i in range(251, 420)]
    eager = StreamSession(model, None, policy, chunk_size=32, **params)
    ref = [eager.feed(ids[a:b]).clone() for a, b in feeds]
    compiled.enable(model)
    try:
        session = StreamSession(model, None, policy, chunk_size=32, **params)
        step = compiled.decode_step(model)
        out = [session.feed(ids[a:b]).clone() for a, b in feeds]
    finally:
        compiled.disable(model)
    assert step.failed is None
    # 349 one-token steps; those that fill the heavy sets after the start and after the chunk, and position
    # restarts, run eagerly
    assert step.steps > 250, step.steps
    for i, (a, b) in enumerate(zip(ref, out)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0, msg=f"step {i}")
    p, q = session.policy, eager.policy
    assert torch.equal(p.seq, q.seq) and torch.equal(p.pos, q.pos)
    assert p.max_position < 420  # the stream crossed at least one position restart
    for i in p.attention_layers:
        assert p.heavy_tokens(i) == q.heavy_tokens(i), f"layer {i}"
        a, b, n = p.sets[i], q.sets[i], p.n_heavy
        assert torch.equal(a.pos[:, :n], b.pos[:, :n])
        torch.testing.assert_close(a.keys[:, :, :n], b.keys[:, :, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.received[:, :n], b.received[:, :n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.value[:, :n], b.value[:, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy,params", [
    # memory choosing blocks at every step, and InfLLM's attention rule (observes attention at every step)
    ("memory", {"sinks": 2, "window": 16, "block": 4, "topk": 2, "ram_mb": 0, "reselect": 1}),
    ("memory", {"sinks": 2, "window": 16, "block": 4, "topk": 2, "ram_mb": 0, "rep_rule": "attention"}),
    # dense retrieval heads (a pattern: half the heads streaming): their evicted buffer grows, no fixed shape
    ("duo", {"sinks": 2, "window": 8}),
])
def test_policies_that_choose_in_python_stay_eager(policy, params):
    model = make_tiny("llama", layers=1)
    if policy == "duo":
        h = model.config.num_key_value_heads
        params = dict(params, pattern=torch.arange(h).expand(1, h) % 2 == 0)  # [layers, KV heads]
    ids = _stream(200, seed=2)
    compiled.enable(model)
    try:
        step = compiled.decode_step(model)
        s = StreamSession(model, None, policy, **params)
        ref = StreamSession(model, None, policy, **params)
        for i in range(200):
            torch.testing.assert_close(s.feed(ids[i : i + 1]), ref.feed(ids[i : i + 1]), atol=0, rtol=0)
    finally:
        compiled.disable(model)
    assert step.steps == 0


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    model = make_tiny("llama", layers=1)
    ids = _stream(120, seed=3)
    ref = StreamSession(model, None, "sink", sinks=2, window=20)
    expected = [ref.feed(ids[i : i + 1]).clone() for i in range(120)]
    compiled.enable(model)
    try:
        step = compiled.decode_step(model)

        def broken(*args, **kwargs):
            raise RuntimeError("InductorError: no C++ compiler found")

        monkeypatch.setattr(step, "fn", broken)  # what a machine without a compiler raises on the first call
        s = StreamSession(model, None, "sink", sinks=2, window=20)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [s.feed(ids[i : i + 1]).clone() for i in range(120)]
    finally:
        compiled.disable(model)
    assert [str(w.message) for w in caught if "compiled decoding is unavailable" in str(w.message)] == [
        "compiled decoding is unavailable for this model (RuntimeError: InductorError: no C++ compiler found); decoding eagerly"]
    assert step.steps == 0
    # the step that failed to compile then ran the fixed-shape step eagerly (its attention summed in another
    # order: float32 rounding); every later step takes the ordinary eager path, bit for bit
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    assert sum(not torch.equal(a, b) for a, b in zip(expected, got)) <= 1


@pytest.mark.parametrize("policy,params,text,prefill,steps,compiled_at_least", [
    # sink 4+60: 100 steady-state steps
    ("sink", {"sinks": 4, "window": 60}, "The quick brown fox jumps over the lazy dog. " * 40, 70, 100, 95),
    # h2o 4+40 and 24 heavy per KV head: 100 steady steps (attention received, one token traded per head)
    ("h2o", {"sinks": 4, "window": 40, "heavy": 24}, "The quick brown fox jumps over the lazy dog. " * 40, 80, 100, 95),
    # memory with its defaults past 16 stored blocks: 120 steps, 3 in 4 compiled (not those that choose blocks)
    ("memory", {"ram_mb": 0, "chunk_size": 256},
     "The pass key is 71432. " + "The grass is green. The sky is blue. The sun is yellow. " * 200, 2400, 120, 80),
])
def test_embedded_model_compiled_decode_equals_eager(policy, params, text, prefill, steps, compiled_at_least):
    """SmolLM2-135M in float32: decode steps compiled vs eager, logits within 1e-4, the same blocks."""
    from streamkv.models import load

    model, tok = load(threads=2, compile=True)
    ids = torch.tensor(tok(text)["input_ids"][: prefill + steps])
    assert ids.numel() == prefill + steps
    try:
        a = StreamSession(model, tok, policy, **params)
        a.feed(ids[:prefill])
        got = [a.feed(ids[i : i + 1]).clone() for i in range(prefill, prefill + steps)]
        step = compiled.decode_step(model)
        assert step.failed is None and step.steps >= compiled_at_least, step.steps
    finally:
        compiled.disable(model)
    b = StreamSession(model, tok, policy, **params)
    b.feed(ids[:prefill])
    for i, g in zip(range(prefill, prefill + steps), got):
        torch.testing.assert_close(g, b.feed(ids[i : i + 1]), atol=1e-4, rtol=0)
    assert getattr(a.policy, "retrieved", None) == getattr(b.policy, "retrieved", None)


def test_cli_generate_with_compile(capsys):
    """`streamkv generate --compile` writes what the eager run writes (greedy, the cache full after ~70 tokens)."""
    from streamkv.cli import main

    argv = ["generate", "--prompt", "Once upon a time, in a small village by the sea,", "--policy", "sink",
            "--window", "60", "--max-new-tokens", "120", "--threads", "2"]
    assert main(argv) == 0
    eager = capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would warn
        assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == eager


@pytest.mark.parametrize("compile_it", [False, True])
def test_attend_one_traced_equals_attend_one(compile_it):
    """The compiled steps' attention (products and reductions) against `attend_one` (matmuls), with the query a
    view at an offset into a larger tensor (as a fused qkv projection gives), a masked first part and GQA."""
    torch.manual_seed(0)
    hq, hkv, d = 6, 2, 16
    qkv = torch.randn(1, 1, (hq + 2 * hkv) * d)
    query = qkv[..., d * 2 : d * 2 + hq * d].view(1, 1, hq, d).transpose(1, 2)  # [1, Hq, 1, D], offset 32
    q_mem = torch.randn(1, hq, 1, d)
    k1, v1 = torch.randn(1, hkv, 40, d), torch.randn(1, hkv, 40, d)
    k2, v2 = torch.randn(1, hkv, 24, d), torch.randn(1, hkv, 24, d)
    bias = torch.zeros(40).masked_fill_(torch.arange(40) >= 33, float("-inf"))
    parts = [(query, k1, v1, False), (q_mem, k2, v2, False)]
    expected = attend_one(query, parts, 0.25, bias)[0]  # [1, 1, Hq, D]
    fn = torch.compile(attend_one_traced, dynamic=False) if compile_it else attend_one_traced
    got = fn(query, parts, 0.25, bias)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
