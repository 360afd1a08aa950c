"""Maximally stable extremal regions (MSER) of many maps at once, with VLFeat's semantics.

[`mser`][gpu_dsm.mser.mser] reproduces ``vl_mser`` (VLFeat 0.9.x ``mser.c``) exactly, as a threshold-level
formulation that handles every map of a batch in one pass:

1. ``u`` is the map itself (dark-on-bright) or ``255 - map`` (bright-on-dark, VLFeat's
   ``BrightOnDark``, what DSM uses). Each map's root region is the whole map at its top value;
   every other level set ``{u <= v}`` lies inside the *support* ``{u < top}``, so its components
   lie inside the support's components (*blobs*). Activations after a ReLU are sparse, so blobs
   are small: labelling level sets blob by blob instead of whole planes cut the labelled volume
   10-30x on real and VGG/ResNet-shaped activations.
2. One *tile* per (blob, grey value present in the blob): the blob's level set in that set's
   bounding box. All tiles of all maps are shelf-packed into pages with one-pixel gaps and
   labelled in one call (8-connectivity, ``gpu_dsm.kernels.labelling``).
3. Per component: area, representative (first pixel in raster order), largest ``u`` (one
   scatter each). A component is an *extremal region* of value ``v`` when it holds a pixel of
   value ``v``. The parent of an extremal region is the next extremal region above it, found by
   following each component's successor (the component of the blob's next tile holding its
   representative; the root after the blob's last tile) with pointer jumping.
4. Variation ``(|R_top| - |R|) / |R|``, ``R_top`` the component at level ``v + delta``;
   stability: a region is compared with its parent when the parent's value is ``v + 1``, the
   one with the larger variation (ties: the child) is not maximally stable.
5. From the highest value down (one vectorised step per grey value): drop regions with
   variation ``>= max_variation``, area outside ``[min_area, max_area] * H * W``, or whose
   relative area difference with the nearest kept ancestor (the root if none) is below
   ``min_diversity``.

Arithmetic follows VLFeat's single precision, so thresholds and ties fall the same way.

On the CPU the default backend is a C kernel (`gpu_dsm.kernels.mser`): VLFeat's union-find
over each map's support, one pass per map, with the kept regions' moments summed in the order of
the tensor path above; both give the same regions bit for bit. The tensor path is the GPU's, and
the CPU's where no C compiler works.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch

from gpu_dsm.checks import as_tensor

from gpu_dsm.kernels import mser as mser_kernel
from gpu_dsm.kernels import native
from gpu_dsm.kernels.labelling import BACKENDS as LABELLING_BACKENDS
from gpu_dsm.kernels.labelling import label_planes

POLARITIES = ("bright", "dark", "both")
#: ``"native"``: the C kernel (``kernels/mser.c``, CPU); the others: the tensor path of this module
#: with that labelling backend (``gpu_dsm.kernels.labelling``); ``"auto"``: native on the CPU where
#: it builds, else the tensor path
BACKENDS = ("native",) + LABELLING_BACKENDS
MAX_LEVEL = 255
_PAGE_SIDE = 2048  # side of the pages that level-set tiles are packed into for labelling


@dataclass
class MSERRegions:
    """Regions found by [`mser`][gpu_dsm.mser.mser], one row per region, ordered by map then level.

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
        seed: ``(N,)`` int64, the first pixel of the region's own grey value in column-major order
            (``x * H + y``): VLFeat's seed pixel in 98.5% of regions (measured on real activations;
            otherwise another pixel of that value), so MATLAB's ``vl_mser`` lists a map's regions of
            one polarity in the order of ``(value of u, seed)`` (used by ``DetectorConfig.reference()``).
        num_maps: number of maps searched.

    All tensors are on the device of the ``levels`` that [`mser`][gpu_dsm.mser.mser] was given.
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
    seed: torch.Tensor
    num_maps: int = 0

    def __len__(self) -> int:
        return int(self.area.numel())

    def _tensor_fields(self):
        return [f.name for f in fields(self) if f.name != "num_maps"]

    def to(self, device: torch.device | str) -> "MSERRegions":
        """The same regions with every tensor on ``device``."""
        return MSERRegions(**{name: getattr(self, name).to(device) for name in self._tensor_fields()}, num_maps=self.num_maps)

    def select(self, index: torch.Tensor) -> "MSERRegions":
        """Rows ``index``: a ``(N,)`` bool mask, int64 indices or a slice, on the regions' device."""
        return MSERRegions(**{name: getattr(self, name)[index] for name in self._tensor_fields()}, num_maps=self.num_maps)

    @staticmethod
    def cat(parts: list["MSERRegions"], num_maps: int) -> "MSERRegions":
        """The rows of ``parts`` (on one device) one after the other, as regions of ``num_maps`` maps."""
        names = [f.name for f in fields(MSERRegions) if f.name != "num_maps"]
        if len(parts) == 1:
            return MSERRegions(**{n: getattr(parts[0], n) for n in names}, num_maps=num_maps)
        return MSERRegions(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names}, num_maps=num_maps)


def _empty(device: torch.device, value_dtype: torch.dtype, num_maps: int) -> MSERRegions:
    long = dict(dtype=torch.long, device=device)
    return MSERRegions(
        map_index=torch.zeros(0, **long), area=torch.zeros(0, **long), level=torch.zeros(0, **long),
        mean=torch.zeros(0, 2, dtype=torch.float64, device=device),
        cov=torch.zeros(0, 2, 2, dtype=torch.float64, device=device),
        max_value=torch.zeros(0, dtype=value_dtype, device=device),
        sum_value=torch.zeros(0, dtype=torch.float64, device=device), bbox=torch.zeros(0, 4, **long),
        bright=torch.zeros(0, dtype=torch.bool, device=device), seed=torch.zeros(0, **long), num_maps=num_maps,
    )


def _pointer_jump(succ: torch.Tensor) -> torch.Tensor:
    """Follow ``succ`` to its fixed points (``succ[i] == i`` ends a chain)."""
    while True:
        nxt = succ[succ]
        if torch.equal(nxt, succ):
            return succ
        succ = nxt


def _pack_tiles(heights: np.ndarray, widths: np.ndarray, page_height: int, page_width: int):
    """Shelf-pack ``T`` tiles of ``heights x widths`` pixels into pages of ``page_height x page_width``,
    with a one-pixel gap after every tile (8-connected components never touch across it).

    Returns ``(page, y0, x0)`` per tile (numpy int64), the number of pages and the height used
    on the fullest page.
    """
    count = heights.size
    order = np.argsort(-heights, kind="stable")
    right = np.cumsum(widths[order] + 1)  # right edge of each tile if all lay on one line
    page, y0, x0 = (np.zeros(count, dtype=np.int64) for _ in range(3))
    start, line_start, page_index, shelf_y, used = 0, 0, 0, 0, 0
    while start < count:
        stop = max(int(np.searchsorted(right, line_start + page_width, side="right")), start + 1)
        shelf_height = int(heights[order[start]]) + 1
        if shelf_y + shelf_height > page_height:
            page_index, shelf_y = page_index + 1, 0
        members = order[start:stop]
        x0[members] = right[start:stop] - (widths[members] + 1) - line_start
        y0[members] = shelf_y
        page[members] = page_index
        shelf_y += shelf_height
        used = max(used, shelf_y)
        line_start, start = int(right[stop - 1]), stop
    return page, y0, x0, page_index + 1, used


_BIG = torch.iinfo(torch.long).max


def _segment_reduce(index: torch.Tensor, src: torch.Tensor, how: str, init, size: int) -> torch.Tensor:
    """``(size,)``: ``how`` ("amin"/"amax") of ``src`` over equal ``index``; ``init`` where none."""
    out = torch.full((size,), init, dtype=src.dtype, device=src.device)
    return out.scatter_reduce_(0, index, src, how, include_self=True)


def _geometry(row, xs, ys, peak_src, area, n_rows, device):
    """Centroid, covariance, box, peak and sum of ``n_rows`` regions from their pixels."""

    def reduce(src, how, init):
        return _segment_reduce(row, src, how, init, n_rows)

    xf, yf = xs.double(), ys.double()
    area_d = area.double()
    mean = torch.stack([torch.bincount(row, xf, minlength=n_rows), torch.bincount(row, yf, minlength=n_rows)], 1)
    mean = mean / area_d[:, None]
    dx, dy = xf - mean[row, 0], yf - mean[row, 1]
    second = torch.stack([torch.bincount(row, w, minlength=n_rows) for w in (dx * dx, dx * dy, dy * dy)], 1) / area_d[:, None]
    cov = torch.stack([second[:, [0, 1]], second[:, [1, 2]]], 1)
    lowest = float("-inf") if peak_src.dtype.is_floating_point else torch.iinfo(peak_src.dtype).min
    bbox = torch.stack([reduce(xs, "amin", _BIG), reduce(ys, "amin", _BIG), reduce(xs, "amax", -1), reduce(ys, "amax", -1)], 1)
    total = torch.zeros(n_rows, dtype=torch.float64, device=device).index_add_(0, row, peak_src.double())
    return dict(mean=mean, cov=cov, peak=reduce(peak_src, "amax", lowest), total=total, bbox=bbox)


def _select_stable(is_extremal, parent, value, variation, area, nel, max_variation, min_diversity, min_area, max_area):
    """Indices of the regions VLFeat keeps, given every component's tree links and measures
    (steps 4-5 of the module docstring; ``parent`` of a root is itself)."""
    device = value.device
    num_regions = value.numel()
    # extremal regions only
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
    return er[stable]


def _dark_regions(u, peak_source, delta, max_variation, min_diversity, min_area, max_area, backend, map_offset):
    """VLFeat MSER (dark-on-bright, regions of ``{u <= v}``) of maps ``u`` ``(M, H, W)`` int64.

    ``peak_source`` ``(M, H, W)``: the values whose maximum and sum over each region are reported;
    ``delta`` ``(M,)``: per map.
    """
    device = u.device
    num_maps, height, width = u.shape
    nel = height * width
    vspan = int(u.max().item()) + 1
    map_ids = torch.arange(num_maps, device=device)
    # --- blobs: components of each map's support {u < top}. Every level set below the top lies
    # in the support, so each of its components lies in one blob
    top = u.view(num_maps, -1).amax(1)
    support = u < top.view(-1, 1, 1)
    blob_labels, num_blobs = label_planes(support, backend)
    sm, sy, sx = support.nonzero(as_tuple=True)
    del support
    blob = blob_labels[sm, sy, sx].long() - 1
    del blob_labels
    # support pixels sorted by (blob, value): a blob's level set {u <= v} is a prefix of its pixels
    pixel_key = blob * vspan + u[sm, sy, sx]
    order = torch.argsort(pixel_key, stable=True)
    pixel_key, sm, sy, sx, blob = pixel_key[order], sm[order], sy[order], sx[order], blob[order]
    del order

    blob_map = torch.zeros(num_blobs, dtype=torch.long, device=device).scatter_(0, blob, sm)
    blob_size = torch.bincount(blob, minlength=num_blobs)
    blob_start = torch.cumsum(blob_size, 0) - blob_size
    # --- tiles: one per (blob, value present in it), sorted by blob then value, holding the blob's
    # level set {u <= value} in that set's box
    tile_key, tile_count = torch.unique_consecutive(pixel_key, return_counts=True)
    num_tiles = tile_key.numel()
    tile_blob, tile_val = tile_key // vspan, tile_key % vspan
    tile_end = torch.cumsum(tile_count, 0)
    tile_len = tile_end - blob_start[tile_blob]
    # box of each prefix: running maxima of (blob, coordinate) keys restart at every blob
    span = max(height, width)

    def running_max(coord):
        return torch.cummax(blob * span + coord, 0).values[tile_end - 1] - tile_blob * span

    tile_x1, tile_y1 = running_max(sx), running_max(sy)
    tile_x0, tile_y0 = span - 1 - running_max(span - 1 - sx), span - 1 - running_max(span - 1 - sy)
    page_width = max(width + 1, _PAGE_SIDE)
    page, y0, x0, num_pages, page_height = _pack_tiles(
        (tile_y1 - tile_y0 + 1).cpu().numpy(), (tile_x1 - tile_x0 + 1).cpu().numpy(), max(height + 1, _PAGE_SIDE), page_width)
    tile_page = torch.from_numpy(page).to(device)
    tile_dy, tile_dx = torch.from_numpy(y0).to(device) - tile_y0, torch.from_numpy(x0).to(device) - tile_x0
    # --- on-voxels: every pixel of every tile's level set, labelled in one call
    voxel_tile = torch.repeat_interleave(torch.arange(num_tiles, device=device), tile_len)
    first_voxel = torch.cumsum(tile_len, 0) - tile_len
    voxel_pixel = (blob_start[tile_blob] - first_voxel)[voxel_tile] + torch.arange(voxel_tile.numel(), device=device)
    ys, xs, voxel_u = sy[voxel_pixel], sx[voxel_pixel], pixel_key[voxel_pixel] % vspan
    # flat canvas index of map pixel (y, x) in tile t: y * page_width + x + offset[t]
    tile_offset = (tile_page * page_height + tile_dy) * page_width + tile_dx
    voxel_at = tile_offset[voxel_tile] + ys * page_width + xs
    del voxel_pixel, pixel_key
    canvas = torch.zeros((num_pages, page_height, page_width), dtype=torch.bool, device=device)
    canvas.view(-1)[voxel_at] = True
    labels, num_labelled = label_planes(canvas, backend)
    del canvas
    labels = labels.view(-1)
    region = labels[voxel_at].long() - 1
    del voxel_at

    def lookup(tiles, pixel):
        """Component of tile ``tiles`` holding map pixel ``pixel`` (flat ``y * W + x``)."""
        return labels[tile_offset[tiles] + pixel // width * page_width + pixel % width].long() - 1

    # --- per component: tile, area, representative pixel, largest u. Then the roots (each whole
    # map at its top value) as regions num_labelled + map
    region_tile = _segment_reduce(region, voxel_tile, "amin", _BIG, num_labelled)
    representative = _segment_reduce(region, ys * width + xs, "amin", _BIG, num_labelled)
    at_own_value = voxel_u == tile_val[voxel_tile]
    seed = _segment_reduce(region, torch.where(at_own_value, xs * height + ys, _BIG), "amin", _BIG, num_labelled)
    comp_extremal = _segment_reduce(region, voxel_u, "amax", -1, num_labelled) == tile_val[region_tile]
    comp_map = blob_map[tile_blob[region_tile]]
    num_regions = num_labelled + num_maps
    root = num_labelled + map_ids
    arange = torch.arange(num_regions, device=device)
    region_map = torch.cat([comp_map, map_ids])
    value = torch.cat([tile_val[region_tile], top])
    area = torch.cat([torch.bincount(region, minlength=num_labelled), torch.full((num_maps,), nel, device=device)])
    is_extremal = torch.cat([comp_extremal, torch.ones(num_maps, dtype=torch.bool, device=device)])
    is_top = arange >= num_labelled
    # --- successor: the component of the blob's next tile holding the representative; the root
    # after a blob's last tile (the whole blob)
    next_tile = (region_tile + 1).clamp(max=num_tiles - 1)
    has_next = (region_tile + 1 < num_tiles) & (tile_blob[next_tile] == tile_blob[region_tile])
    comp_succ = root[comp_map]
    comp_succ[has_next] = lookup(next_tile[has_next], representative[has_next])
    succ = torch.cat([comp_succ, root])
    head = _pointer_jump(torch.where(is_extremal | is_top, arange, succ))
    parent = torch.where(is_top, arange, head[succ])
    # --- variation against the component at level value + delta: the root once that reaches the
    # map's top, else the component of the blob's last tile at or below it
    target = tile_val[region_tile] + delta[comp_map]
    inside = target < top[comp_map]
    comp_top = root[comp_map]
    top_tile = torch.searchsorted(tile_key, tile_blob[region_tile[inside]] * vspan + target[inside], right=True) - 1
    comp_top[inside] = lookup(top_tile, representative[inside])
    top_region = torch.cat([comp_top, root])
    variation = (area[top_region] - area).to(torch.float32) / area.to(torch.float32)
    del labels
    representative = torch.cat([representative, torch.zeros(num_maps, dtype=torch.long, device=device)])
    # a root's seed: its first pixel of the top value, column-major
    top_pixel = torch.where(u == top.view(-1, 1, 1), torch.arange(nel, device=device).view(height, width) % width * height
                            + torch.arange(nel, device=device).view(height, width) // width, _BIG).view(num_maps, -1).amin(1)
    seed = torch.cat([seed, top_pixel])

    kept = _select_stable(is_extremal, parent, value, variation, area, nel,
                          max_variation, min_diversity, min_area, max_area)
    # --- geometry of the kept regions only, from their pixels (a kept root: the whole map)
    slot = torch.full((num_regions,), -1, dtype=torch.long, device=device)
    slot[kept] = torch.arange(kept.numel(), device=device)
    row = slot[region]
    on_kept = row >= 0
    row, xs, ys, maps_of = row[on_kept], xs[on_kept], ys[on_kept], comp_map[region[on_kept]]
    kept_roots = kept[kept >= num_labelled] - num_labelled
    if kept_roots.numel():
        pixel = torch.arange(nel, device=device)
        row = torch.cat([row, slot[root[kept_roots]].repeat_interleave(nel)])
        maps_of = torch.cat([maps_of, kept_roots.repeat_interleave(nel)])
        xs = torch.cat([xs, (pixel % width).repeat(kept_roots.numel())])
        ys = torch.cat([ys, (pixel // width).repeat(kept_roots.numel())])
    geometry = _geometry(row, xs, ys, peak_source[maps_of, ys, xs], area[kept], kept.numel(), device)
    return dict(map_index=region_map[kept] + map_offset, area=area[kept], value=value[kept],
                representative=representative[kept], seed=seed[kept], **geometry)


def _native_regions(u, peak_source, delta, max_variation, min_diversity, min_area, max_area):
    """`_dark_regions` of all maps ``u`` by the C kernel (CPU; ``peak_source`` real)."""
    source = peak_source if peak_source.dtype in (torch.float32, torch.float64) else peak_source.double()
    found = mser_kernel.mser_maps(u.to(torch.uint8), delta, source, max_variation=max_variation,
                                  min_diversity=min_diversity, min_area=min_area, max_area=max_area)
    m = found.pop("moments")
    cov = torch.stack([m[:, [0, 1]], m[:, [1, 2]]], 1)
    return dict(found, cov=cov, peak=found["peak"].to(peak_source.dtype))


def _use_native(backend: str, device: torch.device, values: torch.Tensor | None) -> bool:
    """Whether `mser` runs the C kernel for ``backend`` (see `BACKENDS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"mser: backend must be one of {BACKENDS}, got {backend!r}")
    exact_values = values is None or values.dtype.is_floating_point
    if backend == "native":
        if device.type != "cpu":
            raise ValueError(f"mser: backend='native' runs on the CPU; the levels are on {device} (use 'auto')")
        if not exact_values:
            raise ValueError(f"mser: backend='native' takes floating point values, got {values.dtype}")
        reason = mser_kernel.unavailable()
        if reason:
            raise native.NativeUnavailable(f"mser: backend='native': {reason}")
        return True
    if backend != "auto" or device.type != "cpu" or not exact_values:
        return False
    reason = mser_kernel.unavailable()
    if reason:
        warnings.warn(f"mser: the C kernel is unavailable ({reason}); labelling level sets with tensor passes, "
                      "several times slower on the CPU", RuntimeWarning, stacklevel=3)
        return False
    return True


def _chunks(u: torch.Tensor, max_voxels: int) -> list[tuple[int, int]]:
    """Split maps so that each chunk's labelled voxels (its level sets below each map's top,
    one per grey value present) stay under ``max_voxels``."""
    num_maps, height, width = u.shape
    flat = u.view(num_maps, -1).clamp(max=MAX_LEVEL + 1)
    hist = torch.zeros(num_maps, MAX_LEVEL + 2, dtype=torch.long, device=u.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    voxels = ((hist.cumsum(1) * (hist > 0)).sum(1) - height * width).tolist()
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
    max_voxels: int = 2**24,
) -> MSERRegions:
    """MSER of every map of ``levels`` (VLFeat semantics; module docstring).

    Args:
        levels: ``(..., H, W)`` integer tensor (uint8 or wider) of grey levels 0..255, any device;
            one map per leading index.
        delta: VLFeat's ``Delta``, in grey levels (>= 1): one for all maps, or an integer tensor
            with one per map (shaped like the leading dimensions, or flat).
        max_variation: VLFeat's ``MaxVariation`` (DSM: 0.5).
        min_diversity: VLFeat's ``MinDiversity`` (DSM: 0.7); 1 disables the duplicate test.
        min_area / max_area: region area bounds as fractions of ``H * W`` (DSM: 0.001 / 0.75).
        polarity: ``"bright"`` (regions of high values, DSM), ``"dark"``, or ``"both"``
            (VLFeat's MATLAB default).
        level_step: threshold spacing; 1 is exact. ``s > 1`` thresholds at multiples of ``s``
            (``delta`` becomes ``round(delta / s)`` steps): faster and approximate; measured
            recall of the exact regions in docs/detector.md.
        values: optional ``(..., H, W)`` real tensor on the device of ``levels`` (e.g. the
            activations the levels were made from); ``max_value`` / ``sum_value`` are then its
            maximum (in its dtype) / sum (float64) over each region (default: of ``levels``).
        backend: ``"auto"`` (default: the C kernel on the CPU where it builds, else the tensor
            path), ``"native"`` (the C kernel, ``gpu_dsm.kernels.mser``: CPU, floating point
            ``values``), or a labelling backend of the tensor path (``"scipy"``, ``"propagate"``:
            ``gpu_dsm.kernels.labelling``). All give the same regions, bit for bit.
        max_voxels: memory budget of the tensor path: maps are processed in chunks of at most
            this many level-set voxels (for every map and grey value present below its top, the
            pixels at or below it); about 40 bytes each at the peak (measured). The C kernel
            needs a few arrays of one map's size per thread.
    Returns:
        [`MSERRegions`][gpu_dsm.mser.MSERRegions] on ``levels``' device, coordinates in pixels of the maps. Maps
        smaller than 3x3 and empty inputs give no regions; so do constant maps.

    Examples:
        Two 12 x 12 maps, each with one bright blob; each blob gives nested regions:

        >>> import torch
        >>> ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
        >>> def blob(x, y, sigma):
        ...     return 255 * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
        >>> levels = torch.stack([blob(3, 4, 1.5), blob(8, 7, 2.0)]).round().to(torch.uint8)  # (2, 12, 12)
        >>> regions = mser(levels, delta=12)
        >>> regions.map_index, regions.area, regions.level
        (tensor([0, 0, 0, 1, 1, 1]), tensor([37,  9,  1, 37,  9,  1]), tensor([ 28, 164, 255,  73, 199, 255]))
        >>> regions.mean[[0, 3]]  # centroids (x, y), float64
        tensor([[3., 4.],
                [8., 7.]], dtype=torch.float64)
    """
    levels = as_tensor(levels, "mser: levels")
    if values is not None:
        values = as_tensor(values, "mser: values", kind="number", device=levels.device)
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
    flat = levels.reshape(-1, height, width)
    num_maps = flat.shape[0]
    value_dtype = values.dtype if values is not None else torch.long
    if num_maps == 0 or height < 3 or width < 3:
        return _empty(levels.device, value_dtype, num_maps)
    if flat.dtype != torch.uint8 and (flat.min() < 0 or flat.max() > MAX_LEVEL):
        raise ValueError(f"mser: levels must lie in 0..{MAX_LEVEL}, got {int(flat.min())}..{int(flat.max())}")
    step = int(level_step)
    if deltas.numel() not in (1, num_maps):
        raise ValueError(f"mser: {deltas.numel()} deltas for {num_maps} maps")
    step_delta = torch.div(deltas.expand(num_maps) + step // 2, step, rounding_mode="floor").clamp(min=1)
    use_native = _use_native(backend, levels.device, values)
    labelling = "auto" if backend == "native" else backend
    # the C kernel reads uint8 maps; the tensor path int64 ones
    maps = flat.to(torch.uint8).contiguous() if use_native else flat.long().contiguous()
    peak_source = values.reshape(-1, height, width) if values is not None else flat.long()
    parts, first_pixels = [], []
    for bright in ([True, False] if polarity == "both" else [polarity == "bright"]):
        u = MAX_LEVEL - maps if bright else maps
        if step > 1:
            u = torch.div(u.long() + step - 1, step, rounding_mode="floor").to(maps.dtype)
        if use_native:
            runs = [_native_regions(u, peak_source, step_delta, max_variation, min_diversity, min_area, max_area)]
        else:
            runs = (_dark_regions(u[start:stop], peak_source[start:stop], step_delta[start:stop], max_variation,
                                  min_diversity, min_area, max_area, labelling, start)
                    for start, stop in _chunks(u, max_voxels))
        for found in runs:
            threshold = (found["value"] * step).clamp(max=MAX_LEVEL)
            parts.append(MSERRegions(
                map_index=found["map_index"], area=found["area"], level=MAX_LEVEL - threshold if bright else threshold,
                mean=found["mean"], cov=found["cov"], max_value=found["peak"], sum_value=found["total"], bbox=found["bbox"],
                bright=torch.full_like(found["area"], bright, dtype=torch.bool), seed=found["seed"], num_maps=num_maps,
            ))
            first_pixels.append(found["representative"])
    if not parts:
        return _empty(levels.device, value_dtype, num_maps)
    out = MSERRegions.cat(parts, num_maps)
    # canonical order: map, polarity (bright first), level, first pixel in raster order
    key = out.map_index * (2 * (MAX_LEVEL + 1)) + out.level + (~out.bright) * (MAX_LEVEL + 1)
    first_pixel = torch.cat(first_pixels) if len(first_pixels) > 1 else first_pixels[0]
    order = torch.argsort(key * (height * width) + first_pixel)
    return out.select(order)
