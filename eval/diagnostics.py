"""Why a re-ranking helped or not: how well a score separates positives from negatives per query."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from gpu_dsm.eval.protocol import setup_ground_truth


def separation_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half); NaN
    when either class is empty (Mann-Whitney AUC)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def top_k_separation(candidates: np.ndarray, scores: dict[str, np.ndarray], gnd: Sequence[dict]) -> dict[str, list]:
    """Per query, the AUC of each score over its top-k candidates (Medium setup: positives easy
    + hard, junk left out).

    Args:
        candidates: ``(Q, K)`` database indices of each query's top-k (initial order).
        scores: name -> ``(Q, K)`` scores of those candidates (e.g. global similarity, inliers).
    """
    out: dict[str, list] = {name: [] for name in scores}
    positives, junk = setup_ground_truth(gnd, "M")
    for q, row in enumerate(np.asarray(candidates)):
        keep = ~np.isin(row, junk[q])
        label = np.isin(row, positives[q])[keep]
        for name, s in scores.items():
            out[name].append(separation_auc(np.asarray(s)[q][keep], label))
    return out


def format_separation(auc: dict[str, list]) -> str:
    names = list(auc)
    lines = ["per-query AUC over the top-k (positives vs negatives, Medium):",
             f"{'query':>6}" + "".join(f"{n:>12}" for n in names)]
    for q in range(len(auc[names[0]])):
        lines.append(f"{q:>6}" + "".join(f"{auc[n][q]:>12.3f}" for n in names))
    lines.append(f"{'mean':>6}" + "".join(f"{np.nanmean(auc[n]):>12.3f}" for n in names))
    return "\n".join(lines)
