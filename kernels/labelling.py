"""Connected-component labelling of a stack of binary planes, 8-connectivity within each plane.

One signature, two exact backends:

- ``"scipy"`` (CPU): ``scipy.ndimage.label`` on the whole stack with a structuring element that
  connects only within a plane, so every plane is labelled in one call.
- ``"propagate"`` (any device; the GPU path): every on-pixel starts with its own index; a 3x3
  max-pool spreads the smallest index of each component, and pointer jumping (a pixel takes the
  label of the pixel its label names) shortens long paths. It iterates until nothing changes, so
  the result is exact whatever the component shapes (unlike a fixed number of iterations, which
  is what makes kornia's max-pool labelling wrong on long components).

Both number components ``1..N`` in raster order of their first pixel over ``(plane, row,
column)``; background is 0. They return identical tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "scipy", "propagate")

# 8-connectivity inside a plane, none across planes
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def _label_scipy(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    from scipy import ndimage

    labels, count = ndimage.label(masks.cpu().numpy(), structure=_STRUCTURE)
    return torch.from_numpy(labels).to(masks.device), int(count)


_STEPS_PER_TEST = 4  # propagation steps between two convergence tests


def _label_propagate(masks: torch.Tensor) -> tuple[torch.Tensor, int]:
    planes, height, width = masks.shape
    area = height * width
    if area >= 2**24:
        raise ValueError(f"propagate labelling works on planes below 2^24 pixels, got {height}x{width}")
    # label = area - (index of a pixel of the component), so max-pooling finds the smallest index;
    # exact in float32 because area < 2^24
    index = torch.arange(area, device=masks.device, dtype=torch.float32).view(1, height, width)
    on = masks.to(torch.float32).contiguous()
    labels = (area - index) * on
    plane_offset = (torch.arange(planes, device=masks.device) * area).view(planes, 1)

    def step(labels: torch.Tensor) -> torch.Tensor:
        pooled = F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0].contiguous() * on
        # pointer jumping: take the label of the pixel named by the label
        named = (area - pooled).long().clamp_(0, area - 1).view(planes, -1) + plane_offset
        jumped = labels.view(-1)[named.view(-1)].view(planes, height, width) * on
        return torch.maximum(pooled, jumped)

    # a converged labelling is a fixed point of step(), so testing only every few steps (each test
    # waits for the device) changes nothing but the number of idle steps at the end
    while True:
        before = labels
        for _ in range(_STEPS_PER_TEST):
            labels = step(labels)
        if torch.equal(labels, before):
            break
    root = (area - labels).long() + plane_offset.view(planes, 1, 1)
    root = torch.where(masks, root, torch.full_like(root, -1))
    flat = root.view(-1)
    present = flat >= 0
    unique, inverse = torch.unique(flat[present], return_inverse=True)
    dtype = torch.int32 if unique.numel() < 2**31 - 1 else torch.long
    out = torch.zeros(flat.shape, dtype=dtype, device=masks.device)
    out[present] = (inverse + 1).to(dtype)
    return out.view(planes, height, width), int(unique.numel())


def label_planes(masks: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, int]:
    """Label the components of every plane of ``masks``.

    Args:
        masks: ``(P, H, W)`` bool, any device; ``P`` planes of ``H x W`` pixels.
        backend: ``"auto"`` (``"scipy"`` on the CPU, ``"propagate"`` elsewhere), ``"scipy"`` or
            ``"propagate"``.
    Returns:
        ``(labels, count)``: ``labels`` ``(P, H, W)`` int32 (int64 when the count needs it) on
        the device of ``masks``, 0 for background and ``1..count`` for the components, numbered
        in raster order of their first pixel over ``(plane, row, column)``; ``count`` an int.
        Both backends give identical tensors.

    Examples:
        >>> import torch
        >>> masks = torch.tensor([[[1, 1, 0, 0],
        ...                        [0, 0, 0, 1],
        ...                        [1, 0, 0, 1]]], dtype=torch.bool)
        >>> labels, count = label_planes(masks)
        >>> count
        3
        >>> labels[0]
        tensor([[1, 1, 0, 0],
                [0, 0, 0, 2],
                [3, 0, 0, 2]], dtype=torch.int32)
        >>> torch.equal(label_planes(masks, "propagate")[0], labels)
        True
    """
    if masks.dtype != torch.bool or masks.ndim != 3:
        raise ValueError(f"label_planes expects a (P, H, W) bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown labelling backend {backend!r}; known: {BACKENDS}")
    if masks.numel() == 0:
        return torch.zeros(masks.shape, dtype=torch.int32, device=masks.device), 0
    if backend == "auto":
        backend = "scipy" if masks.device.type == "cpu" else "propagate"
    return _label_scipy(masks) if backend == "scipy" else _label_propagate(masks)
