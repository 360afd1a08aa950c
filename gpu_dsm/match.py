"""Fast spatial matching of DSM features (paper 3.5-3.6; the authors' reference code, github.com/osimeoni/DSM).

For each (query, candidate) pair and each of the ``S x S`` (query scale, candidate scale) pairs:

1. tentative correspondences: all (query feature, candidate feature) pairs of the same channel;
2. one upright-affine hypothesis per correspondence, ``T = A2 A1^-1``, ``t = x2 - T x1``;
3. every hypothesis scored against every correspondence of its group (one batched matrix
   product, ``gpu_dsm.kernels.scoring``): inlier if the transfer error is below
   ``threshold^2`` and the correspondence's own scale change relative to ``T`` is within
   ``[1 / max_scale_change, max_scale_change]``; the count takes each feature once
   (``min`` of distinct query and distinct candidate features);
4. local optimisation of the best ``lo_hypotheses``: gather inliers at ``lo_factor`` times the
   threshold, least-squares 5-dof fit, re-score, keep if better, at most ``lo_rounds`` rounds;
5. the pair's score is the best count over its scale pairs.

Steps 2-4 run per group of correspondences (a pair's scale pair) by one of two backends
(``MatchConfig.backend``):

- ``"native"``: a C kernel on the CPU (:mod:`gpu_dsm.kernels.fsm`), threads over groups, with the
  float64 operations of the plain matcher (:mod:`gpu_dsm.reference.match`);
- ``"torch"``: tensor passes on any device: the groups are padded into one table, sorted by size
  and processed in chunks whose ``groups x hypotheses x correspondences`` stays under
  ``max_elements``, with no Python loop over candidates or hypotheses;
- ``"auto"`` (default): native on the CPU where the kernel builds, torch on other devices or
  without a C compiler (with a warning naming why).

Both give the plain matcher's inlier decisions.
"""
from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass

import torch

from gpu_dsm.checks import as_tensor
from gpu_dsm.features import LocalFeatures
from gpu_dsm.kernels import fsm, native
from gpu_dsm.kernels.scoring import ERRORS, count_unique, hypotheses_from_frames, inlier_mask, log_scale, scale_gate


BACKENDS = ("auto", "native", "torch")


@dataclass
class MatchConfig:
    """Spatial matching parameters; defaults from the paper (4.1) and the reference code."""

    # inlier threshold, pixels of the activation map. Paper 4.1: 2 (with the symmetric error);
    # 4 with one_way: the only setting positive on roxford5k-mini, -19q, -19q + distractors and
    # holidays-811 with EfficientNet-Lite0 (README, "Defaults chosen on the larger sets")
    threshold: float = 4.0
    max_scale_change: float = 3.0  # paper 4.1: maximal scale change 3
    # "symmetric" (reference code: both transfer directions summed) or "one_way" (forward only,
    # measured, README "Defaults chosen on the larger sets")
    error: str = "one_way"
    lo_hypotheses: int = 5  # reference code: local optimisation of the best 5 hypotheses
    lo_factor: float = 4.0  # reference code: gather inliers at 4x the threshold
    lo_rounds: int = 2  # reference code: at most 2 rounds
    lo_min_inliers: int = 4  # reference code: hypotheses with <= 3 inliers are not refined
    max_elements: int = 2**25  # torch backend's memory budget: groups x hypotheses x correspondences per chunk
    # "auto" | "native" (C kernel, CPU) | "torch" (any device); auto: the C kernel on the CPU where
    # it builds (11-13x faster than torch there on the real top-100 tables, eval/bench_match.py), torch elsewhere
    backend: str = "auto"

    def __post_init__(self):
        if self.error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {self.error!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 0) or not self.max_scale_change >= 1:
            raise ValueError(f"threshold must be > 0 and max_scale_change >= 1, got {self.threshold} and "
                             f"{self.max_scale_change}")
        if not self.lo_factor >= 1 or self.lo_hypotheses < 0 or self.lo_rounds < 0 or self.max_elements < 1 \
                or self.lo_min_inliers < 1:
            raise ValueError("lo_factor must be >= 1, lo_hypotheses and lo_rounds >= 0, lo_min_inliers and "
                             "max_elements >= 1")
        if self.backend not in BACKENDS:
            raise ValueError(f"MatchConfig.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class MatchResult:
    """Spatial verification of ``P`` (query, candidate) pairs.

    Fields:
        inliers: ``(P,)`` int64, best inlier count over the scale pairs (0 when nothing matches).
        transform: ``(P, 5)`` float64, winning ``(a, b, c, tx, ty)``: candidate point
            ``= [[a, 0], [b, c]] @ query point + (tx, ty)``, in feature-map pixels of the
            winning scales; NaN when ``inliers == 0``.
        scale_pair: ``(P, 2)`` int64, winning (query scale, candidate scale) indices; -1 if none.
        matches: ``(P, M, 2)`` int64, inlier correspondences of the winning hypothesis as
            (query feature row, candidate feature row) in the input tables; -1 padding. A
            feature may appear in several of them; ``inliers`` counts each feature once.
        correspondences: ``(P,)`` int64, tentative correspondences over all scale pairs.
    """

    inliers: torch.Tensor
    transform: torch.Tensor
    scale_pair: torch.Tensor
    matches: torch.Tensor
    correspondences: torch.Tensor


def _check_inputs(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor) -> None:
    if query.num_channels and candidates.num_channels and query.num_channels != candidates.num_channels:
        raise ValueError(
            f"query features have {query.num_channels} channels, candidates {candidates.num_channels}: "
            "they come from different backbones"
        )
    if query.device != candidates.device:
        raise ValueError(f"query features on {query.device}, candidate features on {candidates.device}")
    if query_index.shape != (candidates.num_images,):
        raise ValueError(f"query_index must be ({candidates.num_images},), got {tuple(query_index.shape)}")
    if candidates.num_images and (query_index.min() < 0 or query_index.max() >= query.num_images):
        raise ValueError("query_index points outside the query table")


def tentative_correspondences(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor,
                              num_scales: int) -> dict[str, torch.Tensor]:
    """All same-channel (query feature, candidate feature) pairs, grouped by (pair, scale pair).

    A sort-merge join on ``(pair, channel)`` keys: ``O(F log F)`` in the number of features,
    never a (query x candidate) comparison table. Returns flat tensors sorted by group then
    (query row, candidate row): ``pair``, ``qrow``, ``crow``, ``group``
    (``pair * S^2 + query scale * S + candidate scale``).
    """
    device = candidates.device
    channels = int(max(query.num_channels, candidates.num_channels,
                       int(query.channel.max()) + 1 if query.channel.numel() else 1,
                       int(candidates.channel.max()) + 1 if candidates.channel.numel() else 1))
    # candidate side: one key per valid feature, sorted (flat gathers: index_select, not 2-D indexing)
    c_cap = candidates.capacity
    c_flat = candidates.valid.reshape(-1).nonzero().squeeze(1)
    c_pair = torch.div(c_flat, max(c_cap, 1), rounding_mode="floor")
    c_key = c_pair * channels + candidates.channel.reshape(-1).index_select(0, c_flat)
    c_order = torch.argsort(c_key, stable=True)
    c_key, c_flat = c_key.index_select(0, c_order), c_flat.index_select(0, c_order)
    # query side: the valid features of each pair's query
    q_cap = query.capacity
    q_flat = query.valid.index_select(0, query_index).reshape(-1).nonzero().squeeze(1)  # pair * q_cap + row
    q_pair = torch.div(q_flat, max(q_cap, 1), rounding_mode="floor")
    q_at = query_index.index_select(0, q_pair) * q_cap + (q_flat - q_pair * q_cap)  # row of the query table
    q_key = q_pair * channels + query.channel.reshape(-1).index_select(0, q_at)
    num_keys = candidates.num_images * channels
    if num_keys <= 4 * (c_key.numel() + q_key.numel()) + (1 << 20):
        # a dense table of key counts: O(F) instead of two binary searches per query feature
        counts = torch.bincount(c_key, minlength=num_keys)
        first = torch.cumsum(counts, 0) - counts
        lo, n = first.index_select(0, q_key), counts.index_select(0, q_key)
    else:
        lo = torch.searchsorted(c_key, q_key, right=False)
        n = torch.searchsorted(c_key, q_key, right=True) - lo
    rep = torch.repeat_interleave(n)
    offset = torch.arange(rep.numel(), device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    c_at = c_flat.index_select(0, lo.index_select(0, rep) + offset)  # pair * c_cap + row
    q_at = q_at.index_select(0, rep)
    pair = q_pair.index_select(0, rep)
    qrow = q_at - query_index.index_select(0, pair) * q_cap
    crow = c_at - pair * c_cap
    qscale = query.scale.reshape(-1).index_select(0, q_at)
    cscale = candidates.scale.reshape(-1).index_select(0, c_at)
    group = pair * num_scales * num_scales + qscale * num_scales + cscale
    width = max(query.capacity, candidates.capacity, 1)
    order = torch.argsort((group * width + qrow) * width + crow)
    return {"pair": pair.index_select(0, order), "qrow": qrow.index_select(0, order),
            "crow": crow.index_select(0, order), "group": group.index_select(0, order)}


def _least_squares(x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted 5-dof upright-affine fit: ``x1, x2 (G, C, 2)``, ``weight (G, H, C)`` -> params, ok."""
    w = weight.double()
    X, Y = x1[..., 0].double()[:, None], x1[..., 1].double()[:, None]
    U, V = x2[..., 0].double()[:, None], x2[..., 1].double()[:, None]

    def s(t):
        return (w * t).sum(-1)

    n, sx, sy = w.sum(-1), s(X), s(Y)
    sxx, sxy, syy = s(X * X), s(X * Y), s(Y * Y)
    m2 = torch.stack([torch.stack([sxx, sx], -1), torch.stack([sx, n], -1)], -2)
    m3 = torch.stack([torch.stack([sxx, sxy, sx], -1), torch.stack([sxy, syy, sy], -1), torch.stack([sx, sy, n], -1)], -2)
    det2, det3 = torch.linalg.det(m2), torch.linalg.det(m3)
    ok = (n >= 3) & (det2.abs() > 1e-9 * (1 + sxx * n)) & (det3.abs() > 1e-9 * (1 + sxx * syy * n))
    eye2, eye3 = torch.eye(2, dtype=w.dtype, device=w.device), torch.eye(3, dtype=w.dtype, device=w.device)
    m2 = torch.where(ok[..., None, None], m2, eye2)
    m3 = torch.where(ok[..., None, None], m3, eye3)
    ax = torch.linalg.solve(m2, torch.stack([s(X * U), s(U)], -1))
    by = torch.linalg.solve(m3, torch.stack([s(X * V), s(Y * V), s(V)], -1))
    params = torch.stack([ax[..., 0], by[..., 0], by[..., 1], ax[..., 1], by[..., 2]], -1)
    ok &= (params[..., 0] > 0) & (params[..., 2] > 0) & torch.isfinite(params).all(-1)
    return params, ok


class _GroupTable:
    """Padded correspondences of a chunk of groups, ``(G, C)``."""

    def __init__(self, query, candidates, query_index, corr, sizes, starts):
        device = candidates.device
        cmax = int(sizes.max())
        slot = torch.arange(cmax, device=device)
        self.valid = slot[None, :] < sizes[:, None]
        flat = (starts[:, None] + slot[None, :]).clamp(max=corr["pair"].numel() - 1)
        self.pair = corr["pair"][flat]
        self.qrow = corr["qrow"][flat]
        self.crow = corr["crow"][flat]
        qimg = query_index[self.pair]
        self.x1 = query.xy[qimg, self.qrow]
        self.x2 = candidates.xy[self.pair, self.crow]
        params = hypotheses_from_frames(query.frame[qimg, self.qrow].double(), candidates.frame[self.pair, self.crow].double(),
                                        self.x1.double(), self.x2.double())
        ok = self.valid & torch.isfinite(params).all(-1) & (params[..., 0] > 0) & (params[..., 2] > 0)
        self.hyp_valid = ok
        self.params = torch.where(ok[..., None], params, torch.tensor([1.0, 0, 1.0, 0, 0], dtype=torch.float64, device=device))
        self.log_scale = log_scale(self.params)
        # compact per-group feature ids for "each feature counted once"
        self.qid, self.num_q = self._compact(self.qrow)
        self.cid, self.num_c = self._compact(self.crow)

    def _compact(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        g, c = rows.shape
        key = torch.arange(g, device=rows.device)[:, None] * (int(rows.max()) + 1 if rows.numel() else 1) + rows
        _, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((g,), inverse.numel(), dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, torch.arange(g, device=rows.device)[:, None].expand(g, c).reshape(-1), inverse.reshape(-1), "amin")
        local = inverse - first[:, None]
        return local, int(local.max()) + 1 if local.numel() else 1

    def score(self, params: torch.Tensor, log_s: torch.Tensor, threshold_sq: float, cfg: MatchConfig):
        """Inlier masks ``(G, H, C)`` and deduplicated counts ``(G, H)`` of hypotheses ``(G, H, 5)``."""
        mask = inlier_mask(params, self.x1, self.x2, self.valid, threshold_sq, cfg.error)
        mask &= scale_gate(self.log_scale, log_s, cfg.max_scale_change)
        count = torch.minimum(count_unique(mask, self.qid, self.num_q), count_unique(mask, self.cid, self.num_c))
        return mask, count


def _verify_groups(table: _GroupTable, cfg: MatchConfig):
    """Best hypothesis of every group of the table: (count, params, inlier mask)."""
    th2 = cfg.threshold ** 2
    mask, count = table.score(table.params, table.log_scale, th2, cfg)
    count = torch.where(table.hyp_valid, count, torch.zeros_like(count))
    k = min(max(cfg.lo_hypotheses, 1), count.shape[1])
    order = torch.argsort(count, dim=1, descending=True, stable=True)[:, :k]
    best_params = table.params.gather(1, order[..., None].expand(-1, -1, 5))
    best_count = count.gather(1, order)
    best_mask = mask.gather(1, order[..., None].expand(-1, -1, mask.shape[2]))
    active = (best_count >= cfg.lo_min_inliers) & (cfg.lo_hypotheses > 0)
    for _ in range(cfg.lo_rounds):
        if not active.any():
            break
        wide, _ = table.score(best_params, log_scale(best_params), (cfg.lo_factor * cfg.threshold) ** 2, cfg)
        fitted, ok = _least_squares(table.x1, table.x2, wide & active[..., None])
        fitted = torch.where(ok[..., None], fitted, best_params)
        new_mask, new_count = table.score(fitted, log_scale(fitted), th2, cfg)
        improved = active & ok & (new_count > best_count)
        best_params = torch.where(improved[..., None], fitted, best_params)
        best_count = torch.where(improved, new_count, best_count)
        best_mask = torch.where(improved[..., None], new_mask, best_mask)
        active = improved
    top = torch.argmax(best_count, dim=1)  # first of equal counts: the better-ranked initial hypothesis
    pick = torch.arange(top.numel(), device=top.device)
    return best_count[pick, top], best_params[pick, top], best_mask[pick, top]


def spatial_verify(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor | None = None,
                   config: MatchConfig | None = None) -> MatchResult:
    """Spatially verify every candidate against its query.

    Args:
        query: ``Q`` query images' features.
        candidates: ``P`` candidate images' features.
        query_index: ``(P,)`` which query each candidate belongs to (default: all query 0).
        config: matching parameters (paper defaults).
    Returns:
        :class:`MatchResult` over the ``P`` pairs, on the features' device.
    """
    cfg = config or MatchConfig()
    for name, features in (("query", query), ("candidates", candidates)):
        if not isinstance(features, LocalFeatures):
            raise TypeError(f"spatial_verify: {name} must be LocalFeatures, got {type(features).__name__}")
    device = candidates.device
    if query_index is not None:
        query_index = as_tensor(query_index, "query_index", kind="int")
    if query_index is None:
        query_index = torch.zeros(candidates.num_images, dtype=torch.long, device=device)
    query_index = query_index.to(device=device, dtype=torch.long)
    _check_inputs(query, candidates, query_index)
    num_pairs = candidates.num_images
    num_scales = max(int(query.scale.max()) if query.valid.any() else 0,
                     int(candidates.scale.max()) if candidates.valid.any() else 0) + 1
    num_scales = max(num_scales, len(query.scales), len(candidates.scales), 1)
    corr = tentative_correspondences(query, candidates, query_index, num_scales)
    inliers = torch.zeros(num_pairs, dtype=torch.long, device=device)
    transform = torch.full((num_pairs, 5), float("nan"), dtype=torch.float64, device=device)
    scale_pair = torch.full((num_pairs, 2), -1, dtype=torch.long, device=device)
    n_corr = torch.bincount(corr["pair"], minlength=num_pairs)
    empty_matches = torch.full((num_pairs, 0, 2), -1, dtype=torch.long, device=device)
    if corr["group"].numel() == 0:
        return MatchResult(inliers, transform, scale_pair, empty_matches, n_corr)
    groups, sizes = torch.unique_consecutive(corr["group"], return_counts=True)
    starts = torch.cumsum(sizes, 0) - sizes
    if choose_backend(cfg.backend, device) == "native":
        best_count, best_params, mask = _verify_native(query, candidates, query_index, corr, sizes, cfg)
    else:
        best_count, best_params, mask = _verify_torch(query, candidates, query_index, corr, sizes, starts, cfg)
    # best scale pair per (query, candidate) pair: highest count, then lowest scale-pair index
    pair_of_group = groups // (num_scales * num_scales)
    key = best_count * (num_scales * num_scales + 1) + (num_scales * num_scales - groups % (num_scales * num_scales))
    best_key = torch.zeros(num_pairs, dtype=torch.long, device=device).scatter_reduce_(0, pair_of_group, key, "amax")
    is_winner = (key == best_key[pair_of_group]) & (best_count > 0)
    win_groups = is_winner.nonzero().squeeze(1)
    wp = pair_of_group[win_groups]
    inliers[wp] = best_count[win_groups]
    transform[wp] = best_params[win_groups]
    sp = groups[win_groups] % (num_scales * num_scales)
    scale_pair[wp] = torch.stack([sp // num_scales, sp % num_scales], 1)
    # inlier correspondences of the winners, in (query row, candidate row) order per pair
    chosen = (mask & torch.repeat_interleave(is_winner, sizes)).nonzero().squeeze(1)
    if chosen.numel():
        p_all, q_all, c_all = corr["pair"][chosen], corr["qrow"][chosen], corr["crow"][chosen]
        counts = torch.bincount(p_all, minlength=num_pairs)
        slot = torch.arange(p_all.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[p_all]
        matches = torch.full((num_pairs, int(counts.max()), 2), -1, dtype=torch.long, device=device)
        matches[p_all, slot] = torch.stack([q_all, c_all], 1)
    else:
        matches = empty_matches
    return MatchResult(inliers, transform, scale_pair, matches, n_corr)


def choose_backend(wanted: str, device: torch.device | str) -> str:
    """``"native"`` or ``"torch"`` for features on ``device``: ``wanted`` (``MatchConfig.backend``)
    resolved. The C kernel runs on the CPU; ``"auto"`` falls back to torch, with a warning, where
    it does not build."""
    if wanted not in BACKENDS:
        raise ValueError(f"MatchConfig.backend must be one of {BACKENDS}, got {wanted!r}")
    if wanted == "torch":
        return "torch"
    device = torch.device(device)
    if wanted == "native":
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on the CPU; the features are on {device} (use 'auto' or 'torch')")
        reason = fsm.unavailable()
        if reason:
            raise native.NativeUnavailable(f"backend='native': {reason}")
        return "native"
    if device.type != "cpu":
        return "torch"
    reason = fsm.unavailable()
    if reason:
        warnings.warn(f"spatial verification: the C kernel is unavailable ({reason}); verifying with tensor passes, "
                      "much slower on the CPU", RuntimeWarning, stacklevel=3)
        return "torch"
    return "native"


def _verify_native(query, candidates, query_index, corr, sizes, cfg: MatchConfig):
    """Best count ``(G,)``, params ``(G, 5)`` and inlier mask ``(N,)`` of every group, by the C kernel."""
    pair, qrow, crow = corr["pair"], corr["qrow"], corr["crow"]
    q_at = query_index.index_select(0, pair) * query.capacity + qrow
    c_at = pair * candidates.capacity + crow
    starts = torch.cat([sizes.new_zeros(1), torch.cumsum(sizes, 0)])
    return fsm.verify_groups(
        starts, query.xy.reshape(-1, 2).index_select(0, q_at), candidates.xy.reshape(-1, 2).index_select(0, c_at),
        query.frame.reshape(-1, 2, 2).index_select(0, q_at), candidates.frame.reshape(-1, 2, 2).index_select(0, c_at),
        qrow, crow, max(candidates.capacity, 1), threshold=cfg.threshold, max_scale_change=cfg.max_scale_change,
        symmetric=cfg.error == "symmetric", lo_hypotheses=cfg.lo_hypotheses, lo_factor=cfg.lo_factor,
        lo_rounds=cfg.lo_rounds, lo_min_inliers=cfg.lo_min_inliers)


def _verify_torch(query, candidates, query_index, corr, sizes, starts, cfg: MatchConfig):
    """The same by tensor passes: chunks of groups of similar size, each under the memory budget."""
    device = candidates.device
    by_size = torch.argsort(sizes, descending=True, stable=True)
    best_count = torch.zeros(sizes.numel(), dtype=torch.long, device=device)
    best_params = torch.zeros(sizes.numel(), 5, dtype=torch.float64, device=device)
    mask = torch.zeros(corr["pair"].numel(), dtype=torch.bool, device=device)
    sizes_sorted = sizes[by_size].tolist()
    i = 0
    while i < len(sizes_sorted):
        cmax = sizes_sorted[i]  # largest group of the chunk: hypotheses x correspondences = cmax^2
        n = max(1, min(len(sizes_sorted) - i, cfg.max_elements // (cmax * cmax)))
        # groups at least 3/4 of the largest, so padding wastes under half of the work
        n = max(1, bisect.bisect_left([-v for v in sizes_sorted[i:i + n]], -(cmax * 3 // 4)))
        idx = by_size[i:i + n]
        table = _GroupTable(query, candidates, query_index, corr, sizes[idx], starts[idx])
        count, params, chunk_mask = _verify_groups(table, cfg)
        best_count[idx] = count
        best_params[idx] = params
        rows = starts[idx][:, None] + torch.arange(chunk_mask.shape[1], device=device)
        mask[rows[table.valid]] = chunk_mask[table.valid]
        i += n
    return best_count, best_params, mask
