"""`streamkv eval passkey`: the generator puts the key where it says, the scorer is right, files are written."""
import json

import pytest

from eval_helpers import cli, embedded_tokenizer, save_tiny
from streamkv.evaluation.common import EvalError
from streamkv.evaluation.passkey import FILLER, QUESTION, extract_answer, make_key, make_prompt, score


@pytest.fixture(scope="module")
def tok():
    return embedded_tokenizer()


@pytest.mark.parametrize("length", [200, 700, 2048])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_is_placed_at_the_stated_depth(tok, length, depth):
    key = make_key(0, length, depth, 0)
    p = make_prompt(tok, length, depth, key)
    longest = max(len(tok(" " + s, add_special_tokens=False).input_ids) for s in FILLER)
    assert length - longest <= len(p.ids) <= length  # never longer, short by less than one filler sentence
    # the key sentence sits exactly at [key_start, key_end)
    assert tok.decode(p.ids[p.key_start:p.key_end]).strip() == f"The pass key is {key}. Remember it. {key} is the pass key."
    assert tok.decode(p.ids).count(key) == 2
    # the filler before it is the stated fraction of all filler (within one sentence of the requested depth)
    task_len = p.key_start - round(p.actual_depth * p.filler_tokens)
    assert tok.decode(p.ids[:task_len]).startswith("There is an important info")
    assert abs(p.actual_depth - depth) * p.filler_tokens <= longest / 2 + 1
    assert tok.decode(p.ids[-12:]).endswith(" " + QUESTION)
    assert p.key_distance == len(p.ids) - p.key_start


def test_depth_extremes_and_errors(tok):
    p0 = make_prompt(tok, 600, 0.0, "12345")
    p1 = make_prompt(tok, 600, 1.0, "12345")
    assert p0.actual_depth == 0.0 and p1.actual_depth == 1.0
    assert tok.decode(p1.ids[p1.key_end:]).strip() == QUESTION  # nothing between the key and the question
    with pytest.raises(EvalError):
        make_prompt(tok, 20, 0.5, "12345")  # too short for the prompt itself
    assert make_key(0, 512, 0.5, 1) == make_key(0, 512, 0.5, 1) != make_key(0, 512, 0.5, 2)


def test_scorer_on_known_answers():
    assert score(" 71432.", "71432")
    assert score("The pass key is 71432, remember", "71432")
    assert not score(" 7143", "71432")
    assert not score(" 714325", "71432")
    assert not score(" 12345 71432", "71432")  # only the first number counts
    assert not score(" the pass key.", "71432")
    assert extract_answer("none") is None and extract_answer("a 0042 b") == "0042"


def test_cli_grid_json_and_heatmap(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    out, png = tmp_path / "pk.json", tmp_path / "pk.png"
    r = cli("eval", "passkey", "--model", str(folder), "--lengths", "120,260", "--depths", "0,1", "--trials", "2",
            "--policy", "dense,sink:sinks=4,window=60", "--chunk-size", "64", "--max-new-tokens", "4", "--quiet",
            "--out", str(out), "--plot", str(png), "--threads", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert png.stat().st_size > 5000
    assert d["lengths"] == [120, 260] and d["depths"] == [0.0, 1.0] and d["trials"] == 2
    for p in d["policies"]:
        assert len(p["samples"]) == 2 * 2 * 2
        assert set(p["accuracy"]) == {"120", "260"} and set(p["accuracy"]["120"]) == {"0.0", "1.0"}
        for s in p["samples"]:
            assert s["correct"] == score(s["answer"], s["key"])
        mean = sum(s["correct"] for s in p["samples"]) / len(p["samples"])
        assert abs(p["mean_accuracy"] - mean) < 1e-9
    sink = d["policies"][1]
    assert sink["budget"] == 64
    assert sink["count_key_within_budget"] + sink["count_key_beyond_budget"] == 8
    # same keys for every policy
    assert [s["key"] for s in d["policies"][0]["samples"]] == [s["key"] for s in sink["samples"]]
    r = cli("eval", "passkey", "--depths", "0.5,1.5")
    assert r.returncode == 2 and "depths" in r.stderr and "Traceback" not in r.stderr


def test_multi_fact_prompt_places_every_fact(tok):
    from streamkv.evaluation.passkey import NAMED_KEY, NAMED_QUESTION, NAMES, make_multi_prompt

    depths, keys = [0.1, 0.5, 0.9], ["11111", "22222", "33333"]
    ids, facts = make_multi_prompt(tok, 2048, depths, keys)
    question = len(tok(" " + NAMED_QUESTION.format(name=NAMES[0]), add_special_tokens=False).input_ids)
    assert len(ids) <= 2048 - question
    assert [f.key_start for f in facts] == sorted(f.key_start for f in facts)  # in stream order
    for f, d, k, name in zip(facts, depths, keys, NAMES):
        n = len(tok(" " + NAMED_KEY.format(name=name, key=k), add_special_tokens=False).input_ids)
        assert tok.decode(ids[f.key_start : f.key_start + n]).strip() == NAMED_KEY.format(name=name, key=k)
        assert abs(f.actual_depth - d) < 0.02 and f.key == k
    assert len({f.name for f in facts}) == 3
    with pytest.raises(EvalError):
        make_multi_prompt(tok, 2048, [0.1] * 9, ["12345"] * 9)


def test_multi_fact_questions_are_asked_of_the_same_state(tmp_path):
    """Each question is asked from the snapshot taken after the prompt: the answer equals that of a fresh
    session fed the prompt and that question only (so restore is exact, and earlier answers do not leak)."""
    from types import SimpleNamespace

    from eval_helpers import embedded_tokenizer, tiny_model
    from streamkv.evaluation.passkey import NAMED_QUESTION, _ask_multi, answer, make_multi_prompt
    from streamkv.session import StreamSession

    model, tok = tiny_model(layers=1), embedded_tokenizer()
    ids, facts = make_multi_prompt(tok, 400, [0.2, 0.8], ["12345", "67890"])
    args = SimpleNamespace(seed=0, max_new_tokens=6)
    params = dict(sinks=4, window=100)
    got = _ask_multi(StreamSession(model, tok, "sink", chunk_size=64, **params), (400, 0), (ids, facts), args)
    assert [s["name"] for s in got] == [f.name for f in facts]
    for s, f in zip(got, facts):
        fresh = StreamSession(model, tok, "sink", chunk_size=64, **params)
        fresh.feed(ids)
        fresh.feed(fresh.encode(" " + NAMED_QUESTION.format(name=f.name)))
        assert s["key_distance"] == fresh.policy.seen - f.key_start
        assert s["answer"] == answer(fresh, 6)


def test_cli_multi_fact_grid(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    out = tmp_path / "pk.json"
    r = cli("eval", "passkey", "--model", str(folder), "--lengths", "200", "--depths", "0.2,0.8", "--trials", "2",
            "--multi", "--policy", "dense", "--chunk-size", "64", "--max-new-tokens", "3", "--quiet",
            "--out", str(out), "--plot", "", "--threads", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["multi"] is True
    samples = d["policies"][0]["samples"]
    assert len(samples) == 2 * 2  # trials x facts, one prompt per trial
    assert {s["depth"] for s in samples} == {0.2, 0.8} and len({s["key"] for s in samples}) == 4
    r = cli("eval", "passkey", "--multi", "--chat-template", "--lengths", "200", "--depths", "0.5", "--trials", "1",
            "--policy", "dense", "--model", str(folder), "--out", str(out), "--plot", "")
    assert r.returncode != 0 and "--multi" in r.stderr and "Traceback" not in r.stderr
