"""Scoring upright-affine hypotheses against correspondences, all at once, as batched matrix products.

A hypothesis maps query points to candidate points by ``x2 = T x1 + t`` with ``T`` lower
triangular ``[[a, 0], [b, c]]`` (5 dof: translation, anisotropic scale, vertical shear; no
rotation, "upright" images). Its parameters are packed as ``(a, b, c, tx, ty)``.

The symmetric transfer error of correspondence ``l`` under hypothesis ``k``,
``||x2 - T x1 - t||^2 + ||x1 - T^-1 (x2 - t)||^2``, is a quadratic form in
``z_l = (x1, y1, x2, y2)``: ``z^T H_k z + h_k . z + c_k``. So with the 15 monomials
``phi(z_l)`` and matching coefficients ``psi_k`` every error of a group is one matrix product
``E = Psi Phi^T`` (``(G, K, 15) @ (G, 15, C)``), which is what makes scoring all hypotheses of
all candidates one tensor operation.

The product runs in the coordinates' dtype (float32 by default) on centred coordinates; errors
within a bound of the float32 rounding of the threshold are recomputed directly in float64, so
inlier decisions equal those of the direct float64 formula. The bound assumes IEEE float32
products, so the product runs inside :func:`gpu_dsm.kernels.precision.ieee_float32_matmul`:
TF32 or bfloat16 settings of the caller (``torch.set_float32_matmul_precision``,
``allow_tf32``) do not change the decisions.
"""
from __future__ import annotations

import math

import torch

from gpu_dsm.kernels.precision import ieee_float32_matmul

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


def log_scale(params: torch.Tensor) -> torch.Tensor:
    """``log det T = log(a c)`` of hypotheses ``(..., 5)`` -> ``(...)``, their dtype and device."""
    return torch.log(params[..., 0] * params[..., 2])


def _metric(params: torch.Tensor, error: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries ``(g11, g12, g22)`` of ``G`` with error ``r^T G r``, ``r = x2 - T x1 - t``."""
    a, b, c = params[..., 0], params[..., 1], params[..., 2]
    one = torch.ones_like(a)
    if error == "one_way":
        return one, torch.zeros_like(a), one
    # T^-1 = [[1/a, 0], [-b/(a c), 1/c]]; G = I + T^-T T^-1
    ia, ic = 1.0 / a, 1.0 / c
    m = -b * ia * ic
    return one + ia * ia + m * m, m * ic, one + ic * ic


def direct_errors(params: torch.Tensor, xy1: torch.Tensor, xy2: torch.Tensor, error: str = "symmetric") -> torch.Tensor:
    """Transfer errors by the direct formula.

    Args:
        params: ``(..., K, 5)`` floating point hypotheses ``(a, b, c, tx, ty)``.
        xy1, xy2: ``(..., C, 2)`` correspondence points (query, candidate), pixels; same dtype
            and device as ``params``.
        error: ``"symmetric"`` (both transfer directions) or ``"one_way"`` (query to candidate).
    Returns:
        ``(..., K, C)`` squared errors, pixels^2, in the dtype of the inputs.

    Examples:
        >>> import torch
        >>> params = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0]])  # the identity
        >>> direct_errors(params, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [1.0, 3.0]]))
        tensor([[0., 8.]])
    """
    a, b, c, tx, ty = (params[..., i, None] for i in range(5))
    x1, y1 = xy1[..., None, :, 0], xy1[..., None, :, 1]
    x2, y2 = xy2[..., None, :, 0], xy2[..., None, :, 1]
    rx = x2 - a * x1 - tx
    ry = y2 - b * x1 - c * y1 - ty
    forward = rx * rx + ry * ry
    if error == "one_way":
        return forward
    # x1 - T^-1 (x2 - t) = -T^-1 r
    bx = rx / a
    by = (ry - b * bx) / c
    return forward + bx * bx + by * by


def _monomials(z: torch.Tensor) -> torch.Tensor:
    """``(..., 4)`` -> ``(..., 15)``: squares, cross products, linear terms, 1."""
    i, j = torch.triu_indices(4, 4, offset=1, device=z.device)
    return torch.cat([z * z, z[..., i] * z[..., j], z, torch.ones_like(z[..., :1])], -1)


def _coefficients(params: torch.Tensor, error: str) -> torch.Tensor:
    """``(..., 5)`` hypotheses -> ``(..., 15)`` coefficients matching :func:`_monomials`."""
    a, b, c, tx, ty = params.unbind(-1)
    g11, g12, g22 = _metric(params, error)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    # r = P z + q, z = (x1, y1, x2, y2)
    P = torch.stack([torch.stack([-a, zero, one, zero], -1), torch.stack([-b, -c, zero, one], -1)], -2)  # (..., 2, 4)
    q = torch.stack([-tx, -ty], -1)
    G = torch.stack([torch.stack([g11, g12], -1), torch.stack([g12, g22], -1)], -2)
    GP = G @ P
    H = P.transpose(-1, -2) @ GP  # (..., 4, 4)
    h = 2 * (q.unsqueeze(-2) @ GP).squeeze(-2)  # (..., 4)
    c0 = (q.unsqueeze(-2) @ G @ q.unsqueeze(-1)).squeeze(-1)  # (..., 1)
    i, j = torch.triu_indices(4, 4, offset=1, device=params.device)
    return torch.cat([H.diagonal(dim1=-2, dim2=-1), 2 * H[..., i, j], h, c0], -1)


def inlier_mask(
    params: torch.Tensor,
    xy1: torch.Tensor,
    xy2: torch.Tensor,
    valid: torch.Tensor,
    threshold_sq: float,
    error: str = "symmetric",
) -> torch.Tensor:
    """``error < threshold_sq`` for every hypothesis and correspondence of each group.

    Args:
        params: ``(G, K, 5)`` floating point hypotheses (float64 recommended; coefficients are
            built in float64).
        xy1, xy2: ``(G, C, 2)`` floating point correspondence points (query, candidate), pixels;
            the product runs in their dtype (float32 or float64).
        valid: ``(G, C)`` bool, real correspondences.
        threshold_sq: squared error threshold, pixels^2.
        error: ``"symmetric"`` or ``"one_way"`` (see :func:`direct_errors`).
    Returns:
        ``(G, K, C)`` bool on the device of ``params``, False for padded correspondences.

    Examples:
        >>> import torch
        >>> params = torch.tensor([[[1.0, 0.0, 1.0, 0.0, 0.0]]], dtype=torch.float64)
        >>> xy1 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
        >>> xy2 = torch.tensor([[[0.5, 0.0], [1.0, 3.0]]])
        >>> inlier_mask(params, xy1, xy2, torch.tensor([[True, True]]), threshold_sq=1.0)
        tensor([[[ True, False]]])
    """
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
    work = xy1.dtype
    p64, x1, x2 = params.double(), xy1.double(), xy2.double()
    # centre both point sets per group (the error is translation invariant once t is moved)
    n = valid.sum(1, keepdim=True).clamp(min=1).double()
    m1 = (x1 * valid[..., None]).sum(1) / n
    m2 = (x2 * valid[..., None]).sum(1) / n
    a, b, c, tx, ty = p64.unbind(-1)
    tx_c = tx + a * m1[:, None, 0] - m2[:, None, 0]
    ty_c = ty + b * m1[:, None, 0] + c * m1[:, None, 1] - m2[:, None, 1]
    centred = torch.stack([a, b, c, tx_c, ty_c], -1)
    c1, c2 = x1 - m1[:, None], x2 - m2[:, None]
    psi = _coefficients(centred, error)  # float64
    phi = _monomials(torch.cat([c1, c2], -1))  # float64
    with ieee_float32_matmul():
        errors = torch.bmm(psi.to(work), phi.to(work).transpose(1, 2))
    inside = (errors < threshold_sq) & valid[:, None, :]
    if work != torch.float64:
        # conservative bound of the float32 rounding: 15 terms, each |psi| |phi| <= |psi|_1 max|phi|
        scale = psi.abs().sum(-1, keepdim=True) * (phi.abs() * valid[..., None]).amax(dim=(1, 2)).view(-1, 1, 1)
        bound = (scale * (32 * torch.finfo(work).eps)).to(work)
        unsure = errors.sub_(threshold_sq).abs_() <= bound  # errors is not needed any more
        unsure &= valid[:, None, :]
        if unsure.any():
            g, k, l = unsure.nonzero(as_tuple=True)
            exact = direct_errors(centred[g, k][:, None], c1[g, l][:, None], c2[g, l][:, None], error)[:, 0, 0]
            inside[g, k, l] = exact < threshold_sq
    return inside


def scale_gate(log_scale_corr: torch.Tensor, log_scale_hyp: torch.Tensor, max_change: float) -> torch.Tensor:
    """``|log det T_l - log det T_k| <= log(max_change)``, in float32 with a float64 check near the bound.

    Args:
        log_scale_corr: ``(G, C)`` floating point :func:`log_scale` of each correspondence's own
            hypothesis.
        log_scale_hyp: ``(G, K)`` floating point :func:`log_scale` of each hypothesis, on the same
            device.
        max_change: largest allowed ratio of area scales (> 1).
    Returns:
        ``(G, K, C)`` bool on the device of the inputs.
    """
    limit = math.log(max_change)
    diff = (log_scale_corr.float()[:, None, :] - log_scale_hyp.float()[..., None]).abs_()
    inside = diff <= limit
    unsure = diff.sub_(limit).abs_() <= 1e-5 * (1 + limit)
    if unsure.any():
        g, k, l = unsure.nonzero(as_tuple=True)
        inside[g, k, l] = (log_scale_corr[g, l].double() - log_scale_hyp[g, k].double()).abs() <= limit + 1e-12
    return inside


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
