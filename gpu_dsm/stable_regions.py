"""Maximally stable extremal regions (MSER) of many maps at once, with VLFeat's semantics.

:func:`mser` reproduces ``vl_mser`` (VLFeat 0.9.x ``mser.c``) exactly, as a threshold-level
formulation that handles every map of a batch in one pass:

1. For every map, one plane per grey value present in it: the level set ``{u <= v}``, where
   ``u`` is the map itself (dark-on-bright) or ``255 - map`` (bright-on-dark, VLFeat's
   ``BrightOnDark``, what DSM uses). All planes are labelled at once (8-connectivity,
   ``gpu_dsm.kernels.labelling``).
2. Per component: area, coordinate moments, bounding box, largest ``u`` (one scatter each). A
   component is an *extremal region* of value ``v`` when it holds a pixel of value ``v``;
   otherwise it is the same set as a component of a lower plane.
3. The parent of an extremal region is the next extremal region above it, found by following
   each component's successor (its label in the next plane) with pointer jumping.
4. Variation ``(|R_top| - |R|) / |R|``, ``R_top`` the component at level ``v + delta``;
   stability: a region is compared with its parent when the parent's value is ``v + 1``, the
   one with the larger variation (ties: the child) is not maximally stable.
5. From the highest value down (one vectorised step per grey value): drop regions with
   variation ``>= max_variation``, area outside ``[min_area, max_area] * H * W``, or whose
   relative area difference with the nearest kept ancestor (the root if none) is below
   ``min_diversity``.

Arithmetic follows VLFeat's single precision, so thresholds and ties fall the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from gpu_dsm.kernels.labelling import label_planes

POLARITIES = ("bright", "dark", "both")
MAX_LEVEL = 255


@dataclass
class MSERRegions:
    """Regions found by :func:`mser`, one row per region, ordered by map then level.

    Fields:
        map_index: ``(N,)`` int64, flat index of the region's map over the leading dimensions of
            ``levels`` (row-major, as ``levels.reshape(-1, H, W)``).
        area: ``(N,)`` int64, number of pixels.
        level: ``(N,)`` int64, the threshold: the region is an 8-connected component of
            ``{levels >= level}`` (bright) or ``{levels <= level}`` (dark).
        mean: ``(N, 2)`` float64, centroid ``(x, y)``, x = column, y = row, 0-based pixels.
        cov: ``(N, 2, 2)`` float64, population covariance of the pixel coordinates ``(x, y)``
            (VLFeat's second moments; divide by the area, not area - 1).
        max_value: ``(N,)``, largest value over the region's pixels: of ``levels`` (int64), or
            of ``values`` when given (their dtype).
        sum_value: ``(N,)`` float64, sum of the same values over the region's pixels.
        bbox: ``(N, 4)`` int64, ``(x0, y0, x1, y1)``, inclusive pixel bounds.
        bright: ``(N,)`` bool, True for bright-on-dark regions.
        num_maps: number of maps searched.
    """

    map_index: torch.Tensor
    area: torch.Tensor
    level: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    max_value: torch.Tensor
    sum_value: torch.Tensor
    bbox: torch.Tensor
    bright: torch.Tensor
    num_maps: int = 0

    def __len__(self) -> int:
        return int(self.area.numel())

    def _tensor_fields(self):
        return [f.name for f in fields(self) if f.name != "num_maps"]

    def to(self, device: torch.device | str) -> "MSERRegions":
        return MSERRegions(**{name: getattr(self, name).to(device) for name in self._tensor_fields()}, num_maps=self.num_maps)

    def select(self, index: torch.Tensor) -> "MSERRegions":
        """Rows ``index`` (a bool mask or integer indices)."""
        return MSERRegions(**{name: getattr(self, name)[index] for name in self._tensor_fields()}, num_maps=self.num_maps)

    @staticmethod
    def cat(parts: list["MSERRegions"], num_maps: int) -> "MSERRegions":
        names = [f.name for f in fields(MSERRegions) if f.name != "num_maps"]
        return MSERRegions(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names}, num_maps=num_maps)


def _empty(device: torch.device, value_dtype: torch.dtype, num_maps: int) -> MSERRegions:
    long = dict(dtype=torch.long, device=device)
    return MSERRegions(
        map_index=torch.zeros(0, **long), area=torch.zeros(0, **long), level=torch.zeros(0, **long),
        mean=torch.zeros(0, 2, dtype=torch.float64, device=device),
        cov=torch.zeros(0, 2, 2, dtype=torch.float64, device=device),
        max_value=torch.zeros(0, dtype=value_dtype, device=device),
        sum_value=torch.zeros(0, dtype=torch.float64, device=device), bbox=torch.zeros(0, 4, **long),
        bright=torch.zeros(0, dtype=torch.bool, device=device), num_maps=num_maps,
    )


def _pointer_jump(succ: torch.Tensor) -> torch.Tensor:
    """Follow ``succ`` to its fixed points (``succ[i] == i`` ends a chain)."""
    while True:
        nxt = succ[succ]
        if torch.equal(nxt, succ):
            return succ
        succ = nxt


def _dark_regions(u, peak_source, delta, max_variation, min_diversity, min_area, max_area, backend, map_offset):
    """VLFeat MSER (dark-on-bright, regions of ``{u <= v}``) of maps ``u`` ``(M, H, W)`` int64.

    ``peak_source`` ``(M, H, W)``: the values whose maximum and sum over each region are reported;
    ``delta`` ``(M,)``: per map.
    """
    device = u.device
    num_maps, height, width = u.shape
    nel = height * width
    vspan = int(u.max().item()) + 1
    # --- planes: one per (map, value present in the map), sorted by map then value
    plane_key = torch.unique(torch.arange(num_maps, device=device).view(-1, 1, 1) * vspan + u)
    plane_map, plane_val = plane_key // vspan, plane_key % vspan
    small = torch.uint8 if vspan <= 256 else torch.int16  # gathers one byte per voxel
    masks = u.to(small)[plane_map] <= plane_val.to(small).view(-1, 1, 1)
    labels, num_regions = label_planes(masks, backend)
    # --- per-component statistics over the on-voxels
    plane_of, ys, xs = masks.nonzero(as_tuple=True)
    del masks
    region = labels[plane_of, ys, xs].long() - 1
    maps_of = plane_map[plane_of]

    def reduce(src, how, init):
        out = torch.full((num_regions,), init, dtype=src.dtype, device=device)
        return out.scatter_reduce_(0, region, src, how, include_self=True)

    area = torch.bincount(region, minlength=num_regions)
    big = torch.iinfo(torch.long).max
    region_plane = reduce(plane_of, "amin", big)
    representative = reduce(ys * width + xs, "amin", big)
    max_u = reduce(u[maps_of, ys, xs], "amax", -1)
    del plane_of
    value = plane_val[region_plane]
    region_map = plane_map[region_plane]
    is_extremal = max_u == value
    # --- successor in the next plane of the same map; the top plane (whole map) is the root
    next_plane = region_plane + 1
    is_top = (next_plane >= plane_key.numel()) | (plane_map[next_plane.clamp(max=plane_key.numel() - 1)] != region_map)
    lab_flat = labels.view(labels.shape[0], -1)
    succ = torch.arange(num_regions, device=device)
    not_top = ~is_top
    succ[not_top] = lab_flat[next_plane[not_top], representative[not_top]].long() - 1
    # chain head: the first extremal region at or above each component
    head = _pointer_jump(torch.where(is_extremal | is_top, torch.arange(num_regions, device=device), succ))
    parent = torch.where(is_top, torch.arange(num_regions, device=device), head[succ])
    # --- variation against the component at level value + delta
    top_key = region_map * vspan + (value + delta[region_map]).clamp(max=vspan - 1)
    top_plane = torch.searchsorted(plane_key, top_key, right=True) - 1
    top_region = lab_flat[top_plane, representative].long() - 1
    area_f = area.to(torch.float32)
    variation = (area[top_region] - area).to(torch.float32) / area_f
    del labels, lab_flat

    # restrict to extremal regions from here on
    er = is_extremal.nonzero().squeeze(1)
    index_of = torch.full((num_regions,), -1, dtype=torch.long, device=device)
    index_of[er] = torch.arange(er.numel(), device=device)
    er_parent = index_of[parent[er]]
    er_value, er_var, er_area = value[er], variation[er], area[er]
    n_er = er.numel()
    # --- maximal stability: compare with the parent when it is exactly one level up
    stable = torch.ones(n_er, dtype=torch.bool, device=device)
    compare = er_value[er_parent] <= er_value + 1
    child_wins = er_var < er_var[er_parent]
    stable[er_parent[compare & child_wins]] = False
    stable[torch.arange(n_er, device=device)[compare & ~child_wins]] = False
    # --- filters, from the highest value down (ancestors are final before their children)
    max_area_f = torch.tensor(max_area, dtype=torch.float32) * nel
    min_area_f = torch.tensor(min_area, dtype=torch.float32) * nel
    max_var_f = torch.tensor(max_variation, dtype=torch.float32)
    min_div_f = torch.tensor(min_diversity, dtype=torch.float32)
    er_area_f = er_area.to(torch.float32)
    passes = (er_var < max_var_f) & (er_area_f <= max_area_f) & (er_area_f >= min_area_f)
    is_root = er_parent == torch.arange(n_er, device=device)
    nearest = torch.arange(n_er, device=device)  # nearest stable ancestor-or-self (root if none)
    order = torch.argsort(er_value, descending=True, stable=True)
    group_values, group_sizes = torch.unique_consecutive(er_value[order], return_counts=True)
    start = 0
    for size in group_sizes.tolist():
        g = order[start:start + size]
        start += size
        keep = stable[g] & passes[g]
        if min_diversity < 1.0:
            anc = nearest[er_parent[g]]
            p_area = er_area_f[anc]
            diverse = ~((p_area - er_area_f[g]) / p_area < min_div_f)
            keep &= diverse | is_root[g]
        stable[g] = keep
        nearest[g] = torch.where(keep | is_root[g], g, nearest[er_parent[g]])
    kept = er[stable]
    # --- geometry of the kept regions only, from their voxels
    is_kept = torch.zeros(num_regions, dtype=torch.bool, device=device)
    is_kept[kept] = True
    on_kept = is_kept[region]
    region, ys, xs, maps_of = region[on_kept], ys[on_kept], xs[on_kept], maps_of[on_kept]
    slot = torch.full((num_regions,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(kept.numel(), device=device)
    row = slot[region]
    n_kept = kept.numel()

    def reduce_kept(src, how, init):
        out = torch.full((n_kept,), init, dtype=src.dtype, device=device)
        return out.scatter_reduce_(0, row, src, how, include_self=True)

    xf, yf = xs.double(), ys.double()
    area_k = area[kept].double()
    mean = torch.stack([torch.bincount(row, xf, minlength=n_kept), torch.bincount(row, yf, minlength=n_kept)], 1)
    mean = mean / area_k[:, None]
    dx, dy = xf - mean[row, 0], yf - mean[row, 1]
    second = torch.stack([torch.bincount(row, w, minlength=n_kept) for w in (dx * dx, dx * dy, dy * dy)], 1) / area_k[:, None]
    cov = torch.stack([second[:, [0, 1]], second[:, [1, 2]]], 1)
    peak_src = peak_source[maps_of, ys, xs]
    lowest = float("-inf") if peak_src.dtype.is_floating_point else torch.iinfo(peak_src.dtype).min
    bbox = torch.stack([reduce_kept(xs, "amin", big), reduce_kept(ys, "amin", big),
                        reduce_kept(xs, "amax", -1), reduce_kept(ys, "amax", -1)], 1)
    return dict(
        map_index=region_map[kept] + map_offset,
        area=area[kept],
        value=value[kept],
        mean=mean,
        cov=cov,
        peak=reduce_kept(peak_src, "amax", lowest),
        total=torch.zeros(n_kept, dtype=torch.float64, device=device).index_add_(0, row, peak_src.double()),
        bbox=bbox,
    )


def _chunks(u: torch.Tensor, max_voxels: int) -> list[tuple[int, int]]:
    """Split maps so that each chunk's level-set volume stays under ``max_voxels``."""
    num_maps, height, width = u.shape
    distinct = torch.zeros(num_maps, MAX_LEVEL + 2, dtype=torch.bool, device=u.device)
    distinct[torch.arange(num_maps, device=u.device).view(-1, 1), u.view(num_maps, -1).clamp(max=MAX_LEVEL + 1)] = True
    voxels = (distinct.sum(1) * height * width).tolist()
    chunks, start, total = [], 0, 0
    for i, v in enumerate(voxels):
        if total and total + v > max_voxels:
            chunks.append((start, i))
            start, total = i, 0
        total += v
    chunks.append((start, num_maps))
    return chunks


def mser(
    levels: torch.Tensor,
    *,
    delta: int | torch.Tensor,
    max_variation: float = 0.5,
    min_diversity: float = 0.7,
    min_area: float = 0.001,
    max_area: float = 0.75,
    polarity: str = "bright",
    level_step: int = 1,
    values: torch.Tensor | None = None,
    backend: str = "auto",
    max_voxels: int = 2**25,
) -> MSERRegions:
    """MSER of every map of ``levels`` (VLFeat semantics; module docstring).

    Args:
        levels: ``(..., H, W)`` integer tensor of values 0..255; one map per leading index.
        delta: VLFeat's ``Delta``, in grey levels (>= 1): one for all maps, or a tensor with one
            per map (shaped like the leading dimensions, or flat).
        max_variation: VLFeat's ``MaxVariation`` (DSM: 0.5).
        min_diversity: VLFeat's ``MinDiversity`` (DSM: 0.7); 1 disables the duplicate test.
        min_area / max_area: region area bounds as fractions of ``H * W`` (DSM: 0.001 / 0.75).
        polarity: ``"bright"`` (regions of high values, DSM), ``"dark"``, or ``"both"``
            (VLFeat's MATLAB default).
        level_step: threshold spacing; 1 is exact. ``s > 1`` thresholds at multiples of ``s``
            (``delta`` becomes ``round(delta / s)`` steps): faster and approximate; measured
            recall of the exact regions in README ("MSER").
        values: optional ``(..., H, W)`` tensor; ``max_value`` / ``sum_value`` are then its
            maximum / sum over each region (default: of ``levels``).
        backend: connected-component labelling backend (``gpu_dsm.kernels.labelling``).
        max_voxels: memory budget: maps are processed in chunks of at most this many
            ``planes x H x W`` level-set voxels.
    Returns:
        :class:`MSERRegions` on ``levels``' device. Maps smaller than 3x3 and empty inputs give
        no regions; so do constant maps.
    """
    if levels.ndim < 2:
        raise ValueError(f"mser: levels must be (..., H, W), got shape {tuple(levels.shape)}")
    if levels.dtype.is_floating_point or levels.dtype == torch.bool or levels.is_complex():
        raise ValueError(f"mser: levels must be an integer tensor of values 0..255, got {levels.dtype}")
    if polarity not in POLARITIES:
        raise ValueError(f"mser: polarity must be one of {POLARITIES}, got {polarity!r}")
    deltas = torch.as_tensor(delta, device=levels.device).long().reshape(-1)
    if deltas.numel() == 0 or int(deltas.min()) < 1 or int(level_step) < 1:
        raise ValueError(f"mser: delta and level_step must be >= 1, got {delta} and {level_step}")
    if values is not None and values.shape != levels.shape:
        raise ValueError(f"mser: values {tuple(values.shape)} must have the shape of levels {tuple(levels.shape)}")
    height, width = levels.shape[-2:]
    maps = levels.reshape(-1, height, width).long()
    num_maps = maps.shape[0]
    value_dtype = values.dtype if values is not None else torch.long
    if num_maps == 0 or height < 3 or width < 3:
        return _empty(levels.device, value_dtype, num_maps)
    if maps.min() < 0 or maps.max() > MAX_LEVEL:
        raise ValueError(f"mser: levels must lie in 0..{MAX_LEVEL}, got {int(maps.min())}..{int(maps.max())}")
    peak_source = values.reshape(-1, height, width) if values is not None else maps
    step = int(level_step)
    if deltas.numel() not in (1, num_maps):
        raise ValueError(f"mser: {deltas.numel()} deltas for {num_maps} maps")
    step_delta = torch.div(deltas.expand(num_maps) + step // 2, step, rounding_mode="floor").clamp(min=1)
    parts = []
    for bright in ([True, False] if polarity == "both" else [polarity == "bright"]):
        u = MAX_LEVEL - maps if bright else maps
        if step > 1:
            u = torch.div(u + step - 1, step, rounding_mode="floor")
        for start, stop in _chunks(u, max_voxels):
            found = _dark_regions(
                u[start:stop], peak_source[start:stop], step_delta[start:stop],
                max_variation, min_diversity, min_area, max_area, backend, start,
            )
            threshold = (found["value"] * step).clamp(max=MAX_LEVEL)
            parts.append(MSERRegions(
                map_index=found["map_index"], area=found["area"], level=MAX_LEVEL - threshold if bright else threshold,
                mean=found["mean"], cov=found["cov"], max_value=found["peak"], sum_value=found["total"], bbox=found["bbox"],
                bright=torch.full_like(found["area"], bright, dtype=torch.bool), num_maps=num_maps,
            ))
    if not parts:
        return _empty(levels.device, value_dtype, num_maps)
    out = MSERRegions.cat(parts, num_maps)
    order = torch.argsort(out.map_index * (2 * (MAX_LEVEL + 1)) + out.level + (~out.bright) * (MAX_LEVEL + 1), stable=True)
    return out.select(order)
