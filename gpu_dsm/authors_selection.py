"""The DSM authors' feature selection, batched: what ``DetectorConfig.reference()`` runs.

The rules of the reference code (MATLAB, VLFeat), per image and scale, all tensors:

1. levels: activations (scaled as ``DetectorConfig.levels`` says) rounded half away from zero,
   saturated at 255 (MATLAB's ``uint8``); delta: 1000-bin histogram (MATLAB ``hist``) of the
   non-zero float values, the centre of the last bin whose cumulative share is below 0.6,
   rounded, capped at 12 (`reference_delta`);
2. MSER of both polarities; rows ordered as ``vl_mser`` lists them: channel, dark-on-bright
   before bright-on-dark, then by grey value and seed pixel (`MSERRegions.seed`);
3. each region's centroid and second moments as ``vl_mser`` computes them, in single precision
   (`vlfeat_moments`); regions with an exactly singular covariance dropped, THEN channels
   with more than 36 of the rest, THEN regions where ``chol`` fails (`cholesky_fails`);
4. strength: the largest value of ``fms`` (the scaled activations the reference reads) inside the
   1-sigma ellipse, as the reference fills it: ``vl_frame2oell``'s frame, 40 vertices rounded half
   away from zero, Octave's ``poly2mask`` scanline fill (`ellipse_strength`). A feature
   whose ellipse box (clipped to the map) is one pixel high or wide, or whose ellipse holds no
   activation, is dropped;
5. database images: NMS over all features of the scale on the ellipse boxes (inclusive pixel
   coordinates, area ``(x2 - x1) (y2 - y1)``), IoU 0.2, before the per-channel cap; among equal
   strengths the later row is picked first; rows are then in pick order;
6. per channel the strongest 20 (query) / 10 (database), stable (ties: the earlier row); per
   scale the strongest ``max_features``, stable; over the scales (scale order) the strongest
   ``max_features``, stable.

Measured against the authors' code run in Octave 7 with VLFeat 0.9 (``vl_mser``) and the image
package's ``poly2mask`` on the same activations: identical features. Where this can depart from
it: MATLAB's own ``poly2mask`` decides boundary pixels on a 5x5 sub-pixel grid (here: Octave's);
the seed pixel that orders regions of equal grey value in one channel is VLFeat's in 98.5% of
regions (`MSERRegions.seed`), which matters only for ties; the single-precision moments
are exact while a region's coordinate sums stay below 2**24.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import nms

from gpu_dsm.kernels.precision import correctly_rounded_sqrt, fused_multiply_add
from gpu_dsm.mser import MAX_LEVEL, MSERRegions

NUM_VERTICES = 40  # reference code: np = 40 vertices (first and last coincide)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``round``: halves away from zero; a floating point tensor of any shape, its dtype and device.

    Examples:
        >>> import torch
        >>> round_half_away(torch.tensor([-1.5, -0.5, 0.5, 1.5, 2.4]))
        tensor([-2., -1.,  1.,  2.,  2.])
    """
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def reference_levels(scaled: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``uint8(x)``: round half away from zero, saturate to 0..255; floating point of any
    shape -> uint8 of that shape, on its device.

    Examples:
        >>> import torch
        >>> reference_levels(torch.tensor([-3.0, 0.5, 254.5, 300.0]))
        tensor([  0,   1, 255, 255], dtype=torch.uint8)
    """
    return round_half_away(scaled).clamp(0, MAX_LEVEL).to(torch.uint8)


def reference_delta(scaled: torch.Tensor, quantile: float = 0.6, cap: int = 12, bins: int = 1000) -> int:
    """Delta of one image and scale as the reference computes it, in grey levels, from the float
    values ``scaled`` ``(K, H, W)`` (any device) that are rounded into levels.

    MATLAB's ``hist(values, 1000)`` of the non-zero values (bins of equal width between their
    minimum and maximum, each holding ``edge_k <= v < edge_k+1``, the last one its upper edge too),
    the centre of the last bin whose cumulative share is below ``quantile``, rounded half away
    from zero, at most ``cap`` and at least 1. If the first bin alone reaches ``quantile`` (the
    reference then fails), its centre is used; no non-zero value: ``cap``.
    """
    values = scaled[scaled != 0].double()
    if values.numel() == 0:
        return int(cap)
    lo, hi = values.min(), values.max()
    if hi == lo:
        centre = lo
    else:
        width = (hi - lo) / bins
        edges = lo + width * torch.arange(1, bins, dtype=torch.float64, device=values.device)
        counts = torch.bincount(torch.searchsorted(edges, values, right=True), minlength=bins)
        share = torch.cumsum(counts, 0).double() / values.numel()
        below = int((share < quantile).sum())
        centre = lo + width * (max(below - 1, 0) + 0.5)
    return int(max(1, min(int(cap), int(round_half_away(torch.as_tensor(float(centre)))))))


def reference_order(regions: MSERRegions) -> torch.Tensor:
    """Row order of ``vl_mser`` over the channels: channel, dark before bright, grey value of the
    processed map (``u = level``, or ``255 - level`` for bright), seed pixel. Returns ``(N,)``
    int64 row indices of ``regions``, on their device."""
    u = torch.where(regions.bright, MAX_LEVEL - regions.level, regions.level)
    order = torch.argsort(regions.seed, stable=True)
    for key in (u, regions.bright.long(), regions.map_index):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def vlfeat_moments(regions: MSERRegions) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid and second moments of each region as ``vl_mser`` computes them (``mser.c``,
    ``vl_mser_ell_fit``): single precision, the image seen column-major (MATLAB's layout).

    The coordinate sums are integers, exact in single precision below 2**24 (any map of up to
    2**24 / W**2 pixels per region); the central moments are then ``E[x_i x_j] - E[x_i] E[x_j]``
    with every operation rounded to float32, as the C code does.

    Returns:
        ``mean (n, 2)`` float32 ``(x, y)``, 0-based map pixels; ``moments (n, 3)`` float32
        ``(Sxx, Sxy, Syy)``, pixels^2; on the regions' device.
    """
    n = regions.area.double()
    mean, cov = regions.mean.double(), regions.cov.double()
    # the exact integer sums, recovered from the float64 centroid and covariance
    sx, sy = (mean[:, 0] * n).round(), (mean[:, 1] * n).round()
    sxx = (n * cov[:, 0, 0] + sx * sx / n).round()
    sxy = (n * cov[:, 0, 1] + sx * sy / n).round()
    syy = (n * cov[:, 1, 1] + sy * sy / n).round()
    n32 = n.float()
    mx, my = sx.float() / n32, sy.float() / n32
    exx, exy, eyy = sxx.float() / n32, sxy.float() / n32, syy.float() / n32
    moments = torch.stack([exx - mx * mx, exy - my * mx, eyy - my * my], 1)
    return torch.stack([mx, my], 1), moments


def singular(moments: torch.Tensor) -> torch.Tensor:
    """The reference's singular test, ``Sxy^2 - Syy Sxx == 0`` on the float32 moments ``(n, 3)``
    in double precision (exact: both products of floats fit a double); ``(n,)`` bool, on their device."""
    m = moments.double()
    return m[:, 1] * m[:, 1] - m[:, 2] * m[:, 0] == 0


def cholesky_fails(moments: torch.Tensor) -> torch.Tensor:
    """Where ``chol([Sxx Sxy; Sxy Syy], 'lower')`` fails (LAPACK ``potf2``, as OpenBLAS runs it for
    a 2 x 2 matrix): ``Sxx <= 0``, or ``Syy - l21^2 <= 0`` with ``l21 = Sxy * (1 / sqrt(Sxx))``, the
    square root correctly rounded as LAPACK's (the C library's) is.
    ``moments``: ``(n, 3)`` ``(Sxx, Sxy, Syy)``; returns ``(n,)`` bool on their device."""
    m = moments.double()
    l11 = correctly_rounded_sqrt(m[:, 0].clamp(min=0))
    l21 = m[:, 1] * (1.0 / l11)
    return ~(m[:, 0] > 0) | ~(m[:, 2] - l21 * l21 > 0)


def _octave_linspace(a: float, b: float, n: int) -> list[float]:
    """Octave's ``linspace`` (7.x): built from both ends, the end points set exactly."""
    out = [0.0] * n
    out[0], out[-1] = a, b
    step = (b - a) / (n - 1)
    for i in range(1, n // 2):
        out[i], out[n - 1 - i] = a + i * step, b - i * step
    if n % 2 == 1:
        out[n // 2] = (a + b) / 2
    return out


_THETA = _octave_linspace(0.0, 2.0 * math.pi, NUM_VERTICES)
_COS = [math.cos(t) for t in _THETA]  # the C library's cos / sin, as Octave's
_SIN = [math.sin(t) for t in _THETA]


def ellipse_polygons(mean32: torch.Tensor, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices ``(n, 40)`` x and y (unrounded, 1-based) of the 1-sigma ellipses the reference
    draws: ``vl_frame2oell`` maps the moments to ``A = [a 0; b c]`` (``a = sqrt(Sxx)``,
    ``b = Sxy / max(a, 1e-18)``, ``c = sqrt(max(Syy - b^2, 0))``), then ``A [cos t; sin t]`` (BLAS:
    ``y = fma(c, sin t, b cos t)``) plus the centre ``mean + 1``; ``t``: ``linspace(0, 2 pi, 40)``.
    ``mean32`` ``(n, 2)`` and ``moments`` ``(n, 3)`` as `vlfeat_moments` returns them; the
    vertices are float64 map pixels, on their device. The square roots are correctly rounded, as
    Octave's (the C library's ``sqrt``), whatever MKL and the CPU do with ``torch.sqrt``
    (`gpu_dsm.kernels.precision.correctly_rounded_sqrt`); the fused multiply-add is emulated
    exactly (`gpu_dsm.kernels.precision.fused_multiply_add`)."""
    m = moments.double()
    a = correctly_rounded_sqrt(m[:, 0])
    b = m[:, 1] / a.clamp(min=1e-18)
    c = correctly_rounded_sqrt((m[:, 2] - b * b).clamp(min=0))
    cos = torch.tensor(_COS, dtype=torch.float64, device=m.device)
    sin = torch.tensor(_SIN, dtype=torch.float64, device=m.device)
    centre = mean32.double() + 1.0
    x = a[:, None] * cos + centre[:, 0, None]
    y = fused_multiply_add(c[:, None].expand(-1, NUM_VERTICES), sin.expand(len(m), -1), b[:, None] * cos) + centre[:, 1, None]
    return x, y


def _polygon_rows(vx: torch.Tensor, vy: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Spans Octave's ``poly2mask`` (image 2.14) fills on scanlines ``rows`` ``(n, R)`` of polygons
    with integer vertices ``(n, V)``: returns ``lo, hi`` ``(n, R, P)`` (inclusive columns; an empty
    span has ``lo > hi``).

    Its scanline fill: horizontal edges dropped; an edge from ``ymin`` to ``ymax`` crosses
    scanlines ``ymin < y <= ymax``, starting at its x at ``ymax`` and stepping down by its inverse
    slope, accumulated one scanline at a time; a scanline's crossings, sorted, pair up into spans
    ``[round(x1) + (round(x1) != round(x2)), round(x2)]``. A polygon whose vertices all share one
    y gives an empty mask."""
    n = vx.shape[0]
    vx = torch.cat([vx, vx[:, :1]], 1)
    vy = torch.cat([vy, vy[:, :1]], 1)
    x0, x1, y0, y1 = vx[:, :-1], vx[:, 1:], vy[:, :-1], vy[:, 1:]
    edge = y0 != y1
    up = y1 > y0
    ymax, ymin = torch.maximum(y0, y1), torch.minimum(y0, y1)
    xtop, xbot = torch.where(up, x1, x0), torch.where(up, x0, x1)
    inv_slope = torch.where(edge, (xtop - xbot) / torch.where(edge, ymax - ymin, 1.0), 0.0)
    span = int((ymax - ymin).max()) if n else 0
    # x of each edge after k scanline steps, accumulated as the fill does: x_k = x_{k-1} - slope
    steps = [xtop]
    for _ in range(1, max(span, 1)):
        steps.append(steps[-1] - inv_slope)
    xs = torch.stack(steps, -1)  # (n, E, span)
    sl = rows[:, :, None]  # (n, R, 1)
    active = edge[:, None, :] & (ymin[:, None, :] < sl) & (sl <= ymax[:, None, :])
    k = (ymax[:, None, :] - sl).clamp(0, xs.shape[-1] - 1).long()  # (n, R, E)
    x = torch.gather(xs[:, None].expand(-1, rows.shape[1], -1, -1), 3, k[..., None]).squeeze(-1)
    x = torch.where(active, x, torch.full_like(x, math.inf)).sort(-1).values
    count = int(active.sum(-1).max()) if active.numel() else 0
    pairs = max(count // 2, 1)
    x = round_half_away(x[..., : 2 * pairs])
    lo, hi = x[..., 0::2], x[..., 1::2]
    valid = torch.isfinite(hi)
    lo = lo + (lo != hi).double()
    lo = torch.where(valid, lo, torch.full_like(lo, math.inf))
    hi = torch.where(valid, hi, torch.full_like(hi, -math.inf))
    flat = (vy == vy[:, :1]).all(1)
    lo[flat] = math.inf
    return lo, hi


def ellipse_strength(scaled: torch.Tensor, acts: torch.Tensor, channel: torch.Tensor, mean32: torch.Tensor,
                     moments: torch.Tensor, max_elements: int = 1 << 22
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest value inside each feature's 1-sigma ellipse, the reference's way
    (``cmp_mser_regions``): the polygon of `ellipse_polygons`, its vertices rounded half away
    from zero, filled as Octave's ``poly2mask`` does (`_polygon_rows`).

    Args:
        scaled: ``(K, H, W)`` the float values the reference sees (its ``fms``), one image and scale.
        acts: ``(K, H, W)`` the activations (reported strength), on the device of ``scaled``.
        channel, mean32, moments: ``(n,)`` int64 channels, and ``(n, 2)`` / ``(n, 3)`` float32
            from `vlfeat_moments`.
        max_elements: memory budget per chunk (pixels x span pairs).
    Returns:
        ``rank (n,)`` float64, the largest ``scaled`` value in the mask (the reference's strength);
        ``strength (n,)`` float64, the largest activation there; ``box (n, 4)`` float64
        ``(x1, y1, x2, y2)``, inclusive 1-based bounds of the polygon clipped to the map;
        ``keep (n,)`` bool: box at least 2 x 2 pixels and a non-zero sum in the mask. All on the
        device of ``scaled``.
    """
    n = channel.numel()
    height, width = scaled.shape[-2:]
    device = scaled.device
    rank = torch.zeros(n, dtype=torch.float64, device=device)
    strength = torch.zeros(n, dtype=torch.float64, device=device)
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    if n == 0:
        return rank, strength, torch.zeros(n, 4, dtype=torch.float64, device=device), keep
    x, y = ellipse_polygons(mean32, moments)
    vx, vy = round_half_away(x), round_half_away(y)
    x1, x2 = vx.amin(1).clamp(min=1), vx.amax(1).clamp(max=width)
    y1, y2 = vy.amin(1).clamp(min=1), vy.amax(1).clamp(max=height)
    box = torch.stack([x1, y1, x2, y2], 1)
    box_w = (x2 - x1 + 1).clamp(min=0).long()
    box_h = (y2 - y1 + 1).clamp(min=0).long()
    big_enough = (box_w > 1) & (box_h > 1)
    pixels = box_w * box_h * (NUM_VERTICES // 2)
    order = torch.argsort(pixels)
    sizes = pixels[order].tolist()
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and (stop + 1 - start) * max(sizes[stop], 1) <= max_elements:
            stop += 1
        rows = order[start:stop]
        start = stop
        bw, bh = int(box_w[rows].max()), int(box_h[rows].max())
        if bw <= 0 or bh <= 0:
            continue
        sl = y1[rows, None] + torch.arange(bh, device=device, dtype=torch.float64)  # (r, bh)
        lo, hi = _polygon_rows(vx[rows], vy[rows], sl)  # (r, bh, P)
        px = x1[rows, None] + torch.arange(bw, device=device, dtype=torch.float64)  # (r, bw)
        inside = ((px[:, None, :, None] >= lo[:, :, None, :]) & (px[:, None, :, None] <= hi[:, :, None, :])).any(-1)
        inside &= (sl <= y2[rows, None])[:, :, None] & (px <= x2[rows, None])[:, None, :]
        iy = (sl.long() - 1).clamp(0, height - 1)[:, :, None]
        ix = (px.long() - 1).clamp(0, width - 1)[:, None, :]
        ch = channel[rows, None, None]
        fm = torch.where(inside, scaled[ch, iy, ix].double(), 0.0).flatten(1)
        act = torch.where(inside, acts[ch, iy, ix].double(), 0.0).flatten(1)
        rank[rows] = fm.amax(1)
        strength[rows] = act.amax(1)
        keep[rows] = big_enough[rows] & (fm.sum(1) != 0)
    return rank, strength, box, keep


def top_per_group(group: torch.Tensor, strength: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the ``k`` strongest rows of each group, a stable selection (ties: earlier
    rows), as the reference's per-channel cap; the default rules use it too.

    ``group``: ``(n,)`` int64; ``strength``: ``(n,)`` real, on the same device. Returns ``(n,)`` bool
    on that device.

    Examples:
        >>> import torch
        >>> top_per_group(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([1.0, 3.0, 2.0, 5.0, 5.0]), k=2)
        tensor([False,  True,  True,  True,  True])
    """
    if group.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=group.device)
    order = torch.argsort(strength, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    start = torch.cummax(torch.where(first, torch.arange(g.numel(), device=g.device), 0), 0).values
    rank = torch.arange(g.numel(), device=g.device) - start
    keep = torch.zeros_like(group, dtype=torch.bool)
    keep[order[rank < k]] = True
    return keep


def select_scale(regions: MSERRegions, scaled: torch.Tensor, acts: torch.Tensor, *, is_query: bool,
                 max_regions_per_channel: int, per_channel: int, nms_iou: float,
                 max_features: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rules 2-6 (per scale) for one image: ``(rows of regions, strengths, ranks)`` kept, in an
    order whose ties break as the reference's (channel, then the reference's order within a
    channel). ``scaled`` / ``acts``: ``(K, H, W)``, the values the reference reads its strength
    from and the activations; ``ranks`` are the former (the reference's strength), ``strengths``
    the largest activation at the same place. Returns ``(m,)`` int64 rows and ``(m,)`` float64
    strengths and ranks, on the regions' device."""
    device = regions.area.device
    rows = reference_order(regions)
    mean32, moments = vlfeat_moments(regions.select(rows))
    keep = ~singular(moments)
    rows, mean32, moments = rows[keep], mean32[keep], moments[keep]
    counts = torch.bincount(regions.map_index[rows], minlength=regions.num_maps)
    keep = (counts[regions.map_index[rows]] <= max_regions_per_channel) & ~cholesky_fails(moments)
    rows, mean32, moments = rows[keep], mean32[keep], moments[keep]
    rank, strength, box, keep = ellipse_strength(scaled, acts, regions.map_index[rows], mean32, moments)
    rows, rank, strength, box = rows[keep], rank[keep], strength[keep], box[keep]
    if not is_query and nms_iou < 1 and rows.numel():
        # unique scores: the position in a stable ascending sort, so among equal strengths the
        # later row ranks higher and is picked first, as the reference's NMS does
        score = torch.empty(rows.numel(), dtype=torch.float64, device=device)
        score[torch.argsort(rank, stable=True)] = torch.arange(rows.numel(), dtype=torch.float64, device=device)
        picked = nms(box, score, nms_iou)  # pick order: highest score first
        rows, rank, strength = rows[picked], rank[picked], strength[picked]
    # per channel, channels in increasing order, rows within a channel in their current order (the
    # reference also sorts a capped channel by strength, stably: later stable sorts by strength
    # break ties the same way, so the kept sets are equal)
    by_channel = torch.argsort(regions.map_index[rows], stable=True)
    rows, rank, strength = rows[by_channel], rank[by_channel], strength[by_channel]
    keep = top_per_group(regions.map_index[rows], rank, per_channel)
    rows, rank, strength = rows[keep], rank[keep], strength[keep]
    if rows.numel() > max_features:
        top = torch.argsort(rank, descending=True, stable=True)[:max_features]
        rows, rank, strength = rows[top], rank[top], strength[top]
    return rows, strength, rank
