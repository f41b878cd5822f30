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
