"""Integration on the embedded SmolLM2-135M-Instruct: offline load, determinism, multi-turn chat, CLI."""
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # must work with no hub at all

import pytest

from streamkv.models import load
from streamkv.session import StreamSession

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smol():
    return load(threads=2)


def test_loads_offline_with_expected_architecture(smol):
    model, tokenizer = smol
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("llama", 30, 9, 3)
    assert cfg.max_position_embeddings == 8192 and tokenizer.chat_template


def test_greedy_output_is_deterministic(smol):
    model, tok = smol
    outs = []
    for _ in range(2):
        s = StreamSession(model, tok, "sink", sinks=4, window=1020)
        outs.append(s.complete(prompt="The three primary colours are", max_new_tokens=12))
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) > 0
    assert outs[0].text.strip()


def test_multi_turn_chat_in_one_bounded_session(smol):
    model, tok = smol
    s = StreamSession(model, tok, "sink", sinks=4, window=60, chunk_size=64)  # the chat outgrows this cache
    answers = [("What is the capital of France?", "Paris"), ("And what is the capital of Germany?", "Berlin")]
    seen = []
    for question, expected in answers:
        reply = "".join(s.chat(question, max_new_tokens=24))
        assert expected in reply, reply
        seen.append(s.stats()["tokens_seen"])
    reply = "".join(s.chat("Name one colour.", max_new_tokens=16))
    assert reply.strip()
    stats = s.stats()
    assert stats["tokens_seen"] > 64 and stats["tokens_cached"] == 64  # longer than the cache, still bounded
    assert seen[0] < seen[1] < stats["tokens_seen"]
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 3
    assert s.last_usage["completion_tokens"] > 0 and s.last_usage["prompt_tokens"] > 5


def test_chat_stream_holds_exactly_the_rendered_conversation(smol):
    """Turn by turn (stop strings included), the stream holds the same tokens as rendering the whole
    conversation with the chat template at once."""
    model, tok = smol
    fed = []

    def recording(session):  # wrap the real feeding path, noting every token that enters the stream
        original = session._chunks
        def chunks(ids, all_logits, prompt=True):
            fed.extend(ids.tolist())
            return original(ids, all_logits, prompt)
        session._chunks = chunks
        return session

    s = recording(StreamSession(model, tok, "dense"))
    "".join(s.chat("Count from 1 to 10.", max_new_tokens=30, stop=["5"]))
    "".join(s.chat("Say hi.", max_new_tokens=8))
    rendered = tok.apply_chat_template(s.messages, tokenize=False)
    assert tok.decode(fed) == rendered
    # a resent earlier conversation is fed too (as the server does for stateless requests)
    fed.clear()
    s2 = recording(StreamSession(model, tok, "dense"))
    s2.messages.append({"role": "system", "content": "You are terse."})  # appended, fed with the first turn
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"}]
    s2.add_messages(history)
    "".join(s2.chat("What is my name?", max_new_tokens=6))
    "".join(s2.chat("Thanks.", max_new_tokens=4))
    assert tok.decode(fed) == tok.apply_chat_template(s2.messages, tokenize=False)
    assert s2.messages[1:3] == history and s2.messages[0]["role"] == "system"


def test_stop_string_cuts_output(smol):
    model, tok = smol
    s = StreamSession(model, tok, "sink")
    full = s.complete(prompt="Count: 1, 2, 3,", max_new_tokens=20)
    assert " 6," in full.text, full.text
    s2 = StreamSession(model, tok, "sink")
    cut = s2.complete(prompt="Count: 1, 2, 3,", max_new_tokens=20, stop=[" 6,"])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(" 6,")]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "streamkv", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_generate_and_info():
    r = run_cli("generate", "--prompt", "Once upon a time", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "cached" in r.stderr
    r = run_cli("info")
    assert r.returncode == 0 and "30 layers, 9 query / 3 KV heads" in r.stdout and "KV per token" in r.stdout


def test_cli_chat_reads_turns_from_stdin():
    r = subprocess.run([sys.executable, "-m", "streamkv", "chat", "--max-new-tokens", "12", "--window", "40"],
                       input="What is the capital of France?\n/stats\nAnd of Italy?\n", capture_output=True,
                       text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and r.stdout.count("bot>") == 2
    assert r.stderr.count("cached") >= 3  # a status line after each turn, and /stats


@pytest.mark.parametrize("args,message", [
    (["generate", "--prompt", "x", "--policy", "lru"], "unknown --policy 'lru'"),
    (["generate", "--prompt", "x", "--policy", "window", "--sinks", "4"], "--sinks does not apply to policy 'window'"),
    (["generate", "--prompt", "x", "--window", "0"], "--window must be a positive integer"),
    (["generate", "--prompt", "   "], "the prompt is empty"),
    (["generate", "--prompt", "x", "--model", "/nonexistent/model"], "could not load model"),
])
def test_cli_bad_arguments(args, message):
    r = run_cli(*args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
