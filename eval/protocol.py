"""The revisited Oxford/Paris evaluation protocol (Radenović et al. 2018, revisitop).

- Easy (E): positives = easy; junk = junk + hard.
- Medium (M): positives = easy + hard; junk = junk.
- Hard (H): positives = hard; junk = junk + easy.

AP uses trapezoidal interpolation over junk-adjusted ranks; mP@k uses
``kq = min(rank of the last positive, k)``. A query with no positive in a setup is left out of
that setup's mean. Numbers are percentages, as in the papers.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SETUPS = ("E", "M", "H")
DEFAULT_KAPPAS = (1, 5, 10)


def compute_ap(positive_ranks: np.ndarray, num_positives: int) -> float:
    """Trapezoidal AP from the sorted 0-based, junk-adjusted ranks of the positives found.

    ``positive_ranks``: ``(P,)`` integer numpy array, ascending; ``num_positives`` counts all
    positives, found or not (recall is divided by it). Returns AP as a fraction in [0, 1].

    Examples:
        Positives at ranks 0 and 2 (first and third):

        >>> import numpy as np
        >>> print(f"{compute_ap(np.array([0, 2]), num_positives=2):.4f}")  # ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2
        0.7917
    """
    ap = 0.0
    for j, rank in enumerate(positive_ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / 2.0 / num_positives
    return ap


def _junk_adjusted_positive_ranks(ranking: np.ndarray, positives: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based positions of the positives in ``ranking`` after removing the junk images."""
    is_pos = np.isin(ranking, positives)
    is_junk = np.isin(ranking, junk)
    kept = ~is_junk
    adjusted = np.cumsum(kept) - 1  # rank of each position among non-junk images
    return adjusted[is_pos & kept]


def compute_map(
    ranks: np.ndarray, positives: Sequence[Sequence[int]], junk: Sequence[Sequence[int]], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """mAP, per-query AP, mean P@k and per-query P@k for one setup.

    Args:
        ranks: ``(num_queries, num_database)`` integer database indices (numpy array or
            array-like), best first, per query.
        positives / junk: per query, database indices.
        kappas: the ``k`` of mP@k.
    Returns:
        ``(mAP, aps (Q,), mean_pr (len(kappas),), prs (Q, len(kappas)))``, fractions in [0, 1];
        queries without positives get NaN and are left out of the means.
    """
    ranks = np.asarray(ranks)
    nq = ranks.shape[0]
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q in range(nq):
        pos = np.asarray(positives[q], dtype=np.int64)
        if pos.size == 0:
            continue
        found = _junk_adjusted_positive_ranks(ranks[q], pos, np.asarray(junk[q], dtype=np.int64))
        aps[q] = compute_ap(found, len(pos))
        one_based = found + 1
        for j, k in enumerate(kappas):
            kq = min(one_based.max(), k) if one_based.size else k
            prs[q, j] = (one_based <= kq).sum() / kq
    valid = ~np.isnan(aps)
    mean_ap = float(aps[valid].mean()) if valid.any() else float("nan")
    mean_pr = prs[valid].mean(axis=0) if valid.any() else np.full(len(kappas), np.nan)
    return mean_ap, aps, mean_pr, prs


def setup_ground_truth(gnd: Sequence[dict], setup: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Positives and junk of every query for setup ``"E"``, ``"M"`` or ``"H"``."""
    def arr(g: dict, *keys: str) -> np.ndarray:
        return np.concatenate([np.asarray(g.get(k, []), dtype=np.int64) for k in keys])

    if setup == "E":
        return [arr(g, "easy") for g in gnd], [arr(g, "junk", "hard") for g in gnd]
    if setup == "M":
        return [arr(g, "easy", "hard") for g in gnd], [arr(g, "junk") for g in gnd]
    if setup == "H":
        return [arr(g, "hard") for g in gnd], [arr(g, "junk", "easy") for g in gnd]
    raise ValueError(f"unknown setup {setup!r}; known: {SETUPS}")


def evaluate_revisited(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = DEFAULT_KAPPAS) -> dict:
    """The protocol's table for one method.

    Returns ``{"mAP": {"E", "M", "H"}, "mP@k": {...} for k in kappas, "AP": {setup: per-query}}``
    in percent, per-query APs as lists (``None`` where a query has no positive).

    ``ranks``: ``(num_queries, num_database)`` integer database indices (numpy array, or a CPU
    tensor), best first; ``gnd``: revisitop's ground truth, per query a dict of ``easy``,
    ``hard`` and ``junk`` database indices.

    Examples:
        One query whose easy positive (image 0) is ranked second, hard positive (image 2) fourth,
        behind a junk image (1):

        >>> import numpy as np
        >>> table = evaluate_revisited(np.array([[3, 0, 1, 2, 4]]), [{"easy": [0], "hard": [2], "junk": [1]}],
        ...                            kappas=(1, 5))
        >>> table["mAP"], table["mP@5"]
        ({'E': 25.0, 'M': 41.67, 'H': 25.0}, {'E': 50.0, 'M': 66.67, 'H': 50.0})
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
        raise ValueError(f"ranks must be (num_queries={len(gnd)}, num_database), got {ranks.shape}")
    out: dict = {"mAP": {}, **{f"mP@{k}": {} for k in kappas}, "AP": {}}
    for setup in SETUPS:
        positives, junk = setup_ground_truth(gnd, setup)
        mean_ap, aps, mean_pr, _ = compute_map(ranks, positives, junk, kappas)
        out["mAP"][setup] = round(100 * mean_ap, 2)
        for k, pr in zip(kappas, mean_pr):
            out[f"mP@{k}"][setup] = round(100 * float(pr), 2)
        out["AP"][setup] = [None if np.isnan(a) else round(100 * float(a), 2) for a in aps]
    return out


def format_table(results: dict[str, dict], k: int = 10) -> str:
    """A text table of mAP and mP@k for E/M/H, one row per method."""
    header = f"{'method':<16}" + "".join(f"{'mAP ' + s:>9}" for s in SETUPS) + "".join(f"{f'mP@{k} ' + s:>10}" for s in SETUPS)
    lines = [header, "-" * len(header)]
    for method, res in results.items():
        row = f"{method:<16}" + "".join(f"{res['mAP'][s]:>9.2f}" for s in SETUPS)
        row += "".join(f"{res[f'mP@{k}'][s]:>10.2f}" for s in SETUPS)
        lines.append(row)
    return "\n".join(lines)
