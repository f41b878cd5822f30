"""Crash/fault loop and load mix of issue #12, short versions (the long ones: benchmarks/server_reliability.py).
Real server processes, real kill -9, real damaged files."""
from __future__ import annotations

import random

from server_helpers import Server, dir_bytes, fault_loop, load_mix, tiny_model  # noqa: F401

POLICY = "sink:sinks=4,window=40"


def test_kill_9_at_random_moments_loses_no_acknowledged_turn(tiny_model, tmp_path):  # noqa: F811
    result = fault_loop(tiny_model, tmp_path / "data", 3, random.Random(12), "--policy", POLICY,
                        "--chunk-size", "16", damage_every=1)
    assert result["turns_acknowledged"] > 3, result
    assert result["turns_lost"] == 0 and result["sessions_diverged"] == 0, result


def test_load_mix_no_5xx_bounded_memory_and_disk(tiny_model, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    srv = Server(tiny_model, data, "--policy", POLICY, "--max-resident-sessions", "6", "--max-cache-mb", "64",
                 "--max-tokens-cap", "4000").start()
    try:
        rss0 = srv.http().get("/health").json()["rss_bytes"]
        result = load_mix(srv, 8.0, 8, random.Random(3))
        assert result["statuses"].get("5xx", 0) == 0 and not result["five_xx"], result
        assert result["sessions_mixed_or_lost"] == 0, result
        assert result["turns_acknowledged"] >= 8, result
        assert result["peak_rss_bytes"] < rss0 + result["max_cache_bytes"] + (256 << 20), result
        assert dir_bytes(data) < 8 * 256 * (1 << 20)  # under the per-session disk quotas
        assert srv.http().get("/health").json()["status"] == "ok"
    finally:
        srv.stop()
