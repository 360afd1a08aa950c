"""The cache folder (gpu_dsm.cache): an artifact is built once and found again, its name follows
everything it depends on, a second run waits for the first and reuses its file, files are written
whole or not at all, and a corrupt file is named and rebuilt. DSMRetrieval with a cache learns,
describes and indexes once, and a second module on the same folder finds it all."""
from __future__ import annotations

import contextlib
import os
import re
import threading
import time

import pytest
import torch

from gpu_dsm.asmk import ASMKConfig
from gpu_dsm.cache import ArtifactCache, StoreRequest, cache_digest, load_codebook, save_codebook
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.how import HOWConfig
from gpu_dsm.images import ImageSpec
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.shards import Ranks


def _codebook_step(cache: ArtifactCache, calls: list, value: float = 1.0, name: str = "asmk-codebook-x.pt"):
    def build():
        calls.append(1)
        return torch.full((4, 3), value)

    return cache.get(name, load_codebook, build, save_codebook, "ASMK codebook", "asmk_codebook_s")


def test_an_artifact_is_built_once_then_found(tmp_path):
    calls, lines = [], []
    cache = ArtifactCache(tmp_path, log=lines.append)
    first = _codebook_step(cache, calls)
    assert calls == [1] and (tmp_path / "asmk-codebook-x.pt").is_file() and cache.timing["asmk_codebook_s"] is not None
    assert _codebook_step(cache, calls) is first and calls == [1], "the same cache returns what it has"
    again = ArtifactCache(tmp_path, log=lines.append)
    found = _codebook_step(again, calls, value=2.0)
    assert calls == [1] and torch.equal(found, first) and again.timing["asmk_codebook_s"] is None
    assert lines[-1] == f"ASMK codebook: reusing {tmp_path / 'asmk-codebook-x.pt'}"
    assert again.name_of(found) == "asmk-codebook-x.pt" and again.name_of(first) is None


def _network(**changes) -> dict:
    network = {"backbone": "efficientnet_lite0", "weights_sha256": "abc", "upsample": False, "dtype": "float32",
               "extract": {"image_size": 1024, "scales": [1.0], "upscale": True}, "global": {"pooling": "gem"},
               "detector": {"threshold": 0.5}, "whitening": None, "rerank": None, "diffusion": None, "device": "cpu"}
    network.update(changes)
    return network


def test_a_store_name_follows_what_the_store_holds(tmp_path, mini):
    specs = mini.database_specs()[:3]
    request = StoreRequest("database", specs, mini.imlist[:3], "roxford5k-mini", mini.root)

    def name(**changes):
        return ArtifactCache(tmp_path, _network(**changes)).store_name(request)

    global_part, full = name()
    assert full.startswith(f"roxford5k-mini-database-efficientnet_lite0-{global_part[-12:]}-")
    # search-time steps never change a store
    assert name(whitening="w.pt", rerank={"top_k": 5}, diffusion={"alpha": 0.9}, device="cuda") == (global_part, full)
    # extraction options, weights and images do; the detector changes only the full name
    assert name(extract={"image_size": 512, "scales": [1.0], "upscale": True})[0] != global_part
    assert name(weights_sha256="def")[0] != global_part
    other_detector = name(detector={"threshold": 0.6})
    assert other_detector[0] == global_part and other_detector[1] != full
    assert name(detector=None) == (global_part, f"{global_part}-global")
    boxed = StoreRequest("database", [ImageSpec(s.source, box=(0, 0, 10, 10)) for s in specs], mini.imlist[:3],
                         "roxford5k-mini", mini.root)
    assert ArtifactCache(tmp_path, _network()).store_name(boxed)[0] != global_part
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(open(specs[0].source, "rb").read())
    moved = StoreRequest("database", [ImageSpec(str(copy)), *specs[1:]], mini.imlist[:3], "roxford5k-mini", mini.root)
    before = ArtifactCache(tmp_path, _network()).store_name(moved)[0]
    os.utime(copy, (1, 1))  # the same file name, another modification time: another store
    assert ArtifactCache(tmp_path, _network()).store_name(moved)[0] not in (before, global_part)


def test_the_codebook_name_follows_its_settings(tmp_path):
    cache = ArtifactCache(tmp_path, log=lambda line: None)
    names = []
    for seed, iterations in ((0, 5), (1, 5), (0, 6), (0, 5)):
        asmk = ASMKConfig(codebook_size=4, kmeans_iterations=iterations, seed=seed)
        features = type("F", (), {"descriptors": torch.ones(2, 3)})()
        cache.codebook([features], 4, asmk, lambda: torch.full((4, 3), float(seed)))
        names.append(sorted(p.name for p in tmp_path.glob("asmk-codebook-*.pt")))
    assert [len(n) for n in names] == [1, 2, 3, 3], "seed and iterations each give a new codebook; the same settings reuse it"
    assert cache_digest({"a": 1, "b": [2]}) == cache_digest({"b": [2], "a": 1})


def test_a_second_run_waits_for_the_first_and_reuses_its_file(tmp_path):
    calls, lines = [], [[], []]
    results = [None, None]

    def run(i):
        cache = ArtifactCache(tmp_path, log=lines[i].append)

        def build():
            calls.append(i)
            time.sleep(0.5)
            return torch.full((4, 3), float(i))

        results[i] = cache.get("asmk-codebook-x.pt", load_codebook, build, save_codebook, "ASMK codebook")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(10)
    assert calls == [0], "built once"
    assert any("ASMK codebook: waiting for another run using this cache" in line for line in lines[1])
    assert lines[1][-1].startswith("ASMK codebook: reusing") and torch.equal(results[0], results[1])
    assert not list(tmp_path.glob(".*.lock"))


def test_the_ranks_of_one_torchrun_job_take_no_lock(tmp_path):
    job = ArtifactCache(tmp_path, ranks=Ranks(rank=1, world=2))
    assert isinstance(job.lock("a.pt", "a"), contextlib.nullcontext)
    assert not isinstance(ArtifactCache(tmp_path).lock("a.pt", "a"), contextlib.nullcontext)


def test_an_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    def half_then_fail(obj, path, *args, **kwargs):
        open(path, "wb").write(b"half a codebook")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _codebook_step(ArtifactCache(tmp_path, log=lambda line: None), [])
    assert list(tmp_path.iterdir()) == [], "neither the file nor a staged copy nor the lock is left"


def test_a_corrupt_file_is_named_and_rebuilt(tmp_path):
    path = tmp_path / "asmk-codebook-x.pt"
    path.write_bytes(b"not a codebook")
    with pytest.raises(ValueError, match=f"cannot read ASMK codebook file {path}"):
        load_codebook(path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match=f"{path} is not a gpu_dsm ASMK codebook file"):
        load_codebook(path)
    save_codebook(torch.tensor([[1.0, float("nan")]]), path)
    with pytest.raises(ValueError, match=f"corrupt ASMK codebook {path}"):
        load_codebook(path)
    calls, lines = [], []
    rebuilt = _codebook_step(ArtifactCache(tmp_path, log=lines.append), calls)
    assert calls == [1] and torch.equal(load_codebook(path), rebuilt)
    assert lines[0] == f"cache: corrupt ASMK codebook {path}; rebuilding it"


def test_a_store_needs_the_networks_options(tmp_path, mini):
    request = StoreRequest("database", mini.database_specs()[:1], mini.imlist[:1], "roxford5k-mini", mini.root)
    with pytest.raises(ValueError, match="feature stores need the network's options"):
        ArtifactCache(tmp_path).stores([request], lambda *args: None)


def test_the_module_learns_describes_and_indexes_once_with_a_cache(tmp_path, lite0, mini):
    cfg = RetrievalConfig(extract=ExtractConfig(image_size=128, scales=(1.0,), progress=False), initial="asmk",
                          how=HOWConfig(image_size=128, num_features=30, progress=False),
                          asmk=ASMKConfig(codebook_size=8, kmeans_iterations=2), diffusion=DiffusionConfig())
    training, database = mini.database_specs()[:3], mini.database_specs()[3:7]
    lines = []
    first = DSMRetrieval(lite0, cfg, cache=ArtifactCache(tmp_path, log=lines.append)).fit_asmk({"train": training})
    index = first.index(database)
    assert first.how_whitening is not None and first.codebook is not None
    kinds = sorted(re.sub(r"-[0-9a-f]{12}\.pt$", "", p.name) for p in tmp_path.glob("*.pt"))
    assert kinds == ["asmk-codebook", "asmk-index", "graph", "how-images", "how-train", "how-whitening-efficientnet_lite0"]
    assert not any("reusing" in line for line in lines)

    lines.clear()
    second = DSMRetrieval(lite0, cfg, cache=str(tmp_path)).fit_asmk({"train": training})
    second.cache.log = lines.append
    again = second.index(database)
    torch.testing.assert_close(second.how_whitening.projection, first.how_whitening.projection, rtol=0, atol=0)
    assert torch.equal(second.codebook, first.codebook) and torch.equal(again.how.descriptors, index.how.descriptors)
    assert torch.equal(again.asmk.offsets, index.asmk.offsets) and torch.equal(again.graph.affinity.to_dense(),
                                                                                index.graph.affinity.to_dense())
    assert [line.split(":")[0] for line in lines] == ["HOW images", "ASMK index", "graph"]
    assert all(": reusing" in line for line in lines)
    plain = DSMRetrieval(lite0, cfg).fit_asmk(training)
    assert torch.equal(plain.codebook, first.codebook), "the cache changes nothing learned"


def test_the_evaluation_leaves_caching_to_the_library():
    """No keys, locks, lookups or artifact files in the harness: it asks gpu_dsm.cache / DSMRetrieval."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    forbidden = re.compile(r"\b(FileLock|cache_digest|content_digest|stat_digest|unfinished_directories|atomic_directory|"
                           r"torch_save|torch_load_checked|load_codebook|save_codebook|train_codebook|fit_how_whitening\(|"
                           r"describe_how\(|KnnGraph\.load|HOWFeatures\.load|ASMKIndex\.load|Whitening\.load|\.glob\()")
    for path in ("eval/run.py", "eval/asmk_initial.py"):
        text = (repo / path).read_text()
        found = [line.strip() for line in text.splitlines() if forbidden.search(line) and "retrieval." not in line]
        assert not found, f"{path}: {found}"
