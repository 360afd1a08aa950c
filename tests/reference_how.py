"""HOW's test-time features as plain loops, written from the rules of
../shared/notes/how-asmk-reference.md section 1 (float64, one position at a time), to check the
batched gpu_dsm.how against: attention on the raw map, 3x3 smoothing whose border cells average
their valid neighbours, the reduction ``P (u - m)`` without L2, the top n over all scales."""
import math

import numpy as np


def _smoothed(u, row, col, size):
    """Mean of the raw vectors in the ``size x size`` window around ``(row, col)`` that lie inside the map."""
    h, w = u.shape[1:]
    r = size // 2
    cells = [u[:, y, x] for y in range(row - r, row + r + 1) for x in range(col - r, col + r + 1) if 0 <= y < h and 0 <= x < w]
    return sum(cells) / len(cells)


def features(maps_per_scale, projection, bias, num_features, size=3):
    """One image: ``maps_per_scale`` ``[(K, h, w)]`` raw maps; the reduction ``P (u - m)`` as
    ``projection (d, K)`` and ``bias = -P m (d,)`` (``None``: no reduction). Returns a list of ``(attention, scale, x, y, descriptor)``, best
    first (ties: scale order, then row-major, as Python's stable sort keeps them)."""
    candidates = []
    for s, u in enumerate(maps_per_scale):
        u = np.asarray(u, dtype=np.float64)
        _, h, w = u.shape
        for y in range(h):
            for x in range(w):
                attention = math.sqrt(float((u[:, y, x] ** 2).sum()) + 1e-10)
                candidates.append((attention, s, x, y))
    candidates.sort(key=lambda c: -c[0])
    out = []
    for attention, s, x, y in candidates[:num_features]:
        v = _smoothed(np.asarray(maps_per_scale[s], dtype=np.float64), y, x, size)
        if projection is not None:
            v = np.asarray(projection, dtype=np.float64) @ v + np.asarray(bias, dtype=np.float64)
        out.append((attention, s, x, y, v))
    return out
