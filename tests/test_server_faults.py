"""Crash/fault loop and load mix of issue #12, short versions (the long ones: benchmarks/server_reliability.py).
Real server processes, real kill -9, real damaged files."""
from __future__ import annotations

import random

import pytest
from server_helpers import Server, dir_bytes, fault_loop, load_mix, tiny_model  # noqa: F401

from streamkv.server.faults import POINTS, _parse

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


def test_kill_9_at_every_step_of_the_commit_protocol_loses_no_acknowledged_turn(tiny_model, tmp_path):  # noqa: F811
    """The crash points of store.py's commit protocol, each hit on purpose (a random kill almost never lands
    between a snapshot write and its commit): the server SIGKILLs itself there, is restarted, and every
    acknowledged turn is intact and every session continues as an uninterrupted one would."""
    data = tmp_path / "data"
    result = fault_loop(tiny_model, data, len(POINTS), random.Random(5), "--policy", POLICY, "--chunk-size", "16",
                        damage_every=0, crash_points=POINTS)
    assert [h["point"].split(":")[0] for h in result["crash_points"]] == list(POINTS), result
    assert all(h["killed_itself"] for h in result["crash_points"]), result  # each point was really reached
    assert result["turns_lost"] == 0 and result["sessions_diverged"] == 0, result
    assert result["turns_acknowledged"] > len(POINTS), result
    leftovers = [p.name for p in (data / "snapshots").iterdir() if not p.name.endswith(".pt")]
    assert not leftovers, leftovers  # temp files of interrupted writes are swept at start-up


def test_crash_point_spec_is_checked():
    with pytest.raises(ValueError, match="unknown crash point"):
        _parse("snapshot-wrote:1")
    with pytest.raises(ValueError, match="positive integer"):
        _parse("turn-committed:0")
    assert _parse("turn-committed") == ("turn-committed", 1) and _parse(None) is None
