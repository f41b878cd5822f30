"""`streamkv bench`: latency/RSS points per policy, dense stops at its cap, sink vs recompute, files."""
import json

from eval_helpers import cli, save_tiny


def test_bench_json_schema_and_plot(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = cli("bench", "--model", str(folder), "--policy", "sink:sinks=4,window=60,dense,recompute:window=64",
            "--points", "40,150,400", "--decode-steps", "3", "--recompute-steps", "2", "--dense-max-tokens", "200",
            "--chunk-size", "64", "--quiet", "--out", str(out), "--plot", str(png), "--threads", "1", "--in-process")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert png.stat().st_size > 5000
    assert {"machine", "points", "policies", "summary", "isolated"} <= set(d) and d["isolated"] is False
    assert {"cpu", "torch", "torch_threads", "loadavg"} <= set(d["machine"])
    by = {p["label"]: p for p in d["policies"]}
    sink, dense, rec = by["sink:sinks=4,window=60"], by["dense"], by["recompute:window=64"]
    assert [q["position"] for q in sink["points"]] == [42, 152, 402]  # point + steps taken there
    assert [q["position"] for q in dense["points"]] == [42, 152] and "cap" in dense["stopped"]
    assert all(q["tokens_cached"] <= 64 for q in sink["points"])
    assert dense["points"][-1]["tokens_cached"] == 152
    assert len({q["cache_bytes"] for q in sink["points"][1:]}) == 1
    for p in d["policies"]:
        for q in p["points"]:
            assert q["ms_per_token"] > 0 and q["rss_bytes"] > 0 and q["steps"] in (2, 3)
        assert p["prefill"]["tokens_per_second"] > 0
    s = d["summary"]
    assert s["sink"]["last_position"] == 402
    assert s["sink_vs_recompute"]["same_window"] is True and len(s["sink_vs_recompute"]["speedup"]) == 3
    # default mode: each policy in its own process (RSS is that policy's alone)
    out2 = tmp_path / "b2.json"
    r = cli("bench", "--model", str(folder), "--policy", "sink:sinks=4,window=60", "--points", "100",
            "--decode-steps", "2", "--quiet", "--out", str(out2), "--plot", "", "--threads", "1")
    assert r.returncode == 0, r.stderr
    d2 = json.loads(out2.read_text())
    assert d2["isolated"] is True and [q["position"] for q in d2["policies"][0]["points"]] == [101]
    r = cli("bench", "--max-tokens", "10", "--points", "500")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_interleaved_mode_measures_every_cell():
    import torch

    from eval_helpers import tiny_model
    from streamkv.evaluation.bench import interleaved
    from streamkv.evaluation.common import parse_policies

    model = tiny_model()
    ids = torch.randint(3, 49152, (700,), generator=torch.Generator().manual_seed(0)).tolist()
    res = interleaved(model, ids, parse_policies("sink:sinks=4,window=60,recompute:window=64"), [100, 600],
                      rounds=3, chunk_size=64, progress=False, recompute_max_tokens=200)
    cells = [(c["label"], c["position"]) for c in res["cells"]]
    assert cells == [("sink:sinks=4,window=60", 100), ("sink:sinks=4,window=60", 600), ("recompute:window=64", 100)]
    assert all(c["steps"] == 3 and c["ms_per_token"] > 0 for c in res["cells"])
    assert res["cells"][0]["ratio_to_first"] == 1.0 and all(c["tokens_cached"] <= 64 for c in res["cells"])


def test_rounds_alternate_engines_in_rotated_order(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    out = tmp_path / "r.json"
    r = cli("bench", "--model", str(folder), "--policy", "sink:sinks=4,window=60,window:window=64", "--points", "100",
            "--decode-steps", "2", "--rounds", "2", "--quiet", "--out", str(out), "--plot", "", "--threads", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert [(p["label"], p["round"]) for p in d["policies"]] == [
        ("sink:sinks=4,window=60", 0), ("window:window=64", 0), ("window:window=64", 1), ("sink:sinks=4,window=60", 1)]


def test_peer_is_refused_clearly_when_it_cannot_run(tmp_path, monkeypatch):
    """--peer llamacpp: a model other than the embedded one has no GGUF here; without llama-cpp-python the error
    says how to install it. Checked before any model is loaded."""
    import sys

    import pytest

    from streamkv.evaluation import peer

    folder = save_tiny(tmp_path / "tiny")
    r = cli("bench", "--model", str(folder), "--peer", "llamacpp", "--points", "100", "--quiet", "--out",
            str(tmp_path / "p.json"), "--plot", "")
    assert r.returncode != 0 and "drop --model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.json").exists()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what an environment without the extra has
    with pytest.raises(peer.PeerError, match=r"needs llama-cpp-python.*pip install 'streamkv\[peer\]'"):
        peer.check("llamacpp", None)


def test_vs_peer_summary_is_the_median_over_rounds():
    from streamkv.evaluation.bench import summarise

    def entry(label, policy, ms, tps):
        return {"label": label, "policy": policy, "budget": 1024, "prefill": {"tokens_per_second": tps},
                "points": [{"position": 2001, "ms_per_token": ms, "ms_per_token_median": ms, "rss_bytes": 1,
                            "tokens_cached": 1024, "cache_bytes": 1}]}

    res = {"policies": [entry("sink", "sink", 30, 900), entry("llamacpp", "llamacpp", 15, 300),
                        entry("sink", "sink", 20, 1000), entry("llamacpp", "llamacpp", 10, 200),
                        entry("sink", "sink", 25, 800), entry("llamacpp", "llamacpp", 12, 250)]}
    vs = summarise(res)["vs_peer"]
    assert list(vs) == ["sink"]
    assert vs["sink"]["rounds"] == 3
    assert vs["sink"]["points"] == [{"position": 2001, "ms_per_token": 25, "peer_ms_per_token": 12, "ratio": 25 / 12}]
    assert vs["sink"]["prefill_ratio"] == 900 / 250
