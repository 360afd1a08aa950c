"""A plain, loop-by-loop fast spatial matcher: the oracle for ``gpu_dsm.match.spatial_verify``.

One (query, candidate) pair at a time, one scale pair at a time, one hypothesis at a time, in
float64 with the direct error formula. Same definitions as the batched matcher (see its
module docstring): symmetric transfer error, scale gate, each feature counted once, LO on the
best 5 hypotheses (ties: earlier correspondence first), pair score = best scale pair.
"""
from __future__ import annotations

import math

import numpy as np


def _hypothesis(f1, f2, x1, x2):
    p, q, r = f1[0, 0], f1[1, 0], f1[1, 1]
    a2, b2, c2 = f2[0, 0], f2[1, 0], f2[1, 1]
    a, c = a2 / p, c2 / r
    b = b2 / p - c2 * q / (p * r)
    return np.array([a, b, c, x2[0] - a * x1[0], x2[1] - b * x1[0] - c * x1[1]])


def _error(h, x1, x2, symmetric=True):
    a, b, c, tx, ty = h
    rx = x2[0] - a * x1[0] - tx
    ry = x2[1] - b * x1[0] - c * x1[1] - ty
    e = rx * rx + ry * ry
    if symmetric:
        bx = rx / a
        by = (ry - b * bx) / c
        e += bx * bx + by * by
    return e


def _inliers(h, corr, th_sq, max_scale, symmetric):
    log_h = math.log(h[0] * h[2])
    out = []
    for k, (i, j, x1, x2, log_s) in enumerate(corr):
        if abs(log_s - log_h) <= math.log(max_scale) + 1e-12 and _error(h, x1, x2, symmetric) < th_sq:
            out.append(k)
    return out


def _count(inl, corr):
    return min(len({corr[k][0] for k in inl}), len({corr[k][1] for k in inl}))


def _fit(inl, corr):
    if len(inl) < 3:
        return None
    X = np.array([corr[k][2] for k in inl], dtype=np.float64)
    U = np.array([corr[k][3] for k in inl], dtype=np.float64)
    n = len(inl)
    sx, sy = X[:, 0].sum(), X[:, 1].sum()
    sxx, sxy, syy = (X[:, 0] ** 2).sum(), (X[:, 0] * X[:, 1]).sum(), (X[:, 1] ** 2).sum()
    m2 = np.array([[sxx, sx], [sx, n]])
    m3 = np.array([[sxx, sxy, sx], [sxy, syy, sy], [sx, sy, n]])
    if abs(np.linalg.det(m2)) <= 1e-9 * (1 + sxx * n) or abs(np.linalg.det(m3)) <= 1e-9 * (1 + sxx * syy * n):
        return None
    a, tx = np.linalg.solve(m2, [(X[:, 0] * U[:, 0]).sum(), U[:, 0].sum()])
    b, c, ty = np.linalg.solve(m3, [(X[:, 0] * U[:, 1]).sum(), (X[:, 1] * U[:, 1]).sum(), U[:, 1].sum()])
    h = np.array([a, b, c, tx, ty])
    if a <= 0 or c <= 0 or not np.isfinite(h).all():
        return None
    return h


def verify_pair(q, c, threshold=2.0, max_scale=3.0, symmetric=True, lo_hypotheses=5, lo_factor=4.0,
                lo_rounds=2, lo_min_inliers=4, num_scales=3):
    """Best inlier count of one pair. ``q``, ``c``: dicts of numpy arrays (``LocalFeatures.image``)."""
    th_sq = threshold ** 2
    best = 0
    for sq in range(num_scales):
        for sc in range(num_scales):
            corr = []
            for i in range(len(q["xy"])):
                if q["scale"][i] != sq:
                    continue
                for j in range(len(c["xy"])):
                    if c["scale"][j] != sc or c["channel"][j] != q["channel"][i]:
                        continue
                    f1, f2 = q["frame"][i].astype(np.float64), c["frame"][j].astype(np.float64)
                    log_s = math.log(f2[0, 0] * f2[1, 1]) - math.log(f1[0, 0] * f1[1, 1])
                    corr.append((i, j, q["xy"][i].astype(np.float64), c["xy"][j].astype(np.float64), log_s, f1, f2))
            if not corr:
                continue
            plain = [t[:5] for t in corr]
            counts = []
            for (i, j, x1, x2, log_s, f1, f2) in corr:
                h = _hypothesis(f1, f2, x1, x2)
                counts.append((_count(_inliers(h, plain, th_sq, max_scale, symmetric), plain), h))
            order = sorted(range(len(counts)), key=lambda k: -counts[k][0])[:lo_hypotheses]
            for k in order:
                count, h = counts[k]
                if count >= lo_min_inliers:
                    for _ in range(lo_rounds):
                        wide = _inliers(h, plain, (lo_factor * threshold) ** 2, max_scale, symmetric)
                        fitted = _fit(wide, plain)
                        if fitted is None:
                            break
                        new = _count(_inliers(fitted, plain, th_sq, max_scale, symmetric), plain)
                        if new <= count:
                            break
                        count, h = new, fitted
                best = max(best, count)
    return best
