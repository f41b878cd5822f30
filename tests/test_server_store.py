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
