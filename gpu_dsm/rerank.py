"""Re-ranking the top of an initial ranking by spatial verification (paper 3.6).

``DSMReranker`` is the ``nn.Module`` a user puts after a retrieval model: given the query's
local features, the candidates' local features and their initial similarities, it returns the
re-ranked top-k. Scores:

- ``"inliers"``: the paper's score, the number of inliers (ties keep the initial order);
- ``"fused"``: beyond the paper, ``weight * inliers / max inliers (over the query's top-k) +
  min-max scaled initial similarity``, so verification corrects the global ranking instead of
  replacing it. Why it is the default is measured in docs/design-decisions.md ("Re-ranking").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

import torch
from torch import nn

from gpu_dsm.checks import as_tensor, check_shape
from gpu_dsm.features import LocalFeatures
from gpu_dsm.match import MatchConfig, MatchResult, spatial_verify
from gpu_dsm.progress import progress
from gpu_dsm.store import FeatureStore, StoreStack



class LocalSubset:
    """The local features of some database images, read by their database indices: what a
    re-ranking of a given top-k needs when only its images were described.

    Args:
        table: [`LocalFeatures`][gpu_dsm.features.LocalFeatures] of ``n`` images.
        rows: ``(n,)`` their distinct database indices, ascending (any integer sequence).
    """

    def __init__(self, table: LocalFeatures, rows: Sequence[int] | torch.Tensor):
        self.table = table
        self.rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if self.rows.numel() != table.num_images or bool((self.rows.diff() <= 0).any()):
            raise ValueError("LocalSubset: rows must be one distinct ascending database index per image of the table")

    def local_features(self, indices: Sequence[int], device: torch.device | str = "cpu",
                       capacity: int | None = None) -> LocalFeatures:
        """The features of database images ``indices`` (each one of ``rows``; repeats allowed)
        on ``device``, padded as the table."""
        wanted = torch.as_tensor(list(indices), dtype=torch.long)
        at = torch.searchsorted(self.rows, wanted).clamp(max=max(self.rows.numel() - 1, 0))
        if wanted.numel() and (self.rows.numel() == 0 or not bool((self.rows[at] == wanted).all())):
            raise IndexError("LocalSubset: a database image whose features were not described was asked for")
        return self.table[at.to(self.table.device)].to(device)


#: where local features come from: a table in memory, a feature store read on demand, or the
#: described images of a given top-k
LocalSource = Union[LocalFeatures, FeatureStore, StoreStack, LocalSubset]

SCORES = ("inliers", "fused")


@dataclass
class RerankConfig:
    """Re-ranking parameters."""

    top_k: int = field(default=100, metadata={
        "flag": "--top-k", "help": "candidates verified per query",
        "source": "paper 4.1; 20 / 50 measured within 0.2 on the four sets, docs 'Design decisions'"})
    score: str = field(default="fused", metadata={
        "flag": "--score", "choices": SCORES,
        "help": "re-ranking score: 'inliers' (paper) or 'fused' = weight * inliers / max inliers + scaled similarity "
                "(beyond the paper)",
        "source": "measured: 'inliers' loses 3.7-14.8 mAP M on all four sets, docs 'Design decisions'"})
    fuse_weight: float = field(default=0.5, metadata={
        "flag": "--fuse-weight", "help": "weight of inliers in 'fused'", "needs": {"score": ("fused",)},
        "source": "0.25 / 1 / 2 measured worse on the four sets, docs 'Design decisions'"})
    match: MatchConfig = field(default_factory=MatchConfig)

    @classmethod
    def paper(cls) -> "RerankConfig":
        """The paper's re-ranking: inlier count, symmetric error, threshold 2 (paper 4.1)."""
        return cls(score="inliers", match=MatchConfig(threshold=2.0, error="symmetric"))

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if not (math.isfinite(self.fuse_weight) and self.fuse_weight >= 0):
            raise ValueError(f"fuse_weight must be a finite number >= 0, got {self.fuse_weight}")


@dataclass
class RerankResult:
    """Re-ranked top-k of ``Q`` queries.

    Fields:
        indices: ``(Q, K)`` int64 database indices, best first.
        scores: ``(Q, K)`` float64 re-ranking score of each, in that order (``-inf`` beyond the
            re-ranked ``top_k``).
        inliers: ``(Q, K)`` int64 inlier counts, in that order (0 beyond ``top_k``).
        order: ``(Q, K)`` int64 positions in the initial top-k, in the new order.
        match: the [`MatchResult`][gpu_dsm.match.MatchResult] of the ``Q * min(top_k, K)`` verified pairs in the
            initial order (``None`` where results of several batches were merged).
    All tensors are on the device of the candidates' features.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    inliers: torch.Tensor
    order: torch.Tensor
    match: MatchResult | None

    def initial_order_inliers(self) -> torch.Tensor:
        """``(Q, K)`` int64 inlier counts in the initial (pre-re-ranking) order of the candidates,
        on the result's device."""
        return torch.zeros_like(self.inliers).scatter_(1, self.order, self.inliers)


def rerank_scores(inliers: torch.Tensor, similarities: torch.Tensor, score: str = "fused", weight: float = 1.0) -> torch.Tensor:
    """Re-ranking scores from inlier counts and initial similarities (module docstring).

    Args:
        inliers: ``(Q, K)`` inlier counts (any real or integer dtype).
        similarities: ``(Q, K)`` finite initial similarities, on the device of ``inliers``.
        score: ``"inliers"`` (the count itself) or ``"fused"``.
        weight: weight of the normalised inlier count in ``"fused"``.
    Returns:
        ``(Q, K)`` float64 on the device of ``inliers``; ``K = 0`` gives an empty ``(Q, 0)``.

    Examples:
        >>> import torch
        >>> rerank_scores(torch.tensor([[2, 6, 0]]), torch.tensor([[0.9, 0.8, 0.7]]))  # 2/6 + 1, 6/6 + 0.5, 0 + 0
        tensor([[1.3333, 1.5000, 0.0000]], dtype=torch.float64)
    """
    inliers = as_tensor(inliers, "inliers", ndim=2, kind="number")
    similarities = as_tensor(similarities, "similarities", ndim=2, kind="number", finite=True)
    check_shape(similarities, tuple(inliers.shape), "similarities")
    inl = inliers.to(torch.float64)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "inliers" or inl.shape[1] == 0:  # no candidates: nothing to scale
        return inl
    sim = similarities.to(torch.float64)
    lo, hi = sim.amin(1, keepdim=True), sim.amax(1, keepdim=True)
    scaled = torch.where(hi > lo, (sim - lo) / (hi - lo).clamp(min=1e-12), torch.ones_like(sim))
    return weight * inl / inl.amax(1, keepdim=True).clamp(min=1) + scaled


class DSMReranker(nn.Module):
    """Spatial re-ranking of each query's top-k (DSM paper 3.6), batched over queries.

    ``forward(query_features, candidate_features, similarities, indices=None)``:

    - ``query_features``: [`LocalFeatures`][gpu_dsm.features.LocalFeatures] of ``Q`` queries.
    - ``candidate_features``: [`LocalFeatures`][gpu_dsm.features.LocalFeatures] of ``Q * K`` candidates, query-major
      (the ``K`` candidates of query 0 in initial order, then query 1, ...).
    - ``similarities``: ``(Q, K)`` initial similarities (or any score decreasing with rank).
    - ``indices``: ``(Q, K)`` database indices of the candidates (default ``0..K-1``).

    Only the first ``top_k`` of each row are re-ranked; returns [`RerankResult`][gpu_dsm.rerank.RerankResult], on the
    candidate features' device (``similarities`` and ``indices`` are moved there; query and
    candidate features must share a device). With no candidates (``K = 0``) or no queries
    (``Q = 0``) the result is empty: every tensor ``(Q, K)`` with a zero side, and a
    [`MatchResult`][gpu_dsm.match.MatchResult] of no pairs.

    Examples:
        A query with six features (one per channel) and three candidates: two with the same
        channels at scrambled places, one with the query's features moved by ``(3, 2)`` map pixels:

        >>> import torch
        >>> def features(xys, map_size=(20, 20)):  # one image per list of (x, y), channels 0, 1, ...
        ...     images = [{"xy": torch.tensor(xy), "frame": torch.eye(2).expand(len(xy), 2, 2),
        ...                "strength": torch.ones(len(xy)), "channel": torch.arange(len(xy)),
        ...                "scale": torch.zeros(len(xy), dtype=torch.long)} for xy in xys]
        ...     return LocalFeatures.from_images(images, torch.tensor([[map_size]] * len(xys)), (1.0,), 8)
        >>> xy = [[2.0, 3.0], [10.0, 4.0], [6.0, 12.0], [14.0, 14.0], [3.0, 9.0], [12.0, 8.0]]
        >>> scrambled = [xy[i] for i in (3, 0, 5, 1, 4, 2)]
        >>> query = features([xy])
        >>> candidates = features([scrambled, [[x + 3, y + 2] for x, y in xy], scrambled[::-1]])  # Q * K = 1 * 3
        >>> result = DSMReranker()(query, candidates, torch.tensor([[0.9, 0.85, 0.5]]), torch.tensor([[42, 7, 13]]))
        >>> result.indices, result.inliers  # the moved copy verifies all six features and goes first
        (tensor([[ 7, 42, 13]]), tensor([[6, 1, 2]]))
        >>> result.order  # positions in the initial top-k
        tensor([[1, 0, 2]])
    """

    def __init__(self, config: RerankConfig | None = None):
        super().__init__()
        self.config = config or RerankConfig()

    def forward(self, query_features: LocalFeatures, candidate_features: LocalFeatures, similarities: torch.Tensor,
                indices: torch.Tensor | None = None) -> RerankResult:
        """Re-rank (arguments in the class docstring): ``similarities`` ``(Q, K)`` finite real,
        ``indices`` ``(Q, K)`` integer database indices."""
        cfg = self.config
        for name, features in (("query_features", query_features), ("candidate_features", candidate_features)):
            if not isinstance(features, LocalFeatures):
                raise TypeError(f"{name} must be LocalFeatures, got {type(features).__name__}")
        similarities = as_tensor(similarities, "similarities", ndim=2, kind="number", finite=True)
        q, k = similarities.shape
        if indices is not None:
            indices = as_tensor(indices, "indices", kind="int")
            check_shape(indices, (q, k), "indices (like similarities)")
        if q != query_features.num_images or candidate_features.num_images != q * k:
            raise ValueError(
                f"{query_features.num_images} queries and {candidate_features.num_images} candidates do not fit "
                f"similarities of shape {(q, k)} (expected Q queries and Q*K candidates)"
            )
        device = candidate_features.device
        if indices is None:
            indices = torch.arange(k, device=device).expand(q, k)
        indices = indices.to(device)
        similarities = similarities.to(device)
        kk = min(cfg.top_k, k)
        cand = candidate_features[(torch.arange(q * k, device=device).view(q, k)[:, :kk]).reshape(-1)]
        query_index = torch.arange(q, device=device).repeat_interleave(kk)
        match = spatial_verify(query_features, cand, query_index, cfg.match)
        result = rerank_by_inliers(match.inliers.view(q, kk), similarities, indices, cfg)
        result.match = match
        return result


def rerank_by_inliers(inliers: torch.Tensor, similarities: torch.Tensor, indices: torch.Tensor,
                      config: RerankConfig) -> RerankResult:
    """Re-rank the first ``kk = min(config.top_k, K)`` candidates of each query from their
    inlier counts ``(Q, >= kk)`` (integer, initial order) and similarities (finite real) / indices
    (int64) ``(Q, K)``, by ``config.score``; the rest keep their place. Stable: ties keep the
    initial order. The [`RerankResult`][gpu_dsm.rerank.RerankResult] (``match=None``) is on the similarities' device.

    Verification is independent per pair, so the inliers of a query's top 100 also give the
    re-ranking of its top 20 (`gpu_dsm.eval.sweep` relies on it)."""
    q, k = similarities.shape
    kk = min(config.top_k, k)
    device = similarities.device
    top_inliers = inliers[:, :kk].to(device=device, dtype=torch.long)
    top_scores = rerank_scores(top_inliers, similarities[:, :kk], config.score, config.fuse_weight)
    order_top = torch.argsort(top_scores, dim=1, descending=True, stable=True)
    order = torch.cat([order_top, torch.arange(kk, k, device=device).expand(q, k - kk)], 1)
    scores = torch.cat([top_scores, torch.full((q, k - kk), float("-inf"), dtype=torch.float64, device=device)], 1)
    padded = torch.cat([top_inliers, torch.zeros(q, k - kk, dtype=torch.long, device=device)], 1)
    return RerankResult(
        indices=indices.to(device).gather(1, order),
        scores=scores.gather(1, order),
        inliers=padded.gather(1, order),
        order=order,
        match=None,
    )


def gather_local(source: LocalSource, indices: Sequence[int] | torch.Tensor, device: torch.device | str) -> LocalFeatures:
    """The local features of images ``indices`` (in that order, repeats allowed) on ``device``.

    ``indices``: database rows, a sequence of ints or an integer tensor (any device). A
    [`LocalFeatures`][gpu_dsm.features.LocalFeatures] table (any device) is indexed on its device and the rows moved; a
    feature store reads them from its memory map.
    """
    if isinstance(source, LocalFeatures):
        rows = torch.as_tensor(indices, dtype=torch.long, device=source.device)
        return source[rows].to(device)
    rows = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    return source.local_features(rows, device=device)


def rerank_top_k(reranker: DSMReranker, queries: LocalSource, database: LocalSource, ranks: torch.Tensor,
                 similarities: torch.Tensor, device: torch.device | str = "cpu", query_batch: int = 8,
                 show_progress: bool = False, desc: str = "re-ranking") -> tuple[torch.Tensor, RerankResult]:
    """DSM re-ranking of the top of every query's ranking (paper 3.6).

    Args:
        reranker: the [`DSMReranker`][gpu_dsm.rerank.DSMReranker] (its ``config.top_k`` candidates are verified).
        queries, database: where the local features of the queries / database images come from.
        ranks: ``(Q, N)`` int64 database indices of each query's ranking, best first (on the CPU).
        similarities: ``(Q, >= K)`` their initial scores, real, any device (moved to ``device``).
        device: where verification runs (the local features are gathered there).
        query_batch: queries verified at once: bounds memory to ``query_batch * top_k`` candidate tables.
        show_progress: report progress (`gpu_dsm.progress.progress`: a bar on a terminal, lines in a log).
    Returns:
        ``(new ranks (Q, N), re-ranking of the top-k)``: the new ranks int64 on the device of
        ``ranks``, the top-k re-ordered and the rest unchanged; the [`RerankResult`][gpu_dsm.rerank.RerankResult] ``(Q, K)``
        on the CPU (int64 ``indices``, ``inliers`` and ``order``, float64 ``scores``; its ``match``
        is ``None``: per-batch results are not merged).
    """
    if query_batch < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    k = min(reranker.config.top_k, ranks.shape[1])
    new_ranks = ranks.clone()
    parts = []
    with progress(ranks.shape[0], desc, show_progress, unit="query") as bar:
        for start in range(0, ranks.shape[0], query_batch):
            stop = min(start + query_batch, ranks.shape[0])
            top = ranks[start:stop, :k]
            query_features = gather_local(queries, range(start, stop), device)
            candidates = gather_local(database, top.reshape(-1), device)
            result = reranker(query_features, candidates, similarities[start:stop, :k].to(device), top.to(device))
            new_ranks[start:stop, :k] = result.indices.to(new_ranks.device)
            parts.append(result)
            bar.update(stop - start)
    if not parts:
        empty = torch.zeros(0, k, dtype=torch.long)
        return new_ranks, RerankResult(indices=empty, scores=empty.double(), inliers=empty, order=empty, match=None)
    merged = RerankResult(
        indices=torch.cat([r.indices.cpu() for r in parts]), scores=torch.cat([r.scores.cpu() for r in parts]),
        inliers=torch.cat([r.inliers.cpu() for r in parts]), order=torch.cat([r.order.cpu() for r in parts]),
        match=None,
    )
    return new_ranks, merged
