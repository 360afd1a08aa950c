"""Spatially verified diffusion: confident matches, seeds, fusion and the final ranking, as pure
functions on hand-made cases, against the plain per-query reference, and through the module."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from gpu_dsm.diffusion import (DiffusionConfig, confident_first, confident_matches, diffuse, diffusion_ranking, fused_ranking,
                               fused_scores, plain_seeds,
                               verified_seeds)
from gpu_dsm.graph import GraphConfig, build_knn_graph
from gpu_dsm.ranking import diffuse_initial, diffuse_verified
from gpu_dsm.reference.diffusion import confident_flags, verified_diffusion_ranking
from gpu_dsm.rerank import RerankConfig, rerank_by_inliers

EXACT = dict(dtype=torch.float64, tol=1e-13, max_iter=500)


def _clustered(n, d=32, clusters=12, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return F.normalize(centres[labels] + noise * torch.randn(n, d, generator=g), dim=1), centres, g


def _verified(sims, ranks, inliers, top_k):
    """The default re-ranking of each query's top ``top_k`` from its inliers (initial order)."""
    result = rerank_by_inliers(inliers, sims[:, :top_k], ranks[:, :top_k], RerankConfig(top_k=top_k))
    reranked_ranks = ranks.clone()
    reranked_ranks[:, :top_k] = result.indices
    return result, reranked_ranks


def test_confident_matches_stand_out_from_the_querys_other_candidates():
    inliers = torch.tensor([[5, 4, 20, 6, 5, 4, 6, 5, 5, 4],  # median 5, MAD 1: 13 and 12.5 or more
                            [9, 9, 9, 9, 9, 9, 9, 9, 9, 23],  # MAD 0 counts as 1: 17 and 22.5; 23 is confident
                            [8, 8, 8, 8, 8, 8, 8, 8, 9, 17],  # 16 by the spread, 20 by the ratio: 17 is not
                            [0, 0, 0, 0, 0, 0, 0, 0, 0, 7]])  # 0 + 8 * 1: 7 is not
    expected = torch.tensor([[i == 2 for i in range(10)], [i == 9 for i in range(10)], [False] * 10, [False] * 10])
    assert torch.equal(confident_matches(inliers), expected)
    assert confident_matches(inliers, ratio=0)[2, 9] and not confident_matches(inliers, mads=0)[2, 9]
    assert confident_matches(inliers, mads=0, ratio=0).sum(1).tolist() == [7, 10, 10, 10]  # at or above the median
    for row in inliers.tolist():  # the plain reference, with statistics.median_low
        for mads, ratio in ((8.0, 2.5), (8.0, 0.0), (3.0, 1.5)):
            assert confident_flags(row, mads, ratio) == confident_matches(torch.tensor([row]), mads, ratio).tolist()[0]
    assert confident_matches(torch.zeros(2, 0)).shape == (2, 0)
    with pytest.raises(ValueError, match="mads"):
        confident_matches(inliers, mads=-1)
    with pytest.raises(ValueError, match="ratio"):
        confident_matches(inliers, ratio=float("nan"))


def test_verified_seeds_add_confident_matches_at_the_best_weight():
    sims = torch.tensor([[0.9, 0.8, 0.6, 0.5, 0.4]])
    ranks = torch.tensor([[4, 2, 0, 1, 3]])
    confident = torch.tensor([[False, True, False, True, False]])
    y = verified_seeds(sims, ranks, confident, 6, query_k=2, gamma=2.0)
    expected = torch.zeros(6)
    expected[4], expected[2], expected[1] = 0.81, 0.81, 0.81  # image 2 is a plain seed too: the larger weight
    torch.testing.assert_close(y[:, 0], expected)
    none = verified_seeds(sims, ranks, torch.zeros_like(confident), 6, query_k=2, gamma=2.0)
    assert torch.equal(none, plain_seeds(sims, ranks, 6, query_k=2, gamma=2.0))
    with pytest.raises(TypeError, match="bool"):
        verified_seeds(sims, ranks, confident.int(), 6)
    with pytest.raises(ValueError, match="confident"):
        verified_seeds(sims, ranks, torch.ones(1, 6, dtype=torch.bool), 6)


def test_fused_ranking_is_the_ranking_of_the_fused_scores():
    """Computed on the places of the ranking only, it equals ranking the (N, Q) fused scores: a
    top-M of a larger database and the whole one, truncated scores (zeros, ties), each weight."""
    generator = torch.Generator().manual_seed(0)
    n, q = 300, 5
    for m in (40, n):
        ranks = torch.stack([torch.randperm(n, generator=generator)[:m] for _ in range(q)])
        sims = torch.sort(torch.rand(q, m, generator=generator) * 2 - 0.5, dim=1, descending=True).values
        f = torch.rand(n, q, generator=generator)
        f[torch.rand(n, q, generator=generator) < 0.5] = 0.0  # unreached images tie at 0
        f[:, 0] = 0.0  # a query diffusion reaches nowhere
        for weight in (0.0, 0.5, 0.85):
            expected = diffusion_ranking(fused_scores(f, sims, ranks, weight, 3.0), ranks)
            assert torch.equal(fused_ranking(f, sims, ranks, weight, 3.0), expected)
    with pytest.raises(ValueError, match="weight"):
        fused_ranking(f, sims, ranks, weight=1.0)


def test_fusion_and_confident_first():
    f = torch.tensor([[0.2], [1.0], [0.0], [0.5]])
    sims, ranks = torch.tensor([[0.8, 0.4, 0.2, 0.0]]), torch.tensor([[0, 3, 1, 2]])
    fused = fused_scores(f, sims, ranks, weight=0.5, gamma=1.0)
    torch.testing.assert_close(fused[:, 0], torch.tensor([0.1 + 0.5, 0.5 + 0.125, 0.0, 0.25 + 0.25]))
    torch.testing.assert_close(fused_scores(f, sims, ranks, weight=0.0), f / 1.0)
    assert torch.equal(fused_scores(torch.zeros(4, 1), sims, ranks, 0.5, 1.0)[:, 0], torch.tensor([0.5, 0.125, 0.0, 0.25]))
    with pytest.raises(ValueError, match="weight"):
        fused_scores(f, sims, ranks, weight=1.0)
    ranking = torch.tensor([[5, 1, 3, 0, 2, 4]])
    assert confident_first(ranking, torch.tensor([[0, 3, 1]]), torch.tensor([[True, False, True]])).tolist() == [[0, 1, 5, 3, 2, 4]]
    assert torch.equal(confident_first(ranking, torch.tensor([[0, 3]]), torch.zeros(1, 2, dtype=torch.bool)), ranking)


def test_one_strong_match_and_four_weak_ones_keep_the_strong_match_first():
    """The paper's seeds weigh a true match with 40 inliers nearly like four non-matches with
    4-6 (inliers / max * similarity), and its final ranking is the diffusion order alone: the
    cluster of the weak ones wins. Verified seeds keep the strong match first."""
    x, centres, g = _clustered(300, seed=2)
    query = F.normalize(centres[0] + 0.3 * torch.randn(centres.shape[1], generator=g), dim=0)
    sims, ranks = (query[None] @ x.T).sort(dim=1, descending=True)
    graph = build_knn_graph(x, GraphConfig(k=10))
    k = 100
    # the strong match: an image of another cluster, far down the initial ranking
    strong_pos = int(((x[ranks[0, :k]] @ centres[5]) > 0.5).nonzero()[-1])
    inliers = torch.full((1, k), 5)
    inliers[0, :4] = torch.tensor([4, 6, 5, 6])
    inliers[0, strong_pos] = 40
    result, reranked_ranks = _verified(sims, ranks, inliers, k)
    strong = int(ranks[0, strong_pos])
    ours, _ = diffuse_verified(graph, sims, result, reranked_ranks, DiffusionConfig(alpha=0.9, **EXACT))
    assert int(ours[0, 0]) == strong
    paper, _ = diffuse_verified(graph, sims, result, reranked_ranks,
                                dataclasses.replace(DiffusionConfig.paper(), alpha=0.9, **EXACT))
    assert int(paper[0, 0]) != strong  # what the rule is for: the paper's seeds lose the strong match


def test_a_query_without_verified_images_equals_plain_diffusion():
    """No inliers: the re-ranked order is the initial one and the seeds are the plain seeds, so
    global+dsm+D is global+D; a query with a confident match has it first."""
    x, _, g = _clustered(400, seed=3)
    sims, ranks = (x[:5] @ x.T).sort(dim=1, descending=True)
    graph = build_knn_graph(x, GraphConfig(k=10))
    inliers = torch.zeros(5, 100, dtype=torch.long)
    inliers[2] = torch.randint(3, 8, (100,), generator=g)
    inliers[2, 40] = 60  # query 2 has a confident match
    result, reranked_ranks = _verified(sims, ranks, inliers, 100)
    cfg = DiffusionConfig(alpha=0.8, **EXACT)
    verified, _ = diffuse_verified(graph, sims, result, reranked_ranks, cfg)
    plain, _ = diffuse_initial(graph, sims, ranks, cfg)
    same = [q for q in range(5) if torch.equal(verified[q], plain[q])]
    assert same == [0, 1, 3, 4]
    assert int(verified[2, 0]) == int(ranks[2, 40])


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_batched_rule_equals_the_plain_reference(backend):
    """Every query's final ranking equals the per-query reference (direct float64 solve, Python
    sort), on clustered data with confident matches in some queries and not others; the
    whole-graph and truncated (R = N) solves agree on both sparse backends."""
    x, centres, g = _clustered(250, seed=4)
    queries = F.normalize(centres[:6] + 0.4 * torch.randn(6, centres.shape[1], generator=g), dim=1)
    sims, ranks = (queries @ x.T).sort(dim=1, descending=True)
    graph = build_knn_graph(x, GraphConfig(k=8))
    inliers = torch.randint(2, 9, (6, 60), generator=g)
    inliers[0, [3, 17, 42]] = torch.tensor([30, 25, 40])
    inliers[3, 55] = 50
    result, reranked_ranks = _verified(sims, ranks, inliers, 60)
    cfg = DiffusionConfig(alpha=0.85, sparse_backend=backend, **EXACT)
    ranking, _ = diffuse_verified(graph, sims, result, reranked_ranks, cfg)
    truncated, _ = diffuse_verified(graph, sims, result, reranked_ranks, dataclasses.replace(cfg, truncation_size=250))
    assert torch.equal(truncated, ranking)
    dense = graph.affinity.to_dense().double().numpy()
    for q in range(6):
        initial = list(zip(ranks[q].tolist(), sims[q].double().tolist()))
        verified = list(zip(result.indices[q].tolist(), result.inliers[q].tolist()))
        expected = verified_diffusion_ranking(dense, initial, verified, alpha=0.85)
        assert ranking[q].tolist() == expected, q
    assert confident_matches(result.inliers)[[0, 3]].any(1).all() and not confident_matches(result.inliers)[[1, 2]].any()


def test_truncated_verified_diffusion_leaves_out_seeds_past_the_top_r():
    x, _, g = _clustered(300, seed=6)
    sims, ranks = (x[:3] @ x.T).sort(dim=1, descending=True)
    graph = build_knn_graph(x, GraphConfig(k=10))
    inliers = torch.randint(3, 8, (3, 100), generator=g)
    inliers[:, 90] = 70  # confident, and far down the re-ranked top 100 of no query
    result, reranked_ranks = _verified(sims, ranks, inliers, 100)
    cfg = DiffusionConfig(alpha=0.8, truncation_size=20)
    ranking, _ = diffuse_verified(graph, sims, result, reranked_ranks, cfg)
    assert torch.equal(ranking[:, 0], ranks[:, 90])  # still first: verification found it
    seeds = plain_seeds(sims, ranks, 300, cfg.query_k, cfg.gamma)
    f, _ = diffuse(graph, seeds, cfg, reranked_ranks)
    assert int((f != 0).sum(0).max()) <= 20
    with pytest.raises(ValueError, match="seeds"):
        DiffusionConfig(seeds="cubic")
    with pytest.raises(ValueError, match="similarity_weight"):
        DiffusionConfig(similarity_weight=1.0)
