"""`memory` (block store + retrieval) against exact references, and its store's tiers, faults and snapshots."""
import os

import pytest
import torch
from test_core_policies import random_ids, stream
from tiny import ARCHS, VOCAB, make_tiny

from streamkv import make_policy
from streamkv.policies.blockstore import BlockStore, BlockStoreError
from streamkv.session import StreamSession

torch.set_grad_enabled(False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunks", [[1], [7, 1, 1, 13, 1, 30]], ids=["token-by-token", "chunked"])
def test_retrieving_every_block_equals_dense(arch, chunks):
    """K*B >= every evicted token, contiguous placement: all blocks come back in stream order, contiguously
    between sinks and window, so the cache attends what dense does at the same distances."""
    model = make_tiny(arch, layers=2)
    ids = random_ids(260)
    reference = model(ids).logits[0]
    cache = make_policy("memory", model, sinks=3, window=20, block=8, topk=40, reps=2, ram_mb=0,  # ram 0: via disk
                        placement="contiguous")
    got = stream(model, cache, ids, chunks)
    assert (got - reference).abs().max().item() < 1e-4
    assert cache.store.n_blocks == (260 - 3 - 20) // 8 and cache.store.stats()["reads_disk"] > 0


@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma3"])
def test_per_head_selection_of_every_block_equals_dense(arch):
    """selection=head with K*B >= every evicted token: each head retrieves all blocks, so again dense."""
    model = make_tiny(arch, layers=2)
    ids = random_ids(260)
    reference = model(ids).logits[0]
    cache = make_policy("memory", model, sinks=3, window=20, block=8, topk=40, reps=2, ram_mb=0,
                        placement="contiguous", selection="head")
    got = stream(model, cache, ids, [7, 1, 1, 13, 1, 30])
    assert (got - reference).abs().max().item() < 1e-4


def test_generate_with_memory_equals_dense():
    model = make_tiny("llama", layers=2)
    prompt = random_ids(12, seed=1)
    kwargs = dict(max_new_tokens=60, do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    dense = model.generate(prompt, **kwargs)
    out = model.generate(prompt, past_key_values=make_policy("memory", model, sinks=2, window=10, block=4, topk=30, placement="contiguous"), **kwargs)
    assert torch.equal(out.sequences, dense.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, dense.logits)) < 1e-4


def _attended(kept, blocks, sinks, block, start, q, placement):
    """The tokens a one-layer step attends (sinks + retrieved blocks + window + the q new ones) and their
    positions: contiguous 0..n-1, or every retrieved token at one position with the window right after it."""
    mem = [t for b in blocks for t in range(sinks + b * block, sinks + (b + 1) * block)]
    sink_ids, win_ids = [t for t in kept if t < sinks], [t for t in kept if t >= sinks]
    context = sink_ids + mem + win_ids + list(range(start, start + q))
    if placement == "contiguous":
        return context, list(range(len(context)))
    n_s, one = len(sink_ids), 1 if mem else 0
    return context, list(range(n_s)) + [n_s] * len(mem) + list(range(n_s + one, n_s + one + len(win_ids) + q))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt_neox", "cohere", "smollm3", "gemma3"])
@pytest.mark.parametrize("placement", ["contiguous", "fixed"])
@pytest.mark.parametrize("chunks,reselect,choose", [([1], 1, "current"), ([5, 1, 1, 9, 1, 2], 1, "current"),
                                                   ([5, 1, 1, 1, 1, 1, 1, 2], 3, "current"), ([5, 1, 1, 1, 1, 1, 1, 2], 3, "ahead")],
                         ids=["token-by-token", "chunked", "chunked-reselect-3", "chunked-reselect-3-ahead"])
def test_one_layer_step_equals_fresh_forward_over_what_it_attends(arch, placement, chunks, reselect, choose, rep_rule="mean"):
    """One layer: a token's key/value depend on that token and its position only. So every step must equal a
    fresh forward over exactly sinks + the retrieved blocks (the policy says which) + window + new tokens,
    at the positions the placement gives: contiguous 0..n-1, or every retrieved token at the position right
    before the window. Few blocks retrieved out of many, evictions and position restarts included."""
    sinks, window, block, topk = 2, 6, 3, 2
    model = make_tiny(arch, layers=1)
    cache = make_policy("memory", model, sinks=sinks, window=window, block=block, topk=topk, reps=2, placement=placement,
                        ram_mb=0, reselect=reselect, rep_rule=rep_rule, choose=choose)
    cache.max_position = 40  # many position restarts in a short stream
    ids = random_ids(220, seed=2)
    start, i, restarts, choices = 0, 0, 0, set()
    while start < ids.shape[1]:
        q = min(chunks[i % len(chunks)], ids.shape[1] - start)
        kept = sorted(int(s) for s in cache.seq[: cache.n_used] if s >= 0)
        before = cache.next_pos
        pos = cache.position_ids(q)
        restarts += int(pos[0, 0].item() != before)
        got = model(input_ids=ids[:, start : start + q], position_ids=pos, past_key_values=cache, use_cache=True).logits[0]
        blocks = cache.retrieved[0]
        assert len(blocks) == min(topk, max(0, (start - sinks - window) // block)) or start < sinks + window + block
        context, positions = _attended(kept, blocks, sinks, block, start, q, placement)
        reference = model(input_ids=ids[:, context], position_ids=torch.tensor([positions])).logits[0, -q:]
        assert (got - reference).abs().max().item() < 1e-4, f"step at token {start}"
        assert cache.n_kept <= sinks + window + block - 1
        choices.add(tuple(blocks))
        start, i = start + q, i + 1
    assert restarts >= 3 and len(choices) > 5, (restarts, len(choices))


@pytest.mark.parametrize("arch", ["llama", "phi3"])
@pytest.mark.parametrize("placement", ["contiguous", "fixed"])
@pytest.mark.parametrize("chunks", [[1], [5, 1, 1, 9, 1, 2]], ids=["token-by-token", "chunked"])
def test_per_head_selection_each_head_equals_fresh_forward(arch, placement, chunks):
    """selection=head: each KV head attends its own blocks. Per head, the attention output (the input of the
    output projection, sliced to the head's query group) must equal a fresh forward over exactly sinks + that
    head's blocks + window + new tokens at the placement's positions; the heads must really choose differently."""
    sinks, window, block, topk = 2, 6, 3, 2
    model = make_tiny(arch, layers=1)
    attn = model.model.layers[0].self_attn
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.hidden_size // hq
    seen = []
    hook = attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0][0]))  # [q, Hq*D]
    cache = make_policy("memory", model, sinks=sinks, window=window, block=block, topk=topk, reps=2,
                        placement=placement, selection="head", ram_mb=0)
    cache.max_position = 40
    ids = random_ids(220, seed=2)
    start, i, differ, steps = 0, 0, 0, 0
    try:
        while start < ids.shape[1]:
            q = min(chunks[i % len(chunks)], ids.shape[1] - start)
            kept = sorted(int(s) for s in cache.seq[: cache.n_used] if s >= 0)
            pos = cache.position_ids(q)
            seen.clear()
            model(input_ids=ids[:, start : start + q], position_ids=pos, past_key_values=cache, use_cache=True)
            got = seen[0]
            per_head = cache.retrieved[0]
            if per_head:
                assert len(per_head) == hkv and all(len(r) == len(per_head[0]) for r in per_head)
                differ += len({tuple(r) for r in per_head}) > 1
            for h in range(hkv):
                blocks = per_head[h] if per_head else []
                context, positions = _attended(kept, blocks, sinks, block, start, q, placement)
                seen.clear()
                model(input_ids=ids[:, context], position_ids=torch.tensor([positions]))
                cols = slice(h * (hq // hkv) * d, (h + 1) * (hq // hkv) * d)  # the query heads of KV head h
                err = (got[:, cols] - seen[0][-q:, cols]).abs().max().item()
                assert err < 1e-4, f"head {h}, step at token {start}"
            steps += 1
            start, i = start + q, i + 1
    finally:
        hook.remove()
    assert differ > steps // 4, (differ, steps)  # the heads chose different blocks at many steps


def test_selection_parameter_is_checked():
    model = make_tiny("llama", layers=1)
    with pytest.raises(ValueError, match="selection"):
        make_policy("memory", model, selection="each")
    with pytest.raises(ValueError, match="rep_rule must be one of attention, mean"):
        make_policy("memory", model, rep_rule="max")


@pytest.mark.parametrize("placement", ["contiguous", "fixed"])
def test_mean_representatives_are_the_means_of_the_block_keys_and_the_attention_rule_steps_exactly(placement):
    """The default rep_rule=mean observes no attention, and each block's representatives are the means of its
    two halves' keys, as computed at position 0 (a key fed alone at position 0 is the one-layer model's key
    there). InfLLM's rule (rep_rule=attention, which observes attention) still steps exactly: every one-layer
    step equals a fresh forward over what the policy says it attends."""
    test_one_layer_step_equals_fresh_forward_over_what_it_attends("llama", placement, [5, 1, 1, 9, 1, 2], 1, "current",
                                                                  rep_rule="attention")
    model = make_tiny("llama", layers=1)
    sinks, window, block = 2, 6, 4
    cache = make_policy("memory", model, sinks=sinks, window=window, block=block, topk=2, reps=2, ram_mb=0,
                        placement=placement)
    assert not cache.observe and cache.describe()["rep_rule"] == "mean"
    ids = random_ids(60, seed=3)
    stream(model, cache, ids, [5, 1, 3])
    assert cache.store.n_blocks >= 8
    from transformers import DynamicCache

    at0 = []
    for t in range(ids.shape[1]):  # every token's key at position 0 [H, D]
        c = DynamicCache(config=model.config)
        model(input_ids=ids[:, t : t + 1], position_ids=torch.tensor([[0]]), past_key_values=c, use_cache=True)
        at0.append(c.layers[0].keys[0, :, 0])
    at0 = torch.stack(at0, dim=1)  # [H, n, D]
    for b in range(cache.store.n_blocks):
        first = sinks + b * block
        halves = [at0[:, first : first + block // 2].mean(1), at0[:, first + block // 2 : first + block].mean(1)]
        expected = torch.stack(halves, dim=1)  # [H, 2, D]
        assert (cache.index[0][:, b].float() - expected).abs().max().item() < 1e-2 * expected.abs().max().item(), b
        stored, _, pos = cache.store.get(b, 0)  # the store keeps the block's keys at position 0 too [H, B, D]
        assert torch.equal(pos, torch.arange(first, first + block))  # (no restart here: a token sat at its index)
        assert (stored - at0[:, first : first + block]).abs().max().item() < 1e-5, b


def test_block_round_trips_bit_exactly_and_damage_is_named(tmp_path):
    store = BlockStore(tmp_path, ram_bytes=0, tag="t")
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g)) for _ in range(2)]
    pos = torch.arange(100, 108)
    for l, (k, v) in enumerate(layers):
        store.add_layer(0, l, 2, k, v, pos)
    ram = store.get(0, 1)
    store.spill()  # over the 0-byte cap: to disk
    assert store.stats()["blocks_in_ram"] == 0 and store.stats()["blocks_on_disk"] == 1
    for l, (k, v) in enumerate(layers):
        dk, dv, dpos = store.get(0, l)
        assert torch.equal(dk, k) and torch.equal(dv, v) and torch.equal(dpos, pos)
    assert torch.equal(ram[0], layers[1][0])
    path = store.path(0)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a byte of layer 1's values
    path.write_bytes(bytes(data))
    store._headers.clear()
    store.get(0, 0)  # layer 0 is intact
    with pytest.raises(BlockStoreError, match=r"block-00000000.skv is damaged \(layer 1"):
        store.get(0, 1)
    path.write_bytes(bytes(data[: len(data) // 2]))  # torn
    with pytest.raises(BlockStoreError, match="damaged"):
        store.get(0, 1)
    path.write_bytes(b"garbage" * 10)
    store._headers.clear()
    with pytest.raises(BlockStoreError, match="not a streamkv block file"):
        store.get(0, 0)
    path.unlink()
    with pytest.raises(BlockStoreError, match="block-00000000.skv is missing"):
        store.get(0, 0)


def test_store_directory_errors(tmp_path):
    model = make_tiny("llama", layers=1)
    with pytest.raises(BlockStoreError, match="does not exist"):
        make_policy("memory", model, store_dir=str(tmp_path / "nope"))
    for params, message in [(dict(block=0), "block must be a positive integer"), (dict(placement="middle"), "placement must be one of"),
                            (dict(reps=9, block=8), "cannot exceed block"), (dict(ram_mb=-1), "ram_mb must be a non-negative")]:
        with pytest.raises(ValueError, match=message):
            make_policy("memory", model, **params)


def test_disk_full_raises_clearly_and_loses_nothing(tmp_path):
    """A write that fails (ENOSPC from /dev/full) raises before the step changes anything; once space is
    back, the stream continues exactly as an uninterrupted one."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(120, seed=5)[0]
    params = dict(sinks=2, window=8, block=4, topk=3, ram_mb=0)
    ref = StreamSession(model, None, "memory", chunk_size=16, **params)
    ref.feed(ids[:60])
    expected = ref.feed(ids[60:])  # same chunking as below (chunking changes what a bounded cache attends)
    cache = make_policy("memory", model, store_dir=str(tmp_path), **params)
    session = StreamSession(model, None, cache, chunk_size=16)
    session.feed(ids[:60])
    n = cache.store.n_blocks
    os.symlink("/dev/full", cache.store.path(n - 1).with_suffix(".tmp"))  # the next spill writes into a full disk
    stream_state = lambda: {k: session.stats()[k] for k in ("tokens_seen", "tokens_cached", "cache_bytes", "next_position", "blocks")}
    before = (stream_state(), session.logits.clone())
    with pytest.raises(BlockStoreError, match="No space left on device"):
        session.feed(ids[60:61])
    assert stream_state() == before[0] and torch.equal(session.logits, before[1])  # (blocks may have changed tier)
    got = session.feed(ids[60:])  # the symlink is gone with the failed write: the retry succeeds
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("placement,selection", [("fixed", "shared"), ("contiguous", "shared"), ("fixed", "head")])
def test_a_store_with_keys_at_their_positions_still_streams(tmp_path, placement, selection):
    """Stores written before keys were kept at position 0 hold them at the positions `pos` records, and their
    snapshots say nothing of it: such a cache (simulated: `keys_at_zero` off from the start, which stores and
    reads as the old code did) restores from a snapshot without the flag and continues bit-identically, and
    streams what a cache storing keys at 0 does (fixed placement: bit-identically, as one rotation from the
    same cos/sin either way; contiguous rotates twice from 0, so only to rounding)."""
    model = make_tiny("llama", layers=2)
    ids = random_ids(400, seed=6)[0]
    params = dict(sinks=2, window=16, block=8, topk=4, ram_mb=0, placement=placement, selection=selection)
    old = StreamSession(model, None, "memory", chunk_size=32, store_dir=str(tmp_path), **params)
    old.policy.keys_at_zero = False
    new = StreamSession(model, None, "memory", chunk_size=32, **params)
    old_logits, new_logits = old.feed(ids[:250]), new.feed(ids[:250])
    state = old.state_dict()
    assert state["policy"]["memory"].pop("keys_at_zero") is False  # (what an old snapshot lacks)
    expected = old.feed(ids[250:])
    restored = StreamSession(model, None, "memory", chunk_size=32, store_dir=str(tmp_path), **params)
    restored.load_state_dict(state)
    assert restored.policy.keys_at_zero is False
    assert torch.equal(restored.feed(ids[250:]), expected)
    old_logits, new_logits = torch.cat([old_logits, expected]), torch.cat([new_logits, new.feed(ids[250:])])
    if placement == "fixed":
        assert torch.equal(old_logits, new_logits)
    else:
        assert (old_logits - new_logits).abs().max().item() < 1e-5


def test_snapshot_restores_identical_logits(tmp_path):
    model = make_tiny("llama", layers=2)
    ids = random_ids(400, seed=6)[0]
    params = dict(sinks=2, window=16, block=8, topk=4, ram_mb=0, store_dir=str(tmp_path))
    a = StreamSession(model, None, "memory", chunk_size=32, **params)
    a.feed(ids[:250])
    state = a.state_dict()
    expected = a.feed(ids[250:])
    b = StreamSession(model, None, "memory", chunk_size=32, **params)
    b.load_state_dict(state)
    got = b.feed(ids[250:])
    assert torch.equal(got, expected)


def test_resident_memory_bounded_over_50k_tokens(tmp_path):
    """Resident KV (slot table + retrieved blocks) never exceeds S + W + B - 1 + K*B tokens; the store's RAM
    tier stays under its cap while the disk tier grows linearly with the stream; the process's RSS stays within
    2% from 10k to 50k tokens (the embedded model over 256k tokens: docs/RESULTS.md section 6)."""
    model = make_tiny("llama", layers=2)
    session = StreamSession(model, None, "memory", sinks=4, window=120, block=32, topk=4, ram_mb=1, chunk_size=500,
                            store_dir=str(tmp_path))
    cache = session.policy
    ids = random_ids(50_000, seed=3)[0]
    budget = 4 + 120 + 31 + 4 * 32
    block_bytes = 2 * 2 * 2 * 32 * 16 * 4  # k+v, layers, kv heads, tokens, head dim, float32
    ram_bound = 2**20 + (500 // 32 + 1) * block_bytes  # the cap is enforced when a step starts: + one chunk's blocks
    seen, rss = [], {}
    for start in range(0, 49_800, 5_000):
        session.feed(ids[start : min(start + 5_000, 49_800)])
        stats = cache.memory_stats()
        assert stats["resident_tokens"] <= budget and stats["ram_bytes"] <= ram_bound
        seen.append((cache.seen, cache.nbytes(), stats["disk_bytes"]))
        rss[cache.seen] = _rss_bytes()
    for t in ids[49_800:].tolist():  # the decode path too
        session.feed([t])
        assert cache.memory_stats()["resident_tokens"] <= budget
    assert len({b for _, b, _ in seen[1:]}) == 1  # resident bytes constant
    per_token = [(d2 - d1) / (s2 - s1) for (s1, _, d1), (s2, _, d2) in zip(seen[1:], seen[2:])]
    assert max(per_token) < 1.05 * min(per_token)  # disk grows linearly
    assert cache.store.n_blocks == (50_000 - 4 - 120) // 32
    at10k = rss[min(rss, key=lambda n: abs(n - 10_000))]
    assert max(rss[n] for n in rss if n >= 10_000) <= 1.02 * at10k, rss  # RSS flat within 2% from 10k on
    import platform

    from streamkv.policies import blockstore

    if platform.libc_ver()[0] == "glibc":  # spills give the freed heap back (what keeps RSS flat on the real model)
        assert blockstore.glibc() is not None


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_policy_spec_with_strings():
    from streamkv import parse_policy_spec

    assert parse_policy_spec("memory:window=512,placement=fixed,store_dir=/tmp/x") == (
        "memory", {"window": 512, "placement": "fixed", "store_dir": "/tmp/x"})


@pytest.mark.parametrize("selection,choose", [("shared", "current"), ("head", "current"), ("shared", "ahead"),
                                              ("head", "ahead")])
def test_reselect_keeps_the_choice_between_decode_steps_and_stays_exact(selection, choose):
    """reselect=3: a prefill chunk always chooses; decode steps re-choose only every 3rd step (what is attended
    then is checked against fresh forwards in the one-layer test above), with choose=ahead after that step's
    attention, so the new choice is attended from the next step on; a snapshot taken at a choosing step
    restores the same behaviour (identical logits)."""
    sinks, window, block, topk = 2, 6, 3, 2
    model = make_tiny("llama", layers=1)
    params = dict(sinks=sinks, window=window, block=block, topk=topk, reps=2, placement="contiguous", ram_mb=0,
                  selection=selection, reselect=3, choose=choose)
    cache = make_policy("memory", model, **params)
    ids = random_ids(120, seed=4)
    for a_, b_ in ((0, 40), (40, 60)):  # the second chunk already chooses among more than topk blocks
        model(input_ids=ids[:, a_:b_], position_ids=cache.position_ids(b_ - a_), past_key_values=cache, use_cache=True)
    assert cache.store.n_blocks > topk
    choices = []
    for t in range(60, 100):
        before = cache.retrieved[0]
        model(input_ids=ids[:, t : t + 1], position_ids=cache.position_ids(1), past_key_values=cache, use_cache=True)
        run = t - 60 + 1  # decode steps since the prefill chunk
        if (run % 3 if choose == "current" else run % 3 != 1 or run == 1):
            assert cache.retrieved[0] == before, f"decode step {run} re-chose"
        choices.append(cache.retrieved[0])
        if t == 80:
            state = cache.state_dict()
    assert len({str(c) for c in choices}) > 1  # it does re-choose, every third step
    a = make_policy("memory", model, **params)
    a.load_state_dict(state)
    got = [model(input_ids=ids[:, t : t + 1], position_ids=a.position_ids(1), past_key_values=a, use_cache=True).logits
           for t in range(81, 100)]
    ref = make_policy("memory", model, **params)
    for a_, b_ in ((0, 40), (40, 60)):
        model(input_ids=ids[:, a_:b_], position_ids=ref.position_ids(b_ - a_), past_key_values=ref, use_cache=True)
    exp = [model(input_ids=ids[:, t : t + 1], position_ids=ref.position_ids(1), past_key_values=ref, use_cache=True).logits
           for t in range(60, 100)][21:]
    assert all(torch.equal(g, e) for g, e in zip(got, exp)) and len(got) == len(exp) == 19


def test_ram_tier_keeps_layer_parts_and_promotes_disk_reads(tmp_path):
    """The RAM tier is an LRU of (block, layer) parts: a part read back from disk joins it, by dropping parts
    already on disk, so a part a layer keeps coming back to is read from disk once; the cap always holds and a
    block leaves RAM for good only once it is on disk."""
    g = torch.Generator().manual_seed(1)
    part = 2 * 3 * 8 * 16 * 4  # keys + values of one layer of one block: [3, 8, 16] float32 each
    store = BlockStore(tmp_path, ram_bytes=3 * part, tag="t")
    data = {}
    for b in range(3):  # 3 blocks x 2 layers = 6 parts; the cap holds 3
        for l in range(2):
            data[b, l] = (torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 16, generator=g))
            store.add_layer(b, l, 2, *data[b, l], torch.arange(8) + 8 * b)
    store.spill()  # over the cap: every block written, the 3 least recent parts dropped
    assert store.ram_used() == 3 * part and store.stats()["parts_in_ram"] == 3 and store.on_disk == {0, 1, 2}
    assert set(store.ram) == {(1, 1), (2, 0), (2, 1)}
    k, v, pos = store.get(0, 1)  # from disk; joins RAM in place of (1, 1), the least recent part
    assert store.reads == {"ram": 0, "disk": 1} and torch.equal(k, data[0, 1][0]) and torch.equal(pos, torch.arange(8))
    assert set(store.ram) == {(2, 0), (2, 1), (0, 1)} and store.ram_used() == 3 * part
    store.get(0, 1)
    assert store.reads == {"ram": 1, "disk": 1}  # the second read comes from RAM
    store.add_layer(3, 0, 2, *data[0, 0], torch.arange(8) + 24)  # a new block (not on disk) arrives mid-step:
    store.add_layer(3, 1, 2, *data[0, 1], torch.arange(8) + 24)  # the tier is over its cap until the next spill
    store.get(1, 0)  # from disk; joins RAM in place of the 3 least recent parts (on disk), over-cap block 3 stays
    assert list(store.ram) == [(3, 0), (3, 1), (1, 0)]
    store.add_layer(4, 0, 2, *data[0, 0], torch.arange(8) + 32)
    store.add_layer(4, 1, 2, *data[0, 1], torch.arange(8) + 32)
    store.get(1, 0)  # (a RAM read: now the least recent are block 3's parts, not on disk)
    store.get(2, 1)  # from disk; room would need dropping block 3: read, not kept, nothing dropped
    assert store.reads == {"ram": 2, "disk": 3} and list(store.ram) == [(3, 0), (3, 1), (4, 0), (4, 1), (1, 0)]
    store.spill()
    assert store.on_disk == {0, 1, 2, 3, 4} and store.ram_used() == 3 * part
    for (b, l), (k, v) in data.items():  # every part intact, wherever it is
        got = store.get(b, l)
        assert torch.equal(got[0], k) and torch.equal(got[1], v)
    assert store.ram_used() <= 3 * part
