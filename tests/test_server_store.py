"""The commit protocol of the server's store (no server process needed)."""
import torch

from streamkv.server.store import Store


def test_commit_point_and_orphan_sweep(tmp_path):
    store = Store(tmp_path)
    store.create_session("sess_x", "owner", "tiny", {"name": "sink", "params": {}}, {})
    store.write_snapshot("sess_x", 1, {"t": torch.arange(3)})
    store.commit_turn("sess_x", 1, "chat", 10, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    # a crash after writing the next snapshot but before its transaction: the file is an orphan
    store.write_snapshot("sess_x", 2, {"t": torch.arange(5)})
    (store.snap_dir / ".sess_x.partial.tmp").write_bytes(b"half a file")
    store.close()

    store = Store(tmp_path)  # restart
    assert store.sweep_orphans() == 2
    meta = store.get_session("sess_x")
    assert meta["version"] == 1 and meta["n_turns"] == 2 and meta["tokens_seen"] == 10
    assert torch.equal(store.read_snapshot("sess_x", 1)["t"], torch.arange(3))
    assert [p.name for p in store.snap_dir.iterdir()] == ["sess_x.1.pt"]
    assert [t["content"] for t in store.turns("sess_x")] == ["a", "b"]
    # the next commit replaces the previous snapshot file
    store.write_snapshot("sess_x", 2, {"t": torch.arange(7)})
    store.commit_turn("sess_x", 2, "chat", 20, [{"role": "user", "content": "c"}])
    assert [p.name for p in store.snap_dir.iterdir()] == ["sess_x.2.pt"]
    store.delete_session("sess_x")
    assert store.get_session("sess_x") is None and store.turns("sess_x") == []
    assert list(store.snap_dir.iterdir()) == []
    store.close()


def test_snapshots_are_verified_and_the_turn_log_round_trips(tmp_path):
    import os
    import shutil
    import stat

    import pytest

    from streamkv.server.store import SnapshotError, StoreError

    store = Store(tmp_path)
    for sid in ("sess_a", "sess_b"):
        store.create_session(sid, "owner", "tiny", {"name": "sink", "params": {}}, {})
    record = {"runs": [[16, 2], [1, 5]], "ids": list(range(37)), "after": {"messages": [], "messages_fed": 0,
                                                                          "prompt_tokens": 0, "kind": "text"}}
    for sid in ("sess_a", "sess_b"):
        size = store.write_snapshot(sid, 1, {"t": torch.arange(4)})
        store.commit_turn(sid, 1, "text", 37, [{"role": "prompt", "content": "x"}], record, size)
    assert store.feed_log("sess_a") == [{"version": 1, **record}]
    assert store.get_session("sess_a")["snapshot_bytes"] == size and store.get_session("sess_a")["log_bytes"] > 148
    assert store.owner_usage("owner")[0] == 2
    assert stat.S_IMODE(os.stat(tmp_path / "streamkv.sqlite3").st_mode) == 0o600
    assert stat.S_IMODE(store.snapshot_path("sess_a", 1).stat().st_mode) == 0o600

    a, b = store.snapshot_path("sess_a", 1), store.snapshot_path("sess_b", 1)
    shutil.copy(b, a)  # foreign: a valid snapshot of another session
    with pytest.raises(SnapshotError, match="belongs to sess_b"):
        store.read_snapshot("sess_a", 1)
    data = b.read_bytes()
    b.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit in the payload
    store.check_snapshot("sess_b", 1)  # the cheap start-up check cannot see it ...
    with pytest.raises(SnapshotError, match="checksum"):
        store.read_snapshot("sess_b", 1)  # ... the checksum on load does
    b.unlink()
    assert [sid for sid, _ in store.damaged_snapshots()] == ["sess_a", "sess_b"]
    store.close()

    (tmp_path / "streamkv.sqlite3").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"streamkv.sqlite3{suffix}").unlink(missing_ok=True)
    with pytest.raises(StoreError, match="damaged"):
        Store(tmp_path)
