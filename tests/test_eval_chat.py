"""`streamkv eval chat`: many turns in ONE session far longer than the cache, no error, flat cache."""
import json

import pytest

from eval_helpers import cli, save_tiny


def test_chat_runner_survives_a_session_longer_than_the_cache(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps({"question_id": i, "category": "test",
                                       "turns": [f"Tell me about topic number {i}.", "Shorter now, please."]})
                           for i in range(5)) + "\n")
    out = tmp_path / "chat.jsonl"
    r = cli("eval", "chat", "--model", str(folder), "--questions", str(q), "--policy", "sink:sinks=4,window=60",
            "--max-new-tokens", "12", "--chunk-size", "32", "--quiet", "--out", str(out), "--threads", "1", "--no-recall")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and [r_["turn"] for r_ in rows[:2]] == [1, 2]
    assert all("error" not in r_ for r_ in rows)
    for r_ in rows:
        assert {"reply", "finish_reason", "seconds", "tokens_seen", "tokens_cached", "cache_bytes", "rss_bytes"} <= set(r_)
        assert r_["tokens_cached"] <= 64
    assert rows[-1]["tokens_seen"] > 3 * 64  # the stream went far past the cache
    seen = [r_["tokens_seen"] for r_ in rows]
    assert seen == sorted(seen)
    full = [r_ for r_ in rows if r_["tokens_seen"] > 64]
    assert len({r_["cache_bytes"] for r_ in full}) == 1  # KV memory is flat once the cache is full
    s = json.loads(out.with_suffix(".summary.json").read_text())
    assert s["turns"] == 10 and s["errors"] == 0 and s["cache_bounded"] is True
    assert s["tokens_seen"] == rows[-1]["tokens_seen"] and s["max_tokens_cached"] <= 64
    assert out.with_suffix(".png").stat().st_size > 5000


def test_recall_check_with_memory(tmp_path):
    """The fact turn comes first and the question last; the summary says what was answered, whether it is the
    code, and how far back the fact was (a random tiny model is not expected to know it: only the record)."""
    folder = save_tiny(tmp_path / "tiny")
    q = tmp_path / "q.jsonl"
    q.write_text("\n".join(json.dumps({"turns": [f"Tell me about topic {i}."]}) for i in range(4)) + "\n")
    out = tmp_path / "chat.jsonl"
    r = cli("eval", "chat", "--model", str(folder), "--questions", str(q), "--policy", "memory:sinks=4,window=40,block=8,topk=2",
            "--max-new-tokens", "8", "--chunk-size", "32", "--quiet", "--out", str(out), "--threads", "1", "--plot", "")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["question_id"] == "recall-fact" and rows[-1]["question_id"] == "recall-question" and len(rows) == 6
    s = json.loads(out.with_suffix(".summary.json").read_text())
    assert s["recall"]["answer"] == rows[-1]["reply"] and isinstance(s["recall"]["correct"], bool)
    assert s["recall"]["tokens_between"] > 40  # the fact left the window before it was asked for
    assert "recall after" in r.stderr


@pytest.mark.parametrize("content,message", [
    ('{"turns": []}\n', "turns"),
    ('{"turns": ["ok"]}\nnot json\n', ":2: not JSON"),
])
def test_bad_question_files_are_one_line_errors(tmp_path, content, message):
    q = tmp_path / "q.jsonl"
    q.write_text(content)
    r = cli("eval", "chat", "--questions", str(q))
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
