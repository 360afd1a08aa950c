"""An interrupted store write resumes: only the missing images are described again, and the
store is identical, file for file, to an uninterrupted write's."""
import pytest
import torch

from gpu_dsm.global_descriptors import GlobalConfig, describe_images
from gpu_dsm.detect import DetectorConfig, detect_images
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.store import FeatureStore, StoreWriter

pytestmark = pytest.mark.data

EXTRACT = ExtractConfig(image_size=160, scales=(1.0, 0.5), progress=False)


class Crash(Exception):
    """Stands for the process dying in the middle of the write."""


def _write(path, lite0, paths, stop_after=None, stop=Crash):
    """Describe the images the writer still misses into the store at ``path`` (global descriptors
    and DSM local features), as a caller of StoreWriter does; raise ``stop`` after ``stop_after``
    images. Returns the indices described and the number of images the writer took over."""
    described = []
    resumed = []
    names = [p.name for p in paths]
    local = {"scales": list(EXTRACT.scales), "num_channels": lite0.out_channels}
    dim = GlobalConfig().resolve(lite0).descriptor_dim(lite0.out_channels)
    with StoreWriter(path, names, dim, {"extract": "test"}, local=local, chunk_images=2, min_chunk_seconds=0) as writer:
        todo = writer.missing()
        resumed.append(writer.resumed)

        def sink(indices, descriptors, maps_per_image):
            found = detect_images(maps_per_image, DetectorConfig(), False, lite0.activation_bound)
            for j, index in enumerate(indices):
                writer.add_global(todo[index], descriptors[j])
                writer.add_local(todo[index], found[j], torch.tensor([list(m.shape[-2:]) for m in maps_per_image[j]]))
                described.append(todo[index])
                if len(described) == stop_after:
                    raise stop(described, resumed[0])

        describe_images(lite0, [paths[i] for i in todo], sink, EXTRACT)
    return described, resumed[0]


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def photos(mini):
    # database photos of several sizes, so that batches come in another order than the images
    return [mini.image_path(name) for name in mini.imlist[:5]]


def test_an_interrupted_write_resumes_to_the_same_store(tmp_path, lite0, photos, monkeypatch):
    full, _ = _write(tmp_path / "full", lite0, photos)
    assert sorted(full) == list(range(5)) and full != sorted(full), "the batches do not follow the image order"
    reference = _files(tmp_path / "full")
    assert FeatureStore(tmp_path / "full").feature_counts().sum() > 0

    # a crash (nothing of the writer runs after it): only the committed chunks of 2 images survive
    monkeypatch.setattr(StoreWriter, "_keep", StoreWriter._close_files)
    with pytest.raises(Crash):
        _write(tmp_path / "resumed", lite0, photos, stop_after=3)
    monkeypatch.undo()
    staged = tmp_path / ".resumed.partial"
    assert staged.is_dir() and not (tmp_path / "resumed").exists()
    # with bytes the dying process wrote half of: a feature row and a journal record cut short
    with open(staged / "local_xy.bin", "ab") as f:
        f.write(b"\x01\x02\x03")
    with open(staged / "done.rec", "ab") as f:
        f.write(b"\x07" * 5)

    # Ctrl-C (an exception Python sees) keeps every finished image, committed or not
    with pytest.raises(KeyboardInterrupt) as stopped:
        _write(tmp_path / "resumed", lite0, photos, stop_after=1, stop=KeyboardInterrupt)
    second, resumed = stopped.value.args
    assert resumed == 2 and set(second).isdisjoint(full[:2])

    third, resumed = _write(tmp_path / "resumed", lite0, photos)
    assert resumed == 3
    assert sorted(third) == sorted(set(range(5)) - set(full[:2]) - set(second)), "only the missing images are described"
    assert _files(tmp_path / "resumed") == reference  # every array, the metadata, nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "resumed"]


def _global_store(path, names, options, rows, stop=None):
    with StoreWriter(path, names, 4, options, chunk_images=1, min_chunk_seconds=0) as writer:
        for i in writer.missing():
            if i == stop:
                raise KeyboardInterrupt
            writer.add_global(i, rows[i])
        return writer.resumed


def test_only_the_same_write_is_resumed_and_never_twice_at_once(tmp_path):
    rows = torch.randn(4, 4)
    names = ["a", "b", "c", "d"]
    with pytest.raises(KeyboardInterrupt):
        _global_store(tmp_path / "s", names, {"k": 1}, rows, stop=2)
    # a second writer of the store while the first runs is refused (one line)
    with StoreWriter(tmp_path / "s", names, 4, {"k": 1}) as first:
        assert first.resumed == 2 and first.missing() == [2, 3]
        with pytest.raises(RuntimeError, match=r"store .*s is being written by another process \(lock .*\.s\.partial\.lock\)"):
            with StoreWriter(tmp_path / "s", names, 4, {"k": 1}):
                pass
        first.add_global(2, rows[2])
        first.add_global(3, rows[3])
    torch.testing.assert_close(FeatureStore(tmp_path / "s").global_descriptors(), rows)
    # other options (another store at the same path): the staged write is discarded, not taken over
    with pytest.raises(KeyboardInterrupt):
        _global_store(tmp_path / "t", names, {"k": 1}, rows, stop=3)
    assert _global_store(tmp_path / "t", names, {"k": 2}, rows) == 0
    assert FeatureStore(tmp_path / "t").options == {"k": 2}
    with pytest.raises(KeyboardInterrupt):
        _global_store(tmp_path / "u", names, {"k": 1}, rows, stop=3)
    with StoreWriter(tmp_path / "u", names, 4, {"k": 1}, resume=False) as fresh:
        assert fresh.resumed == 0 and fresh.missing() == [0, 1, 2, 3]
        for i in range(4):
            fresh.add_global(i, rows[i])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s", "t", "u"]
