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
