"""The DSM authors' feature selection, batched: what ``DetectorConfig.reference()`` runs.

The rules of the reference code (MATLAB, VLFeat), per image and scale, all tensors:

1. levels: activations (scaled as ``DetectorConfig.levels`` says) rounded half away from zero,
   saturated at 255 (MATLAB's ``uint8``); delta: 1000-bin histogram (MATLAB ``hist``) of the
   non-zero float values, the centre of the last bin whose cumulative share is below 0.6,
   rounded, capped at 12 (:func:`reference_delta`);
2. MSER of both polarities; rows ordered as ``vl_mser`` lists them: channel, dark-on-bright
   before bright-on-dark, then by grey value and seed pixel (:attr:`MSERRegions.seed`);
3. regions with a singular covariance dropped, THEN channels with more than 36 of the rest;
4. strength: the largest activation inside the 1-sigma ellipse, as the reference fills it: the
   40 vertices ``A [cos t, sin t] + centre`` (``t = linspace(0, 2 pi, 40)``, 1-based pixel
   coordinates) rounded half away from zero, and the pixels whose centres lie inside the closed
   polygon (:func:`ellipse_strength`). A feature whose ellipse box (clipped to the map) is one
   pixel high or wide, or whose ellipse holds no activation, is dropped;
5. database images: NMS over all features of the scale on the ellipse boxes (inclusive pixel
   coordinates, area ``(x2 - x1) (y2 - y1)``), IoU 0.2, before the per-channel cap; among equal
   strengths the later row is picked first; rows are then in pick order;
6. per channel the strongest 20 (query) / 10 (database), stable (ties: the earlier row); per
   scale the strongest ``max_features``, stable; over the scales (scale order) the strongest
   ``max_features``, stable.

Where this departs from the authors' code: MATLAB's ``poly2mask`` decides boundary pixels on a
5x5 sub-pixel grid, here a pixel centre on the polygon's boundary is inside; the seed pixel
that orders regions of equal grey value in one channel is VLFeat's in 98.5% of regions (see
:attr:`MSERRegions.seed`). Both only matter for ties.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import nms

from gpu_dsm.stable_regions import MAX_LEVEL, MSERRegions

NUM_VERTICES = 40  # reference code: np = 40 vertices (first and last coincide)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``round``: halves away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def reference_levels(scaled: torch.Tensor) -> torch.Tensor:
    """MATLAB's ``uint8(x)``: round half away from zero, saturate to 0..255."""
    return round_half_away(scaled).clamp(0, MAX_LEVEL).to(torch.uint8)


def reference_delta(scaled: torch.Tensor, quantile: float = 0.6, cap: int = 12, bins: int = 1000) -> int:
    """Delta of one image and scale as the reference computes it, from the float values ``scaled``
    ``(K, H, W)`` that are rounded into levels.

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
    processed map (``u = level``, or ``255 - level`` for bright), seed pixel."""
    u = torch.where(regions.bright, MAX_LEVEL - regions.level, regions.level)
    order = torch.argsort(regions.seed, stable=True)
    for key in (u, regions.bright.long(), regions.map_index):
        order = order[torch.argsort(key[order], stable=True)]
    return order


def _polygons(mean: torch.Tensor, frame: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unrounded vertices ``(n, 40)`` x and y, 1-based pixel coordinates, of the 1-sigma ellipses."""
    theta = torch.linspace(0.0, 2.0 * math.pi, NUM_VERTICES, dtype=torch.float64, device=mean.device)
    cos, sin = theta.cos(), theta.sin()
    a, b, c = frame[:, 0, 0, None], frame[:, 1, 0, None], frame[:, 1, 1, None]
    x = mean[:, 0, None] + 1.0 + a * cos
    y = mean[:, 1, None] + 1.0 + b * cos + c * sin
    return x, y, round_half_away(x), round_half_away(y)


def _inside(px: torch.Tensor, py: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor) -> torch.Tensor:
    """Pixel centres ``(n, P)`` inside or on the closed polygons ``(n, V)`` (integer vertices, the
    last equal to the first): crossing number, boundary included; exact in float64."""
    x0, y0 = vx[:, None, :-1], vy[:, None, :-1]
    x1, y1 = vx[:, None, 1:], vy[:, None, 1:]
    px, py = px[:, :, None], py[:, :, None]
    cross = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
    on_edge = (cross == 0) & (px >= torch.minimum(x0, x1)) & (px <= torch.maximum(x0, x1)) \
        & (py >= torch.minimum(y0, y1)) & (py <= torch.maximum(y0, y1))
    straddles = (y0 > py) != (y1 > py)
    # the edge crosses the ray to the right of the point: px < x0 + (py - y0) (x1 - x0) / (y1 - y0)
    right = torch.where(y1 > y0, cross > 0, cross < 0)
    crossings = (straddles & right).sum(-1)
    return on_edge.any(-1) | (crossings % 2 == 1)


def ellipse_strength(acts: torch.Tensor, channel: torch.Tensor, mean: torch.Tensor, frame: torch.Tensor,
                     max_elements: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest activation inside each feature's 1-sigma ellipse, the reference's way.

    Args:
        acts: ``(K, H, W)`` activations of one image and scale.
        channel, mean, frame: ``(n,)``, ``(n, 2)`` (x, y, 0-based), ``(n, 2, 2)`` lower-triangular, float64.
        max_elements: memory budget, pixels x edges per chunk.
    Returns:
        ``strength (n,)`` (float64), ``box (n, 4)`` float64 ``(x1, y1, x2, y2)`` inclusive 1-based
        pixel bounds clipped to the map, ``keep (n,)``: box at least 2 x 2 pixels and some
        activation inside.
    """
    n = channel.numel()
    height, width = acts.shape[-2:]
    device = acts.device
    strength = torch.zeros(n, dtype=torch.float64, device=device)
    box = torch.zeros(n, 4, dtype=torch.float64, device=device)
    keep = torch.zeros(n, dtype=torch.bool, device=device)
    if n == 0:
        return strength, box, keep
    x, y, vx, vy = _polygons(mean.double(), frame.double())
    x1 = round_half_away(x.amin(1)).clamp(min=1)
    x2 = round_half_away(x.amax(1)).clamp(max=width)
    y1 = round_half_away(y.amin(1)).clamp(min=1)
    y2 = round_half_away(y.amax(1)).clamp(max=height)
    box = torch.stack([x1, y1, x2, y2], 1)
    box_w = (x2 - x1 + 1).clamp(min=0).long()
    box_h = (y2 - y1 + 1).clamp(min=0).long()
    big_enough = (box_w > 1) & (box_h > 1)
    pixels = box_w * box_h
    order = torch.argsort(pixels)
    sizes = pixels[order].tolist()
    start = 0
    edges = NUM_VERTICES - 1
    while start < n:
        stop = start + 1
        # grow the chunk while (rows x largest box x edges) stays in budget (sizes are sorted)
        while stop < n and (stop + 1 - start) * max(sizes[stop], 1) * edges <= max_elements:
            stop += 1
        rows = order[start:stop]
        start = stop
        bw, bh = int(box_w[rows].max()), int(box_h[rows].max())
        if bw <= 0 or bh <= 0:
            continue
        gx = torch.arange(bw, device=device, dtype=torch.float64)
        gy = torch.arange(bh, device=device, dtype=torch.float64)
        px = (x1[rows, None, None] + gx[None, None, :]).expand(-1, bh, -1).reshape(rows.numel(), -1)
        py = (y1[rows, None, None] + gy[None, :, None]).expand(-1, -1, bw).reshape(rows.numel(), -1)
        in_box = (px <= x2[rows, None]) & (py <= y2[rows, None])
        inside = _inside(px, py, vx[rows], vy[rows]) & in_box
        ix = (px.long() - 1).clamp(0, width - 1)
        iy = (py.long() - 1).clamp(0, height - 1)
        values = acts[channel[rows, None], iy, ix].double()
        values = torch.where(inside, values, torch.zeros_like(values))
        strength[rows] = values.amax(1)
        keep[rows] = big_enough[rows] & (values.sum(1) != 0)
    return strength, box, keep


def top_per_group(group: torch.Tensor, strength: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask keeping the ``k`` strongest rows of each group, a stable selection (ties: earlier
    rows), as the reference's per-channel cap; the default rules use it too."""
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


def select_scale(regions: MSERRegions, acts: torch.Tensor, frame: torch.Tensor, *, is_query: bool,
                 max_regions_per_channel: int, singular_det: float, per_channel: int, nms_iou: float,
                 max_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rules 2-6 (per scale) for one image: ``(rows of regions, strengths)`` kept, in an order whose
    ties break as the reference's (channel, then the reference's order within a channel). ``frame``: ``(N, 2, 2)`` float64 Cholesky frames of ``regions``."""
    device = regions.area.device
    rows = reference_order(regions)
    cov = regions.cov[rows]
    det = cov[:, 0, 0] * cov[:, 1, 1] - cov[:, 0, 1] * cov[:, 1, 0]
    rows = rows[det > singular_det]
    counts = torch.bincount(regions.map_index[rows], minlength=regions.num_maps)
    rows = rows[counts[regions.map_index[rows]] <= max_regions_per_channel]
    strength, box, keep = ellipse_strength(acts, regions.map_index[rows], regions.mean[rows], frame[rows])
    rows, strength, box = rows[keep], strength[keep], box[keep]
    if not is_query and nms_iou < 1 and rows.numel():
        # unique scores: the position in a stable ascending sort, so among equal strengths the
        # later row ranks higher and is picked first, as the reference's NMS does
        rank = torch.empty(rows.numel(), dtype=torch.float64, device=device)
        rank[torch.argsort(strength, stable=True)] = torch.arange(rows.numel(), dtype=torch.float64, device=device)
        picked = nms(box, rank, nms_iou)  # pick order: highest score first
        rows, strength = rows[picked], strength[picked]
    # per channel, channels in increasing order, rows within a channel in their current order (the
    # reference also sorts a capped channel by strength, stably: later stable sorts by strength
    # break ties the same way, so the kept sets are equal)
    by_channel = torch.argsort(regions.map_index[rows], stable=True)
    rows, strength = rows[by_channel], strength[by_channel]
    keep = top_per_group(regions.map_index[rows], strength, per_channel)
    rows, strength = rows[keep], strength[keep]
    if rows.numel() > max_features:
        top = torch.argsort(strength, descending=True, stable=True)[:max_features]
        rows, strength = rows[top], strength[top]
    return rows, strength
