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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"], "no temporary directory is left behind"


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
