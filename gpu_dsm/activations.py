"""The forms in which activations can be given, brought to one: per image, a list over scales.

The maps are returned as views of the given tensors (same dtype, same device); no copy is made.

Examples:
    >>> import torch
    >>> maps = per_image_maps(torch.rand(2, 512, 20, 30))  # (B, K, H, W): 2 images, 1 scale
    >>> len(maps), [tuple(m.shape) for m in maps[0]]
    (2, [(512, 20, 30)])
    >>> maps = per_image_maps([torch.rand(2, 512, 20, 30), torch.rand(2, 512, 14, 21)])  # one (B, K, H, W) per scale
    >>> [tuple(m.shape) for m in maps[1]]
    [(512, 20, 30), (512, 14, 21)]
    >>> maps = per_image_maps([[torch.rand(512, 20, 30)], [torch.rand(512, 9, 9)]])  # per image [(K, h_s, w_s)] * S
    >>> [tuple(m[0].shape) for m in maps]
    [(512, 20, 30), (512, 9, 9)]
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Activations = Union[torch.Tensor, Sequence[torch.Tensor], Sequence[Sequence[torch.Tensor]]]

_FORMS = ("a (B, K, H, W) tensor, a list of (B, K, H, W) tensors (one per scale), or per image a list of "
          "(K, h, w) tensors (one per scale)")


def is_activations(obj) -> bool:
    """Whether ``obj`` is activations in one of the accepted forms (rather than images): a
    floating point ``(B, K, H, W)`` or ``(K, H, W)`` tensor, a list of ``(B, K, H, W)`` tensors, or
    a list of lists of ``(K, h, w)`` tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.ndim in (3, 4) and obj.is_floating_point()
    if isinstance(obj, (list, tuple)) and obj:
        first = obj[0]
        if isinstance(first, torch.Tensor):
            return first.ndim == 4
        return isinstance(first, (list, tuple)) and bool(first) and isinstance(first[0], torch.Tensor) and first[0].ndim == 3
    return False


def per_image_maps(activations: Activations) -> list[list[torch.Tensor]]:
    """``activations`` as ``[[(K, h_s, w_s)] * S] * B``: per image, its maps at each scale, as
    views of the given tensors (their dtype and device).

    Raises:
        ValueError: any other form, or per-scale tensors with different batch sizes or channels.
    """
    if isinstance(activations, torch.Tensor):
        if activations.ndim == 4:
            return [[m] for m in activations.unbind(0)]
        if activations.ndim == 3:
            return [[activations]]
        raise ValueError(f"activations: expected {_FORMS}; got a tensor of shape {tuple(activations.shape)}")
    if not isinstance(activations, (list, tuple)):
        raise ValueError(f"activations: expected {_FORMS}; got {type(activations).__name__}")
    if not activations:
        return []
    if all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in activations):
        batch = {int(t.shape[0]) for t in activations}
        channels = {int(t.shape[1]) for t in activations}
        if len(batch) != 1 or len(channels) != 1:
            raise ValueError(f"activations: the per-scale (B, K, H, W) tensors differ in B or K: "
                             f"{[tuple(t.shape) for t in activations]}")
        return [list(maps) for maps in zip(*(t.unbind(0) for t in activations))]
    per_image = []
    for i, maps in enumerate(activations):
        if isinstance(maps, torch.Tensor) or not isinstance(maps, (list, tuple)) or not maps:
            what = f"a tensor of shape {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else repr(type(maps).__name__)
            raise ValueError(f"activations: expected {_FORMS}; item {i} is {what}")
        for s, m in enumerate(maps):
            if not isinstance(m, torch.Tensor) or m.ndim != 3:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"activations: image {i}, scale {s}: expected a (K, h, w) tensor, got {shape}")
        per_image.append(list(maps))
    return per_image
