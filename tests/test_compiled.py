"""The compiled decode step (streamkv/compiled.py) against the eager one: same logits (float32, 1e-4) at every
step, through the cache filling, steady state and position restarts; the compiled path is really taken; a
model that cannot compile falls back to eager with a warning."""
import warnings

import pytest
import torch
from tiny import VOCAB, make_tiny

from streamkv import compiled
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


def test_policies_that_choose_in_python_stay_eager():
    model = make_tiny("llama", layers=1)
    ids = _stream(200, seed=2)
    compiled.enable(model)
    try:
        step = compiled.decode_step(model)
        s = StreamSession(model, None, "h2o", sinks=2, window=20, heavy=8)
        ref = StreamSession(model, None, "h2o", sinks=2, window=20, heavy=8)
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
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_embedded_model_compiled_decode_equals_eager():
    """SmolLM2-135M in float32, sink 4+60: 100 steady-state decode steps compiled vs eager, and the CLI flag."""
    from streamkv.cli import main
    from streamkv.models import load

    model, tok = load(threads=2, compile=True)
    try:
        ids = torch.tensor(tok("The quick brown fox jumps over the lazy dog. " * 40)["input_ids"][:200])
        a = StreamSession(model, tok, "sink", sinks=4, window=60)
        a.feed(ids[:70])
        got = [a.feed(ids[i : i + 1]).clone() for i in range(70, 170)]
        step = compiled.decode_step(model)
        assert step.failed is None and step.steps >= 95
    finally:
        compiled.disable(model)
    b = StreamSession(model, tok, "sink", sinks=4, window=60)
    b.feed(ids[:70])
    for i, g in zip(range(70, 170), got):
        torch.testing.assert_close(g, b.feed(ids[i : i + 1]), atol=1e-4, rtol=0)


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
