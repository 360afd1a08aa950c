"""Reliability and security: no silent garbage, no code from a file, errors before the work.

Most tests run the real command line on a tiny revisitop set made of roxford5k-mini photos
(2 queries, 8 database images, 128 px, one scale), so that a whole run takes a second.
"""
import errno
import json
import os
import pickle
import shutil
import stat
import threading
import time
import warnings

import numpy as np
import pytest
import torch

from gpu_dsm.backbones import build_backbone, bundled_weights_path
from gpu_dsm.cli import main
from gpu_dsm.eval.datasets import RevisitopDataset
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.io import FileLock, torch_save, write_json
from gpu_dsm.pipeline import RetrievalConfig
from gpu_dsm.store import FeatureStore, StoreWriter

from conftest import TINY


def _args(root, cache, *extra):
    return ["evaluate", "--data-root", str(root), "--dataset", TINY, "--image-size", "128", "--scales", "1",
            "--cache-dir", str(cache), "--no-progress", "--device", "cpu", *extra]


def _stores(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []


class _Evil:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (shutil.copyfile, (os.devnull, self.marker))


# --- wrong results without a word ---------------------------------------------------------------

def test_overwritten_weights_file_is_not_served_from_the_cache(tiny_root, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    shutil.copy(bundled_weights_path("efficientnet_lite0"), weights)
    cache, out = tmp_path / "cache", tmp_path / "r.json"
    args = _args(tiny_root, cache, "--weights", str(weights), "--out", str(out))
    assert main(args) == 0
    first = json.loads(out.read_text())
    capsys.readouterr()
    assert main(args) == 0 and capsys.readouterr().out.count("reusing") == 2
    # overwrite the weights in place with other (random) weights of the same architecture
    torch.save(build_backbone("efficientnet_lite0", weights="none").features.state_dict(), weights)
    assert main(args) == 0
    assert "reusing" not in capsys.readouterr().out
    second = json.loads(out.read_text())
    assert first["options"]["weights_sha256"] != second["options"]["weights_sha256"]
    assert len(_stores(cache)) == 4
    # an image replaced in place (same name) is not served from the cache either
    dataset = RevisitopDataset.load(tiny_root, TINY)
    image = dataset.image_path(dataset.imlist[0])
    from PIL import Image

    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 1 and "queries: reusing" in printed


def test_non_finite_values_are_refused_in_stores_and_search(tmp_path):
    from gpu_dsm.knn import similarity_topk

    with pytest.raises(ValueError, match=r"image 1 \(b\) has 1 NaN/Inf"):
        with StoreWriter(tmp_path / "s", ["a", "b"], 4, {}) as w:
            w.add_global(0, torch.ones(4))
            w.add_global(1, torch.tensor([1.0, float("nan"), 0, 0]))
    assert not (tmp_path / "s").exists()
    with StoreWriter(tmp_path / "s", ["a", "b", "c"], 4, {}, local={"scales": [1.0], "num_channels": 8}) as w:
        for i in range(3):
            w.add_global(i, torch.ones(4) / 2)
            frame = torch.eye(2).expand(2, 2, 2).clone()
            w.add_local(i, {"xy": torch.rand(2, 2), "frame": frame, "strength": torch.ones(2),
                            "channel": torch.tensor([1, 2]), "scale": torch.zeros(2, dtype=torch.long)},
                        torch.tensor([[4, 4]]))
    # corrupt the files behind the store's back, as a crash or another tool could
    descriptors = np.load(tmp_path / "s" / "global.npy", mmap_mode="r+")
    descriptors[2, 0] = np.nan
    descriptors.flush()
    del descriptors
    xy = np.load(tmp_path / "s" / "local_xy.npy", mmap_mode="r+")
    xy[1, 0] = np.inf
    xy.flush()
    del xy
    store = FeatureStore(tmp_path / "s")
    with pytest.raises(ValueError, match=r"global\.npy has 1 rows with NaN/Inf"):
        store.global_descriptors()
    torch.testing.assert_close(store.global_descriptors([0, 1]), torch.ones(2, 4) / 2)
    with pytest.raises(ValueError, match=r"local_xy\.npy has 1 rows with NaN/Inf"):
        store.local_features([0, 1])
    assert store.local_features([1, 2]).num_images == 2
    with pytest.raises(ValueError, match=r"global\.npy has 1 of 3 rows with NaN/Inf"):
        store.validate()
    # a NaN query or database row: an error, not the database order or a NaN ranked first
    db = torch.nn.functional.normalize(torch.rand(5, 4), dim=1)
    with pytest.raises(ValueError, match="queries contains 1 NaN/Inf"):
        similarity_topk(torch.tensor([[float("nan"), 0, 0, 1.0]]), db)
    db[3, 1] = float("nan")
    with pytest.raises(ValueError, match="database contains 1 NaN/Inf"):
        similarity_topk(db[:1].nan_to_num(), db)
    scores, idx = similarity_topk(np.eye(4, dtype=np.float32)[:2], np.eye(4, dtype=np.float32))
    assert idx[:, 0].tolist() == [0, 1]


def _write_gnd(root, gnd, imlist=("a", "b", "c"), qimlist=("q",)):
    (root / "x" / "jpg").mkdir(parents=True, exist_ok=True)
    for name in (*imlist, *qimlist):
        (root / "x" / "jpg" / f"{name}.jpg").write_bytes(b"")
    with open(root / "x" / "gnd_x.pkl", "wb") as f:
        pickle.dump({"imlist": list(imlist), "qimlist": list(qimlist), "gnd": gnd}, f)


@pytest.mark.parametrize("entry, message", [
    ({"easy": [0, 3], "hard": [], "junk": []}, r"query 0 \(q\): 'easy' holds indices outside 0\.\.2.*\[3\]"),
    ({"easy": [0], "hard": [-1], "junk": []}, r"query 0 \(q\): 'hard' holds indices outside.*\[-1\]"),
    ({"easy": [0], "hard": [1]}, r"query 0 \(q\): ground truth has no 'junk' list"),
    ({"easy": [0.5], "hard": [], "junk": []}, r"'easy' must hold integer image indices"),
    ({"easy": [0], "hard": [], "junk": [], "bbx": [10, 0, 5, 9]}, r"'bbx' must be \[x0, y0, x1, y1\]"),
])
def test_ground_truth_is_validated(tmp_path, entry, message):
    _write_gnd(tmp_path, [entry])
    with pytest.raises(ValueError, match=message):
        RevisitopDataset.load(tmp_path, "x")


def test_ground_truth_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"
    _write_gnd(tmp_path, [{"easy": [0], "hard": [], "junk": [], "x": _Evil(marker)}])
    with pytest.raises(ValueError, match="refusing to load global shutil.copyfile"):
        RevisitopDataset.load(tmp_path, "x")
    assert not marker.exists()
    _write_gnd(tmp_path, [{"easy": np.array([0, 1]), "hard": np.array([], dtype=np.int64), "junk": [2],
                           "bbx": np.array([0.0, 0.0, 4.0, 4.0])}])
    assert RevisitopDataset.load(tmp_path, "x").gnd[0]["easy"].tolist() == [0, 1]


def test_results_json_is_strict(tmp_path):
    write_json(tmp_path / "r.json", {"ap": [float("nan"), 0.5, np.float64("inf")], "n": np.int64(3), "t": (1.0,)})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(token):
        raise ValueError(f"bare {token} in JSON")

    assert json.loads(text, parse_constant=refuse) == {"ap": [None, 0.5, None], "n": 3, "t": [1.0]}


def test_diffusion_settings_are_validated_and_non_convergence_is_said(tiny_root, tmp_path, capsys):
    from gpu_dsm.diffusion import ConvergenceWarning, DiffusionConfig, conjugate_gradient, diffuse
    from gpu_dsm.graph import GraphConfig

    for alpha in (1.0, 1.5, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
            DiffusionConfig(alpha=alpha)
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        DiffusionConfig(max_iter=0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        GraphConfig(gamma=-1)
    s = torch.eye(3).to_sparse_csr()
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\)"):
        conjugate_gradient(s, torch.ones(3, 1), alpha=1.2)
    # a ring graph: one CG iteration does not reach 1e-6
    n = 12
    ring = torch.zeros(n, n)
    for i in range(n):
        ring[i, (i + 1) % n] = ring[(i + 1) % n, i] = 0.5
    seeds = torch.zeros(n, 2)
    seeds[0, 0] = seeds[5, 1] = 1.0
    with pytest.warns(ConvergenceWarning, match=r"stopped after 1 iterations with 2 of 2 queries above tol"):
        diffuse(ring.to_sparse_csr(), seeds, DiffusionConfig(max_iter=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        diffuse(ring.to_sparse_csr(), seeds, DiffusionConfig(max_iter=100))
    # on the command line: a bad alpha is one line and exit 2; non-convergence one warning line
    assert main(_args(tiny_root, tmp_path / "cache", "--diffusion", "--alpha", "1.5")) == 2
    assert "alpha must lie in (0, 1), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()
    assert main(_args(tiny_root, tmp_path / "cache", "--rerank", "none", "--diffusion", "--graph-k", "3",
                      "--cg-iterations", "1")) == 0
    err = capsys.readouterr().err
    assert "gpu-dsm evaluate: warning: diffusion: conjugate gradient stopped after 1 iterations" in err
    assert len(err.strip().splitlines()) == 1


def test_reranker_checks_its_inputs():
    from gpu_dsm.features import LocalFeatures
    from gpu_dsm.rerank import DSMReranker

    g = torch.Generator().manual_seed(0)

    def table(b):
        per = []
        for _ in range(b):
            frame = torch.eye(2).expand(6, 2, 2).clone()
            per.append({"xy": torch.rand(6, 2, generator=g) * 8, "frame": frame, "strength": torch.rand(6, generator=g),
                        "channel": torch.randint(0, 3, (6,), generator=g), "scale": torch.zeros(6, dtype=torch.long)})
        return LocalFeatures.from_images(per, torch.full((b, 1, 2), 10), (1.0,), 3)

    queries, candidates = table(2), table(6)
    sims = torch.rand(2, 3, generator=g)
    indices = torch.tensor([[5, 3, 1], [0, 2, 4]])
    reranker = DSMReranker()
    expected = reranker(queries, candidates, sims, indices)
    with pytest.raises(ValueError, match=r"indices \(like similarities\) must have shape \(2, 3\), got \(3, 2\)"):
        reranker(queries, candidates, sims, indices.T.contiguous())
    with pytest.raises(ValueError, match=r"indices \(like similarities\) must have shape \(2, 3\), got \(6,\)"):
        reranker(queries, candidates, sims, indices.flatten())
    with pytest.raises(ValueError, match="similarities contains 1 NaN/Inf"):
        reranker(queries, candidates, sims.index_put((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"))), indices)
    with pytest.raises(TypeError, match="indices must hold int values"):
        reranker(queries, candidates, sims, indices.float())
    with pytest.raises(TypeError, match="query_features must be LocalFeatures"):
        reranker(sims, candidates, sims, indices)
    from_numpy = reranker(queries, candidates, sims.numpy(), indices.numpy())
    assert torch.equal(from_numpy.indices, expected.indices) and torch.equal(from_numpy.inliers, expected.inliers)


def test_detector_takes_the_activation_bound_from_the_config_or_backbone(lite0, mini):
    from gpu_dsm.detect import DSMDetector, DetectorConfig, detect
    from gpu_dsm.extract import ExtractConfig, extract_activations

    maps = extract_activations(lite0, [mini.database_paths[0]], ExtractConfig(image_size=512, scales=(1.0,), progress=False))
    assert float(maps[0][0].max()) <= 6.0
    with pytest.warns(UserWarning, match=r"rounding them gives 7 grey levels.*activation_bound"):
        unbounded = detect(maps, DetectorConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_config = detect(maps, DetectorConfig(activation_bound=lite0.activation_bound))
        from_backbone = DSMDetector.from_backbone(lite0)(maps)
        explicit = detect(maps, DetectorConfig(), activation_bound=6.0)
    assert int(from_config.counts.sum()) > 2 * int(unbounded.counts.sum())
    for other in (from_backbone, explicit):
        assert torch.equal(other.xy, from_config.xy) and torch.equal(other.channel, from_config.channel)


# --- security ----------------------------------------------------------------------------------

def test_crafted_weights_file_does_not_run_code(tiny_root, tmp_path, capsys):
    marker = tmp_path / "ran"
    state = build_backbone("efficientnet_lite0", weights="none").state_dict()
    torch.save({**state, "payload": _Evil(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"holds a shutil\.copyfile object.*--trust-weights-file"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "evil.pth")
    assert not marker.exists()
    # the same through the command line: one line, exit 2, nothing ran
    assert main(["extract", "--data-root", str(tiny_root), "--dataset", TINY, "--out", str(tmp_path / "o"),
                 "--weights", str(tmp_path / "evil.pth"), "--image-size", "128", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a shutil.copyfile object" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists() and _stores(tmp_path / "o") == []
    # trusted explicitly: unpickled in full, with a warning (the payload runs: that is what trust means)
    with pytest.warns(UserWarning, match="can run arbitrary code"), pytest.raises(ValueError, match="unexpected"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "evil.pth", trust_weights_file=True)
    assert marker.exists()
    # graph and whitening files are read without code either
    from gpu_dsm.whitening import Whitening

    marker.unlink()
    torch.save({"format": "gpu_dsm.whitening/1", "projection": _Evil(marker)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="cannot read whitening file"):
        Whitening.load(tmp_path / "w.pt")
    assert not marker.exists()


def test_cirtorch_checkpoint_with_numpy_whitening_loads_safely(tmp_path):
    source = build_backbone("resnet50", weights="none")
    d = source.out_channels
    learned = {"m": np.random.rand(d, 1), "P": np.eye(d)[:32]}
    ckpt = {"epoch": 10, "state_dict": {**{f"features.{k}": v for k, v in source.features.state_dict().items()},
                                          "pool.p": torch.tensor([3.2])},
            "meta": {"architecture": "resnet50", "pooling": "gem", "whitening": False, "mean": [0.485, 0.456, 0.406],
                     "std": [0.229, 0.224, 0.225], "outputdim": d, "Lw": {"retrieval-SfM-120k": {"ss": learned, "ms": learned}}},
            "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(1e-6)}]}}
    torch.save(ckpt, tmp_path / "cirtorch.pth")
    loaded = build_backbone("resnet50", weights=tmp_path / "cirtorch.pth")
    assert loaded.head.gem_p == pytest.approx(3.2) and loaded.head.post_whitening(3)[1].output_dim == 32


def test_written_files_take_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
        torch_save(tmp_path / "t.pt", {"a": 1})
        with StoreWriter(tmp_path / "s", ["a"], 4, {}) as w:
            w.add_global(0, torch.ones(4))
        os.umask(0o002)
        write_json(tmp_path / "g.json", {"a": 1})
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "r.json") == 0o644 and mode(tmp_path / "t.pt") == 0o644
    assert mode(tmp_path / "s") == 0o755 and mode(tmp_path / "s" / "global.npy") == 0o644
    assert mode(tmp_path / "g.json") == 0o664


# --- errors before the work --------------------------------------------------------------------

def test_output_paths_are_checked_before_any_work(tiny_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "a_dir")], "--out"),
        (["--out", str(tmp_path / "a_file" / "r.json")], "is not a directory"),
        (["--rerank", "dsm", "--plot-inliers", str(tmp_path / "a_dir")], "--plot-inliers"),
    ]
    for extra, message in cases:
        assert main(_args(tiny_root, cache, *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
        assert not cache.exists(), "nothing was extracted"
    assert main(_args(tiny_root, tmp_path / "a_file")) == 2
    assert "--cache-dir" in capsys.readouterr().err
    assert main(["extract", "--data-root", str(tiny_root), "--dataset", TINY, "--out", str(tmp_path / "a_file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_bad_queries_devices_and_backends_are_reported_before_extraction(tiny_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    gnd_path = tiny_root / TINY / f"gnd_{TINY}.pkl"
    with open(gnd_path, "rb") as f:
        cfg = pickle.load(f)
    original = [list(g["bbx"]) for g in cfg["gnd"]]
    cfg["gnd"][1]["bbx"] = [5000.0, 5000.0, 6000.0, 6000.0]
    with open(gnd_path, "wb") as f:
        pickle.dump(cfg, f)
    assert main(_args(tiny_root, cache)) == 2
    err = capsys.readouterr().err
    assert f"query 1 ({cfg['qimlist'][1]})" in err and "empty inside its" in err and not cache.exists()
    cfg["gnd"][1]["bbx"] = [0.0, 0.0, 20.0, 20.0]
    cfg["gnd"][0]["bbx"] = original[0]
    with open(gnd_path, "wb") as f:
        pickle.dump(cfg, f)
    assert main(_args(tiny_root, cache, "--no-upscale")) == 2
    err = capsys.readouterr().err
    assert "query 1" in err and "smaller than efficientnet_lite0 needs (32 px per side)" in err and not cache.exists()
    if not torch.cuda.is_available():
        assert main(_args(tiny_root, cache)[:-2] + ["--device", "cuda"]) == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err and not cache.exists()
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert main(_args(tiny_root, cache, "--diffusion", "--graph-backend", "faiss")) == 2
        assert "needs the faiss-cpu package" in capsys.readouterr().err and not cache.exists()


def test_interrupt_keeps_completed_stores_and_a_corrupt_cache_is_rebuilt(tiny_root, tmp_path, capsys, monkeypatch):
    import gpu_dsm.eval.run as run

    real = run.write_store

    def interrupted_on_queries(*args, is_query=False, **kwargs):
        if is_query:
            raise KeyboardInterrupt
        return real(*args, is_query=is_query, **kwargs)

    cache = tmp_path / "cache"
    monkeypatch.setattr(run, "write_store", interrupted_on_queries)
    assert main(_args(tiny_root, cache)) == 130
    assert capsys.readouterr().err.strip() == "gpu-dsm evaluate: interrupted; completed stores kept"
    (database,) = _stores(cache)
    assert "-database-" in database and FeatureStore(cache / database).num_images == 8
    monkeypatch.setattr(run, "write_store", real)
    assert main(_args(tiny_root, cache)) == 0
    assert "database: reusing" in capsys.readouterr().out
    (cache / database / "global.npy").write_bytes(b"truncated")
    assert main(_args(tiny_root, cache)) == 0
    out = capsys.readouterr().out
    assert "cannot read global.npy" in out and "rebuilding it" in out and "queries: reusing" in out
    assert FeatureStore(cache / database).global_descriptors().shape[0] == 8


def test_two_runs_on_one_cache_extract_each_store_once(tiny_root, tmp_path, monkeypatch):
    import gpu_dsm.eval.run as run

    real, calls = run.write_store, []

    def slow_write(*args, **kwargs):
        calls.append(kwargs.get("is_query"))
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "write_store", slow_write)
    cache = tmp_path / "cache"
    logs: list[list[str]] = [[], []]
    reports = [None, None]

    def evaluate(i):
        extract = ExtractConfig(image_size=128, scales=(1.0,), progress=False)
        cli_cfg = run.RunConfig(data_root=str(tiny_root), dataset=TINY, cache_dir=str(cache),
                                retrieval=RetrievalConfig(extract=extract, rerank=None))
        reports[i] = run.evaluate_dataset(cli_cfg, log=logs[i].append)

    threads = [threading.Thread(target=evaluate, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert sorted(calls) == [False, True], "each store was extracted once"
    assert any("waiting for another run" in line for line in logs[1])
    assert sum("reusing" in line for line in logs[1]) == 2
    assert reports[0]["results"]["global"]["ranks"] == reports[1]["results"]["global"]["ranks"]


def test_global_only_run_reuses_the_local_feature_store(tiny_root, tmp_path, capsys, monkeypatch):
    import gpu_dsm.eval.run as run

    cache = tmp_path / "cache"
    assert main(_args(tiny_root, cache, "--rerank", "dsm")) == 0
    capsys.readouterr()

    def no_network(cfg):
        raise AssertionError("the network ran although the local-feature stores hold the global descriptors")

    monkeypatch.setattr(run, "make_backbone", no_network)
    assert main(_args(tiny_root, cache)) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    assert len(_stores(cache)) == 2


def test_file_lock_excludes_a_second_holder(tmp_path):
    waited = []
    with FileLock(tmp_path / "l"):
        done = threading.Event()

        def second():
            with FileLock(tmp_path / "l", on_wait=waited.append):
                done.set()

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        assert not done.is_set() and waited == [tmp_path / "l"]
    t.join(5)
    assert done.is_set()


def test_a_killed_runs_unfinished_store_is_removed_when_the_store_is_next_built(tiny_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(_args(tiny_root, cache)) == 0
    database = next(p for p in cache.iterdir() if p.is_dir() and "-database-" in p.name)
    shutil.rmtree(database)
    leftover = cache / f".{database.name}.k1ll3d.tmp"  # what atomic_directory leaves after a SIGKILL
    leftover.mkdir()
    (leftover / "global.npy").write_bytes(b"half written")
    capsys.readouterr()
    assert main(_args(tiny_root, cache)) == 0
    printed = capsys.readouterr().out
    assert f"removing {leftover.name}, an unfinished store of a run that was killed" in printed
    assert not leftover.exists() and (database / "meta.json").is_file()


class _FullDisk:
    """The local feature files of the stores whose path holds ``where`` share ``room`` bytes; a
    write past them fails as on a full disk: ``OSError(ENOSPC)``, which names no file. (The
    journal's few bytes still fit.)"""

    def __init__(self, room: int, where: str = ""):
        self.room, self.where = room, where

    def open(self, file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        limited = "a" in mode and str(file).endswith(".bin") and self.where in str(file)
        return _Limited(f, self) if limited else f


class _Limited:
    def __init__(self, file, disk):
        self._file, self._disk = file, disk

    def write(self, data):
        if len(data) > self._disk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)


def _store_files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_full_disk_names_the_store_and_the_rerun_resumes_to_the_same_store(tiny_root, tmp_path, capsys, monkeypatch):
    import gpu_dsm.store as store_module

    def extract(out):
        return main(["extract", "--data-root", str(tiny_root), "--dataset", TINY, "--out", str(out), "--image-size", "128",
                     "--scales", "1", "--no-progress", "--device", "cpu"])

    assert extract(tmp_path / "whole") == 0
    whole = {name: _store_files(tmp_path / "whole" / name) for name in _stores(tmp_path / "whole")}
    (database,) = [name for name in whole if "-database-" in name]
    counts = FeatureStore(tmp_path / "whole" / database).feature_counts()
    per_feature = sum(np.load(tmp_path / "whole" / database / f"local_{name}.npy", mmap_mode="r")[:1].nbytes
                      for name in ("xy", "frame", "strength", "channel", "scale"))
    assert counts.min() > 0
    capsys.readouterr()

    # the disk fills during the last image of the database, whichever it is
    room = (int(counts.sum()) - int(counts.min()) // 2) * per_feature
    monkeypatch.setattr(store_module, "open", _FullDisk(room, "-database-").open, raising=False)
    assert extract(tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    target = tmp_path / "o" / database
    assert err.startswith("gpu-dsm extract: error: No space left on device while writing store ")
    assert f"store {target} (staged in {tmp_path / 'o' / f'.{database}.partial'}" in err and len(err.splitlines()) == 1
    assert not target.exists() and (tmp_path / "o" / f".{database}.partial" / "done.rec").stat().st_size > 0

    # room again: the rerun takes the committed images over and publishes the same stores
    monkeypatch.undo()
    assert extract(tmp_path / "o") == 0
    assert "resuming an interrupted write" in capsys.readouterr().out
    assert _stores(tmp_path / "o") == sorted(whole)
    for name, files in whole.items():
        assert _store_files(tmp_path / "o" / name) == files, name

    # straight from the writer: the errno stays, the store is named, the staged write is kept
    names = ["a", "b", "c"]
    monkeypatch.setattr(store_module, "open", _FullDisk(20).open, raising=False)
    with pytest.raises(OSError) as full:
        with StoreWriter(tmp_path / "s", names, 4, {}, local={"scales": [1.0], "num_channels": 8}, chunk_images=1,
                         min_chunk_seconds=0) as writer:
            for i in writer.missing():
                writer.add_global(i, torch.ones(4))
                writer.add_local(i, {"xy": torch.ones(2, 2), "frame": torch.eye(2).repeat(2, 1, 1),
                                     "strength": torch.ones(2), "channel": torch.zeros(2, dtype=torch.long),
                                     "scale": torch.zeros(2, dtype=torch.long)}, torch.tensor([[4, 4]]))
    assert full.value.errno == errno.ENOSPC and f"while writing store {tmp_path / 's'} " in str(full.value)
    assert (tmp_path / ".s.partial").is_dir() and not (tmp_path / "s").exists()


def test_memory_mapped_store_files_have_their_blocks_reserved(tmp_path):
    """A store written through memory maps on a full disk would die of SIGBUS: the blocks are
    reserved when the file is created, where a full disk is an OSError naming the store."""
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this system")
    with StoreWriter(tmp_path / "s", ["a", "b"], 4096, {}, local={"scales": [1.0], "num_channels": 8}) as writer:
        staged = tmp_path / ".s.partial" / "global.npy"
        assert staged.stat().st_blocks * 512 >= staged.stat().st_size  # not sparse
        for i in writer.missing():
            writer.add_global(i, torch.ones(4096))
            writer.add_local(i, {"xy": torch.ones(3000, 2), "frame": torch.eye(2).repeat(3000, 1, 1),
                                 "strength": torch.ones(3000), "channel": torch.zeros(3000, dtype=torch.long),
                                 "scale": torch.zeros(3000, dtype=torch.long)}, torch.tensor([[4, 4]]))
    for name in ("global.npy", "local_xy.npy", "local_frame.npy"):
        st = (tmp_path / "s" / name).stat()
        assert st.st_blocks * 512 >= st.st_size, name


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "vgg16"])
def test_backbones_without_bundled_weights_say_which_to_pass(name):
    with pytest.raises(ValueError) as built:
        build_backbone(name)
    message = str(built.value)
    assert "\n" not in message and message.startswith(f"{name} has no bundled weights")
    assert "--weights PATH" in message and "weights=PATH" in message and "--weights none" in message
    assert "https://download.pytorch.org/models/" in message  # torchvision's ImageNet state dict
    if name != "resnet18":  # cnnimageretrieval-pytorch publishes no ResNet-18 retrieval network
        assert "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/" in message
    with pytest.raises(ValueError) as path:
        bundled_weights_path(name)
    assert str(path.value) == message
    with pytest.raises(ValueError, match="unknown backbone 'resnet34'"):
        bundled_weights_path("resnet34")


def test_random_weights_are_said(data_root, tmp_path, capsys):
    with pytest.warns(UserWarning, match=r"resnet18 has random weights \(weights='none'\)"):
        build_backbone("resnet18", weights="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_backbone("efficientnet_lite0")
    # the command line: one line, exit 2, before any work
    cache = tmp_path / "cache"
    args = ["evaluate", "--data-root", str(data_root), "--dataset", "roxford5k-mini", "--cache-dir", str(cache),
            "--device", "cpu", "--backbone", "resnet50"]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpu-dsm evaluate: error: resnet50 has no bundled weights"), captured
    assert not cache.exists()


@pytest.mark.parametrize("score", ["fused", "inliers"])
@pytest.mark.parametrize("q,k", [(2, 0), (0, 3), (0, 0)])
def test_reranker_with_no_candidates_or_no_queries_returns_an_empty_result(q, k, score):
    from gpu_dsm.features import LocalFeatures
    from gpu_dsm.rerank import DSMReranker, RerankConfig, rerank_scores

    def table(b):
        per = [{"xy": torch.rand(4, 2) * 8, "frame": torch.eye(2).expand(4, 2, 2).clone(), "strength": torch.rand(4),
                "channel": torch.randint(0, 3, (4,)), "scale": torch.zeros(4, dtype=torch.long)} for _ in range(b)]
        return LocalFeatures.from_images(per, torch.full((b, 1, 2), 10), (1.0,), 3)

    result = DSMReranker(RerankConfig(score=score))(table(q), table(q * k), torch.zeros(q, k),
                                                     torch.zeros(q, k, dtype=torch.long))
    for name in ("indices", "scores", "inliers", "order"):
        assert tuple(getattr(result, name).shape) == (q, k), name
    assert result.indices.dtype == torch.long and result.scores.dtype == torch.float64
    assert result.match.inliers.shape == (0,) and tuple(result.initial_order_inliers().shape) == (q, k)
    assert tuple(rerank_scores(torch.zeros(q, k), torch.zeros(q, k), score).shape) == (q, k)


def test_file_lock_leaves_no_file_and_never_two_holders(tmp_path):
    path = tmp_path / "cache" / ".key.lock"
    with FileLock(path):
        assert path.is_file()
    assert not path.exists()
    with pytest.raises(RuntimeError, match="failed run"):
        with FileLock(path):
            raise RuntimeError("failed run")
    assert not path.exists()
    # threads hammering one lock (flock excludes separate opens, also within a process): a holder
    # removes the file before releasing it, and the waiters that held the removed file retry
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker():
        try:
            for _ in range(40):
                with FileLock(path):
                    with guard:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0.0005)
                    with guard:
                        inside[0] -= 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and most[0] == 1 and inside[0] == 0
    assert not path.exists() and list(path.parent.iterdir()) == []
