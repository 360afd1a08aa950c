"""The plain fast spatial matcher: one pair, one scale pair, one hypothesis at a time, in float64.

It defines what `gpu_dsm.match.spatial_verify` computes (paper 3.5; the DSM reference code's
matcher) in the most direct form, and is the oracle its backends are tested against and the
baseline of ``eval/bench_match.py``; it ships with the package for that benchmark. Definitions
(see `gpu_dsm.match`):

- correspondences of a scale pair: all same-channel (query feature ``i``, candidate feature
  ``j``) pairs, in the order of ``(i, j)``;
- hypothesis of a correspondence: ``T = A2 A1^-1``, ``t = x2 - T x1`` (frames ``A``, centres ``x``);
- inlier of a hypothesis: transfer error below ``threshold^2`` (one-way ``||x2 - T x1 - t||^2``,
  or symmetric, plus ``||x1 - T^-1 (x2 - t)||^2``) and scale change of the correspondence,
  ``log det(A2) - log det(A1)``, within ``log(max_scale)`` of ``log det T``;
- count: each feature once, ``min(distinct query features, distinct candidate features)``;
- local optimisation of the best ``lo_hypotheses`` (ties: earlier correspondence first) with at
  least ``lo_min_inliers``: inliers at ``lo_factor`` times the threshold, least-squares fit of
  ``(a, b, c, tx, ty)``, re-count at the threshold, keep while it improves, at most ``lo_rounds``;
- the pair's result: the best count over the scale pairs (ties: the lowest scale-pair index,
  then the better-ranked hypothesis).

The least-squares fit sums in correspondence order and solves its normal equations by Cramer's
rule, written out so that compiled backends can reproduce it operation for operation.
Errors are evaluated with numpy over a group's correspondences, one hypothesis at a time; every
element goes through the same float64 operations, in the same order, as a scalar loop would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PairMatch:
    """Result of one pair: ``inliers`` (each feature once), winning ``transform``
    ``(a, b, c, tx, ty)`` (a ``(5,)`` float64 numpy array, feature-map pixels; ``None`` without
    inliers), ``scale_pair`` (query scale, candidate scale) or ``None``, and ``matches``, the
    winner's inlier correspondences as sorted (query feature row, candidate feature row) tuples."""

    inliers: int = 0
    transform: np.ndarray | None = None
    scale_pair: tuple[int, int] | None = None
    matches: list[tuple[int, int]] = field(default_factory=list)


def _log(x: float) -> float:
    """``math.log`` with IEEE results where it would raise: ``log 0 = -inf``, negative or NaN -> NaN."""
    x = float(x)
    if x > 0:
        return math.log(x)
    return -math.inf if x == 0 else math.nan


def hypothesis(f1: np.ndarray, f2: np.ndarray, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """``(a, b, c, tx, ty)`` ``(5,)`` float64 of one correspondence from its float64 lower-triangular
    frames ``(2, 2)`` and centres ``(2,)`` (numpy, feature-map pixels).

    Examples:
        >>> import numpy as np
        >>> hypothesis(np.eye(2), 2 * np.eye(2), np.array([1.0, 1.0]), np.array([5.0, 4.0]))
        array([2., 0., 2., 3., 2.])
    """
    p, q, r = float(f1[0, 0]), float(f1[1, 0]), float(f1[1, 1])
    a2, b2, c2 = float(f2[0, 0]), float(f2[1, 0]), float(f2[1, 1])
    with np.errstate(all="ignore"):
        a = np.float64(a2) / p
        c = np.float64(c2) / r
        b = np.float64(b2) / p - np.float64(c2) * q / (np.float64(p) * r)
        tx = np.float64(x2[0]) - a * x1[0]
        ty = np.float64(x2[1]) - b * x1[0] - c * x1[1]
    return np.array([a, b, c, tx, ty], dtype=np.float64)


class _Group:
    """The correspondences of one scale pair, as float64 columns."""

    def __init__(self, rows: list[tuple[int, int]], x1, y1, x2, y2, log_s):
        self.rows = rows
        self.qrow = np.array([i for i, _ in rows])
        self.crow = np.array([j for _, j in rows])
        self.x1, self.y1, self.x2, self.y2 = (np.array(v, dtype=np.float64) for v in (x1, y1, x2, y2))
        self.log_s = np.array(log_s, dtype=np.float64)

    def inliers(self, h: np.ndarray, th_sq: float, log_limit: float, symmetric: bool) -> np.ndarray:
        """Boolean mask over the correspondences; all False for an invalid hypothesis (``a`` or
        ``c`` not positive, or a parameter not finite)."""
        a, b, c, tx, ty = (np.float64(v) for v in h)
        if not (a > 0 and c > 0 and np.isfinite(h).all()):
            return np.zeros(len(self.rows), dtype=bool)
        log_h = _log(a * c)
        with np.errstate(all="ignore"):
            rx = self.x2 - a * self.x1 - tx
            ry = self.y2 - b * self.x1 - c * self.y1 - ty
            e = rx * rx + ry * ry
            if symmetric:
                bx = rx / a
                by = (ry - b * bx) / c
                e = e + (bx * bx + by * by)
            return (np.abs(self.log_s - log_h) <= log_limit) & (e < th_sq)

    def count(self, mask: np.ndarray) -> int:
        return min(len(set(self.qrow[mask].tolist())), len(set(self.crow[mask].tolist())))

    def fit(self, mask: np.ndarray) -> np.ndarray | None:
        """Least-squares ``(a, b, c, tx, ty)`` on the masked correspondences, ``None`` if degenerate."""
        idx = np.flatnonzero(mask)
        if len(idx) < 3:
            return None
        n = float(len(idx))
        sx = sy = sxx = sxy = syy = su = sxu = sv = sxv = syv = 0.0
        for k in idx.tolist():
            x, y, u, v = float(self.x1[k]), float(self.y1[k]), float(self.x2[k]), float(self.y2[k])
            sx += x
            sy += y
            sxx += x * x
            sxy += x * y
            syy += y * y
            su += u
            sxu += x * u
            sv += v
            sxv += x * v
            syv += y * v
        return solve_normal_equations(n, sx, sy, sxx, sxy, syy, su, sxu, sv, sxv, syv)


def solve_normal_equations(n, sx, sy, sxx, sxy, syy, su, sxu, sv, sxv, syv) -> np.ndarray | None:
    """``u = a x + tx`` and ``v = b x + c y + ty`` in the least-squares sense, from the sums of
    the inliers' coordinates (float64 scalars); ``(5,)`` float64 ``(a, b, c, tx, ty)``, or
    ``None`` if a system is singular or ``a, c`` are not positive."""
    det2 = sxx * n - sx * sx
    m_yy = syy * n - sy * sy
    m_xy = sxy * n - sy * sx
    m_xyy = sxy * sy - syy * sx
    det3 = sxx * m_yy - sxy * m_xy + sx * m_xyy
    if not (abs(det2) > 1e-9 * (1 + sxx * n) and abs(det3) > 1e-9 * (1 + sxx * syy * n)):
        return None
    a = (sxu * n - sx * su) / det2
    tx = (sxx * su - sx * sxu) / det2
    b = (sxv * m_yy - sxy * (syv * n - sy * sv) + sx * (syv * sy - syy * sv)) / det3
    c = (sxx * (syv * n - sy * sv) - sxv * m_xy + sx * (sxy * sv - syv * sx)) / det3
    ty = (sxx * (syy * sv - syv * sy) - sxy * (sxy * sv - syv * sx) + sxv * m_xyy) / det3
    h = np.array([a, b, c, tx, ty], dtype=np.float64)
    if not (a > 0 and c > 0 and np.isfinite(h).all()):
        return None
    return h


def match_pair(q: dict, c: dict, threshold: float = 2.0, max_scale: float = 3.0, symmetric: bool = True,
               lo_hypotheses: int = 5, lo_factor: float = 4.0, lo_rounds: int = 2, lo_min_inliers: int = 4,
               num_scales: int = 3) -> PairMatch:
    """Spatially verify one pair. ``q``, ``c``: dicts of numpy arrays as ``LocalFeatures.image``
    gives them (``xy (F, 2)`` and ``frame (F, 2, 2)`` real, feature-map pixels, computed in
    float64; ``channel (F,)`` and ``scale (F,)`` integers); ``threshold`` in feature-map pixels."""
    th_sq = threshold ** 2
    lo_th_sq = (lo_factor * threshold) ** 2
    log_limit = math.log(max_scale) + 1e-12
    best = PairMatch()
    qxy, cxy = np.asarray(q["xy"], dtype=np.float64), np.asarray(c["xy"], dtype=np.float64)
    qf, cf = np.asarray(q["frame"], dtype=np.float64), np.asarray(c["frame"], dtype=np.float64)
    by_key: dict[tuple[int, int], list[int]] = {}  # (scale, channel) -> candidate features, in order
    for j in range(len(cxy)):
        by_key.setdefault((int(c["scale"][j]), int(c["channel"][j])), []).append(j)
    for sq in range(num_scales):
        for sc in range(num_scales):
            rows, x1, y1, x2, y2, log_s, hyps = [], [], [], [], [], [], []
            for i in range(len(qxy)):
                if q["scale"][i] != sq:
                    continue
                for j in by_key.get((sc, int(q["channel"][i])), ()):
                    rows.append((i, j))
                    x1.append(qxy[i, 0])
                    y1.append(qxy[i, 1])
                    x2.append(cxy[j, 0])
                    y2.append(cxy[j, 1])
                    log_s.append(_log(cf[j, 0, 0] * cf[j, 1, 1]) - _log(qf[i, 0, 0] * qf[i, 1, 1]))
                    hyps.append(hypothesis(qf[i], cf[j], qxy[i], cxy[j]))
            if not rows:
                continue
            group = _Group(rows, x1, y1, x2, y2, log_s)
            counts = [group.count(group.inliers(h, th_sq, log_limit, symmetric)) for h in hyps]
            order = sorted(range(len(counts)), key=lambda k: -counts[k])[:max(lo_hypotheses, 1)]
            group_best = (0, None)
            for k in order:
                count, h = counts[k], hyps[k]
                if lo_hypotheses and count >= lo_min_inliers:
                    for _ in range(lo_rounds):
                        fitted = group.fit(group.inliers(h, lo_th_sq, log_limit, symmetric))
                        if fitted is None:
                            break
                        new = group.count(group.inliers(fitted, th_sq, log_limit, symmetric))
                        if new <= count:
                            break
                        count, h = new, fitted
                if count > group_best[0]:
                    group_best = (count, h)
            if group_best[0] > best.inliers:
                count, h = group_best
                mask = group.inliers(h, th_sq, log_limit, symmetric)
                best = PairMatch(count, h, (sq, sc), [rows[k] for k in np.flatnonzero(mask).tolist()])
    return best


def verify_pair(q: dict, c: dict, **kwargs) -> int:
    """Best inlier count of one pair (`match_pair`'s ``inliers``)."""
    return match_pair(q, c, **kwargs).inliers


def verify_pair_details(q: dict, c: dict, config=None) -> dict:
    """`match_pair` with the parameters of a `gpu_dsm.match.MatchConfig` (default
    one if ``None``) on ``LocalFeatures.image`` dicts (tensors or arrays), as a dict: ``inliers``,
    ``transform`` (``None`` without inliers), ``scale_pair`` and ``matches`` (see `PairMatch`)."""
    if config is None:
        from gpu_dsm.match import MatchConfig

        config = MatchConfig()
    q, c = ({k: v.numpy() if hasattr(v, "numpy") else np.asarray(v) for k, v in d.items()} for d in (q, c))
    num_scales = 1 + max([int(d["scale"].max()) for d in (q, c) if len(d["scale"])] or [0])
    result = match_pair(q, c, threshold=config.threshold, max_scale=config.max_scale_change,
                        symmetric=config.error == "symmetric", lo_hypotheses=config.lo_hypotheses,
                        lo_factor=config.lo_factor, lo_rounds=config.lo_rounds, lo_min_inliers=config.lo_min_inliers,
                        num_scales=num_scales)
    return {"inliers": result.inliers, "transform": result.transform, "scale_pair": result.scale_pair,
            "matches": result.matches}
