"""Query-time diffusion on the kNN graph (Iscen et al. 2017; DSM paper 3.6, 4.1).

For each query, solve ``(I - alpha S) f = y`` by conjugate gradient, all queries at once: the
queries are the columns of one dense ``(N, Q)`` matrix, so every iteration is one sparse-dense
product. ``y`` holds the seeds:

- [`plain_seeds`][gpu_dsm.diffusion.plain_seeds]: the query's ``kq`` most similar database images, similarity^gamma
  (Iscen et al.);
- [`verified_seeds`][gpu_dsm.diffusion.verified_seeds] (the default, ``DiffusionConfig.seeds = "verified"``): the plain seeds,
  and every *confidently* verified image of the re-ranked top-k ([`confident_matches`][gpu_dsm.diffusion.confident_matches]: its
  inliers stand out from those of the query's other candidates) at the weight of the query's best
  match. With no confident image they are the plain seeds;
- [`dsm_seeds`][gpu_dsm.diffusion.dsm_seeds] (``seeds = "paper"``): the top ``candidates`` after spatial re-ranking,
  weight ``inliers / max inliers * similarity``, keeping the best ``keep`` (paper 4.1; the
  reference code's off-by-one keeps 4). If no candidate has an inlier, the similarity^gamma of
  the top ``keep`` are the seeds (the plain query).

The final score of an image is [`fused_scores`][gpu_dsm.diffusion.fused_scores]: ``(1 - w)`` times its diffusion score over
the query's largest plus ``w`` times the similarity^gamma of its place in the ranking diffusion
refines, over the best (``DiffusionConfig.similarity_weight``; ``w = 0`` is the paper's diffusion
score alone), ties in that ranking's order. With verified seeds the confident images come first,
in their verified order ([`confident_first`][gpu_dsm.diffusion.confident_first]). Why: ``docs/diffusion.md`` measures each part.

The solve runs on the connected components of the graph that hold a seed (the rest of ``f`` is
exactly zero), with the products and column reductions of ``gpu_dsm.kernels``. With
``DiffusionConfig.truncation_size`` R it runs, per query, on the sub-graph of its top R images
(truncated diffusion, [`truncated_conjugate_gradient`][gpu_dsm.diffusion.truncated_conjugate_gradient]): the large-database setting.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from gpu_dsm.checks import as_tensor, check_shape
from gpu_dsm.graph import KnnGraph
from gpu_dsm.kernels.dots import column_dots as _column_dots
from gpu_dsm.kernels.sparse import BACKENDS as SPARSE_BACKENDS, SparseOperator


SEEDS = ("verified", "paper")
_RESTRICT_BELOW = 0.8  # solve on the seeded components when they hold less than this fraction of the nodes


@dataclass
class DiffusionConfig:
    """Diffusion parameters; defaults from Iscen et al. 2017 and the DSM reference code."""

    # None: scaled to the database, alpha_for(N) = 0.99 (Iscen et al., the paper) from
    # large_database images on, small_alpha below (docs/design-decisions.md, "Diffusion on small databases"); a float: that alpha
    alpha: float | None = field(default=None, metadata={
        "flag": "--alpha", "type": float, "help": "diffusion alpha",
        "default_text": "scaled to the database: 0.99 as Iscen et al. and the paper from 5000 images on, 0.5 below",
        "source": "measured, docs 'Design decisions'"})
    small_alpha: float = 0.5  # measured on roxford5k-mini, roxford5k-19q, roxford5k-19q + distractors (docs/design-decisions.md)
    large_alpha: float = 0.99  # Iscen et al.; DSM paper 4.1 (5k to 1M images)
    large_database: int = 5000  # where GraphConfig's size rule reaches the paper's k = 50
    tol: float = field(default=1e-6, metadata={
        "flag": "--cg-tol", "help": "conjugate-gradient relative residual", "source": "reference code"})
    max_iter: int = field(default=20, metadata={
        "flag": "--cg-iterations", "help": "conjugate-gradient iterations at most", "source": "reference code"})
    gamma: float = field(default=3.0, metadata={
        "flag": "--gamma", "help": "similarity exponent of graph weights and seeds", "source": "Iscen et al."})
    query_k: int = field(default=10, metadata={
        "flag": "--query-k", "help": "plain seeds: the query's kq most similar images",
        "source": "Iscen et al.; 3 / 5 no better on all sets, docs 'Design decisions'"})
    dsm_candidates: int = 10  # DSM seeds come from the top 10 re-ranked images (paper 4.1)
    dsm_keep: int = field(default=5, metadata={
        "flag": "--dsm-keep", "stage": "rerank", "help": "with --seeds paper: DSM seeds kept of the top 10 verified images",
        "needs": {"seeds": ("paper",)}, "source": "paper 4.1; the reference code keeps 4; 3 / 4 measured, docs 'Design decisions'"})
    seeds: str = field(default="verified", metadata={
        "flag": "--seeds", "stage": "rerank", "choices": SEEDS,
        "help": "seeds of 'global+dsm+D': 'verified' = the plain seeds plus the confidently verified images, which "
                "also rank first; 'paper' = the top 10 verified weighted inliers / max x similarity, best --dsm-keep "
                "(paper 4.1)", "source": "ours, measured, docs 'Diffusion'"})
    confident_mads: float = field(default=8.0, metadata={
        "flag": "--confident-mads", "stage": "rerank", "needs": {"seeds": ("verified",)},
        "help": "a verified image is confident when its inliers reach the median of its query's top-k plus this many "
                "median absolute deviations", "source": "measured on five sets, docs 'Diffusion'"})
    confident_ratio: float = field(default=2.5, metadata={
        "flag": "--confident-ratio", "stage": "rerank", "needs": {"seeds": ("verified",)},
        "help": "a verified image is confident only when its inliers also reach this many times the median of its "
                "query's top-k", "source": "measured on five sets, docs 'Diffusion'"})
    similarity_weight: float = field(default=0.85, metadata={
        "flag": "--similarity-weight",
        "help": "final diffusion score: (1 - w) diffusion / max + w (similarity / best)^gamma, the similarity of the "
                "image's place in the ranking diffusion refines, w in [0, 1); 0 = the diffusion score alone (Iscen et "
                "al., the paper)", "source": "the smallest w that holds on five sets, docs 'Diffusion'"})
    dtype: torch.dtype = torch.float32  # fp32 suffices: condition number <= 1 / (1 - alpha)
    # sparse products (ours): "auto" (scipy on the CPU, torch elsewhere), "scipy", or "torch" (the
    # GPU path's CSR products and torch.linalg.vecdot reductions, on any device)
    sparse_backend: str = "auto"
    # None (default): solve on the whole graph (Iscen et al., the paper). R: truncated diffusion,
    # each query on the sub-graph of its top R initial images (fyang93/diffusion's truncated solve;
    # ours to offer: a 1M-image query then costs R nodes' edges, docs "Scaling out"); R must hold
    # every seed: at least query_k and dsm_candidates
    truncation_size: int | None = field(default=None, metadata={
        "flag": "--truncation-size", "type": int, "metavar": "R",
        "help": "truncated diffusion: solve each query on the sub-graph of its top R images, R >= 10 (the seeds' "
                "candidates) (fyang93/diffusion's truncated solve; for large databases, docs 'Diffusion')",
        "default_text": "none, the whole graph as the paper", "source": "Iscen et al."})

    def __post_init__(self):
        # I - alpha S is positive definite (CG converges) only for 0 < alpha < 1: |eig(S)| <= 1
        for name in ("alpha", "small_alpha", "large_alpha"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 < value < 1):
                raise ValueError(f"diffusion {name} must lie in (0, 1), got {value}")
        if self.large_database < 1:
            raise ValueError(f"diffusion large_database must be >= 1, got {self.large_database}")
        if not (math.isfinite(self.tol) and self.tol > 0):
            raise ValueError(f"diffusion tol must be > 0, got {self.tol}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"diffusion gamma must be > 0, got {self.gamma}")
        if self.truncation_size is not None and int(self.truncation_size) < max(self.query_k, self.dsm_candidates):
            raise ValueError(f"diffusion truncation_size must hold the seeds: at least query_k ({self.query_k}) and "
                             f"dsm_candidates ({self.dsm_candidates}), got {self.truncation_size}")
        if self.seeds not in SEEDS:
            raise ValueError(f"diffusion seeds must be one of {SEEDS}, got {self.seeds!r}")
        for name in ("confident_mads", "confident_ratio"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"diffusion {name} must be a finite number >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.similarity_weight) and 0 <= self.similarity_weight < 1):
            raise ValueError(f"diffusion similarity_weight must lie in [0, 1) (1 would ignore diffusion), got {self.similarity_weight}")
        for name in ("max_iter", "query_k", "dsm_candidates", "dsm_keep"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"diffusion {name} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"diffusion dtype must be torch.float32 or torch.float64, got {self.dtype}")
        if self.sparse_backend not in SPARSE_BACKENDS:
            raise ValueError(f"diffusion sparse_backend must be one of {SPARSE_BACKENDS}, got {self.sparse_backend!r}")

    @classmethod
    def paper(cls) -> "DiffusionConfig":
        """The paper's diffusion: alpha 0.99, its DSM seeds (top 10 verified, best 5), the
        diffusion score alone (paper 4.1, Iscen et al.); the paper's graph is ``GraphConfig(k=50)``."""
        return cls(alpha=cls.large_alpha, seeds="paper", similarity_weight=0.0)

    def alpha_for(self, num_nodes: int) -> float:
        """The alpha used on a database of ``num_nodes`` images."""
        if self.alpha is not None:
            return float(self.alpha)
        return float(self.large_alpha if num_nodes >= self.large_database else self.small_alpha)


class ConvergenceWarning(UserWarning):
    """Conjugate gradient stopped at its iteration limit above its tolerance."""


@dataclass
class CGInfo:
    """Convergence of a batched solve: iterations run and final relative residual per column."""

    iterations: int
    relative_residual: torch.Tensor


def conjugate_gradient(affinity: torch.Tensor | SparseOperator, rhs: torch.Tensor, alpha: float = 0.99, tol: float = 1e-6,
                       max_iter: int = 20, restrict: bool = True, backend: str = "auto") -> tuple[torch.Tensor, CGInfo]:
    """Solve ``(I - alpha S) F = Y`` for every column of ``rhs (N, Q)``; ``S`` sparse ``(N, N)`` symmetric.

    Columns are independent CG runs sharing the products; a column whose relative residual is
    at most ``tol`` stops moving. Zero columns give zero solutions. With ``restrict`` the solve
    runs on the connected components of the graph that hold a seed of some column: elsewhere
    every iterate is exactly zero, so the result is the same, for less work on fragmented
    graphs (mutual kNN graphs often are). ``backend``: the sparse backend of the operator built
    from a sparse ``affinity`` (``gpu_dsm.kernels.sparse``; a `SparseOperator` keeps its
    own); the column reductions follow it (``"torch"``: ``torch.linalg.vecdot``).

    Args:
        affinity: ``(N, N)`` sparse (COO or CSR) symmetric ``S``, any device (the ``"scipy"``
            backend: the CPU), or its `SparseOperator`.
        rhs: ``(N, Q)`` finite floating point seeds ``Y``, on the operator's device; never modified.
        alpha: ``0 < alpha < 1``; tol: relative residual at which a column stops; max_iter: iterations at most.
    Returns:
        ``(F, CGInfo)``: ``F`` ``(N, Q)`` in the operator's dtype (built here: the dtype of
        ``rhs``) on its device, in the caller's node order; ``CGInfo.relative_residual`` ``(Q,)``
        in that dtype, on that device.
    """
    n = affinity.shape[0]
    rhs = _checked_rhs(rhs, n, alpha)
    op = affinity if isinstance(affinity, SparseOperator) else SparseOperator(affinity, rhs.dtype, backend=backend)
    internal = op.to_internal(rhs.to(op.dtype))
    # the solve overwrites its right-hand side: a copy this function owns, never the caller's
    # tensor (the torch backend and an operator without reordering keep the caller's order)
    shared = internal.untyped_storage().data_ptr() == rhs.untyped_storage().data_ptr()
    rhs = internal.clone(memory_format=torch.contiguous_format) if shared else internal.contiguous()
    if restrict and n:
        reached = op.reached_by(rhs)
        # extracting the sub-graph copies its part of the matrix: worth it when it is clearly smaller
        if reached.sum() < _RESTRICT_BELOW * n:
            rows = reached.nonzero().squeeze(1)
            f_reached, info = _conjugate_gradient(op.restricted(reached), rhs[rows], alpha, tol, max_iter)
            f = torch.zeros_like(rhs)
            f[op.original_index(rows)] = f_reached
            return f, info
    f, info = _conjugate_gradient(op, rhs, alpha, tol, max_iter)
    return op.from_internal(f), info


def truncated_conjugate_gradient(affinity: torch.Tensor | SparseOperator, rhs: torch.Tensor, candidates: torch.Tensor,
                                 alpha: float = 0.99, tol: float = 1e-6, max_iter: int = 20,
                                 backend: str = "auto") -> tuple[torch.Tensor, CGInfo]:
    """Solve column ``q`` of ``(I - alpha S) F = Y`` on the sub-graph induced by ``candidates[q]``.

    Truncated diffusion: each query's system is the sub-matrix of ``I - alpha S`` on its top ``R``
    images (the truncated solve of fyang93/diffusion, ``lap_alpha[ids][:, ids]``), so a solve
    costs ``R`` nodes' edges instead of the whole graph's. All queries' sub-graphs form one
    block-diagonal operator: each iteration is one product, each column keeps its own CG steps
    (the result equals solving each query alone).

    Args:
        affinity: ``(N, N)`` sparse symmetric ``S`` (any device; the ``"scipy"`` backend: the
            CPU), or its `SparseOperator`.
        rhs: ``(N, Q)`` finite floating point seeds, any device (moved to the operator's); every
            non-zero of column ``q`` must lie on ``candidates[q]``.
        candidates: ``(Q, R)`` integer database indices, distinct within a row (e.g. the initial
            top R), any device.

    Returns:
        ``(F (N, Q), CGInfo)``: ``F`` is zero outside each column's candidates, in the operator's
        dtype (built here: the dtype of ``rhs``) on its device; ``CGInfo.relative_residual``
        ``(Q,)`` likewise.
    """
    n = affinity.shape[0]
    rhs = _checked_rhs(rhs, n, alpha)
    candidates = as_tensor(candidates, "candidates", ndim=2, kind="int", device=rhs.device).long()
    if candidates.shape[0] != rhs.shape[1]:
        raise ValueError(f"rhs must be ({n}, Q) and candidates (Q, R), got {tuple(rhs.shape)} and {tuple(candidates.shape)}")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= n):
        raise ValueError(f"candidates must be database indices in 0..{n - 1}")
    op = affinity if isinstance(affinity, SparseOperator) else SparseOperator(affinity, rhs.dtype, backend=backend)
    num_q, r = candidates.shape
    y = rhs.T.gather(1, candidates).to(op.dtype)  # (Q, R): column q's seeds on its candidates
    # what is left once the candidates are zeroed must be zero (NaN != 0 counts too); one clone and
    # one reduction over all entries instead of per-column counts of a strided (N, Q) mask (5x faster)
    rest = rhs.clone()
    rest.T.scatter_(1, candidates, 0.0)
    if bool(rest.any()):
        q = int(rest.any(0).nonzero()[0, 0])
        raise ValueError(f"diffusion: query {q} has seeds outside its {r} candidates (truncation_size): the "
                         "candidates must hold every seed")
    blocks = op.induced_blocks(op.internal_index(candidates.to(op.device)))

    def product(p: torch.Tensor, out: torch.Tensor) -> None:  # p, out (R, Q): column q is block q
        shifted = blocks.shifted_product(p.T.contiguous().view(num_q * r, 1), alpha)
        out.copy_(shifted.view(num_q, r).T)

    f_sub, info = _solve(product, y.to(op.device).T.contiguous(), tol, max_iter, op.backend)
    f = torch.zeros(n, num_q, dtype=op.dtype, device=f_sub.device)
    f.scatter_(0, candidates.to(f.device).T, f_sub)
    return f, info


def _checked_rhs(rhs, n: int, alpha: float) -> torch.Tensor:
    """``rhs`` as a finite floating point ``(n, Q)`` tensor, with ``0 < alpha < 1`` checked: the
    inputs of both solvers."""
    if not (math.isfinite(alpha) and 0 < alpha < 1):
        raise ValueError(f"alpha must lie in (0, 1) (I - alpha S is then positive definite), got {alpha}")
    rhs = as_tensor(rhs, "rhs", kind="float")
    if rhs.ndim != 2 or rhs.shape[0] != n:
        raise ValueError(f"rhs must be ({n}, Q), got {tuple(rhs.shape)}")
    # max and min propagate NaN: two reductions instead of a (N, Q) bool mask (20x faster on the CPU)
    if rhs.numel() and not torch.isfinite(torch.stack([rhs.amax(), rhs.amin()])).all():
        raise ValueError("diffusion seeds contain NaN or Inf")
    return rhs


def _conjugate_gradient(op: SparseOperator, rhs: torch.Tensor, alpha: float, tol: float, max_iter: int) -> tuple[torch.Tensor, CGInfo]:
    """Batched CG on ``op``'s internal order (see `conjugate_gradient`); overwrites ``rhs``."""
    return _solve(lambda p, out: op.shifted_product(p, alpha, out=out), rhs, tol, max_iter, op.backend)


def _solve(product, rhs: torch.Tensor, tol: float, max_iter: int, backend: str) -> tuple[torch.Tensor, CGInfo]:
    """Batched CG for ``A F = rhs`` (``rhs (N, Q)``, overwritten), ``product(p, out)`` writing
    ``A p`` into ``out``; each column keeps its own steps and stops at its tolerance.

    Few fresh ``(N, Q)`` buffers: on the CPU their first touch (page faults) costs as much as
    several iterations' vector operations. The reductions run as the products do: the torch
    sparse backend (the GPU path) with ``torch.linalg.vecdot``, the scipy one with numpy.
    """
    dots = "torch" if backend == "torch" else "auto"

    def column_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return _column_dots(a, b, backend=dots)

    rs = column_dots(rhs, rhs)
    norm_y = rs.sqrt().clamp(min=1e-30)
    r = rhs.contiguous()
    p = r.clone()
    f = torch.zeros_like(r)
    ap = torch.empty_like(r)
    active = rs.sqrt() / norm_y > tol
    it = 0
    for it in range(1, max_iter + 1):
        if not active.any():
            it -= 1
            break
        product(p, ap)
        denom = column_dots(p, ap)
        step = torch.where(active & (denom > 0), rs / denom.clamp(min=1e-30), torch.zeros_like(rs))
        f.addcmul_(p, step)
        r.addcmul_(ap, step, value=-1.0)
        rs_new = column_dots(r, r)
        beta = torch.where(active, rs_new / rs.clamp(min=1e-30), torch.zeros_like(rs))
        torch.addcmul(r, p, beta, out=p)
        rs = rs_new
        active = active & (rs.sqrt() / norm_y > tol)
    return f, CGInfo(iterations=it, relative_residual=rs.sqrt() / norm_y)


def plain_seeds(similarities: torch.Tensor, ranks: torch.Tensor, num_nodes: int, query_k: int = 10,
                gamma: float = 3.0) -> torch.Tensor:
    """``(N, Q)`` seeds from each query's ``query_k`` best initial similarities: ``similarity^gamma``
    (negative similarities count as 0) at those images, zero elsewhere (Iscen et al. 2017).

    Args:
        similarities: ``(Q, >= K)`` finite real initial scores, best first (moved to the device of ``ranks``).
        ranks: ``(Q, K)`` integer database indices in ``0..num_nodes - 1``, in the same order;
            the first ``min(query_k, K)`` of each row are the seeds.
        num_nodes: ``N``, the database images.
    Returns:
        ``(N, Q)`` float32 on the device of ``ranks``.

    Examples:
        >>> import torch
        >>> plain_seeds(torch.tensor([[0.9, 0.5, 0.1]]), torch.tensor([[2, 0, 1]]), 4, query_k=2, gamma=1.0)
        tensor([[0.5000],
                [0.0000],
                [0.9000],
                [0.0000]])
    """
    similarities, ranks = _seed_inputs(similarities, ranks, num_nodes, "ranks")
    k = min(query_k, ranks.shape[1])
    y = torch.zeros(num_nodes, ranks.shape[0], dtype=torch.float32, device=ranks.device)
    weights = similarities[:, :k].float().clamp(min=0).pow(gamma)
    y[ranks[:, :k].T, torch.arange(ranks.shape[0], device=ranks.device)[None, :].expand(k, -1)] = weights.T
    return y


def dsm_seeds(similarities: torch.Tensor, indices: torch.Tensor, inliers: torch.Tensor, num_nodes: int,
              candidates: int = 10, keep: int = 5, gamma: float = 3.0) -> torch.Tensor:
    """``(N, Q)`` seeds from spatially verified candidates.

    Of the first ``candidates`` of each row, weight ``inliers / max inliers * similarity``
    (negative similarities count as 0), the best ``keep`` of them are seeds (ties: row order);
    a row without any inlier takes ``similarity^gamma`` instead (the plain query). Rows of
    ``similarities``, ``indices`` and ``inliers`` are in re-ranked order: the global similarity,
    database index and inlier count of each re-ranked candidate.

    Args:
        similarities: ``(Q, >= K)`` finite real global similarities (moved to the device of ``indices``).
        indices: ``(Q, K)`` integer database indices in ``0..num_nodes - 1``.
        inliers: ``(Q, K)`` inlier counts, any real or integer dtype (moved to the device of ``indices``).
        num_nodes: ``N``, the database images.
    Returns:
        ``(N, Q)`` float32 on the device of ``indices``.

    Examples:
        Candidate 1 has the most inliers: weight ``6/6 * 0.8``; candidate 0 ``3/6 * 0.9``; the
        third, without inliers, is not kept:

        >>> import torch
        >>> dsm_seeds(torch.tensor([[0.9, 0.8, 0.7]]), torch.tensor([[3, 0, 1]]), torch.tensor([[3, 6, 0]]), 4, keep=2)
        tensor([[0.8000],
                [0.0000],
                [0.0000],
                [0.4500]])
    """
    similarities, indices = _seed_inputs(similarities, indices, num_nodes, "indices")
    inliers = as_tensor(inliers, "inliers", kind="number", device=indices.device)
    check_shape(inliers, tuple(indices.shape), "inliers (like indices)")
    c = min(candidates, indices.shape[1])
    inl = inliers[:, :c].float()
    sim = similarities[:, :c].float().clamp(min=0)
    weight = inl / inl.amax(1, keepdim=True).clamp(min=1) * sim
    no_inliers = inl.amax(1) == 0
    weight = torch.where(no_inliers[:, None], sim.pow(gamma), weight)
    keep = min(keep, c)
    best = torch.argsort(weight, dim=1, descending=True, stable=True)[:, :keep]
    y = torch.zeros(num_nodes, indices.shape[0], dtype=torch.float32, device=indices.device)
    cols = torch.arange(indices.shape[0], device=indices.device)[None, :].expand(keep, -1)
    y[indices.gather(1, best).T, cols] = weight.gather(1, best).T
    return y


def confident_matches(inliers: torch.Tensor, mads: float = 8.0, ratio: float = 2.5) -> torch.Tensor:
    """Which verified candidates are confident matches: ``(Q, K)`` bool.

    A query's top-k is mostly images that do not match it (``K = 100`` candidates, a handful of
    true matches), so the median of its inlier counts and their median absolute deviation (MAD,
    at least 1) say how many inliers a non-match gets. A candidate is confident when its count is
    at least ``median + mads * MAD`` and at least ``ratio * median``: far out of the non-matches'
    spread, and a multiple of their typical count (the spread alone lets non-matches through when
    the counts are large and tightly spread). The rule is per query: counts scale with the image
    sizes and the number of features, a fixed count does not.

    Args:
        inliers: ``(Q, K)`` inlier counts of each query's verified candidates, any order, any
            real or integer dtype, any device.
        mads: how many MADs above the median. ratio: how many times the median.
    Returns:
        ``(Q, K)`` bool on the device of ``inliers``, in its order.

    Examples:
        Nine candidates with 4-6 inliers and one with 20 (median 5, MAD 1: 13 and 12.5 inliers):

        >>> import torch
        >>> confident_matches(torch.tensor([[5, 4, 20, 6, 5, 4, 6, 5, 5, 4]]))
        tensor([[False, False,  True, False, False, False, False, False, False, False]])
    """
    inliers = as_tensor(inliers, "inliers", ndim=2, kind="number")
    for name, value in (("mads", mads), ("ratio", ratio)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    if inliers.shape[1] == 0:
        return torch.zeros(inliers.shape, dtype=torch.bool, device=inliers.device)
    counts = inliers.double()
    median = counts.median(1, keepdim=True).values  # the lower median: exact, no interpolation
    mad = (counts - median).abs().median(1, keepdim=True).values.clamp(min=1.0)
    return (counts >= median + mads * mad) & (counts >= ratio * median)


def verified_seeds(similarities: torch.Tensor, ranks: torch.Tensor, confident: torch.Tensor, num_nodes: int,
                   query_k: int = 10, gamma: float = 3.0) -> torch.Tensor:
    """``(N, Q)`` seeds: the query's plain seeds ([`plain_seeds`][gpu_dsm.diffusion.plain_seeds]), and every confidently
    verified image at the weight of the query's best match, ``max(similarity_1, 0)^gamma``.

    A confident match is as likely relevant as the query's nearest neighbour, whatever its own
    similarity: that is what verification adds. Without confident images these are exactly the
    plain seeds.

    Args:
        similarities: ``(Q, >= K)`` finite real initial scores, best first (initial order).
        ranks: ``(Q, >= K)`` integer database indices in ``0..num_nodes - 1``, in the same order.
        confident: ``(Q, K)`` bool, the confident candidates among the first ``K`` of ``ranks``
            ([`confident_matches`][gpu_dsm.diffusion.confident_matches]), on the device of ``ranks``.
        num_nodes: ``N``, the database images.
    Returns:
        ``(N, Q)`` float32 on the device of ``ranks``.

    Examples:
        Image 3, fourth of the initial ranking, is a confident match; the plain seeds are the top 2:

        >>> import torch
        >>> sims, ranks = torch.tensor([[0.9, 0.8, 0.5, 0.4]]), torch.tensor([[2, 0, 1, 3]])
        >>> verified_seeds(sims, ranks, torch.tensor([[False, False, False, True]]), 5, query_k=2, gamma=1.0).T
        tensor([[0.8000, 0.0000, 0.9000, 0.9000, 0.0000]])
    """
    y = plain_seeds(similarities, ranks, num_nodes, query_k, gamma)
    similarities, ranks = _seed_inputs(similarities, ranks, num_nodes, "ranks")
    confident = as_tensor(confident, "confident", ndim=2, device=ranks.device)
    if confident.dtype != torch.bool:
        raise TypeError(f"confident must be a bool tensor, got {confident.dtype}")
    k = confident.shape[1]
    if confident.shape[0] != ranks.shape[0] or k > ranks.shape[1]:
        raise ValueError(f"confident {tuple(confident.shape)} must be (Q, K) with K at most the columns of ranks "
                         f"{tuple(ranks.shape)}")
    if k == 0 or ranks.shape[0] == 0:
        return y
    best = similarities[:, :1].float().clamp(min=0).pow(gamma)  # (Q, 1): the query's best match
    current = y.T.gather(1, ranks[:, :k])
    y.T.scatter_(1, ranks[:, :k], torch.where(confident, torch.maximum(current, best), current))
    return y


def fused_scores(scores: torch.Tensor, similarities: torch.Tensor, ranks: torch.Tensor, weight: float,
                 gamma: float = 3.0) -> torch.Tensor:
    """Final scores ``(N, Q)``: ``(1 - weight) * f / max f + weight * (s / s_best)^gamma``.

    ``f`` is each image's diffusion score and ``s`` the similarity of its place in ``ranks``
    (negative counts as 0), both divided by the query's largest, so the two terms share the scale
    ``[0, 1]``. For the initial ranking ``s`` is the image's own similarity; for a re-ranked one
    ([`gpu_dsm.ranking.diffuse_verified`][gpu_dsm.ranking.diffuse_verified]) the ``j``-th best similarity goes to the image at
    place ``j``, so the term keeps the re-ranked order.
    Diffusion then re-orders the initial ranking instead of replacing it: an image diffusion does
    not reach keeps its initial similarity's share, ahead of a reached image the query does not
    resemble (SuperGlobal, Shao et al. 2023, averages an initial and an expanded score likewise).
    ``weight = 0`` is the diffusion score alone. Images missing from ``ranks`` (a top-M of a
    larger database) get the diffusion term only.

    Args:
        scores: ``(N, Q)`` real diffusion scores ([`diffuse`][gpu_dsm.diffusion.diffuse]), any device.
        similarities: ``(Q, M)`` finite real scores of the places of ``ranks``.
        ranks: ``(Q, M)`` integer database indices, distinct within a row, in ``0..N - 1``.
        weight: in ``[0, 1)``. gamma: the exponent of the similarities (the seeds' gamma).
    Returns:
        ``(N, Q)`` in the dtype of ``scores`` on its device.

    Examples:
        Image 1, reached by diffusion but unlike the query, falls behind image 0, the query's
        nearest neighbour, which diffusion scores lower:

        >>> import torch
        >>> f = torch.tensor([[0.4], [0.8], [0.0]])
        >>> fused_scores(f, torch.tensor([[1.0, 0.5, 0.2]]), torch.tensor([[0, 2, 1]]), weight=0.5, gamma=1.0).T
        tensor([[0.7500, 0.6000, 0.2500]])
    """
    scores, similarities, ranks = _fusion_inputs(scores, similarities, ranks, weight)
    fused = (1 - weight) * (scores / _largest_scores(scores)[None, :])
    if weight == 0 or ranks.shape[1] == 0:
        return fused
    fused.T.scatter_add_(1, ranks, _similarity_term(similarities, scores.dtype, weight, gamma))
    return fused


def _fusion_inputs(scores, similarities, ranks, weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checked inputs of [`fused_scores`][gpu_dsm.diffusion.fused_scores] and
    [`fused_ranking`][gpu_dsm.diffusion.fused_ranking]: ``(scores (N, Q), similarities (Q, M), ranks (Q, M))``."""
    if not (math.isfinite(weight) and 0 <= weight < 1):
        raise ValueError(f"weight must lie in [0, 1), got {weight}")
    scores = as_tensor(scores, "scores", ndim=2, kind="float")
    similarities, ranks = _seed_inputs(similarities, ranks.to(scores.device), scores.shape[0], "ranks")
    check_shape(similarities, tuple(ranks.shape), "similarities (like ranks)")
    if ranks.shape[0] != scores.shape[1]:
        raise ValueError(f"scores {tuple(scores.shape)} must be (N, Q) for ranks {tuple(ranks.shape)}")
    return scores, similarities, ranks


def _largest_scores(scores: torch.Tensor) -> torch.Tensor:
    """``(Q,)`` each query's largest diffusion score (at least the dtype's smallest normal), the
    scale of the diffusion term; torch.max over dim 0 of an ``(N, Q)`` tensor is 2-3x faster than
    amax on the CPU."""
    return torch.max(scores, 0).values.clamp(min=torch.finfo(scores.dtype).tiny)


def _similarity_term(similarities: torch.Tensor, dtype: torch.dtype, weight: float, gamma: float) -> torch.Tensor:
    """``(Q, M)`` the fused score's similarity term: ``weight * (s / s_best)^gamma``, negative ``s`` as 0."""
    s = similarities.to(dtype).clamp(min=0).pow(gamma)
    return weight * (s / s.amax(1, keepdim=True).clamp(min=torch.finfo(dtype).tiny))


def fused_ranking(scores: torch.Tensor, similarities: torch.Tensor, ranks: torch.Tensor, weight: float,
                  gamma: float = 3.0) -> torch.Tensor:
    """The images of ``ranks`` ordered by [`fused_scores`][gpu_dsm.diffusion.fused_scores], ties in the order of ``ranks``:
    ``diffusion_ranking(fused_scores(...), ranks)``, computed on the places of ``ranks`` only.

    For a top-M of a large database (truncated diffusion at a million images) this reads the
    ``(N, Q)`` diffusion scores once (their per-query maximum) and does the rest on ``(Q, M)``,
    instead of building and scattering ``(N, Q)`` fused scores; the arithmetic per place is the
    same, so the ranking is identical.

    Args:
        scores: ``(N, Q)`` real diffusion scores ([`diffuse`][gpu_dsm.diffusion.diffuse]), any device.
        similarities: ``(Q, M)`` finite real scores of the places of ``ranks``.
        ranks: ``(Q, M)`` integer database indices, distinct within a row, in ``0..N - 1``.
        weight: in ``[0, 1)``. gamma: the exponent of the similarities.
    Returns:
        ``(Q, M)`` int64 database indices, best first, on the device of ``scores``.

    Examples:
        >>> import torch
        >>> f = torch.tensor([[0.4], [0.8], [0.0]])
        >>> fused_ranking(f, torch.tensor([[1.0, 0.5, 0.2]]), torch.tensor([[0, 2, 1]]), weight=0.5, gamma=1.0)
        tensor([[0, 1, 2]])
    """
    scores, similarities, ranks = _fusion_inputs(scores, similarities, ranks, weight)
    ranks = ranks.long()
    fused = (1 - weight) * (scores.T.gather(1, ranks) / _largest_scores(scores)[:, None])
    if weight != 0 and ranks.shape[1] != 0:
        fused = fused + _similarity_term(similarities, scores.dtype, weight, gamma)
    order = torch.argsort(fused, dim=1, descending=True, stable=True)
    return ranks.gather(1, order)


def confident_first(ranking: torch.Tensor, indices: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
    """``ranking`` with each row's confident images first, in the order of ``indices``.

    Args:
        ranking: ``(Q, M)`` int64 database indices, best first, distinct within a row.
        indices: ``(Q, K)`` int64 database indices of the verified candidates in their verified
            order (each one in its row of ``ranking``).
        confident: ``(Q, K)`` bool, which of them are confident ([`confident_matches`][gpu_dsm.diffusion.confident_matches]).
    All on one device. Returns:
        ``(Q, M)`` int64: the confident images in their verified order, then the rest of
        ``ranking`` in its order.

    Examples:
        >>> import torch
        >>> confident_first(torch.tensor([[4, 1, 3, 0, 2]]), torch.tensor([[3, 0, 1]]), torch.tensor([[True, True, False]]))
        tensor([[3, 0, 4, 1, 2]])
    """
    check_shape(indices, tuple(confident.shape), "indices (like confident)")
    if confident.shape[1] == 0 or ranking.shape[1] == 0:
        return ranking
    k = confident.shape[1]
    # the sort key of each image of ``ranking``: its verified position if confident, else k; found
    # by a batched binary search among the row's sorted candidates (no table of the whole database)
    keys = torch.where(confident, torch.arange(k, device=ranking.device).expand_as(indices), k)
    sorted_indices, by_index = indices.sort(dim=1)
    at = torch.searchsorted(sorted_indices, ranking).clamp(max=k - 1)
    found = sorted_indices.gather(1, at) == ranking
    key = torch.where(found, keys.gather(1, by_index.gather(1, at)), k)
    order = torch.argsort(key, dim=1, stable=True)
    return ranking.gather(1, order)


def _seed_inputs(similarities, indices, num_nodes: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Check ``similarities`` and database ``indices``: both ``(Q, K)``, finite, in ``0..num_nodes-1``."""
    indices = as_tensor(indices, name, ndim=2, kind="int")
    similarities = as_tensor(similarities, "similarities", kind="number", device=indices.device, finite=True)
    check_shape(similarities, (indices.shape[0], None), "similarities")
    if similarities.shape[1] < indices.shape[1]:
        raise ValueError(f"similarities {tuple(similarities.shape)} must have at least as many columns as {name} "
                         f"{tuple(indices.shape)}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_nodes):
        raise ValueError(f"{name} must be database indices in 0..{num_nodes - 1}")
    return similarities, indices


def diffusion_ranking(scores: torch.Tensor, initial_ranks: torch.Tensor) -> torch.Tensor:
    """Full ranking ``(Q, N)`` by diffusion scores ``(N, Q)``, ties (unreached images) in initial order.

    Args:
        scores: ``(N, Q)`` real diffusion scores ([`diffuse`][gpu_dsm.diffusion.diffuse]).
        initial_ranks: ``(Q, N)`` int64 database indices of each query's initial ranking, best
            first, on the device of ``scores``.
    Returns:
        ``(Q, N)`` int64 database indices, best first, on that device.

    Examples:
        >>> import torch
        >>> diffusion_ranking(torch.tensor([[0.0], [0.2], [0.0], [0.7]]), torch.tensor([[2, 1, 0, 3]]))
        tensor([[3, 1, 2, 0]])
    """
    # scores in initial order, then a stable sort: equal scores keep the initial order
    f = scores.T.gather(1, initial_ranks)
    order = torch.argsort(f, dim=1, descending=True, stable=True)
    return initial_ranks.gather(1, order)


def diffuse(graph: KnnGraph | SparseOperator | torch.Tensor, seeds: torch.Tensor,
            config: DiffusionConfig | None = None, ranks: torch.Tensor | None = None) -> tuple[torch.Tensor, CGInfo]:
    """Diffusion scores ``(N, Q)`` for seeds ``(N, Q)`` on a graph: a [`KnnGraph`][gpu_dsm.graph.KnnGraph] (its
    product operator is built once and kept), a `SparseOperator` (its own backend), or a
    sparse affinity; ``config.sparse_backend`` chooses the products of the first and last.

    With ``config.truncation_size`` R, each query is solved on the sub-graph of its first R
    images of ``ranks`` (``(Q, >= R)`` int64 database indices, best first; required then):
    [`truncated_conjugate_gradient`][gpu_dsm.diffusion.truncated_conjugate_gradient]. Scores are zero outside them.

    Warns ([`ConvergenceWarning`][gpu_dsm.diffusion.ConvergenceWarning]) when CG stops at ``max_iter`` with a column's relative
    residual above ``tol`` (the reference code's 20 iterations often do at alpha = 0.99): the
    result is then the truncated solve, and the warning says by how much.

    Args:
        graph: the database's graph; its products run on its device (the ``"scipy"`` backend: the CPU).
        seeds: ``(N, Q)`` finite floating point ([`plain_seeds`][gpu_dsm.diffusion.plain_seeds], [`dsm_seeds`][gpu_dsm.diffusion.dsm_seeds]), on the
            graph's device (any device with ``truncation_size``); converted to the solve's dtype.
        config: alpha, tolerance, iterations, dtype, backend, truncation (default [`DiffusionConfig`][gpu_dsm.diffusion.DiffusionConfig]).
        ranks: ``(Q, >= R)`` integer database indices, any device; only with ``truncation_size``.
    Returns:
        ``(F, CGInfo)``: ``F`` ``(N, Q)`` on the graph's device, in ``config.dtype`` (a
        `SparseOperator` graph: its own dtype); ``CGInfo.relative_residual`` ``(Q,)`` likewise.

    Examples:
        Five images in two components (``{0, 1, 2}`` and ``{3, 4}``) and one query whose initial
        ranking is ``0, 1, 2, 4, 3``:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from gpu_dsm.graph import GraphConfig, build_knn_graph
        >>> x = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.3], [0.0, 1.0], [0.1, 0.9]]), dim=1)
        >>> graph = build_knn_graph(x, GraphConfig(k=2))
        >>> ranks = torch.tensor([[0, 1, 2, 4, 3]])
        >>> similarities = torch.tensor([[1.0, 0.9, 0.8, 0.2, 0.1]])
        >>> config = DiffusionConfig(alpha=0.5)

        Seeded by the top image only, diffusion reaches its component; images 4 and 3 are not
        reached (score 0) and keep their initial order:

        >>> scores, info = diffuse(graph, plain_seeds(similarities, ranks, graph.num_nodes, query_k=1), config)
        >>> scores.shape, scores.dtype
        (torch.Size([5, 1]), torch.float32)
        >>> scores.T.round(decimals=3)
        tensor([[1.1990, 0.4150, 0.3830, 0.0000, 0.0000]])
        >>> info.iterations  # the solve ran on the 3-node component: CG is exact in 3 steps
        3
        >>> diffusion_ranking(scores, ranks)
        tensor([[0, 1, 2, 4, 3]])

        Seeded by the spatially verified candidates (image 1 with 12 inliers, image 2 with 3),
        image 1 leads:

        >>> seeds = dsm_seeds(similarities[:, :3], ranks[:, :3], torch.tensor([[0, 12, 3]]), graph.num_nodes, keep=2)
        >>> seeds.T
        tensor([[0.0000, 0.9000, 0.2000, 0.0000, 0.0000]])
        >>> scores, info = diffuse(graph, seeds, config)
        >>> diffusion_ranking(scores, ranks)
        tensor([[1, 2, 0, 4, 3]])
    """
    cfg = config or DiffusionConfig()
    seeds = as_tensor(seeds, "seeds", kind="float")
    if isinstance(graph, KnnGraph):
        op = graph.operator(cfg.dtype, cfg.sparse_backend)
    elif isinstance(graph, SparseOperator):
        op = graph
    else:
        op = SparseOperator(graph, cfg.dtype, backend=cfg.sparse_backend)
    alpha = cfg.alpha_for(seeds.shape[0])
    if cfg.truncation_size is None:
        f, info = conjugate_gradient(op, seeds.to(op.dtype), alpha, cfg.tol, cfg.max_iter)
    elif ranks is None:
        raise ValueError("diffusion with truncation_size needs each query's ranking (ranks) to take its top R from")
    else:
        r = min(int(cfg.truncation_size), seeds.shape[0])
        if ranks.shape[-1] < r:
            raise ValueError(f"diffusion: ranks hold {ranks.shape[-1]} images per query, truncation_size needs {r}")
        f, info = truncated_conjugate_gradient(op, seeds.to(op.dtype), ranks[:, :r], alpha, cfg.tol, cfg.max_iter)
    residual = info.relative_residual
    unconverged = int((residual > cfg.tol).sum()) if residual.numel() else 0
    if unconverged:
        warnings.warn(
            f"diffusion: conjugate gradient stopped after {info.iterations} iterations with {unconverged} of "
            f"{residual.numel()} queries above tol {cfg.tol:g} (largest relative residual {float(residual.max()):.2e}); "
            "raise max_iter (--cg-iterations) for the exact solution",
            ConvergenceWarning, stacklevel=2,
        )
    return f, info
