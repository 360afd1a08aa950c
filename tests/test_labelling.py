import numpy as np
import pytest
import torch
from scipy import ndimage

from gpu_dsm.kernels.labelling import label_planes


def _plain_label(mask):
    """Flood fill, 8-connectivity, components numbered in raster order: the obvious reference."""
    h, w = mask.shape
    out = np.zeros((h, w), dtype=np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not out[y, x]:
                n += 1
                stack = [(y, x)]
                out[y, x] = n
                while stack:
                    cy, cx = stack.pop()
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not out[ny, nx]:
                                out[ny, nx] = n
                                stack.append((ny, nx))
    return out, n


def _snake(h, w):
    """One component that winds through the whole plane: a path of about h*w/2 pixels."""
    m = np.zeros((h, w), dtype=bool)
    m[::2] = True
    for i, y in enumerate(range(1, h, 2)):
        m[y, w - 1 if i % 2 == 0 else 0] = True
    return m


@pytest.mark.parametrize("backend", ["scipy", "propagate"])
def test_matches_flood_fill(backend):
    rng = np.random.default_rng(0)
    planes = [rng.random((13, 17)) < p for p in (0.2, 0.45, 0.6, 0.9)] + [_snake(31, 29), np.zeros((13, 17), bool)]
    for plane in planes:
        labels, n = label_planes(torch.from_numpy(plane[None]), backend)
        expected, n_expected = _plain_label(plane)
        assert n == n_expected
        assert np.array_equal(labels[0].numpy(), expected)


def test_backends_identical_on_stacks_and_long_components():
    rng = np.random.default_rng(1)
    stack = rng.random((64, 24, 40)) < 0.55
    stack[5] = _snake(24, 40)  # a component far longer than 100 max-pool iterations
    masks = torch.from_numpy(stack)
    a, na = label_planes(masks, "scipy")
    b, nb = label_planes(masks, "propagate")
    assert na == nb and torch.equal(a.long(), b.long())
    assert int(a[5].max() - a[5][a[5] > 0].min()) == 0, "the snake is a single component"
    # no component crosses planes
    per_plane = [set(a[p][a[p] > 0].tolist()) for p in range(64)]
    assert all(not (per_plane[i] & per_plane[i + 1]) for i in range(63))


def test_bad_input():
    with pytest.raises(ValueError, match="bool"):
        label_planes(torch.zeros(2, 3, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="unknown labelling backend"):
        label_planes(torch.zeros(2, 3, 3, dtype=torch.bool), "kornia")
    labels, n = label_planes(torch.zeros(0, 5, 5, dtype=torch.bool))
    assert n == 0 and labels.shape == (0, 5, 5)
