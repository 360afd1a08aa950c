"""Plain, loop-by-loop references of the DSM detector: one channel, one region, one pixel at a time.

Two sets of rules, both on top of the VLFeat MSER port `gpu_dsm.reference.mser.mser_reference`:

* `default_image_features`: the default rules of `gpu_dsm.detect.detect`
  (``DetectorConfig()``, the module docstring of `gpu_dsm.detect`);
* `authors_image_features`: the DSM authors' feature code (github osimeoni/DSM,
  ``dsm/features/cmp_mser_regions.m``, ``cmp_nms.m``, ``get_max_feats_ms.m``, ``utils/nms.m``), run
  as in Octave 7 with VLFeat 0.9 and the image package's ``poly2mask``: what
  ``DetectorConfig.reference()`` must compute. Each step below names the line it follows.

Both return a list of features, dicts with ``scale``, ``channel``, ``x``, ``y`` (0-based centroid of
the region's pixels, float64), ``strength`` and, for the authors' rules, ``value`` (the strength in
the values the reference reads, ``activations * 255 / bound``).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from gpu_dsm.reference.mser import mser_reference

f32 = np.float32
DSM_MSER = dict(max_variation=0.5, min_diversity=0.7, min_area=0.001, max_area=0.75)


# ------------------------------------------------------------------------------ shared helpers
def _region_geometry(pixels, width):
    """Area, centroid ``(x, y)`` and population covariance (float64) of flat ``y * W + x`` pixels."""
    xs = [p % width for p in pixels]
    ys = [p // width for p in pixels]
    n = len(pixels)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) * (x - mx) for x in xs) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / n
    syy = sum((y - my) * (y - my) for y in ys) / n
    return n, (mx, my), ((sxx, sxy), (sxy, syy)), xs, ys


def _greedy_nms(boxes, order, iou):
    """Greedy NMS visiting ``order``; a box is dropped when its IoU with a kept one exceeds ``iou``.
    Boxes ``(x1, y1, x2, y2)``, area ``(x2 - x1) (y2 - y1)``. Returns the kept indices in pick order."""
    kept = []
    for i in order:
        ok = True
        for j in kept:
            w = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = w * h
            area_i = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            area_j = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            if inter / (area_i + area_j - inter) > iou:
                ok = False
                break
        if ok:
            kept.append(i)
    return kept


def _stable_descending(values):
    """Indices sorted by decreasing value, equal values in their original order."""
    return sorted(range(len(values)), key=lambda i: -values[i])


# ------------------------------------------------------------------------------- default rules
def default_levels(acts: np.ndarray, bound: float | None) -> np.ndarray:
    """``levels="auto"``: ``round(a * 255 / bound)`` (ReLU6: ``bound = 6``) or ``round(a)`` without a
    bound; halves to even; saturated to 0..255 (float32 products, as ``torch``). ``acts``: a real
    numpy array of any shape; returns int64 levels of that shape."""
    x = acts.astype(np.float32) * (f32(255.0 / bound) if bound is not None else f32(1.0))
    out = np.zeros(x.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(x):
        out[idx] = min(255, max(0, int(round(float(v)))))  # Python's round: halves to even
    return out


def default_delta(levels: np.ndarray, quantile: float = 0.6, cap: int = 12, bins: int = 1000) -> int:
    """Paper 4.1: the centre of the histogram bin (``bins`` equal bins between the smallest and largest
    non-zero level) where the cumulative share of the non-zero levels reaches ``quantile``, truncated
    to an integer, within ``[1, cap]``. Exact rational arithmetic. ``levels``: an integer numpy
    array of any shape (one image and scale); returns the delta in grey levels."""
    values = sorted(int(v) for v in levels.ravel() if v > 0)
    if not values:
        return cap
    lo, hi = values[0], values[-1]
    if lo == hi:
        centre = Fraction(lo)
    else:
        need = Fraction(quantile) * len(values)
        count, level = 0, lo
        for v in values:
            count += 1
            if count >= need:
                level = v
                break
        b = min(bins - 1, math.floor(Fraction(level - lo) * bins / (hi - lo)))
        centre = lo + (b + Fraction(1, 2)) * Fraction(hi - lo, bins)
    return int(max(1, min(cap, math.floor(centre))))


def default_scale_features(acts: np.ndarray, bound: float | None, is_query: bool, *, delta: int | None = None,
                           max_regions: int = 36, singular_det: float = 1e-9, strength: str = "max", p: float = 3.0,
                           per_channel: int | None = None, iou: float = 0.2, max_features: int = 512, stats=None):
    """The default rules on one image and scale, ``acts`` ``(K, H, W)``: bright-on-dark MSERs of every
    channel; drop channels with more than ``max_regions`` regions, then regions with covariance
    determinant ``<= singular_det``; strength = max (or mean, or GeM) of the activations over the
    region's pixels, ties ranked by the mean (``+ 1e-6 * mean / largest mean``); per channel the
    ``per_channel`` strongest (20 query / 10 database); database: greedy NMS over all channels on
    the regions' pixel boxes (``+1`` on the far edges); the ``max_features`` strongest. Among equal
    ranks: the order (channel, threshold level, first pixel in raster order). ``acts`` is a real
    numpy array; ``x``, ``y`` of the features are float64 map pixels."""
    per_channel = per_channel or (20 if is_query else 10)
    stats = stats if stats is not None else {}
    levels = default_levels(acts, bound)
    delta = delta if delta is not None else default_delta(levels)
    num_channels, height, width = acts.shape
    cands = []
    for ch in range(num_channels):
        found = mser_reference(255 - levels[ch], delta, **DSM_MSER)
        if len(found) > max_regions:
            stats["cluttered_channels"] = stats.get("cluttered_channels", 0) + 1
            continue
        for r in found:
            n, (mx, my), cov, xs, ys = _region_geometry(r["pixels"], width)
            if cov[0][0] * cov[1][1] - cov[0][1] * cov[1][0] <= singular_det:
                continue
            vals = [float(acts[ch, y, x]) for x, y in zip(xs, ys)]
            if strength == "gem":
                mean = sum(v ** p for v in vals) / n
                s = mean ** (1.0 / p)
            else:
                mean = sum(vals) / n
                s = max(vals) if strength == "max" else mean
            cands.append(dict(channel=ch, level=255 - r["value"], first=min(r["pixels"]), x=mx, y=my, strength=s,
                              mean=mean, box=(min(xs), min(ys), max(xs) + 1, max(ys) + 1)))
    cands.sort(key=lambda c: (c["channel"], c["level"], c["first"]))
    top_mean = max([c["mean"] for c in cands], default=0.0)
    for c in cands:
        c["rank"] = c["strength"] + 1e-6 * c["mean"] / max(top_mean, 1e-12)
    kept = []
    for ch in sorted({c["channel"] for c in cands}):
        group = [c for c in cands if c["channel"] == ch]
        if len(group) > per_channel:
            stats["capped_channels"] = stats.get("capped_channels", 0) + 1
        kept += [group[i] for i in _stable_descending([c["rank"] for c in group])[:per_channel]]
    kept.sort(key=lambda c: (c["channel"], c["level"], c["first"]))
    if not is_query and kept:
        order = _stable_descending([c["rank"] for c in kept])
        picked = _greedy_nms([c["box"] for c in kept], order, iou)
        stats["nms_suppressed"] = stats.get("nms_suppressed", 0) + len(kept) - len(picked)
        kept = [kept[i] for i in sorted(picked)]
    if len(kept) > max_features:
        stats["scale_capped"] = stats.get("scale_capped", 0) + 1
    return [kept[i] for i in _stable_descending([c["rank"] for c in kept])[:max_features]]


def default_image_features(maps, bound: float | None, is_query: bool, max_features: int = 512, stats=None, **rules):
    """The default rules on one image: per scale `default_scale_features`, then the
    ``max_features`` strongest over the scales (ties: scale order, then each scale's order).
    ``maps``: the image's activations, one ``(K, h_s, w_s)`` real numpy array per scale."""
    stats = stats if stats is not None else {}
    everything = []
    for s, acts in enumerate(maps):
        everything += [dict(f, scale=s) for f in default_scale_features(acts, bound, is_query, max_features=max_features,
                                                                        stats=stats, **rules)]
    if len(everything) > max_features:
        stats["image_capped"] = stats.get("image_capped", 0) + 1
    return [everything[i] for i in _stable_descending([f["rank"] for f in everything])[:max_features]]


# ------------------------------------------------------------------------------- authors' rules
def matlab_round(x: float) -> float:
    """MATLAB / Octave ``round``: halves away from zero."""
    return math.copysign(math.floor(abs(x) + 0.5), x)


def matlab_uint8(x: np.ndarray) -> np.ndarray:
    """``uint8(x)``: round halves away from zero, saturate to 0..255; a real numpy array of any
    shape -> uint8 of that shape."""
    out = np.zeros(x.shape, dtype=np.int64)
    for idx, v in np.ndenumerate(x):
        out[idx] = min(255, max(0, int(matlab_round(float(v)))))
    return out


def hist_delta(scaled: np.ndarray, quantile: float = 0.6, cap: int = 12, bins: int = 1000) -> int:
    """``compute_delta`` of ``fit_localfeatures.m``: ``[co, ce] = hist(values, 1000)`` of the non-zero
    values, ``v = find(cumsum(co) / sum(co) < 0.6)``, ``min(round(ce(v(end))), 12)`` (the first bin
    when no bin is below the share, where the reference fails; at least 1). ``scaled``: the float
    values of one image and scale, a real numpy array of any shape; returns grey levels."""
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


def vl_mser_frame(xs, ys):
    """``vl_mser``'s frame of a region (``mser.c``, ``vl_mser_ell_fit``, single precision, the image
    column-major as MATLAB passes it): ``(x + 1, y + 1, Sxx, Sxy, Syy)`` after ``vl_ertr``."""
    n = f32(len(xs))
    my, mx = f32(sum(ys)) / n, f32(sum(xs)) / n
    syy = f32(sum(y * y for y in ys)) / n - my * my
    sxy = f32(sum(x * y for x, y in zip(xs, ys))) / n - my * mx
    sxx = f32(sum(x * x for x in xs)) / n - mx * mx
    return float(mx) + 1.0, float(my) + 1.0, float(sxx), float(sxy), float(syy)


def octave_linspace(a: float, b: float, n: int) -> list[float]:
    """Octave 7's ``linspace``: symmetric from both ends, the end points exact."""
    out = [0.0] * n
    out[0], out[-1] = a, b
    step = (b - a) / (n - 1)
    for i in range(1, n // 2):
        out[i] = a + i * step
        out[n - 1 - i] = b - i * step
    if n % 2 == 1:
        out[n // 2] = (a + b) / 2
    return out


def ellipse_vertices(frame):
    """``vl_frame2oell`` then ``X = A * [cos(thr); sin(thr)] + centre`` (``cmp_mser_regions.m``,
    ``np = 40``): ``A = [a 0; b c]``, ``a = sqrt(Sxx)``, ``b = Sxy / max(a, 1e-18)``,
    ``c = sqrt(max(Syy - b^2, 0))``; the BLAS product rounds ``b cos + c sin`` once after the first
    product (a fused multiply-add). Returns unrounded ``xs, ys`` (1-based)."""
    xc, yc, sxx, sxy, syy = frame
    a = math.sqrt(sxx)
    b = sxy / max(a, 1e-18)
    c = math.sqrt(max(syy - b * b, 0.0))
    xs, ys = [], []
    for t in octave_linspace(0.0, 2.0 * math.pi, 40):
        cos, sin = math.cos(t), math.sin(t)
        xs.append(a * cos + xc)
        ys.append(float(Fraction(c) * Fraction(sin) + Fraction(b * cos)) + yc)
    return xs, ys


def poly2mask(x, y, m, n):
    """Octave image 2.14 ``poly2mask``, line by line (a scanline fill), with MATLAB's behaviour for a
    polygon whose vertices share one y (an empty mask). Returns the set of 1-based ``(row, col)``."""
    x = [matlab_round(v) for v in x]
    y = [matlab_round(v) for v in y]
    mask = set()
    if all(v == y[0] for v in y):
        return mask
    if x[0] != x[-1] or y[0] != y[-1]:
        x, y = x + [x[0]], y + [y[0]]
    edges = []  # [emaxy, eminy, exmaxy, m_inv]
    for i in range(len(x) - 1):
        if y[i] == y[i + 1]:
            continue
        if y[i] < y[i + 1]:
            eminy, emaxy, exminy, exmaxy = y[i], y[i + 1], x[i], x[i + 1]
        else:
            eminy, emaxy, exminy, exmaxy = y[i + 1], y[i], x[i + 1], x[i]
        edges.append([emaxy, eminy, exmaxy, (exmaxy - exminy) / (emaxy - eminy)])
    ge = [[-math.inf] * 4] + sorted(edges, key=lambda e: (e[0], e[2]))
    sl = ge[-1][0]
    gei = len(ge) - 1
    ae = []
    while sl == ge[gei][0]:
        ae.insert(0, ge[gei][1:])
        gei -= 1
    miny = max(min(y), 1)
    while sl >= miny:
        if sl <= m:
            xs = [e[1] for e in ae]
            for k in range(0, len(xs) - 1, 2):
                lo, hi = matlab_round(xs[k]), matlab_round(xs[k + 1])
                lo += lo != hi
                lo, hi = max(lo, 1), min(hi, n)
                for col in range(int(lo), int(hi) + 1):
                    mask.add((int(sl), col))
        sl -= 1
        ae = [e for e in ae if e[0] != sl]
        for e in ae:
            e[1] -= e[2]
        while sl == ge[gei][0]:
            ae.append(list(ge[gei][1:]))
            gei -= 1
        ae.sort(key=lambda e: e[1])
    return mask


def chol_ok(sxx, sxy, syy) -> bool:
    """``chol([Sxx Sxy; Sxy Syy], 'lower')`` succeeds (LAPACK, through numpy)."""
    try:
        np.linalg.cholesky(np.array([[sxx, sxy], [sxy, syy]], dtype=np.float64))
        return True
    except np.linalg.LinAlgError:
        return False


def nms_m(boxes, scores, overlap):
    """``utils/nms.m``: scores sorted ascending (stable), the last one picked first; a box is kept
    while its IoU with the pick is ``<= overlap``; area ``(x2 - x1) (y2 - y1)``."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    pick = []
    while order:
        i = order[-1]
        pick.append(i)
        rest = []
        for j in order[:-1]:
            w = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            h = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = w * h
            area_i = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            area_j = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            if inter / (area_i + area_j - inter) <= overlap:
                rest.append(j)
        order = rest
    return pick


def authors_scale_features(acts: np.ndarray, bound: float | None, is_query: bool, *, delta: int | None = None,
                           max_regions=36, per_channel=None, iou=0.2, tot_max=512, stats=None):
    """``cmp_mser_regions`` (+ ``cmp_nms`` for database images) and the per-scale part of
    ``get_max_feats_ms`` on one image and scale, ``acts`` ``(K, H, W)``; ``fms = acts * 255 / bound``
    (float32; the raw activations without a bound). Features in the reference's final row order.
    ``acts`` is a real numpy array; ``x``, ``y`` of the features are float64 0-based map pixels."""
    per_channel = per_channel or (20 if is_query else 10)
    stats = stats if stats is not None else {}
    scaled = acts.astype(np.float32) * (f32(255.0 / bound) if bound is not None else f32(1.0))
    levels = matlab_uint8(scaled)  # fms_ui = uint8(fms)
    delta = delta if delta is not None else hist_delta(scaled)
    num_channels, height, width = acts.shape
    feats = []
    for ch in range(num_channels):
        if levels[ch].max() <= 0:
            continue
        regions = []
        # vl_mser: dark-on-bright, then bright-on-dark (on ~I = 255 - I), each in the order of
        # its regions' seeds in the sorted pixels of the column-major image
        for bright in (False, True):
            u = 255 - levels[ch] if bright else levels[ch]
            for r in mser_reference(u.T, delta, **DSM_MSER):
                xs = [p // height for p in r["pixels"]]  # flat index x * H + y of the transposed map
                ys = [p % height for p in r["pixels"]]
                regions.append((xs, ys))
        frames = [vl_mser_frame(xs, ys) for xs, ys in regions]
        # remove singular covariance matrices: f(4)^2 - f(5) f(3) == 0
        keep = [i for i, f in enumerate(frames) if f[3] * f[3] - f[4] * f[2] != 0]
        if len(keep) > max_regions:  # cluttered channel
            stats["cluttered_channels"] = stats.get("cluttered_channels", 0) + 1
            continue
        keep = [i for i in keep if chol_ok(frames[i][2], frames[i][3], frames[i][4])]
        for i in keep:
            vx, vy = ellipse_vertices(frames[i])
            mask = poly2mask(vx, vy, height, width)
            min_x, max_x = max(matlab_round(min(vx)), 1), min(matlab_round(max(vx)), width)
            min_y, max_y = max(matlab_round(min(vy)), 1), min(matlab_round(max(vy)), height)
            masked = [float(scaled[ch, r - 1, c - 1]) for r, c in mask]
            if max_x - min_x + 1 <= 1 or max_y - min_y + 1 <= 1 or sum(masked) == 0:
                continue
            xs, ys = regions[i]
            n = len(xs)
            feats.append(dict(channel=ch, x=sum(xs) / n, y=sum(ys) / n, value=max([0.0] + masked),
                              strength=max([0.0] + [float(acts[ch, r - 1, c - 1]) for r, c in mask]),
                              box=(min_y, min_x, max_y, max_x)))
    if not is_query and feats:  # cmp_nms
        picked = nms_m([f["box"] for f in feats], [f["value"] for f in feats], iou)
        stats["nms_suppressed"] = stats.get("nms_suppressed", 0) + len(feats) - len(picked)
        feats = [feats[i] for i in picked]
    capped = []  # get_max_feats_ms: per channel (ascending), then per scale
    for ch in sorted({f["channel"] for f in feats}):
        group = [f for f in feats if f["channel"] == ch]
        if len(group) > per_channel:
            stats["capped_channels"] = stats.get("capped_channels", 0) + 1
            group = [group[i] for i in _stable_descending([abs(f["value"]) for f in group])[:per_channel]]
        capped += group
    if len(capped) > tot_max:
        stats["scale_capped"] = stats.get("scale_capped", 0) + 1
        capped = [capped[i] for i in _stable_descending([abs(f["value"]) for f in capped])[:tot_max]]
    return capped


def authors_image_features(maps, bound: float | None, is_query: bool, ms_tot_max: int = 512, stats=None, **rules):
    """All scales: `authors_scale_features` per scale, then ``get_max_feats_ms``'s multi-scale
    cut (the ``ms_tot_max`` strongest, stable over the scales in order). ``maps``: one
    ``(K, h_s, w_s)`` real numpy array per scale."""
    stats = stats if stats is not None else {}
    everything = []
    for s, acts in enumerate(maps):
        everything += [dict(f, scale=s) for f in authors_scale_features(acts, bound, is_query, stats=stats, **rules)]
    if len(everything) > ms_tot_max:
        stats["image_capped"] = stats.get("image_capped", 0) + 1
        everything = [everything[i] for i in _stable_descending([abs(f["value"]) for f in everything])[:ms_tot_max]]
    return everything
