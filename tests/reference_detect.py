"""A plain, loop-by-loop reference of the DSM authors' feature selection (what
``DetectorConfig.reference()`` must compute), written from the rules in
``gpu_dsm/reference_selection.py``: one channel, one region, one pixel at a time, on top of the
VLFeat MSER port in ``gpu_dsm.reference.mser``.
"""
from __future__ import annotations

import math

import numpy as np

from gpu_dsm.reference.mser import mser_reference, region_stats


def matlab_round(x: float) -> float:
    return math.copysign(math.floor(abs(x) + 0.5), x)


def matlab_uint8(x: np.ndarray) -> np.ndarray:
    out = np.zeros(x.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(x):
        out[idx] = min(255, max(0, int(matlab_round(float(v)))))
    return out


def hist_delta(scaled: np.ndarray, quantile: float = 0.6, cap: int = 12, bins: int = 1000) -> int:
    values = [float(v) for v in scaled.ravel() if v != 0]
    if not values:
        return cap
    lo, hi = min(values), max(values)
    if hi == lo:
        centre = lo
    else:
        width = (hi - lo) / bins
        counts = [0] * bins
        edges = [lo + width * k for k in range(1, bins)]
        for v in values:
            b = 0
            while b < bins - 1 and edges[b] <= v:
                b += 1
            counts[b] += 1
        running, below = 0, 0
        for c in counts:
            running += c
            if running / len(values) < quantile:
                below += 1
            else:
                break
        centre = lo + width * (max(below - 1, 0) + 0.5)
    return int(max(1, min(cap, matlab_round(centre))))


def _seed(pixels, image, value, width, height):
    """First pixel of grey value ``value`` (of the processed map) in column-major order."""
    best = None
    for p in pixels:
        y, x = divmod(p, width)
        if image[y, x] == value:
            key = x * height + y
            best = key if best is None else min(best, key)
    return best


def _inside(px, py, vx, vy):
    inside = False
    for i in range(len(vx) - 1):
        x0, y0, x1, y1 = vx[i], vy[i], vx[i + 1], vy[i + 1]
        cross = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
        if cross == 0 and min(x0, x1) <= px <= max(x0, x1) and min(y0, y1) <= py <= max(y0, y1):
            return True
        if (y0 > py) != (y1 > py):
            if (y1 > y0 and cross > 0) or (y1 < y0 and cross < 0):
                inside = not inside
    return inside


def ellipse_strength(fm, mean, frame):
    """(strength, box (x1, y1, x2, y2) 1-based, keep) of one feature on its ``(H, W)`` map."""
    height, width = fm.shape
    thetas = np.linspace(0.0, 2.0 * math.pi, 40)
    a, b, c = frame[0, 0], frame[1, 0], frame[1, 1]
    xs = [mean[0] + 1.0 + a * math.cos(t) for t in thetas]
    ys = [mean[1] + 1.0 + b * math.cos(t) + c * math.sin(t) for t in thetas]
    vx, vy = [matlab_round(v) for v in xs], [matlab_round(v) for v in ys]
    x1, x2 = max(matlab_round(min(xs)), 1), min(matlab_round(max(xs)), width)
    y1, y2 = max(matlab_round(min(ys)), 1), min(matlab_round(max(ys)), height)
    best, total = 0.0, 0.0
    for py in range(int(y1), int(y2) + 1):
        for px in range(int(x1), int(x2) + 1):
            if _inside(px, py, vx, vy):
                v = float(fm[py - 1, px - 1])
                best, total = max(best, v), total + v
    keep = (x2 - x1 + 1) > 1 and (y2 - y1 + 1) > 1 and total != 0
    return best, (x1, y1, x2, y2), keep


def nms(boxes, scores, overlap):
    """nms.m: greedy, scores sorted ascending (stable), the last one picked first."""
    order = list(np.argsort(np.asarray(scores), kind="stable"))
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    pick = []
    while order:
        i = order[-1]
        pick.append(i)
        rest = []
        for j in order[:-1]:
            w = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = w * h
            if inter / (area[i] + area[j] - inter) <= overlap:
                rest.append(j)
        order = rest
    return pick


def _stable_desc(values):
    return sorted(range(len(values)), key=lambda i: -values[i])  # Python's sort is stable


def scale_features(acts: np.ndarray, bound: float, is_query: bool, max_regions=36, per_channel=None, iou=0.2, tot_max=512):
    """Features of one image at one scale: list of dicts (channel, x, y, strength), final row order."""
    per_channel = per_channel or (20 if is_query else 10)
    scaled = acts.astype(np.float32) * np.float32(255.0 / bound)
    levels = matlab_uint8(scaled)
    delta = hist_delta(scaled)
    num_channels, height, width = acts.shape
    feats = []
    for ch in range(num_channels):
        found = []
        for bright in (False, True):
            u = 255 - levels[ch] if bright else levels[ch]
            if u.max() == u.min():
                continue
            part = []
            for r in mser_reference(u, delta):
                part.append((r["value"], _seed(r["pixels"], u, r["value"], width, height), r["pixels"]))
            found += [p for _, _, p in sorted(part, key=lambda t: (t[0], t[1]))]
        kept = []
        for pixels in found:
            _, mean, cov = region_stats(pixels, width)
            if cov[0, 0] * cov[1, 1] - cov[0, 1] * cov[1, 0] > 1e-9:
                kept.append((mean, np.linalg.cholesky(cov)))
        if len(kept) > max_regions:
            continue
        for mean, frame in kept:
            strength, box, keep = ellipse_strength(acts[ch], mean, frame)
            if keep:
                feats.append({"channel": ch, "x": mean[0], "y": mean[1], "strength": strength, "box": box})
    if not is_query and feats:
        feats = [feats[i] for i in nms([f["box"] for f in feats], [f["strength"] for f in feats], iou)]
    capped = []
    for ch in sorted({f["channel"] for f in feats}):
        group = [f for f in feats if f["channel"] == ch]
        if len(group) > per_channel:
            group = [group[i] for i in _stable_desc([f["strength"] for f in group])[:per_channel]]
        capped += group
    if len(capped) > tot_max:
        capped = [capped[i] for i in _stable_desc([f["strength"] for f in capped])[:tot_max]]
    return capped


def image_features(maps, bound: float, is_query: bool, ms_tot_max: int = 512):
    """All scales: list of dicts with ``scale`` added, as the reference's multi-scale selection keeps them."""
    everything = []
    for s, acts in enumerate(maps):
        everything += [dict(f, scale=s) for f in scale_features(acts, bound, is_query)]
    if len(everything) > ms_tot_max:
        everything = [everything[i] for i in _stable_desc([f["strength"] for f in everything])[:ms_tot_max]]
    return everything
