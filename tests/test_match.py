"""Batched spatial matching against the plain reference matcher, on real and synthetic tables."""
import math

import numpy as np
import pytest
import torch

from gpu_dsm.detect import DetectorConfig, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.features import LocalFeatures
from gpu_dsm.match import MatchConfig, spatial_verify, tentative_correspondences
from gpu_dsm.rerank import DSMReranker, RerankConfig, rerank_scores
from gpu_dsm.reference.match import verify_pair


@pytest.fixture(scope="module")
def real_tables(mini, lite0):
    """Two real queries against 10 database images (positives of each, negatives of both) at 640 px."""
    cfg = ExtractConfig(image_size=640, progress=False)
    queries = [0, 4]
    cands = []
    for q in queries:
        g = mini.gnd[q]
        cands += (list(g["easy"]) + list(g["hard"]))[:3]
    negatives = [i for i in range(len(mini.imlist)) if all(i not in mini.gnd[q]["easy"] + mini.gnd[q]["hard"] for q in queries)]
    cands += negatives[:4]
    qa = extract_activations(lite0, [mini.query_specs()[q] for q in queries], cfg)
    ca = extract_activations(lite0, [mini.database_specs()[i] for i in cands], cfg)
    qf = detect(qa, DetectorConfig(), is_query=True, scales=cfg.scales, activation_bound=6.0)
    cf = detect(ca, DetectorConfig(), is_query=False, scales=cfg.scales, activation_bound=6.0)
    # every query against every candidate
    n = cf.num_images
    query_index = torch.arange(2).repeat_interleave(n)
    candidates = LocalFeatures.cat([cf, cf])
    return qf, candidates, query_index


def _np(d):
    return {k: v.numpy() for k, v in d.items()}


@pytest.mark.parametrize("cfg", [MatchConfig(), MatchConfig(threshold=4.0), MatchConfig(error="one_way", threshold=3.0)])
def test_batched_equals_reference_on_real_tables(real_tables, cfg):
    qf, cf, qi = real_tables
    result = spatial_verify(qf, cf, qi, cfg)
    expected = [verify_pair(_np(qf.image(int(qi[p]))), _np(cf.image(p)), threshold=cfg.threshold,
                            symmetric=cfg.error == "symmetric") for p in range(cf.num_images)]
    assert result.inliers.tolist() == expected
    assert max(expected) >= 4, "real pairs with a real geometric match"
    # winners are consistent: transform finite where inliers, scale pair in range, matches listed
    has = result.inliers > 0
    assert torch.isfinite(result.transform[has]).all() and torch.isnan(result.transform[~has]).all()
    assert ((result.scale_pair[has] >= 0) & (result.scale_pair[has] < 3)).all()
    for p in torch.nonzero(has).flatten().tolist():
        m = result.matches[p]
        m = m[m[:, 0] >= 0]
        assert len(m) >= result.inliers[p]
        assert (qf.channel[qi[p], m[:, 0]] == cf.channel[p, m[:, 1]]).all()


def test_memory_budget_does_not_change_results(real_tables):
    qf, cf, qi = real_tables
    a = spatial_verify(qf, cf, qi, MatchConfig(backend="torch"))
    b = spatial_verify(qf, cf, qi, MatchConfig(max_elements=5000, backend="torch"))  # the tensor passes' budget
    assert torch.equal(a.inliers, b.inliers) and torch.equal(a.scale_pair, b.scale_pair)
    assert torch.equal(a.matches, b.matches)


def _synthetic_pair(n=40, seed=0, transform=(1.3, 0.2, 0.8, 5.0, -3.0)):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 30
    frame = torch.zeros(n, 2, 2)
    frame[:, 0, 0] = torch.rand(n, generator=g) + 0.5
    frame[:, 1, 0] = torch.randn(n, generator=g) * 0.2
    frame[:, 1, 1] = torch.rand(n, generator=g) + 0.5
    a, b, c, tx, ty = transform
    T = torch.tensor([[a, 0.0], [b, c]])
    q = {"xy": xy, "frame": frame, "strength": torch.ones(n), "channel": torch.arange(n), "scale": torch.zeros(n, dtype=torch.long)}
    cand = dict(q, xy=xy @ T.T + torch.tensor([tx, ty]), frame=T @ frame)
    sizes = torch.tensor([[[40, 40]]])
    return (LocalFeatures.from_images([q], sizes, (1.0,), n), LocalFeatures.from_images([cand], sizes, (1.0,), n))


def test_recovers_a_known_transform():
    q, c = _synthetic_pair()
    res = spatial_verify(q, c)
    assert res.inliers.tolist() == [40]
    torch.testing.assert_close(res.transform[0], torch.tensor([1.3, 0.2, 0.8, 5.0, -3.0], dtype=torch.float64), atol=1e-4, rtol=0)
    # shuffled channels: only chance agreements among 40 wrong correspondences remain
    c.channel[0] = c.channel[0].flip(0)
    assert spatial_verify(q, c).inliers.item() < 6
    # no shared channel at all: zero inliers, no winner
    c.channel[0] += 100
    res = spatial_verify(q, c)
    assert res.inliers.tolist() == [0] and res.scale_pair.tolist() == [[-1, -1]]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_scale_gate(backend, native_kernel):
    """An inlier's own area change relative to the hypothesis' lies within
    ``[1 / max_scale_change, max_scale_change]``, bounds included."""
    q, c = _synthetic_pair(transform=(1.0, 0.0, 1.0, 0.0, 0.0))
    c.frame[0, :20] *= 2.0  # area change 4 relative to the identity (exact in float32)

    def inliers(max_scale_change):
        cfg = MatchConfig(max_scale_change=max_scale_change, backend=backend)
        return spatial_verify(q, c, config=cfg).inliers.tolist()

    assert inliers(3.0) == [20]  # 4 > 3: the 20 fail the gate
    assert inliers(3.999) == [20]
    assert inliers(4.0) == [40]  # on the bound: inside
    assert inliers(5.0) == [40]
    q.frame[0, :20] *= 2.0  # the other way round: area change 1/4
    c.frame[0, :20] /= 2.0
    assert inliers(3.999) == [20] and inliers(4.0) == [40]


def test_empty_and_mismatched_inputs():
    q, c = _synthetic_pair()
    empty = LocalFeatures.empty(3, 1, (1.0,), 40)
    res = spatial_verify(q, empty, torch.zeros(3, dtype=torch.long))
    assert res.inliers.tolist() == [0, 0, 0] and res.correspondences.tolist() == [0, 0, 0]
    res = spatial_verify(LocalFeatures.empty(1, 1, (1.0,), 40), c)
    assert res.inliers.tolist() == [0]
    other = LocalFeatures.from_images([c.image(0)], c.map_sizes, (1.0,), 512)
    with pytest.raises(ValueError, match="different backbones"):
        spatial_verify(q, other)
    with pytest.raises(ValueError, match="on meta"):
        spatial_verify(q, c.to("meta"))
    with pytest.raises(ValueError, match="query_index"):
        spatial_verify(q, c, torch.tensor([3]))
    degenerate = LocalFeatures.from_images([dict(c.image(0), frame=torch.zeros(40, 2, 2))], c.map_sizes, (1.0,), 40)
    assert spatial_verify(q, degenerate).inliers.tolist() == [0]


def test_correspondences_are_same_channel_pairs():
    q, c = _synthetic_pair(n=10)
    c.channel[0, :5] = 3  # five candidate features share channel 3 with query feature 3
    corr = tentative_correspondences(q, c, torch.zeros(1, dtype=torch.long), 1)
    pairs = set(zip(corr["qrow"].tolist(), corr["crow"].tolist()))
    expected = {(i, j) for i in range(10) for j in range(10) if int(q.channel[0, i]) == int(c.channel[0, j])}
    assert pairs == expected and len(corr["qrow"]) == len(expected)


def test_reranker_orders_and_ties():
    q, c = _synthetic_pair()
    noise = dict(c.image(0), channel=c.image(0)["channel"] + 100)  # no shared channel
    cands = LocalFeatures.from_images([noise, c.image(0), noise], c.map_sizes.expand(3, 1, 2), (1.0,), 200)
    q = LocalFeatures.from_images([q.image(0)], q.map_sizes, (1.0,), 200)
    sims = torch.tensor([[0.9, 0.8, 0.7]])
    out = DSMReranker(RerankConfig(score="inliers"))(q, cands, sims, torch.tensor([[10, 11, 12]]))
    assert out.indices.tolist() == [[11, 10, 12]]  # verified first, ties keep the initial order
    assert out.inliers.tolist() == [[40, 0, 0]]
    fused = rerank_scores(torch.tensor([[0, 40, 0]]), sims, "fused", 1.0)
    torch.testing.assert_close(fused, torch.tensor([[1.0, 1.5, 0.0]], dtype=torch.float64))
    partial = DSMReranker(RerankConfig(score="inliers", top_k=1))(q, cands, sims)
    assert partial.indices.tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="do not fit"):
        DSMReranker()(q, cands, torch.ones(1, 2))
