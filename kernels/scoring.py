"""Upright-affine hypotheses from local frames, and distinct features among inliers.

A hypothesis maps query points to candidate points by ``x2 = T x1 + t`` with ``T`` lower
triangular ``[[a, 0], [b, c]]`` (5 dof: translation, anisotropic scale, vertical shear; no
rotation, "upright" images). Its parameters are packed as ``(a, b, c, tx, ty)``.
`hypotheses_from_frames` gives each correspondence's own hypothesis; `count_unique`
counts the distinct features among a hypothesis' inliers, so that each feature counts once;
``ERRORS`` names the transfer errors (``MatchConfig.error``). They serve the tensor passes of
`gpu_dsm.match.spatial_verify`, which score the hypotheses (docs/matching.md).
"""
from __future__ import annotations

import torch

ERRORS = ("symmetric", "one_way")


def hypotheses_from_frames(frame1: torch.Tensor, frame2: torch.Tensor, xy1: torch.Tensor, xy2: torch.Tensor) -> torch.Tensor:
    """One hypothesis per correspondence: ``T = A2 A1^-1``, ``t = x2 - T x1``.

    Args:
        frame1, frame2: ``(..., 2, 2)`` floating point lower-triangular frames (query,
            candidate), with positive diagonals.
        xy1, xy2: ``(..., 2)`` their centres ``(x, y)``, feature-map pixels; all four of one
            dtype, on one device.
    Returns:
        ``(..., 5)`` parameters ``(a, b, c, tx, ty)`` (``tx``, ``ty`` in candidate pixels) in the
        dtype of the inputs, on their device.

    Examples:
        >>> import torch
        >>> frame1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> frame2 = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> hypotheses_from_frames(frame1, frame2, torch.tensor([1.0, 1.0]), torch.tensor([5.0, 4.0]))
        tensor([2., 0., 2., 3., 2.])
    """
    p, q, r = frame1[..., 0, 0], frame1[..., 1, 0], frame1[..., 1, 1]
    a2, b2, c2 = frame2[..., 0, 0], frame2[..., 1, 0], frame2[..., 1, 1]
    a = a2 / p
    c = c2 / r
    b = b2 / p - c2 * q / (p * r)
    tx = xy2[..., 0] - a * xy1[..., 0]
    ty = xy2[..., 1] - b * xy1[..., 0] - c * xy1[..., 1]
    return torch.stack([a, b, c, tx, ty], -1)


def count_unique(mask: torch.Tensor, ids: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Distinct ids among the True entries of each row.

    Args:
        mask: ``(G, K, C)`` bool.
        ids: ``(G, C)`` int64 in ``[0, num_ids)`` (e.g. the query feature of each correspondence),
            on the device of ``mask``.
        num_ids: the number of possible ids.
    Returns:
        ``(G, K)`` int64 counts on the device of ``mask``.

    Examples:
        >>> import torch
        >>> mask = torch.tensor([[[True, True, True], [False, True, False]]])
        >>> count_unique(mask, torch.tensor([[0, 0, 2]]), num_ids=3)
        tensor([[2, 1]])
    """
    g, k, c = mask.shape
    seen = torch.zeros(g, k, max(num_ids, 1), dtype=torch.uint8, device=mask.device)
    seen.scatter_reduce_(2, ids[:, None, :].expand(g, k, c), mask.to(torch.uint8), "amax")
    return seen.sum(-1, dtype=torch.int32).long()
