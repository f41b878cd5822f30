"""`streamkv bench`: latency/RSS points per policy, dense stops at its cap, sink vs recompute, files."""
import json

from eval_helpers import cli, save_tiny


def test_bench_json_schema_and_plot(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    r = cli("bench", "--model", str(folder), "--policy", "sink:sinks=4,window=60,dense,recompute:window=64",
            "--points", "40,150,400", "--decode-steps", "3", "--recompute-steps", "2", "--dense-max-tokens", "200",
            "--chunk-size", "64", "--quiet", "--out", str(out), "--plot", str(png), "--threads", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert png.stat().st_size > 5000
    assert {"machine", "points", "policies", "summary", "isolated"} <= set(d) and d["isolated"] is True
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
    r = cli("bench", "--max-tokens", "10", "--points", "500")
    assert r.returncode == 2 and "Traceback" not in r.stderr
