"""A plain, one-map-at-a-time port of VLFeat's MSER (``vl/mser.c``, ``vl_mser_process``).

Union-find over pixels sorted by value, exactly as VLFeat: the oracle for ``gpu_dsm.mser``.
Regions of ``{u <= v}`` (VLFeat's native dark-on-bright); bright-on-dark runs it on ``255 - x``
as VLFeat's MATLAB entry does. Single-precision arithmetic as in the C code.
"""
from __future__ import annotations

import numpy as np

f32 = np.float32


def mser_reference(image, delta, max_variation=0.5, min_diversity=0.7, min_area=0.001, max_area=0.75):
    """MSER of one ``(H, W)`` map of integer grey levels 0..255 (array-like); returns a list of
    regions, each a dict with ``value`` (grey level of the region in ``image``, an int) and
    ``pixels`` (sorted flat indices ``y*W+x``, a list of ints). Dark-on-bright: regions of
    ``{image <= value}``; pass ``255 - levels`` for bright regions.

    Examples:
        >>> import numpy as np
        >>> ys, xs = np.mgrid[0:12, 0:12]
        >>> levels = np.round(255 * np.exp(-((xs - 3) ** 2 + (ys - 4) ** 2) / 4.5)).astype(np.uint8)  # one blob
        >>> [(region["value"], len(region["pixels"])) for region in mser_reference(255 - levels, delta=12)]
        [(0, 1), (91, 9), (227, 37)]
    """
    image = np.asarray(image, dtype=np.int64)
    height, width = image.shape
    nel = height * width
    flat = image.ravel()
    # counting sort by value, ascending, stable in pixel index (VLFeat's bucket sort)
    perm = np.argsort(flat, kind="stable")
    parent = [-1] * nel
    shortcut = [0] * nel
    area = [0] * nel
    height_ = [0] * nel

    def climb(idx):
        root = idx
        while shortcut[root] != root:
            root = shortcut[root]
        while shortcut[idx] != root:  # path compression
            nxt = shortcut[idx]
            shortcut[idx] = root
            idx = nxt
        return root

    for idx in perm:
        idx = int(idx)
        val = flat[idx]
        parent[idx] = idx
        shortcut[idx] = idx
        area[idx] = 1
        height_[idx] = 1
        r_idx = idx
        y, x = divmod(idx, width)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if (dy == 0 and dx == 0) or not (0 <= ny < height and 0 <= nx < width):
                    continue
                n_idx = ny * width + nx
                if parent[n_idx] == -1:
                    continue
                r_idx = climb(idx)
                nr_idx = climb(n_idx)
                if r_idx == nr_idx:
                    continue
                hgt, n_hgt = height_[r_idx], height_[nr_idx]
                if flat[nr_idx] == val and hgt < n_hgt:
                    parent[r_idx] = nr_idx
                    shortcut[r_idx] = nr_idx
                    area[nr_idx] += area[r_idx]
                    height_[nr_idx] = max(n_hgt, hgt + 1)
                else:
                    parent[nr_idx] = r_idx
                    shortcut[nr_idx] = r_idx
                    area[r_idx] += area[nr_idx]
                    height_[r_idx] = max(hgt, n_hgt + 1)

    # extremal regions, in the order of the sorted pixels
    er_index, er_of_pixel = [], {}
    for idx in perm:
        idx = int(idx)
        p = parent[idx]
        if flat[p] > flat[idx] or p == idx:
            er_of_pixel[idx] = len(er_index)
            er_index.append(idx)
    ner = len(er_index)
    er_parent = []
    for i in range(ner):
        idx = er_index[i]
        while True:
            idx = parent[idx]
            if idx in er_of_pixel:
                break
        er_parent.append(er_of_pixel[idx])
    value = [int(flat[er_index[i]]) for i in range(ner)]
    er_area = [area[er_index[i]] for i in range(ner)]

    variation = []
    for i in range(ner):
        top_val = value[i] + delta
        top = i
        while True:
            nxt = er_parent[top]
            if nxt == top or value[nxt] > top_val:
                break
            top = nxt
        variation.append(f32(er_area[top] - er_area[i]) / f32(er_area[i]))

    stable = [True] * ner
    for i in range(ner):
        p = er_parent[i]
        if value[p] > value[i] + 1:
            continue
        loser = p if variation[i] < variation[p] else i
        stable[loser] = False

    max_area_f = f32(max_area) * f32(nel)
    min_area_f = f32(min_area) * f32(nel)
    max_var_f, min_div_f = f32(max_variation), f32(min_diversity)
    for i in range(ner - 1, -1, -1):
        if not stable[i]:
            continue
        if variation[i] >= max_var_f or er_area[i] > max_area_f or er_area[i] < min_area_f:
            stable[i] = False
            continue
        if min_diversity < 1.0 and er_parent[i] != i:
            p = er_parent[i]
            while not stable[p]:
                nxt = er_parent[p]
                if nxt == p:
                    break
                p = nxt
            div = f32(er_area[p] - er_area[i]) / f32(er_area[p])
            if div < min_div_f:
                stable[i] = False

    # pixels of each kept region: the component of {u <= value} containing its seed
    regions = []
    for i in range(ner):
        if not stable[i]:
            continue
        seed = er_index[i]
        mask = image <= value[i]
        pixels = _component(mask, seed, width)
        assert len(pixels) == er_area[i]
        regions.append({"value": value[i], "pixels": pixels})
    return regions


def _component(mask, seed, width):
    height = mask.shape[0]
    seen = {seed}
    stack = [seed]
    while stack:
        idx = stack.pop()
        y, x = divmod(idx, width)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx]:
                    n = ny * width + nx
                    if n not in seen:
                        seen.add(n)
                        stack.append(n)
    return sorted(seen)


def region_stats(pixels, width):
    """Area (int), mean ``(x, y)`` ``(2,)`` and population covariance ``(2, 2)`` (float64 numpy
    arrays, pixels and pixels^2) of a region's flat pixel indices ``y * width + x``."""
    ys, xs = np.divmod(np.asarray(pixels), width)
    pts = np.stack([xs, ys], 1).astype(np.float64)
    mean = pts.mean(0)
    centred = pts - mean
    return len(pixels), mean, centred.T @ centred / len(pixels)
