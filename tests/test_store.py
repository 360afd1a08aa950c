import json

import numpy as np
import pytest
import torch

from gpu_dsm.io import write_json
from gpu_dsm.store import FeatureStore, StoreWriter


def _write(path, n=5, d=8, order=None):
    data = torch.randn(n, d)
    with StoreWriter(path, [f"im{i}" for i in range(n)], d, {"k": 1}) as w:
        for i in order or range(n):
            w.add_global(i, data[i])
    return data


def test_round_trip_and_subset(tmp_path):
    data = _write(tmp_path / "s", order=[3, 1, 0, 4, 2])
    store = FeatureStore(tmp_path / "s")
    assert store.names == [f"im{i}" for i in range(5)] and store.options == {"k": 1}
    torch.testing.assert_close(store.global_descriptors(), data)
    torch.testing.assert_close(store.global_descriptors([4, 0]), data[[4, 0]])
    assert isinstance(store._global, np.memmap)
    assert store.bytes_per_image() > 8 * 4


def test_interrupted_write_keeps_the_old_store(tmp_path):
    old = _write(tmp_path / "s")
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(tmp_path / "s", ["a", "b"], 8, {}) as w:
            w.add_global(0, torch.zeros(8))
            raise KeyboardInterrupt
    torch.testing.assert_close(FeatureStore(tmp_path / "s").global_descriptors(), old)
    with pytest.raises(RuntimeError, match="1 images were never written"):
        with StoreWriter(tmp_path / "s", ["a", "b"], 8, {}) as w:
            w.add_global(0, torch.zeros(8))
    torch.testing.assert_close(FeatureStore(tmp_path / "s").global_descriptors(), old)
    # what both failed writes finished is staged, and the next write of the same store takes it over
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.partial", "s"]
    with StoreWriter(tmp_path / "s", ["a", "b"], 8, {}) as w:
        assert w.resumed == 1 and w.missing() == [1]
        w.add_global(1, torch.ones(8))
    torch.testing.assert_close(FeatureStore(tmp_path / "s").global_descriptors(), torch.stack([torch.zeros(8), torch.ones(8)]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "no staged write or lock file is left behind"


def test_corrupt_stores_are_named(tmp_path):
    _write(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["num_images"] = 7
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="global.npy has shape"):
        FeatureStore(tmp_path / "s")
    (tmp_path / "s" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json unreadable"):
        FeatureStore(tmp_path / "s")
    _write(tmp_path / "t")
    (tmp_path / "t" / "global.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="cannot read global.npy"):
        FeatureStore(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="not a feature store"):
        FeatureStore(tmp_path)


def test_json_write_is_atomic(tmp_path):
    write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(tmp_path / "r.json", {"a": object()})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _local(n, seed):
    g = torch.Generator().manual_seed(seed)
    frame = torch.zeros(n, 2, 2)
    frame[:, 0, 0], frame[:, 1, 0], frame[:, 1, 1] = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5
    return {"xy": torch.rand(n, 2, generator=g) * 30, "frame": frame, "strength": torch.rand(n, generator=g),
            "channel": torch.randint(0, 1280, (n,), generator=g), "scale": torch.randint(0, 3, (n,), generator=g)}


def test_local_features_round_trip_and_subset(tmp_path):
    counts = [5, 0, 12, 3]
    local = [_local(n, i) for i, n in enumerate(counts)]
    sizes = torch.tensor([[32, 24], [23, 17], [16, 12]])
    with StoreWriter(tmp_path / "s", ["a", "b", "c", "d"], 4, {}, local={"scales": [1, 0.7, 0.5], "num_channels": 1280}) as w:
        for i in [2, 0, 3, 1]:  # any order
            w.add_global(i, torch.zeros(4))
            w.add_local(i, local[i], sizes * (i + 1))
    store = FeatureStore(tmp_path / "s")
    assert store.has_local
    feats = store.local_features()
    assert feats.counts.tolist() == counts and feats.scales == (1.0, 0.7, 0.5) and feats.num_channels == 1280
    for i, n in enumerate(counts):
        got = feats.image(i)
        for key in ("xy", "frame", "strength", "channel", "scale"):
            torch.testing.assert_close(got[key], local[i][key])
        assert torch.equal(feats.map_sizes[i], sizes * (i + 1))
    sub = store.local_features([3, 2])
    assert sub.counts.tolist() == [3, 12]
    torch.testing.assert_close(sub.image(1)["xy"], local[2]["xy"])
    assert store.bytes_per_image() < 4 * 4 + 27 * 20 + 1200
    with pytest.raises(ValueError, match="no local features"):
        _write(tmp_path / "g")
        FeatureStore(tmp_path / "g").local_features()


def test_corrupt_local_offsets(tmp_path):
    with StoreWriter(tmp_path / "s", ["a"], 4, {}, local={"scales": [1], "num_channels": 8}) as w:
        w.add_global(0, torch.zeros(4))
        w.add_local(0, _local(3, 0), torch.tensor([[4, 4]]))
    np.save(tmp_path / "s" / "local_count.npy", np.array([9], dtype=np.int32))
    with pytest.raises(ValueError, match="point outside"):
        FeatureStore(tmp_path / "s")
