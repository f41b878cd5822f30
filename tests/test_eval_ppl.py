"""`streamkv eval ppl`: chunked vs token-by-token equality where it must hold, exact sampled recompute, files."""
import json
import math

import numpy as np
import pytest
import torch

from eval_helpers import cli, save_tiny, tiny_model
from streamkv.evaluation.common import PolicySpec, parse_policies, split_policy_list, EvalError
from streamkv.evaluation.ppl import merge, recompute_nll_at, sample_positions, segments, stream_nll

# Tolerances (float32, CPU): chunked and token-by-token differ only by summation order.
MEAN_TOL = 1e-4  # |mean NLL difference|
POS_TOL = 2e-3  # max |per-position NLL difference|


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 49152, (161,), generator=g).tolist()


def test_dense_chunked_equals_token_by_token(model, ids):
    tok = stream_nll(model, ids, PolicySpec("dense"), chunk_size=1, progress=False)
    chk = stream_nll(model, ids, PolicySpec("dense"), chunk_size=48, progress=False)
    assert tok.shape == chk.shape == (len(ids) - 1,)
    assert abs(tok.mean() - chk.mean()) < MEAN_TOL
    assert np.abs(tok - chk).max() < POS_TOL


def test_sink_chunked_equals_token_by_token_while_within_budget(model, ids):
    spec = PolicySpec("sink", {"sinks": 4, "window": 96})  # budget 100
    tok = stream_nll(model, ids, spec, chunk_size=1, progress=False)
    chk = stream_nll(model, ids, spec, chunk_size=32, progress=False)
    dense = stream_nll(model, ids, PolicySpec("dense"), chunk_size=1, progress=False)
    # targets 1..100 are predicted from at most 100 earlier tokens: everything fits, all three agree
    assert np.abs(tok[:100] - chk[:100]).max() < POS_TOL
    assert np.abs(tok[:100] - dense[:100]).max() < POS_TOL
    # past the budget token-by-token sink really evicts (differs from dense); chunked sees a bit more context
    assert np.abs(tok[110:] - dense[110:]).max() > 1e-2


def test_sampled_recompute_is_exact(model, ids):
    from streamkv.session import StreamSession
    from streamkv.policies import Recompute

    w = 24
    s = StreamSession(model, None, Recompute(model, window=w), chunk_size=16)
    logits = s.feed(ids[:-1], all_logits=True)
    ref = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:]).view(-1, 1)).squeeze(1).numpy()
    pos = sample_positions(len(ids) - 1, 9)
    assert len(pos) == 9 and pos[0] == 1 and pos[-1] == len(ids) - 1
    got = recompute_nll_at(model, ids, w, pos, progress=False)
    assert np.abs(got - ref[pos - 1]).max() < 1e-4


def test_segments_and_policy_lists():
    pos = np.arange(1, 3001)
    nll = np.where(pos < 1024, 1.0, 2.0)
    seg = segments(pos, nll, 3000)
    assert [s["start"] for s in seg] == [1, 256, 1024, 2048]
    assert sum(s["count"] for s in seg) == 3000
    assert math.isclose(seg[0]["ppl"], math.e) and math.isclose(seg[-1]["ppl"], math.e ** 2)
    assert split_policy_list("sink:sinks=4,window=1020,window,dense") == ["sink:sinks=4,window=1020", "window", "dense"]
    specs = parse_policies(["sink:sinks=2,window=30,recompute:window=32", "dense"])
    assert [s.label for s in specs] == ["sink:sinks=2,window=30", "recompute:window=32", "dense"]
    with pytest.raises(EvalError):
        parse_policies("nosuch")
    with pytest.raises(EvalError):
        parse_policies("sink:size=3")


def test_cli_writes_json_and_png(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("The creature looked at the moon and said nothing at all. " * 60)
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    r = cli("eval", "ppl", "--model", str(folder), "--text", str(text), "--tokens", "300", "--quiet",
            "--policy", "sink:sinks=4,window=60,window:window=64", "--policy", "dense,recompute:window=64",
            "--sample", "12", "--chunk-size", "32", "--dense-max-tokens", "200",
            "--out", str(out), "--plot", str(png), "--threads", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert png.stat().st_size > 5000
    assert d["tokens"] == 300 and d["targets"] == 299 and d["sample"] == 12
    assert {"machine", "argv", "created", "model", "position_convention", "paired"} <= set(d)
    by = {p["label"]: p for p in d["policies"]}
    assert set(by) == {"sink:sinks=4,window=60", "window:window=64", "dense", "recompute:window=64"}
    assert by["dense"]["tokens_streamed"] == 200 and by["dense"]["positions_evaluated"] == 199
    assert by["recompute:window=64"]["mode"] == "sampled" and by["recompute:window=64"]["positions_evaluated"] == 12
    for p in d["policies"]:
        assert {"ppl", "mean_nll", "segments", "curve", "seconds", "mode"} <= set(p)
        assert sum(s["count"] for s in p["segments"]) == p["positions_evaluated"]
        assert math.isclose(p["ppl"], math.exp(p["mean_nll"]), rel_tol=1e-9)
    assert d["paired"]["ratio_to"] == "recompute:window=64"
    assert d["paired"]["covered"]["sink:sinks=4,window=60"] == 12
    # policies run as separate jobs and merged give the same paired comparison as one run
    a, b = dict(d, policies=d["policies"][:2]), dict(d, policies=d["policies"][2:])
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    m = merge([str(tmp_path / "a.json"), str(tmp_path / "b.json")], str(tmp_path / "m.json"), str(tmp_path / "m.png"))
    assert [p["label"] for p in m["policies"]] == [p["label"] for p in d["policies"]]
    for label, r in d["paired"]["ratio"].items():
        assert math.isclose(m["paired"]["ratio"][label]["ratio"], r["ratio"], rel_tol=1e-4)
    with pytest.raises(EvalError):
        merge([str(tmp_path / "a.json"), str(tmp_path / "a.json")], str(tmp_path / "x.json"), None)
    # bad arguments: one line, exit code 2
    r = cli("eval", "ppl", "--model", str(folder), "--text", str(tmp_path / "missing.txt"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot read" in r.stderr
    r = cli("eval", "ppl", "--text", str(text), "--policy", "nosuch", "--model", str(folder))
    assert r.returncode == 2 and "unknown policy" in r.stderr and "Traceback" not in r.stderr
