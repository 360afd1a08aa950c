"""Plain reference of spatially verified diffusion, one query at a time with lists and loops.

``verified_diffusion_ranking`` follows `gpu_dsm.ranking.diffuse_verified` (seeds
``"verified"``) step by step: the confident matches of the query's verified candidates (median
and median absolute deviation of their inlier counts), the seeds, a direct float64 solve of
``(I - alpha S) f = y``, the fused score (the similarity of each image's place in the re-ranked
ranking), and the ranking with the confident matches first.
"""
from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np


def confident_flags(inliers: Sequence[int], mads: float, ratio: float) -> list[bool]:
    """Whether each count is at least ``median + mads * max(MAD, 1)`` and ``ratio * median``
    (lower medians, as ``torch.median``).

    Examples:
        >>> confident_flags([5, 4, 20, 6, 5, 4, 6, 5, 5, 4], 8.0, 2.5)
        [False, False, True, False, False, False, False, False, False, False]
    """
    median = statistics.median_low(inliers)
    mad = max(statistics.median_low([abs(n - median) for n in inliers]), 1)
    return [n >= median + mads * mad and n >= ratio * median for n in inliers]


def verified_diffusion_ranking(affinity: np.ndarray, initial: Sequence[tuple[int, float]],
                               verified: Sequence[tuple[int, int]], alpha: float, query_k: int = 10,
                               gamma: float = 3.0, mads: float = 8.0, ratio: float = 2.5,
                               weight: float = 0.85) -> list[int]:
    """The final ranking of one query.

    Args:
        affinity: ``(N, N)`` dense symmetric ``S`` (float64 numpy).
        initial: ``(database index, similarity)`` of every image, in the initial order (best first).
        verified: ``(database index, inliers)`` of the verified top ``K``, in the re-ranked order.
        alpha, query_k, gamma, mads, ratio, weight: as `gpu_dsm.diffusion.DiffusionConfig`
            (``alpha``, ``query_k``, ``gamma``, ``confident_mads``, ``confident_ratio``,
            ``similarity_weight``).
    Returns:
        The database indices, best first.
    """
    n = affinity.shape[0]
    similarity = dict(initial)
    confident = [index for (index, _), ok in zip(verified, confident_flags([c for _, c in verified], mads, ratio)) if ok]
    y = np.zeros(n)
    for index, s in initial[:query_k]:
        y[index] = max(s, 0.0) ** gamma
    best = max(initial[0][1], 0.0) ** gamma
    for index in confident:
        y[index] = max(y[index], best)
    f = np.linalg.solve(np.eye(n) - alpha * affinity, y)
    top_f = max(f.max(), 0.0)
    # the order diffusion refines: the verified top K, then the rest of the initial ranking; the
    # image at its place j gets the j-th best initial similarity
    in_top = {index for index, _ in verified}
    refined = [index for index, _ in verified] + [index for index, _ in initial if index not in in_top]
    powered = [max(s, 0.0) ** gamma for _, s in initial]
    top_s = max(powered)
    place_term = {index: (powered[j] / top_s if top_s > 0 else 0.0) for j, index in enumerate(refined)}

    def score(index: int) -> float:
        diffusion = f[index] / top_f if top_f > 0 else 0.0
        return (1 - weight) * diffusion + weight * place_term[index]

    ranked = sorted(refined, key=lambda index: -score(index))  # stable: ties keep the refined order
    return confident + [index for index in ranked if index not in set(confident)]
