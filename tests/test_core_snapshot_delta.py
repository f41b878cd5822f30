"""Incremental snapshots (policies/base.py: delta_state / merge_delta): a state that points at the tokens its
base snapshot already holds, merged back, is the full state bit for bit, and a session restored from it
continues with identical logits; through evictions, prefill chunks that compact the slot table, and
position restarts that re-rotate every key (then nothing may be taken from the base)."""
from __future__ import annotations

import pytest
import torch
from tiny import VOCAB, make_tiny

from streamkv.policies.base import delta_state, merge_delta, snapshot_index
from streamkv.session import StreamSession


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("policy,params", [("sink", {"sinks": 4, "window": 40}), ("window", {"window": 40}),
                                           ("h2o", {"sinks": 4, "window": 24, "heavy": 16})])
@pytest.mark.parametrize("restarts", [False, True])
def test_delta_merges_to_the_full_state_and_continues_identically(policy, params, restarts):
    model = make_tiny("llama", layers=2)
    s = StreamSession(model, None, policy, chunk_size=7, **params)
    if restarts:
        s.policy.max_position = 70  # force position restarts (every kept key re-rotated) within the stream
    g = torch.Generator().manual_seed(1)
    s.feed(torch.randint(0, VOCAB, (60,), generator=g))
    base_state = s.state_dict(copy=True)["policy"]
    base = snapshot_index(base_state)
    shared_seen = []
    for turn in range(6):
        s.feed(torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g))  # chunks
        for _ in range(3):  # and single-token decode steps
            s.feed([int(s.logits.argmax())])
        full = s.state_dict(copy=True)
        delta = delta_state(full["policy"], base, max_new=1.0)
        assert delta is not None
        shared_seen.append(int((delta["from_base"] >= 0).sum()))
        merged = merge_delta(base_state, delta)
        assert _equal(merged, full["policy"])  # bit for bit
        restored = StreamSession(model, None, policy, chunk_size=7, **params)
        if restarts:
            restored.policy.max_position = 70
        restored.load_state_dict({**full, "policy": merged})
        nxt = torch.randint(0, VOCAB, (5,), generator=g)
        assert torch.equal(restored.feed(nxt), StreamSession.feed(s, nxt))  # the same logits from here on
    assert max(shared_seen) > 0  # the base really was used


def test_delta_is_small_when_little_changed_and_refused_when_most_did():
    model = make_tiny("llama", layers=2)
    s = StreamSession(model, None, "sink", chunk_size=16, sinks=4, window=200)
    s.feed(torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(2)))
    base = snapshot_index(s.state_dict()["policy"])
    s.feed(torch.randint(0, VOCAB, (10,), generator=torch.Generator().manual_seed(3)))
    d = delta_state(s.state_dict()["policy"], base)
    new = int((d["from_base"] < 0).sum())
    assert new == 10 + 4  # the new tokens, and the sinks (re-rotated to sit before the moved window)
    assert d["layers"][0]["keys"].shape[2] == new
    s.feed(torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(4)))
    assert delta_state(s.state_dict()["policy"], base) is None  # 160 of 204 tokens new: write a full one


def test_merge_refuses_a_base_that_is_not_its_own():
    model = make_tiny("llama", layers=2)
    s = StreamSession(model, None, "sink", chunk_size=16, sinks=4, window=40)
    s.feed(torch.randint(0, VOCAB, (50,), generator=torch.Generator().manual_seed(5)))
    small = s.state_dict()["policy"]
    s.feed(torch.randint(0, VOCAB, (3,), generator=torch.Generator().manual_seed(6)))
    d = delta_state(s.state_dict()["policy"], snapshot_index(small))
    tiny_base = {**small, "n_used": 2}
    with pytest.raises(ValueError, match="not its base"):
        merge_delta(tiny_base, d)
