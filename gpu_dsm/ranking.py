"""The ranking stages and the methods composed from them (DSM paper 3.6, 4.1).

Data flows one way:

1. an initial ranking of the whole database for every query: [`GlobalRanking`][gpu_dsm.ranking.GlobalRanking] (global
   descriptors, exact or FAISS) or [`ASMKRanking`][gpu_dsm.ranking.ASMKRanking] (HOW + ASMK); both
   ``search(queries, k) -> (scores (Q, k), indices (Q, k))``;
2. [`gpu_dsm.rerank.rerank_top_k`][gpu_dsm.rerank.rerank_top_k]: DSM spatial verification of each query's top-k, with local features
   gathered from memory ([`LocalFeatures`][gpu_dsm.features.LocalFeatures]) or from a feature store, a batch of queries at a time;
3. [`diffuse_initial`][gpu_dsm.ranking.diffuse_initial] / [`diffuse_verified`][gpu_dsm.ranking.diffuse_verified]: diffusion on the database's kNN graph,
   seeded by the initial top of each query or by its spatially verified top.

[`rank_methods`][gpu_dsm.ranking.rank_methods] runs them and names each result as the evaluation does: ``global``,
``global+dsm``, ``global+D``, ``global+dsm+D``, and with the ASMK initial ranking ``asmk``,
``asmk+dsm``, ``asmk+dsm+D`` (``asmk+D`` when diffusion runs without re-ranking).
[`rank_given`][gpu_dsm.ranking.rank_given] runs stages 2 and 3 on a top-k that any other model ranked: ``given``,
``given+dsm``, ``given+D``, ``given+dsm+D``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gpu_dsm.asmk import ASMKIndex
from gpu_dsm.diffusion import (CGInfo, DiffusionConfig, confident_first, confident_matches, diffuse, dsm_seeds,
                               fused_ranking, plain_seeds, verified_seeds)
from gpu_dsm.graph import KnnGraph
from gpu_dsm.how import HOWFeatures
from gpu_dsm.kernels.sparse import SparseOperator
from gpu_dsm.progress import progress
from gpu_dsm.rerank import DSMReranker, LocalSource, RerankConfig, RerankResult, rerank_top_k
from gpu_dsm.knn import GlobalIndex



@dataclass
class DescribedImages:
    """What retrieval knows of ``N`` images (queries, or a database with its indices).

    Fields:
        global_descriptors: ``(N, D)`` float32, L2-normalised, whitened when the module has a
            learned whitening; on the module's device.
        local: DSM local features: a [`LocalFeatures`][gpu_dsm.features.LocalFeatures] table in memory, or a
            [`FeatureStore`][gpu_dsm.store.FeatureStore] / [`StoreStack`][gpu_dsm.store.StoreStack] they are gathered from; ``None`` without
            re-ranking.
        how: HOW features (with the ASMK initial ranking), else ``None``.
        search_index: a database's global search index ([`GlobalIndex`][gpu_dsm.knn.GlobalIndex]).
        asmk: a database's ASMK inverted file.
        graph: a database's kNN graph (with diffusion).
        names: the images' names (their paths when described from paths; a store's names), or
            ``None``; a saved index keeps them.
    """

    global_descriptors: torch.Tensor
    local: LocalSource | None = None
    how: HOWFeatures | None = None
    search_index: GlobalIndex | None = None
    asmk: ASMKIndex | None = None
    graph: KnnGraph | None = None
    names: list[str] | None = None

    @property
    def num_images(self) -> int:
        """``N``, the images described (rows of ``global_descriptors``)."""
        return int(self.global_descriptors.shape[0])


class InitialRanking(Protocol):
    """A database index that ranks it for every query: ``(scores (Q, k), indices (Q, k))``, best
    first; ``k=None``: the whole database."""

    def search(self, queries: DescribedImages, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank the database for each of the ``Q`` images of ``queries``.

        Args:
            queries: the described queries (the ranking reads what it needs of them).
            k: images returned per query (``None``: all ``N``, a full ranking; capped at ``N``).
        Returns:
            ``(scores (Q, k), indices (Q, k))``: real scores and int64 database indices, best first.
        """
        ...


@dataclass
class GlobalRanking:
    """The initial ranking by global descriptors (paper 3.6): cosine similarity, exact or FAISS.

    An approximate index returns its top ``k`` only; with ``k=None`` the images it did not return
    follow in database order (they are unranked)."""

    index: GlobalIndex

    def search(self, queries: DescribedImages, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` of every query by its ``global_descriptors`` ``(Q, D)`` ([`GlobalIndex.search`][gpu_dsm.knn.GlobalIndex.search]).

        Returns:
            ``(scores (Q, k), indices (Q, k))`` on the device of the queries' descriptors, best
            first: cosine similarities (their dtype for the exact index, float32 from FAISS) and
            int64 database indices. ``k=None``: ``(Q, N)``; the images an approximate index did not
            return come last, with score ``-inf`` ([`complete_ranking`][gpu_dsm.ranking.complete_ranking]).
        """
        n = self.index.num_images
        scores, indices = self.index.search(queries.global_descriptors, n if k is None else k)
        if k is None and indices.shape[1] < n:
            scores, indices = complete_ranking(scores, indices, n)
        return scores, indices


@dataclass
class ASMKRanking:
    """The initial ranking by HOW + ASMK (Tolias et al. 2020): float64 scores."""

    index: ASMKIndex

    def search(self, queries: DescribedImages, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top ``k`` of every query by the ASMK similarity of its HOW features (``queries.how``,
        moved to the index's device; [`ASMKIndex.search`][gpu_dsm.asmk.ASMKIndex.search]).

        Returns:
            ``(scores (Q, k) float64, indices (Q, k) int64)`` on the index's device, best first
            (``k=None``: all ``N``); a query without features scores 0 everywhere.
        """
        if queries.how is None:
            raise ValueError("the ASMK initial ranking needs the queries' HOW features (describe them with the module)")
        device = self.index.device
        how = queries.how
        return self.index.search(how.descriptors.to(device), how.image_ids.to(device), k=k, num_queries=how.num_images)


def complete_ranking(scores: torch.Tensor, indices: torch.Tensor, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend a top-k ``(Q, k)`` to all ``num_images`` images: the images it does not hold follow in
    database order with score ``-inf`` (an approximate index's ``-1``, "no result", is dropped).

    Args:
        scores: ``(Q, k)`` floating point scores, best first.
        indices: ``(Q, k)`` int64 database indices (distinct within a row, or ``-1``), on the
            device of ``scores``.
        num_images: ``N``.
    Returns:
        ``(scores (Q, N), indices (Q, N))`` in the dtypes of the inputs, on their device.

    Examples:
        >>> import torch
        >>> complete_ranking(torch.tensor([[0.9, 0.5, 0.0]]), torch.tensor([[2, 4, -1]]), 5)
        (tensor([[0.9000, 0.5000,   -inf,   -inf,   -inf]]), tensor([[2, 4, 0, 1, 3]]))
    """
    full_scores, full_indices = [], []
    for row_scores, row in zip(scores, indices):
        found = row >= 0
        seen = torch.zeros(num_images, dtype=torch.bool, device=row.device)
        seen[row[found]] = True
        rest = torch.nonzero(~seen).flatten()
        full_indices.append(torch.cat([row[found], rest]))
        full_scores.append(torch.cat([row_scores[found], row_scores.new_full((rest.numel(),), float("-inf"))]))
    if not full_indices:
        return scores.new_zeros(0, num_images), indices.new_zeros(0, num_images)
    return torch.stack(full_scores), torch.stack(full_indices)


def diffuse_initial(graph: KnnGraph | SparseOperator, similarities: torch.Tensor, ranks: torch.Tensor,
                    config: DiffusionConfig) -> tuple[torch.Tensor, CGInfo]:
    """Diffusion seeded by each query's ``config.query_k`` most similar images (Iscen et al.
    2017), ranked by [`fused_scores`][gpu_dsm.diffusion.fused_scores] ([`fused_ranking`][gpu_dsm.diffusion.fused_ranking]): ``(ranking (Q, M), CGInfo)``.

    ``similarities`` ``(Q, M)`` real scores and ``ranks`` ``(Q, M)`` int64 database indices of
    the initial ranking, best first, any device (moved to the graph's); ``M`` is the whole
    database, or a top-M of it (then the ranking holds those M). Ties keep the initial order.
    The ranking is int64 on the graph's device; ``CGInfo.relative_residual`` ``(Q,)`` in
    ``config.dtype`` there."""
    device = graph.device
    similarities, ranks = similarities.to(device), ranks.to(device)
    seeds = plain_seeds(similarities, ranks, graph.num_nodes, config.query_k, config.gamma)
    f, info = diffuse(graph, seeds, config, ranks)
    return fused_ranking(f, similarities, ranks, config.similarity_weight, config.gamma), info


def diffuse_verified(graph: KnnGraph | SparseOperator, similarities: torch.Tensor, reranked: RerankResult,
                     reranked_ranks: torch.Tensor, config: DiffusionConfig) -> tuple[torch.Tensor, CGInfo]:
    """Diffusion seeded by the spatially verified top of each query: ``(ranking (Q, M), CGInfo)``.

    ``config.seeds``: ``"verified"`` seeds each query with its plain seeds and its confident
    matches ([`verified_seeds`][gpu_dsm.diffusion.verified_seeds], [`confident_matches`][gpu_dsm.diffusion.confident_matches]) and puts the confident matches
    first ([`confident_first`][gpu_dsm.diffusion.confident_first]); ``"paper"``: [`dsm_seeds`][gpu_dsm.diffusion.dsm_seeds] (paper 3.6, 4.1). Both rank
    by [`fused_scores`][gpu_dsm.diffusion.fused_scores] with the similarity of each image's place in ``reranked_ranks`` (the
    ``j``-th best initial similarity at place ``j``): diffusion refines the re-ranked ranking. A
    query whose verification found nothing (no inliers, so the re-ranked order is the initial
    one) gets exactly [`diffuse_initial`][gpu_dsm.ranking.diffuse_initial]'s ranking.

    Args:
        graph: the database's graph (or its operator).
        similarities: ``(Q, M)`` real initial scores in the initial order, best first.
        reranked: the re-ranking of each query's top ``K`` ([`rerank_top_k`][gpu_dsm.rerank.rerank_top_k]).
        reranked_ranks: ``(Q, M)`` int64 database indices: the initial ranking with its top ``K``
            re-ordered (the order of ties). ``M``: the whole database or a top-M of it.
    Inputs on any device (moved to the graph's). With truncated diffusion (``truncation_size`` R
    below K) the seeds outside each query's first R of ``reranked_ranks`` are left out.

    Returns:
        The ranking ``(Q, M)`` int64 on the graph's device; ``CGInfo.relative_residual`` ``(Q,)``
        in ``config.dtype`` there.
    """
    device = graph.device
    similarities, reranked_ranks = similarities.to(device), reranked_ranks.to(device)
    seeds, confident = verified_diffusion_seeds(similarities, reranked, reranked_ranks, graph.num_nodes, config)
    r = config.truncation_size
    # every seed lies in the first max(K, query_k) of the ranking (the verified top K, the initial top
    # query_k), so only a smaller R leaves seeds out
    if r is not None and r < reranked_ranks.shape[1] and r < max(reranked.order.shape[1], config.query_k):
        top = reranked_ranks[:, :r]
        kept = seeds.T.gather(1, top)
        seeds = torch.zeros_like(seeds)
        seeds.T.scatter_(1, top, kept)
    f, info = diffuse(graph, seeds, config, reranked_ranks)
    # the similarity term follows the ranking diffusion refines: the image at place j of the
    # re-ranked ranking gets the j-th best initial similarity, so the term keeps the verified order
    ranking = fused_ranking(f, similarities, reranked_ranks, config.similarity_weight, config.gamma)
    if confident is not None:
        ranking = confident_first(ranking, reranked.indices.to(device), confident)
    return ranking, info


def verified_diffusion_seeds(similarities: torch.Tensor, reranked: RerankResult, reranked_ranks: torch.Tensor,
                             num_nodes: int, config: DiffusionConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The seeds of [`diffuse_verified`][gpu_dsm.ranking.diffuse_verified] for ``config.seeds``: ``(seeds (N, Q), confident)``.

    ``"verified"``: [`verified_seeds`][gpu_dsm.diffusion.verified_seeds] of the initial ranking with the confident matches
    ([`confident_matches`][gpu_dsm.diffusion.confident_matches]), which are returned ``(Q, K)`` bool in the re-ranked order;
    ``"paper"``: [`dsm_seeds`][gpu_dsm.diffusion.dsm_seeds] of the re-ranked top ``K``, and ``confident`` is ``None``.
    Inputs as [`diffuse_verified`][gpu_dsm.ranking.diffuse_verified]'s, on the device of ``similarities``; the seeds are float32 there.
    """
    device = similarities.device
    k = reranked.order.shape[1]
    order, indices, inliers = reranked.order.to(device), reranked.indices.to(device), reranked.inliers.to(device)
    if config.seeds == "paper":  # the verified top k's own similarities, in re-ranked order
        seeds = dsm_seeds(similarities[:, :k].gather(1, order), indices, inliers, num_nodes, config.dsm_candidates,
                          config.dsm_keep, config.gamma)
        return seeds, None
    confident = confident_matches(inliers, config.confident_mads, config.confident_ratio)  # (Q, K), re-ranked order
    # the plain seeds come from the initial ranking: its top k back in the initial order
    ranks = reranked_ranks.to(device).clone()
    ranks[:, :k] = torch.empty_like(indices).scatter_(1, order, indices)
    initial_confident = torch.zeros_like(confident).scatter_(1, order, confident)
    return verified_seeds(similarities, ranks, initial_confident, num_nodes, config.query_k, config.gamma), confident


@dataclass
class InitialStages:
    """One initial ranking and what followed it, every tensor on the CPU.

    Fields:
        scores: ``(Q, N)`` float32 scores of the initial ranking (cosine similarity, or ASMK score).
        ranks: ``(Q, N)`` its database indices, best first.
        reranked: the DSM re-ranking of its top-k (``None`` without re-ranking).
        reranked_ranks: ``(Q, N)`` the ranking with that top-k re-ordered (``None`` likewise).
    """

    scores: torch.Tensor
    ranks: torch.Tensor
    reranked: RerankResult | None = None
    reranked_ranks: torch.Tensor | None = None


@dataclass
class SearchResult:
    """Every query's ranking of the whole database by each method.

    Fields:
        ranks: ``(Q, N)`` the final ranking of the configured method (``method``): diffusion's
            order when diffusion is on, else the re-ranked one, else the initial one. Of a given
            top-k ([`rank_given`][gpu_dsm.ranking.rank_given]): ``(Q, K)``, a re-ordering of it.
        method: its name (``"global+dsm+D"``, ``"asmk+dsm"``, ``"given+dsm"``, ...).
        methods: ``{name: (Q, N) ranking}`` of every method computed, in the evaluation's order.
        stages: ``{"global": ..., "asmk": ...}`` (or ``{"given": ...}``) each initial ranking with
            its re-ranking ([`InitialStages`][gpu_dsm.ranking.InitialStages]).
        diagnostics: seconds per stage (``timing``) and conjugate-gradient figures (``diffusion``).
    Properties ``initial``, ``similarities`` and ``reranked`` are those of the configured initial ranking.
    """

    ranks: torch.Tensor
    method: str
    methods: dict[str, torch.Tensor]
    stages: dict[str, InitialStages]
    diagnostics: dict[str, Any] = field(default_factory=dict)

    @property
    def initial_method(self) -> str:
        """The configured initial ranking, ``"global"``, ``"asmk"`` or ``"given"``: ``method`` up to its first ``+``."""
        return self.method.split("+", 1)[0]

    @property
    def initial(self) -> torch.Tensor:
        """``(Q, N)`` int64 database indices of the configured initial ranking, best first, on the CPU."""
        return self.stages[self.initial_method].ranks

    @property
    def similarities(self) -> torch.Tensor:
        """``(Q, N)`` float32 scores of the configured initial ranking, in its order, on the CPU."""
        return self.stages[self.initial_method].scores

    @property
    def reranked(self) -> RerankResult | None:
        """The DSM re-ranking of its top-k."""
        return self.stages[self.initial_method].reranked


@contextmanager
def _timed(timing: dict[str, float], stage: str, device: torch.device):
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timing[f"{stage}_s"] = round(time.perf_counter() - start, 4)


def _cg(info: CGInfo) -> dict[str, float]:
    residual = info.relative_residual
    return {"iterations": info.iterations, "max_relative_residual": float(residual.max()) if residual.numel() else 0.0}


def rank_methods(queries: DescribedImages, database: DescribedImages, initial: str = "global",
                 rerank: RerankConfig | None = None, diffusion: DiffusionConfig | None = None,
                 device: torch.device | str = "cpu", query_batch: int = 8, show_progress: bool = False) -> SearchResult:
    """Rank ``database`` for every query by each method the configuration turns on.

    ``global`` always (with the database's ``search_index``, exact when it has none);
    ``asmk`` with ``initial="asmk"`` (``database.asmk`` and ``queries.how``); ``+dsm`` with
    ``rerank`` (local features of both); ``+D`` with ``diffusion`` (``database.graph``).
    ``show_progress``: progress of re-ranking (per query) and diffusion (per solve).
    """
    if initial not in ("global", "asmk"):
        raise ValueError(f"initial must be 'global' or 'asmk', got {initial!r}")
    device = torch.device(device)
    _check_stage_inputs(queries, database, rerank, diffusion)
    if initial == "asmk" and database.asmk is None:
        raise ValueError("initial='asmk' needs the database's ASMK index (DescribedImages.asmk)")
    timing: dict[str, float] = {}
    reranker = DSMReranker(rerank) if rerank is not None else None
    search_index = database.search_index or GlobalIndex.build(database.global_descriptors)
    with _timed(timing, "search", device):
        similarities, ranks = GlobalRanking(search_index).search(queries, None)
    stages = {"global": InitialStages(similarities.cpu(), ranks.cpu())}
    if initial == "asmk":
        with _timed(timing, "asmk_search", device):
            scores, asmk_ranks = ASMKRanking(database.asmk).search(queries, None)
        stages["asmk"] = InitialStages(scores.cpu().float(), asmk_ranks.cpu())
    names = list(stages)[::-1]  # the ASMK initial ranking first, then the global one
    plain = ["global"] if reranker is not None else names[::-1]
    return _refine(queries, database, stages, names, plain, initial, reranker, diffusion, device, query_batch,
                   show_progress, timing)


def rank_given(queries: DescribedImages, database: DescribedImages, scores: torch.Tensor, indices: torch.Tensor,
               rerank: RerankConfig | None = None, diffusion: DiffusionConfig | None = None,
               device: torch.device | str = "cpu", query_batch: int = 8, show_progress: bool = False) -> SearchResult:
    """The stages after the initial ranking, for a ranking given by any model: DSM re-ranking of
    its top (``rerank``) and diffusion on ``database.graph`` (``diffusion``), plain and seeded by
    the verified images, exactly as [`rank_methods`][gpu_dsm.ranking.rank_methods] runs them after its own rankings.

    Args:
        queries: the described queries (their local features with ``rerank``).
        database: the database: local features with ``rerank`` (only the rows of ``indices`` are
            read), its kNN graph with ``diffusion``.
        scores: ``(Q, K)`` finite real scores, best first, higher is more similar (re-ranking
            scales them per query; diffusion's seeds weight them as ``max(s, 0)^gamma``, so
            cosine-like similarities in ``[-1, 1]`` suit it best); any device.
        indices: ``(Q, K)`` integer database indices in ``0..N - 1``, distinct within a row, in
            the same order; any device. ``K`` may be ``N``: a full ranking.
    Returns:
        A [`SearchResult`][gpu_dsm.ranking.SearchResult] of ``(Q, K)`` rankings on the CPU, methods ``given``,
        ``given+dsm`` (with ``rerank``), ``given+D`` and ``given+dsm+D`` (with ``diffusion``):
        each a re-ordering of ``indices``.
    """
    device = torch.device(device)
    scores = torch.as_tensor(scores)
    indices = torch.as_tensor(indices)
    if scores.ndim != 2 or tuple(scores.shape) != tuple(indices.shape):
        raise ValueError(f"the given ranking needs scores and indices of one shape (Q, K), got {tuple(scores.shape)} "
                         f"and {tuple(indices.shape)}")
    if scores.shape[0] != queries.num_images:
        raise ValueError(f"the given ranking has {scores.shape[0]} rows for {queries.num_images} queries")
    if not scores.is_floating_point() or not bool(torch.isfinite(scores).all()):
        raise ValueError("the given scores must be finite floating point numbers")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"the given indices must be integers, got {indices.dtype}")
    indices = indices.cpu().long()
    n = database.num_images
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"the given indices must lie in 0..{n - 1} (the database's images)")
    if indices.shape[1] > 1 and bool((indices.sort(1).values.diff(dim=1) == 0).any()):
        raise ValueError("the given indices repeat an image within a query's ranking")
    _check_stage_inputs(queries, database, rerank, diffusion)
    stages = {"given": InitialStages(scores.detach().cpu().float(), indices)}
    reranker = DSMReranker(rerank) if rerank is not None else None
    return _refine(queries, database, stages, ["given"], ["given"], "given", reranker, diffusion, device, query_batch,
                   show_progress, {})


def _check_stage_inputs(queries: DescribedImages, database: DescribedImages, rerank: RerankConfig | None,
                        diffusion: DiffusionConfig | None) -> None:
    """What re-ranking and diffusion read: local features of both sides, the database's graph."""
    if rerank is not None and (queries.local is None or database.local is None):
        raise ValueError("re-ranking needs the local features of the queries and of the database")
    if diffusion is not None and database.graph is None:
        raise ValueError("diffusion needs the database's kNN graph (DescribedImages.graph)")


def _verified_timing(name: str) -> str:
    return {"global": "diffusion_dsm", "asmk": "diffusion_asmk"}.get(name, f"diffusion_{name}_dsm")


def _refine(queries: DescribedImages, database: DescribedImages, stages: dict[str, InitialStages], names: list[str],
            plain: list[str], initial: str, reranker: DSMReranker | None, diffusion: DiffusionConfig | None,
            device: torch.device, query_batch: int, show_progress: bool, timing: dict[str, float]) -> SearchResult:
    """Re-rank the initial rankings ``names`` (in that order), diffuse ``plain`` ones from their
    initial top and, with re-ranking, every one of ``names`` from its verified top; the result's
    method is ``initial`` with the stages that ran."""
    methods: dict[str, torch.Tensor] = {name: stage.ranks for name, stage in stages.items()}
    cg: dict[str, Any] = {}
    if reranker is not None:
        for name in names:
            stage = stages[name]
            with _timed(timing, "rerank" if name == "global" else f"rerank_{name}", device):
                stage.reranked_ranks, stage.reranked = rerank_top_k(
                    reranker, queries.local, database.local, stage.ranks, stage.scores, device, query_batch,
                    show_progress, desc=f"re-ranking {name}")
            methods[f"{name}+dsm"] = stage.reranked_ranks
    if diffusion is not None:
        graph = database.graph
        verified = names[::-1] if reranker is not None else []
        with progress(len(plain) + len(verified), "diffusion", show_progress, unit="solve") as bar:
            for name in plain:
                with _timed(timing, f"diffusion_{name}", device):
                    diffused, info = diffuse_initial(graph, stages[name].scores, stages[name].ranks, diffusion)
                methods[f"{name}+D"], cg[f"{name}+D"] = diffused.cpu(), _cg(info)
                bar.update(1)
            for name in verified:
                stage = stages[name]
                with _timed(timing, _verified_timing(name), device):
                    diffused, info = diffuse_verified(graph, stage.scores, stage.reranked, stage.reranked_ranks, diffusion)
                methods[f"{name}+dsm+D"], cg[f"{name}+dsm+D"] = diffused.cpu(), _cg(info)
                bar.update(1)
    method = initial + ("+dsm" if reranker is not None else "") + ("+D" if diffusion is not None else "")
    diagnostics: dict[str, Any] = {"timing": timing}
    if diffusion is not None:
        diagnostics["diffusion"] = {**cg, "graph_k": database.graph.k, "graph_edges": database.graph.num_edges}
    return SearchResult(ranks=methods[method], method=method, methods=methods, stages=stages, diagnostics=diagnostics)
