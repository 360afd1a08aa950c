"""Fast spatial matching of DSM features (paper 3.5-3.6; the authors' reference code, github.com/osimeoni/DSM).

For each (query, candidate) pair and each of the ``S x S`` (query scale, candidate scale) pairs:

1. tentative correspondences: all (query feature, candidate feature) pairs of the same channel;
2. one upright-affine hypothesis per correspondence, ``T = A2 A1^-1``, ``t = x2 - T x1``;
3. every hypothesis scored against every correspondence of its group: inlier if the transfer error is below
   ``threshold^2`` and the correspondence's own scale change relative to ``T`` is within
   ``[1 / max_scale_change, max_scale_change]``; the count takes each feature once
   (``min`` of distinct query and distinct candidate features);
4. local optimisation of the best ``lo_hypotheses``: gather inliers at ``lo_factor`` times the
   threshold, least-squares 5-dof fit, re-score, keep if better, at most ``lo_rounds`` rounds;
5. the pair's score is the best count over its scale pairs.

Steps 2-4 run per group of correspondences (a pair's scale pair) by one of two backends
(``MatchConfig.backend``):

- ``"native"``: a C kernel on the CPU (`gpu_dsm.kernels.fsm`) that runs steps 1-5 per pair
  from the padded feature tables (the correspondences included, no tensor work per pair), threads
  over ranges of pairs, with the float64 operations of the plain matcher
  (`gpu_dsm.reference.match`);
- ``"torch"``: tensor passes on any device, with the plain matcher's float64 operations on
  ``(groups, hypotheses, correspondences)`` tensors: groups sorted by size and padded into
  chunks whose ``groups x hypotheses x correspondences`` stays under ``max_elements``, the
  chunks planned on the host once per batch from the group sizes; a scoring pass over all
  hypotheses keeps each group's best ``max(lo_hypotheses, 1)``, a second pass refines them. No
  Python loop over candidates or hypotheses, and no host sync inside the passes: a call reads
  from the device four times (numbers of scales and channels, of correspondences, the group
  sizes, the longest match list);
- ``"auto"`` (default): native on the CPU where the kernel builds, torch on other devices or
  without a C compiler (with a warning naming why).

Both give the plain matcher's inlier decisions.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from gpu_dsm.checks import as_tensor
from gpu_dsm.features import LocalFeatures
from gpu_dsm.kernels import fsm, native
from gpu_dsm.kernels.scoring import ERRORS, count_unique, hypotheses_from_frames


BACKENDS = ("auto", "native", "torch")


@dataclass
class MatchConfig:
    """Spatial matching parameters; defaults from the paper (4.1) and the reference code."""

    # 4 with one_way: positive on roxford5k-mini, -19q, -19q + distractors and holidays-811 with
    # EfficientNet-Lite0, and of the settings positive on all four the largest gain on -mini and -19q
    threshold: float = field(default=4.0, metadata={
        "flag": "--threshold", "help": "inlier threshold on the transfer error, feature-map pixels",
        "source": "measured on four sets, docs 'Design decisions'; paper 4.1: 2 with the symmetric error"})
    max_scale_change: float = field(default=3.0, metadata={
        "flag": "--max-scale-change", "help": "largest scale change of an inlier relative to the hypothesis",
        "source": "paper 4.1"})
    error: str = field(default="one_way", metadata={
        "flag": "--error", "choices": ERRORS,
        "help": "symmetric (both transfer directions summed, reference code) or one_way (forward only) transfer error",
        "source": "measured on four sets, docs 'Design decisions'"})
    lo_hypotheses: int = 5  # reference code: local optimisation of the best 5 hypotheses
    lo_factor: float = 4.0  # reference code: gather inliers at 4x the threshold
    lo_rounds: int = 2  # reference code: at most 2 rounds
    lo_min_inliers: int = 4  # reference code: hypotheses with <= 3 inliers are not refined
    # torch backend's memory budget: groups x hypotheses x correspondences per chunk (about 32 bytes each)
    max_elements: int = 2**25
    # "auto" | "native" (C kernel, CPU) | "torch" (any device); auto: the C kernel on the CPU where
    # it builds (14x faster than torch there on the real top-100 tables, eval/bench_match.py), torch elsewhere
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


def tentative_correspondences(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor,
                              num_scales: int, num_channels: int | None = None) -> dict[str, torch.Tensor]:
    """All same-channel (query feature, candidate feature) pairs, grouped by (pair, scale pair).

    A sort-merge join on ``(pair, channel)`` keys: ``O(F log F)`` in the number of feature slots,
    never a (query x candidate) comparison table. ``num_channels``: more than the largest channel
    of a real feature (default: read from the tables, one host sync); the join reads one number
    from the device, the number of correspondences (the size of the output). Returns flat tensors
    sorted by group then (query row, candidate row): ``pair``, ``qrow``, ``crow``, ``group``
    (``pair * S^2 + query scale * S + candidate scale``).
    """
    device = candidates.device
    num_pairs, q_cap, c_cap = candidates.num_images, query.capacity, candidates.capacity
    if num_channels is None:
        num_channels = _largest(query.channel, query.valid, candidates.channel, candidates.valid) + 1
    channels = max(num_channels, 1)
    num_keys = num_pairs * channels
    # candidate side: every slot keyed (pair, channel), empty slots after every real key
    c_slot = torch.arange(num_pairs * c_cap, device=device)
    c_key = torch.div(c_slot, max(c_cap, 1), rounding_mode="floor") * channels + candidates.channel.reshape(-1)
    c_key = torch.where(candidates.valid.reshape(-1), c_key, num_keys)
    c_key, c_slot = torch.sort(c_key, stable=True)
    # query side: every slot of each pair's query, with the run of candidate slots of its key
    q_slot = torch.arange(num_pairs * q_cap, device=device)
    q_pair = torch.div(q_slot, max(q_cap, 1), rounding_mode="floor")
    q_at = query_index.index_select(0, q_pair) * q_cap + (q_slot - q_pair * q_cap)  # row of the query table
    q_valid = query.valid.reshape(-1).index_select(0, q_at)
    q_key = torch.where(q_valid, q_pair * channels + query.channel.reshape(-1).index_select(0, q_at), num_keys)
    if num_keys <= 4 * (c_key.numel() + q_key.numel()) + (1 << 20):
        # a dense table of key counts: O(F) instead of two binary searches per query slot
        counts = torch.zeros(num_keys + 1, dtype=torch.long, device=device).index_add_(0, c_key, torch.ones_like(c_key))
        first = torch.cumsum(counts, 0) - counts
        lo, n = first.index_select(0, q_key), counts.index_select(0, q_key)
    else:
        lo = torch.searchsorted(c_key, q_key)
        n = torch.searchsorted(c_key, q_key, right=True) - lo
    n = torch.where(q_valid, n, 0)
    total = int(n.sum())  # the output size: a host sync
    rep = torch.repeat_interleave(n, output_size=total)
    offset = torch.arange(total, device=device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n, output_size=total)
    c_at = c_slot.index_select(0, lo.index_select(0, rep) + offset)  # pair * c_cap + row
    q_at = q_at.index_select(0, rep)
    pair = q_pair.index_select(0, rep)
    qrow = q_at - query_index.index_select(0, pair) * q_cap
    crow = c_at - pair * c_cap
    qscale = query.scale.reshape(-1).index_select(0, q_at)
    cscale = candidates.scale.reshape(-1).index_select(0, c_at)
    group = pair * num_scales * num_scales + qscale * num_scales + cscale
    width = max(q_cap, c_cap, 1)
    order = torch.argsort((group * width + qrow) * width + crow)
    return {"pair": pair.index_select(0, order), "qrow": qrow.index_select(0, order),
            "crow": crow.index_select(0, order), "group": group.index_select(0, order)}


def _largest(*values_and_valid: torch.Tensor) -> int:
    """The largest of the valid entries of several ``(values, valid)`` tables (-1 if none): one host sync."""
    pairs = list(zip(values_and_valid[::2], values_and_valid[1::2]))
    parts = [torch.where(valid, values, -1).amax() for values, valid in pairs if values.numel()]
    return int(torch.stack(parts).amax()) if parts else -1


def _batch_facts(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor) -> tuple[bool, int, int]:
    """Whether ``query_index`` stays inside the query table, the number of scales (``1 +`` the
    largest scale index of a real feature, at least the tables' scales) and of channels (``1 +``
    the largest channel of a real feature): one host sync for all three."""
    facts = [((query_index < 0) | (query_index >= query.num_images)).any().long()]
    for name in ("scale", "channel"):
        for features in (query, candidates):
            values = getattr(features, name)
            facts.append(torch.where(features.valid, values, -1).amax() if values.numel() else values.new_full((), -1))
    out_of_range, *largest = torch.stack(facts).tolist()
    num_scales = max(largest[0], largest[1]) + 1
    num_scales = max(num_scales, len(query.scales), len(candidates.scales), 1)
    return not out_of_range, num_scales, max(largest[2], largest[3]) + 1


def _select(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Indices ``(count,)`` of the True entries of ``mask (M,)``, their number known: no host sync."""
    at = torch.where(mask, torch.cumsum(mask.long(), 0) - 1, count)
    out = torch.zeros(count + 1, dtype=torch.long, device=mask.device)
    return out.scatter_(0, at, torch.arange(mask.numel(), device=mask.device))[:count]


def spatial_verify(query: LocalFeatures, candidates: LocalFeatures, query_index: torch.Tensor | None = None,
                   config: MatchConfig | None = None) -> MatchResult:
    """Spatially verify every candidate against its query.

    Args:
        query: ``Q`` query images' features.
        candidates: ``P`` candidate images' features.
        query_index: ``(P,)`` which query each candidate belongs to (default: all query 0).
        config: matching parameters (paper defaults).
    Returns:
        [`MatchResult`][gpu_dsm.match.MatchResult] over the ``P`` pairs, on the features' device.

    On any device the call reads from the device four times (the numbers of scales and channels
    with the range check of ``query_index``, the number of correspondences, the group sizes, the
    longest match list); the rest is queued.
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
    if choose_backend(cfg.backend, device) == "native":
        return _verify_native(query, candidates, query_index, cfg)
    in_range, num_scales, num_channels = _batch_facts(query, candidates, query_index)
    if not in_range:
        raise ValueError("query_index points outside the query table")
    num_pairs, scale_pairs = candidates.num_images, num_scales * num_scales
    corr = tentative_correspondences(query, candidates, query_index, num_scales, num_channels)
    num_corr = corr["group"].numel()
    per_group = torch.zeros(num_pairs * scale_pairs, dtype=torch.long, device=device)
    per_group.index_add_(0, corr["group"], torch.ones_like(corr["group"]))
    n_corr = per_group.view(num_pairs, scale_pairs).sum(1)
    if num_corr == 0:
        return MatchResult(torch.zeros(num_pairs, dtype=torch.long, device=device),
                           torch.full((num_pairs, 5), math.nan, dtype=torch.float64, device=device),
                           torch.full((num_pairs, 2), -1, dtype=torch.long, device=device),
                           torch.full((num_pairs, 0, 2), -1, dtype=torch.long, device=device), n_corr)
    sizes_host = [n for n in per_group.tolist() if n]  # the chunk plan's sizes: one host sync
    groups = _select(per_group > 0, len(sizes_host))
    sizes = per_group.index_select(0, groups)
    starts = torch.cumsum(sizes, 0) - sizes
    best_count, best_params, mask = _verify_torch(query, candidates, query_index, corr, sizes, starts, sizes_host, cfg)
    return _winners(corr, groups, sizes, best_count, best_params, mask, num_pairs, num_scales, n_corr)


def _winners(corr, groups, sizes, best_count, best_params, mask, num_pairs: int, num_scales: int,
             n_corr: torch.Tensor) -> MatchResult:
    """Each pair's best scale pair (highest count, then lowest scale-pair index) from the groups'
    results ``(G,)``, ``(G, 5)`` and inlier mask ``(N,)``; one host sync (the longest match list)."""
    device = best_count.device
    scale_pairs = num_scales * num_scales
    pair_of_group, scale_pair_of_group = groups // scale_pairs, groups % scale_pairs
    key = best_count * (scale_pairs + 1) + (scale_pairs - scale_pair_of_group)
    best_key = torch.zeros(num_pairs, dtype=torch.long, device=device).scatter_reduce_(0, pair_of_group, key, "amax")
    is_winner = (key == best_key.index_select(0, pair_of_group)) & (best_count > 0)
    target = torch.where(is_winner, pair_of_group, num_pairs)  # the others write to a spare row
    inliers = torch.zeros(num_pairs + 1, dtype=torch.long, device=device).scatter_(0, target, best_count)
    transform = torch.full((num_pairs + 1, 5), math.nan, dtype=torch.float64, device=device)
    transform.index_copy_(0, target, best_params)
    scale_pair = torch.full((num_pairs + 1, 2), -1, dtype=torch.long, device=device)
    scale_pair.index_copy_(0, target, torch.stack([scale_pair_of_group // num_scales,
                                                   scale_pair_of_group % num_scales], 1))
    # inlier correspondences of the winners, in (query row, candidate row) order per pair
    num_corr = mask.numel()
    pair = corr["pair"]
    chosen = (mask & torch.repeat_interleave(is_winner, sizes, output_size=num_corr)).long()
    before = torch.cumsum(chosen, 0) - chosen  # chosen correspondences before each one
    pair_first = torch.cumsum(n_corr, 0) - n_corr
    slot = before - before.index_select(0, pair_first.index_select(0, pair))
    per_pair = torch.zeros(num_pairs, dtype=torch.long, device=device).index_add_(0, pair, chosen)
    longest = int(per_pair.max()) if num_pairs else 0  # the output's shape: a host sync
    matches = torch.full((num_pairs * longest + 1, 2), -1, dtype=torch.long, device=device)
    matches.index_copy_(0, torch.where(chosen > 0, pair * longest + slot, num_pairs * longest),
                        torch.stack([corr["qrow"], corr["crow"]], 1))
    return MatchResult(inliers[:num_pairs], transform[:num_pairs], scale_pair[:num_pairs],
                       matches[:num_pairs * longest].view(num_pairs, longest, 2), n_corr)


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


def _verify_native(query, candidates, query_index, cfg: MatchConfig) -> MatchResult:
    """Every pair verified by the C kernel from the feature tables, correspondences included. The
    tables' recorded scales and channels size the kernel's (channel, scale) counts; where a feature
    lies outside them (or none are recorded), the sizes are read from the tables (``_batch_facts``)."""
    settings = dict(threshold=cfg.threshold, max_scale_change=cfg.max_scale_change, symmetric=cfg.error == "symmetric",
                    lo_hypotheses=cfg.lo_hypotheses, lo_factor=cfg.lo_factor, lo_rounds=cfg.lo_rounds,
                    lo_min_inliers=cfg.lo_min_inliers)
    recorded = (max(len(query.scales), len(candidates.scales)), max(query.num_channels, candidates.num_channels))
    if min(recorded) >= 1:
        try:
            return MatchResult(**fsm.verify_pairs(query, candidates, query_index, *recorded, **settings))
        except fsm.OutOfRange:
            pass
    _, num_scales, num_channels = _batch_facts(query, candidates, query_index)
    return MatchResult(**fsm.verify_pairs(query, candidates, query_index, max(num_scales, 1), max(num_channels, 1),
                                          **settings))


# Tensor passes: chunks of the hypotheses x correspondences work. Per device type, a chunk's fixed
# cost (its ~40 operator launches) in elements, what padding may waste before one more chunk pays
# off, and the most elements a chunk holds besides MatchConfig.max_elements. On the CPU a launch
# costs about as much as 1000 elements of scoring, and chunks whose float64 temporaries stay in
# the cache (2 MiB) run several times faster per element (eval/bench_match.py); on a GPU an element
# costs far less, so chunks are only split where the memory budget asks for it.
_CHUNKS = {"cpu": (1 << 14, 1 << 18)}
_CHUNKS_ACCELERATOR = (1 << 22, 1 << 62)
_REFINE_COST = 5  # a refinement chunk launches about 5 times a scoring chunk's operators
_RUNG = 2 ** 0.25  # the chunk plan groups sizes into rungs of this ratio
# per-correspondence columns of the flat table: its points and scale change, then its hypothesis
_LOG_S = 4  # x1, y1, x2, y2, then the scale change
_HYPOTHESIS = slice(5, 11)  # a, b, c, tx, ty, log det T
_COLUMNS = 11


def _plan_chunks(sizes: list[int], per_group, max_elements: int, chunk_cost: int) -> list[tuple[int, int, int]]:
    """Chunks ``(start, stop, width)`` over groups sorted by decreasing size ``sizes``.

    A chunk pads its groups to ``width``, its first group's size, and holds at most
    ``max_elements // per_group(width)`` of them (at least one). The boundaries minimise the padded
    work plus ``chunk_cost`` per chunk, by dynamic programming over rungs of sizes within a factor
    ``_RUNG``; decided on the host, once per batch.
    """
    rungs, i = [], 0  # (first group, stop) of each rung
    while i < len(sizes):
        rung, j = int(math.log(sizes[i], _RUNG)), i + 1
        while j < len(sizes) and int(math.log(sizes[j], _RUNG)) == rung:
            j += 1
        rungs.append((i, j))
        i = j
    best, choice = [0.0] + [math.inf] * len(rungs), [0] * (len(rungs) + 1)
    for j in range(1, len(rungs) + 1):
        stop = rungs[j - 1][1]
        for i in range(j):  # one chunk plan for rungs i .. j - 1
            start = rungs[i][0]
            work = per_group(sizes[start])
            chunks = math.ceil((stop - start) / max(1, max_elements // work))
            cost = best[i] + chunks * chunk_cost + (stop - start) * work
            if cost < best[j]:
                best[j], choice[j] = cost, i
    bounds, j = [], len(rungs)
    while j:
        bounds.append((rungs[choice[j]][0], rungs[j - 1][1]))
        j = choice[j]
    plan = []
    for start, stop in reversed(bounds):
        while start < stop:
            width = sizes[start]
            end = min(stop, start + max(1, max_elements // per_group(width)))
            plan.append((start, end, width))
            start = end
    return plan


def _flat_tables(query, candidates, query_index, corr, group_first) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-correspondence tables, once per batch, each with one padding row at the end (row ``N``).

    Returns:
        columns: ``(N + 1, 11)`` float64: x1, y1, x2, y2, the scale change ``log det A2 - log det A1``,
            and the correspondence's hypothesis ``a, b, c, tx, ty, log det T`` (NaN padding: never an inlier).
        ids: ``(N + 1, 2)`` int64: the query and the candidate feature as ids ``0, 1, ...`` within the group.
    """
    pair, qrow, crow = corr["pair"], corr["qrow"], corr["crow"]
    num_corr = pair.numel()
    q_at = query_index.index_select(0, pair) * query.capacity + qrow
    c_at = pair * candidates.capacity + crow
    xy1 = query.xy.reshape(-1, 2).index_select(0, q_at).double()
    xy2 = candidates.xy.reshape(-1, 2).index_select(0, c_at).double()
    f1 = query.frame.reshape(-1, 2, 2).index_select(0, q_at).double()
    f2 = candidates.frame.reshape(-1, 2, 2).index_select(0, c_at).double()
    a, b, c, tx, ty = hypotheses_from_frames(f1, f2, xy1, xy2).unbind(1)  # reference/match.py hypothesis()
    ok = (a > 0) & (c > 0) & torch.isfinite(torch.stack([a, b, c, tx, ty])).all(0)
    log_h = torch.where(ok, torch.log(a * c), math.nan)  # an invalid hypothesis gates every correspondence out
    log_s = torch.log(f2[:, 0, 0] * f2[:, 1, 1]) - torch.log(f1[:, 0, 0] * f1[:, 1, 1])
    columns = xy1.new_full((num_corr + 1, _COLUMNS), math.nan)
    torch.stack([xy1[:, 0], xy1[:, 1], xy2[:, 0], xy2[:, 1], log_s, a, b, c, tx, ty, log_h], 1, out=columns[:num_corr])
    width = max(query.capacity, candidates.capacity, 1)
    ids = torch.zeros(num_corr + 1, 2, dtype=torch.long, device=pair.device)
    ids[:num_corr, 0] = _ids_within_groups(corr["group"] * width + qrow, group_first)
    key, order = torch.sort(corr["group"] * width + crow, stable=True)  # groups stay where they were
    ids[:num_corr, 1].index_copy_(0, order, _ids_within_groups(key, group_first))
    return columns, ids


def _gather(table: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """Rows ``at (G, C)`` of a flat table ``(N + 1, F)``, feature-major: ``(F, G, C)``."""
    return table.index_select(0, at.reshape(-1)).T.contiguous().view(table.shape[1], *at.shape)


def _ids_within_groups(key: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Dense ranks ``(N,)`` of ``key (N,)``, sorted, counted from 0 at each row's group start ``first (N,)``."""
    new = torch.ones_like(key, dtype=torch.bool)
    new[1:] = key[1:] != key[:-1]
    rank = torch.cumsum(new, 0)
    return rank - rank.index_select(0, first)


def _inliers(hyp: torch.Tensor, cols: torch.Tensor, threshold_sq: float, log_limit: float, symmetric: bool):
    """Inlier masks ``(G, K, C)`` of hypotheses ``hyp (6, G, K)`` (a, b, c, tx, ty, log det T) over
    correspondences ``cols (>= 5, G, C)`` (x1, y1, x2, y2, log scale change).

    The plain matcher's float64 operations in its order (reference/match.py ``_Group.inliers``,
    kernels/fsm.c ``score``), one operator over the whole tensor each, so the same decisions.
    """
    a, b, c, tx, ty, log_h = hyp[..., None]
    x1, y1, x2, y2, log_s = cols[:_LOG_S + 1, :, None, :]
    rx = a * x1
    torch.sub(x2, rx, out=rx).sub_(tx)  # x2 - a x1 - tx
    ry = b * x1
    torch.sub(y2, ry, out=ry)
    tmp = torch.mul(c, y1)
    ry.sub_(tmp).sub_(ty)  # y2 - b x1 - c y1 - ty
    if symmetric:
        bx = rx / a
        torch.mul(b, bx, out=tmp)
        torch.sub(ry, tmp, out=tmp).div_(c)  # by = (ry - b bx) / c
        bx.mul_(bx).add_(tmp.mul_(tmp))
    error = rx.mul_(rx).add_(ry.mul_(ry))
    if symmetric:
        error.add_(bx)
    # error < threshold_sq and |log_s - log_h| <= log_limit, as one comparison: for floats
    # e < t <=> e - nextafter(t, -inf) <= 0 and d <= l <=> d - l <= 0 exactly; NaN fails both
    error.sub_(math.nextafter(threshold_sq, -math.inf))
    change = torch.sub(log_s, log_h, out=ry).abs_().sub_(log_limit)
    return torch.maximum(error, change, out=error) <= 0


def _count(mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Inliers with each feature once, ``min(distinct query, distinct candidate features)``:
    ``mask (G, K, C)``, ``ids (2, G, C)`` -> ``(G, K)``."""
    width = mask.shape[-1]
    return torch.minimum(count_unique(mask, ids[0], width), count_unique(mask, ids[1], width))


def _monomials(cols: torch.Tensor) -> torch.Tensor:
    """The least-squares sums' terms ``(G, C, 11)`` of correspondences ``cols (>= 4, G, C)``: 1, x, y,
    xx, xy, yy, u, xu, v, xv, yv for query point (x, y) and candidate point (u, v); zero for padding."""
    x, y, u, v = cols[:4].nan_to_num(0.0)
    return torch.stack([torch.ones_like(x), x, y, x * x, x * y, y * y, u, x * u, v, x * v, y * v], -1)


def _fit(mask: torch.Tensor, monomials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares hypotheses ``(6, G, K)`` on the inliers ``mask (G, K, C)`` and whether each is
    valid ``(G, K)``: the normal equations solved by Cramer's rule with the formulas of
    reference/match.py ``solve_normal_equations``, each family of terms one batched operation;
    ``monomials (G, C, 11)`` from `_monomials`."""
    sums = torch.bmm(mask.to(monomials.dtype), monomials)
    n, sx, sy, sxx, sxy, syy, su, sxu, sv, sxv, syv = sums.unbind(-1)
    det2, m_yy, m_xy, m_xyy, a_num, tx_num, r_v, q_v, r_w, q_w = _products(
        (sxx, n, sx, sx), (syy, n, sy, sy), (sxy, n, sy, sx), (sxy, sy, syy, sx), (sxu, n, sx, su),
        (sxx, su, sx, sxu), (syv, n, sy, sv), (syv, sy, syy, sv), (sxy, sv, syv, sx), (syy, sv, syv, sy))
    det3, b_num, c_num, ty_num = _products(
        (sxx, m_yy, sxy, m_xy, sx, m_xyy), (sxv, m_yy, sxy, r_v, sx, q_v), (sxx, r_v, sxv, m_xy, sx, r_w),
        (sxx, q_w, sxy, r_w, sxv, m_xyy))
    params = torch.stack([a_num, b_num, c_num, tx_num, ty_num]) / torch.stack([det2, det3, det3, det2, det3])
    bounds = 1e-9 * (1 + torch.stack([sxx, sxx * syy]) * n)
    ok = (n >= 3) & (torch.stack([det2, det3]).abs() > bounds).all(0)
    ok &= (params[0] > 0) & (params[2] > 0) & torch.isfinite(params).all(0)
    return torch.cat([params, torch.log(params[0] * params[2])[None]]), ok


def _products(*terms: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """``p q - r s`` of each term ``(p, q, r, s)``, or ``p q - r s + t u`` of each ``(p, q, r, s, t, u)``,
    evaluated left to right like the scalar formula, all terms in one batched operation."""
    width = len(terms[0])
    factors = torch.stack([x for term in terms for x in term]).unflatten(0, (len(terms), width))
    p, q, r, s, *rest = factors.unbind(1)
    out = p * q - r * s
    if rest:
        out += rest[0] * rest[1]
    return out.unbind(0)


def _padded(rows: torch.Tensor, sizes: torch.Tensor, starts: torch.Tensor, width: int, num_corr: int) -> torch.Tensor:
    """Flat correspondence indices ``(G, width)`` of groups ``rows``; padding -> ``num_corr``."""
    slot = torch.arange(width, device=rows.device)
    size, start = sizes.index_select(0, rows), starts.index_select(0, rows)
    return torch.where(slot < size[:, None], start[:, None] + slot, num_corr)


def _verify_torch(query, candidates, query_index, corr, sizes, starts, sizes_host: list[int], cfg: MatchConfig):
    """Best count ``(G,)``, params ``(G, 5)`` and inlier mask ``(N,)`` of every group, by tensor passes.

    Two passes over chunks of groups of similar size, planned on the host from ``sizes_host``
    (`_plan_chunks`), without host syncs: every hypothesis of every group scored, the best
    ``max(lo_hypotheses, 1)`` of each kept; then their local optimisation and the winner's inliers.
    """
    device = candidates.device
    num_groups, num_corr = len(sizes_host), corr["pair"].numel()
    th2 = cfg.threshold ** 2
    log_limit = math.log(cfg.max_scale_change) + 1e-12  # reference/match.py, kernels/fsm.py
    symmetric = cfg.error == "symmetric"
    first = torch.repeat_interleave(starts, sizes, output_size=num_corr)
    columns, ids = _flat_tables(query, candidates, query_index, corr, first)
    by_size = torch.argsort(sizes, descending=True, stable=True)
    sizes_desc = sorted(sizes_host, reverse=True)
    chunk_cost, chunk_cap = _CHUNKS.get(device.type, _CHUNKS_ACCELERATOR)
    max_elements = min(cfg.max_elements, chunk_cap)
    keep = max(cfg.lo_hypotheses, 1)
    top_count = torch.zeros(num_groups, keep, dtype=torch.long, device=device)
    top_at = torch.full((num_groups, keep), num_corr, dtype=torch.long, device=device)  # padding: never an inlier
    for start, stop, width in _plan_chunks(sizes_desc, lambda w: w * w, max_elements, chunk_cost):
        rows = by_size[start:stop]
        at = _padded(rows, sizes, starts, width, num_corr)
        cols = _gather(columns, at)
        count = _count(_inliers(cols[_HYPOTHESIS], cols, th2, log_limit, symmetric), _gather(ids, at))
        k = min(keep, width)
        order = torch.argsort(count, dim=1, descending=True, stable=True)[:, :k]  # ties: the earlier correspondence
        top_count[rows, :k] = count.gather(1, order)
        top_at[rows, :k] = at.gather(1, order)
    best_count = torch.zeros(num_groups, dtype=torch.long, device=device)
    best_params = torch.zeros(num_groups, 5, dtype=torch.float64, device=device)
    mask = torch.zeros(num_corr + 1, dtype=torch.bool, device=device)
    for start, stop, width in _plan_chunks(sizes_desc, lambda w: keep * w, max_elements, chunk_cost * _REFINE_COST):
        rows = by_size[start:stop]
        at = _padded(rows, sizes, starts, width, num_corr)
        cols = _gather(columns, at)
        hyp = _gather(columns, top_at.index_select(0, rows))[_HYPOTHESIS]
        count, hyp = _refine(hyp, top_count.index_select(0, rows), cols, _gather(ids, at), cfg, log_limit)
        best_count[rows] = count
        best_params[rows] = hyp[:5, :, 0].T
        mask.index_put_((at.reshape(-1),), _inliers(hyp, cols, th2, log_limit, symmetric)[:, 0].reshape(-1))
    return best_count, best_params, mask[:num_corr]


def _refine(hyp, count, cols, ids, cfg: MatchConfig, log_limit: float):
    """Local optimisation of each group's best hypotheses ``hyp (6, G, K)`` with counts ``(G, K)``
    (reference code: at most ``lo_rounds`` least-squares fits on the inliers at ``lo_factor`` times
    the threshold, kept while the count grows). Returns the best count ``(G,)`` and its hypothesis
    ``(6, G, 1)``: the first of equal counts, i.e. the better-ranked initial hypothesis."""
    th2, lo_th2 = cfg.threshold ** 2, (cfg.lo_factor * cfg.threshold) ** 2
    symmetric = cfg.error == "symmetric"
    active = count >= cfg.lo_min_inliers
    rounds = cfg.lo_rounds if cfg.lo_hypotheses > 0 else 0
    monomials = _monomials(cols) if rounds else None
    for _ in range(rounds):
        fitted, ok = _fit(_inliers(hyp, cols, lo_th2, log_limit, symmetric), monomials)
        new_count = _count(_inliers(fitted, cols, th2, log_limit, symmetric), ids)
        improved = active & ok & (new_count > count)
        hyp = torch.where(improved, fitted, hyp)
        count = torch.where(improved, new_count, count)
        active = improved
    top = torch.argmax(count, dim=1, keepdim=True)
    return count.gather(1, top)[:, 0], hyp.gather(2, top.expand(6, -1, -1))
