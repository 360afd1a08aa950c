"""DSMRetrieval is the method: the evaluation harness ranks exactly as the module does, the module
drops in after any network, and its learned state travels with it."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from conftest import TINY
from gpu_dsm.asmk import ASMKConfig
from gpu_dsm.cli import main
from gpu_dsm.detect import DetectorConfig
from gpu_dsm.diffusion import DiffusionConfig
from gpu_dsm.eval.datasets import RevisitopDataset
from gpu_dsm.eval.run import RunConfig, evaluate_dataset
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.how import HOWConfig
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.whitening import fit_pca_whitening

REPO = Path(__file__).resolve().parents[1]


def _small(initial: str = "asmk") -> dict:
    """Settings small enough for the CPU: 160 px, two scales, a 16-word codebook."""
    return dict(extract=ExtractConfig(image_size=160, scales=(1.0, 0.75), progress=False),
                how=HOWConfig(image_size=160, num_features=60, progress=False),
                asmk=ASMKConfig(codebook_size=16, kmeans_iterations=3), initial=initial)


def test_the_harness_ranks_exactly_as_the_module_for_every_method(tiny_root, tmp_path, lite0):
    """``gpu-dsm evaluate`` (stores, caches) and DSMRetrieval from images in memory give the same
    ranking of every method, on real photos."""
    small = _small()
    cfg = RunConfig(data_root=str(tiny_root), dataset=TINY, retrieval=RetrievalConfig(diffusion=DiffusionConfig(), **small),
                    cache_dir=str(tmp_path / "cache"))
    report = evaluate_dataset(cfg, log=lambda *a: None)
    expected = {"global", "global+dsm", "global+D", "global+dsm+D", "asmk", "asmk+dsm", "asmk+dsm+D"}
    assert set(report["results"]) == expected

    dataset = RevisitopDataset.load(tiny_root, TINY)
    retrieval = DSMRetrieval(lite0, RetrievalConfig(diffusion=DiffusionConfig(), **small))
    retrieval.fit_asmk(dataset.database_specs())
    index = retrieval.index(dataset.database_specs())
    result = retrieval.search(dataset.query_specs(), index)
    assert set(result.methods) == expected and result.method == "asmk+dsm+D"
    for name in expected:
        assert result.methods[name].tolist() == report["results"][name]["ranks"], name
    assert torch.equal(result.ranks, result.methods["asmk+dsm+D"]) and result.ranks.shape == (2, 8)
    # the methods differ somewhere, or the comparison above could not tell them apart
    assert len({tuple(map(tuple, r.tolist())) for r in result.methods.values()}) > 2

    # saved and loaded, the module and its index rank as the harness does
    retrieval.save(tmp_path / "saved", index)
    loaded = DSMRetrieval.load(tmp_path / "saved", lite0)
    after = loaded.search(dataset.query_specs(), loaded.load_index(tmp_path / "saved"))
    for name in expected:
        assert after.methods[name].tolist() == report["results"][name]["ranks"], name
    # each initial ranking given from outside goes through the same later stages
    queries = retrieval.describe(dataset.query_specs(), is_query=True)
    for initial in ("global", "asmk"):
        stage = result.stages[initial]
        given = retrieval.rerank(queries, index, stage.scores, stage.ranks)
        for later in ("dsm", "dsm+D"):
            assert given.methods[f"given+{later}"].tolist() == report["results"][f"{initial}+{later}"]["ranks"], initial


def test_a_saved_module_with_whitening_and_codebook_ranks_identically(lite0, mini, tmp_path):
    small = _small()
    cfg = RetrievalConfig(diffusion=DiffusionConfig(), **small)
    database, queries = mini.database_specs()[:6], mini.query_specs()[:2]
    learner = DSMRetrieval(lite0, dataclasses.replace(cfg, initial="global"))
    whitening = fit_pca_whitening(learner.index(database).global_descriptors, dim=4)
    retrieval = DSMRetrieval(lite0, cfg, whitening=whitening).fit_asmk(database)
    keys = retrieval.state_dict().keys()
    assert {"learned.whitening_projection", "learned.whitening_bias", "learned.how_whitening_projection",
            "learned.codebook"} <= set(keys)
    before = retrieval.search(queries, retrieval.index(database))
    torch.save(retrieval.state_dict(), tmp_path / "module.pt")

    restored = DSMRetrieval(lite0, cfg)
    assert restored.whitening is None and restored.codebook is None
    restored.load_state_dict(torch.load(tmp_path / "module.pt"))
    torch.testing.assert_close(restored.whitening.projection, whitening.projection, rtol=0, atol=0)
    after = restored.search(queries, restored.index(database))
    assert restored.learned.whitening().output_dim == 4
    for name, ranks in before.methods.items():
        assert torch.equal(ranks, after.methods[name]), name


def test_drop_in_after_a_torchvision_trunk_as_written(mini):
    """The example of the docs, verbatim: a random-weight resnet18 trunk, 10 database images, 2 queries."""
    from gpu_dsm import DiffusionConfig as DC, ExtractConfig as EC, RetrievalConfig as RC, DSMRetrieval as DR
    from gpu_dsm import fit_pca_whitening as fit

    database_paths = [str(mini.image_path(name)) for name in mini.imlist[:10]]
    query_paths = [str(mini.image_path(name)) for name in mini.qimlist[:2]]
    torch.manual_seed(0)
    trunk = nn.Sequential(*list(torchvision.models.resnet18(weights=None).children())[:-2]).eval()
    cfg = RC(extract=EC(image_size=320), diffusion=DC())
    retrieval = DR(trunk, cfg)
    index = retrieval.index(database_paths)
    result = retrieval.search(query_paths, index)
    assert result.ranks.shape == (2, 10)
    assert all(sorted(row) == list(range(10)) for row in result.ranks.tolist())
    assert retrieval.backbone.stride == 32 and retrieval.backbone.out_channels == 512
    W = fit(index.global_descriptors)
    assert any("whiten" in k for k in DR(trunk, cfg, whitening=W).state_dict())


class _TimmStyle(nn.Module):
    """timm's convention: ``forward_features`` gives the maps, ``forward`` the logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x).mean((2, 3)))


def test_drop_in_after_a_timm_style_module_and_from_activation_tensors():
    torch.manual_seed(0)
    net = _TimmStyle().eval()
    cfg = RetrievalConfig(extract=ExtractConfig(image_size=64, scales=(1.0,), progress=False))
    retrieval = DSMRetrieval(net, cfg)
    assert retrieval.backbone.stride == 4 and retrieval.backbone.out_channels == 32
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (64, 48, 3), dtype=np.uint8) for _ in range(3)]
    described = retrieval.describe(images)
    assert described.global_descriptors.shape == (3, 32) and described.local.num_images == 3
    # the same images as activations, in each accepted form, describe identically
    with torch.no_grad():
        maps = [retrieval.backbone(torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255) for im in images]
    per_image = [[m[0]] for m in maps]
    from_lists = retrieval.describe(per_image)
    torch.testing.assert_close(from_lists.global_descriptors, described.global_descriptors)
    assert torch.equal(from_lists.local.counts, described.local.counts)
    batch = torch.cat(maps[:2])  # equal sizes: one (B, K, H, W) tensor
    from_tensor = retrieval.describe(batch)
    torch.testing.assert_close(from_tensor.global_descriptors, described.global_descriptors[:2])
    from_scales = retrieval.describe([batch])
    assert torch.equal(from_scales.local.xy, from_tensor.local.xy)
    with pytest.raises(ValueError, match="per image a list of"):
        retrieval.describe_activations([m[0] for m in maps])


def test_a_module_that_does_not_give_maps_is_named():
    with pytest.raises(TypeError, match=r"\(B, K, h, w\) activation maps"):
        DSMRetrieval(torchvision.models.resnet18(weights=None))
    with pytest.raises(TypeError, match="nn.Module"):
        DSMRetrieval(lambda x: x)


def test_a_retrieval_checkpoint_brings_its_learned_whitening_into_the_module(tmp_path):
    from gpu_dsm.backbones import build_backbone, save_retrieval_checkpoint

    torch.manual_seed(0)
    net = build_backbone("resnet18", weights="none")
    rng = np.random.default_rng(0)
    lw = {"m": rng.normal(size=(512, 1)) * 0.01, "P": rng.normal(size=(64, 512))}
    save_retrieval_checkpoint(net, tmp_path / "c.pth", gem_p=3.0, learned_whitening={"sfm": {"ms": lw, "ss": lw}})
    retrieval = DSMRetrieval(build_backbone("resnet18", weights=str(tmp_path / "c.pth")))
    assert retrieval.whitening_label == "checkpoint Lw[sfm][ms]" and retrieval.whitening.output_dim == 64
    torch.testing.assert_close(retrieval.state_dict()["learned.whitening_projection"],
                               torch.as_tensor(lw["P"], dtype=torch.float32))
    none = DSMRetrieval(build_backbone("resnet18", weights=str(tmp_path / "c.pth")), whitening="none")
    assert none.whitening is None


def test_an_empty_database_is_named_and_no_queries_give_an_empty_ranking():
    torch.manual_seed(0)
    retrieval = DSMRetrieval(_TimmStyle().eval(), RetrievalConfig(
        extract=ExtractConfig(image_size=64, scales=(1.0,), progress=False), diffusion=DiffusionConfig()))
    with pytest.raises(ValueError, match="database is empty"):
        retrieval.index([])
    rng = np.random.default_rng(0)
    index = retrieval.index([rng.integers(0, 255, (64, 48, 3), dtype=np.uint8) for _ in range(4)])
    result = retrieval.search([], index)
    assert result.ranks.shape == (0, 4) and all(r.shape == (0, 4) for r in result.methods.values())


def test_paper_rerank_overrides_are_validated(tiny_root, tmp_path, capsys):
    base = ["evaluate", "--data-root", str(tiny_root), "--dataset", TINY, "--cache-dir", str(tmp_path / "c"),
            "--rerank", "dsm", "--paper-rerank"]
    assert main(base + ["--top-k", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_k must be >= 1" in err
    for flag, value in (("--threshold", "3"), ("--error", "one_way"), ("--score", "fused")):
        assert main(base + [flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"cannot be combined with {flag}" in err
    assert not (tmp_path / "c").exists(), "nothing was extracted"


def test_the_shells_leave_ranking_to_the_library():
    """No ranking, verification, seeding, diffusion or graph building outside the library."""
    names = (r"(spatial_verify|DSMReranker|rerank_top_k|rerank_by_inliers|dsm_seeds|plain_seeds|diffuse|diffuse_initial|"
             r"diffuse_verified|diffusion_ranking|build_knn_graph|similarity_topk|GlobalIndex|stable_top|conjugate_gradient)")
    forbidden = re.compile(rf"\b{names}\s*\(|^\s*(from|import)\b.*\b{names}\b|\b(index|asmk|search_index)\.search\(")
    for path in ("eval/run.py", "eval/asmk_initial.py", "gpu_dsm/cli.py"):
        found = [line.strip() for line in (REPO / path).read_text().splitlines()
                 if forbidden.search(line) and not line.strip().startswith(("#", '"', "'"))]
        assert not found, f"{path}: {found}"


def test_nothing_shipped_imports_the_tests():
    for folder in ("gpu_dsm", "eval", "kernels"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert "sys.path" not in text, path
            assert not re.search(r"^\s*(from|import) (tests|reference_\w+|conftest)\b", text, re.M), path


def test_the_detector_takes_a_batch_tensor_or_one_per_scale():
    from gpu_dsm.detect import DSMDetector, detect

    torch.manual_seed(0)
    cfg = DetectorConfig(activation_bound=6.0)
    big, small = torch.rand(2, 8, 12, 14) * 6, torch.rand(2, 8, 8, 9) * 6
    lists = detect([[big[0], small[0]], [big[1], small[1]]], cfg, scales=(1.0, 0.7))
    per_scale = detect([big, small], cfg, scales=(1.0, 0.7))
    for name in ("xy", "frame", "channel", "scale", "valid", "map_sizes"):
        assert torch.equal(getattr(lists, name), getattr(per_scale, name)), name
    one = DSMDetector(cfg)(big)
    assert one.num_images == 2 and torch.equal(one.counts, detect([[big[0]], [big[1]]], cfg).counts)
    with pytest.raises(ValueError, match=r"got a tensor of shape \(7, 9\)"):
        detect(torch.rand(7, 9), cfg)


def test_show_match_ranks_as_evaluate_does_with_a_learned_whitening(tiny_root, tmp_path):
    """show-match's rank-r candidate is evaluate's rank-r image, also when a learned whitening
    re-orders the global ranking."""
    from gpu_dsm.eval.show_match import show_match
    from gpu_dsm.store import FeatureStore

    cache = tmp_path / "cache"
    extract = ExtractConfig(image_size=128, scales=(1.0,), progress=False)
    plain = evaluate_dataset(RunConfig(data_root=str(tiny_root), dataset=TINY, retrieval=RetrievalConfig(extract=extract),
                                       cache_dir=str(cache)), log=lambda *a: None)
    database = next(p for p in cache.iterdir() if p.is_dir() and "-database-" in p.name)
    whitening = fit_pca_whitening(FeatureStore(database).global_descriptors(), dim=3)
    whitening.save(tmp_path / "w.pt")
    cfg = RunConfig(data_root=str(tiny_root), dataset=TINY, retrieval=RetrievalConfig(extract=extract),
                    whitening=str(tmp_path / "w.pt"), cache_dir=str(cache))
    whitened = evaluate_dataset(cfg, log=lambda *a: None)["results"]["global"]["ranks"]
    assert whitened != plain["results"]["global"]["ranks"], "the whitening re-orders the ranking"
    for query in range(2):
        for rank in (1, 2, 5):
            shown = show_match(cfg, query, rank, tmp_path / f"m{query}{rank}.png", log=lambda *a: None)
            assert shown["candidate"] == whitened[query][rank - 1]


def test_the_extraction_batch_size_follows_the_device():
    from gpu_dsm.extract import default_batch_size

    assert default_batch_size("cpu") == 1
    assert default_batch_size(torch.device("cuda:1")) == 16 and default_batch_size("meta") == 16


def test_an_approximate_top_k_is_completed_to_a_full_ranking():
    """What an approximate index does not return follows in database order; its -1 ("no result") is dropped."""
    from gpu_dsm.ranking import complete_ranking

    scores, ranks = complete_ranking(torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.2, -1.0]]),
                                     torch.tensor([[3, 0, 2], [4, 1, -1]]), 6)
    assert ranks.tolist() == [[3, 0, 2, 1, 4, 5], [4, 1, 0, 2, 3, 5]]
    assert scores[0, :3].tolist() == pytest.approx([0.9, 0.5, 0.1]) and torch.isinf(scores[1, 2:]).all()


def test_truncated_diffusion_in_the_module(lite0, mini):
    """Truncation at R = N is the whole-graph solve (every method ranks alike); at R < N the images
    past each query's top R keep the order of the ranking diffusion refines."""
    full_cfg = RetrievalConfig(diffusion=DiffusionConfig(dtype=torch.float64, tol=1e-12, max_iter=300),
                               **_small(initial="global"))
    database, queries = mini.database_specs()[:12], mini.query_specs()[:2]
    retrieval = DSMRetrieval(lite0, full_cfg)
    index, described = retrieval.index(database), retrieval.describe(queries, is_query=True)
    full = retrieval.search(described, index)

    def truncated(r: int):
        cfg = dataclasses.replace(full_cfg, diffusion=dataclasses.replace(full_cfg.diffusion, truncation_size=r))
        return DSMRetrieval(lite0, cfg).search(described, index)

    every = truncated(12)
    for name, ranks in full.methods.items():
        assert torch.equal(ranks, every.methods[name]), name
    top10 = truncated(10)
    assert torch.equal(top10.methods["global+D"][:, 10:], full.methods["global"][:, 10:])
    # past each query's top 10 diffusion scores nothing: those images keep the order of the
    # ranking diffusion refines (the fused score's similarity term follows it)
    assert torch.equal(top10.methods["global+dsm+D"][:, 10:], full.methods["global+dsm"][:, 10:])
