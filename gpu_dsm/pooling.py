"""Global descriptors pooled from activations: MAC, SPoC, GeM, and their multi-scale aggregate.

Pure functions take activations ``(B, K, H, W)`` (``B`` images, ``K`` channels, an ``H x W``
feature map; any floating dtype, any device) and return ``(B, K)`` in the same dtype on the same
device (not normalised); the ``nn.Module`` wrappers hold the parameters (GeM's ``p``) and
L2-normalise.

Examples:
    >>> import torch
    >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]],
    ...                    [[0.0, 0.0], [0.0, 8.0]]]])  # (B=1, K=2, H=2, W=2)
    >>> mac(x), spoc(x)
    (tensor([[4., 8.]]), tensor([[2.5000, 2.0000]]))
    >>> gem(x, p=1.0)  # p = 1 is the mean, p -> inf the max
    tensor([[2.5000, 2.0000]])
    >>> MAC()(x)  # L2-normalised
    tensor([[0.4472, 0.8944]])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("gem", "mac", "spoc", "gemmp")  # gemmp: GeM with one p per channel (cnnimageretrieval-pytorch)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Max pooling (MAC, Tolias et al.): ``(B, K, H, W) -> (B, K)``, dtype and device of ``x``."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor, center_prior: bool = False) -> torch.Tensor:
    """Sum pooling (SPoC, Babenko & Lempitsky 2015), as a mean over positions: ``(B, K, H, W) -> (B, K)``,
    dtype and device of ``x``.

    ``center_prior`` weights positions by a Gaussian centred on the map with sigma one third of
    the distance from the centre to the nearest border (SPoC paper, "centering prior").
    The scale of the result does not matter after L2 normalisation.
    """
    if not center_prior:
        return x.mean(dim=(-2, -1))
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device, dtype=x.dtype) - (h - 1) / 2
    xs = torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1) / 2
    sigma = max(min(h, w) / 2, 0.5) / 3
    weight = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return (x * weight).sum(dim=(-2, -1)) / weight.sum()


def gem(x: torch.Tensor, p: float | torch.Tensor = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling (Radenović et al.): ``mean(clamp(x, eps)^p)^(1/p)``.

    Args:
        x: ``(B, K, H, W)`` floating point activations.
        p: the exponent: a float or a tensor broadcastable to ``(B, K)`` (``GeM``'s ``(1,)``
            parameter), on the device of ``x``.
        eps: activations are clamped from below at ``eps`` (so ``p`` may be fractional).
    Returns:
        ``(B, K)`` in the dtype of ``x``, on its device.

    Examples:
        >>> import torch
        >>> gem(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), p=3.0)  # (25 / 4) ** (1 / 3)
        tensor([[2.9240]])
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def pool(x: torch.Tensor, method: str, p: float | torch.Tensor = 3.0) -> torch.Tensor:
    """Dispatch to [`gem`][gpu_dsm.pooling.gem], [`mac`][gpu_dsm.pooling.mac] or [`spoc`][gpu_dsm.pooling.spoc] by name.

    Args:
        x: ``(B, K, H, W)`` floating point activations, ``H, W >= 1``.
        method: one of `POOLINGS`; ``"gemmp"`` is [`gem`][gpu_dsm.pooling.gem] with a ``(K,)`` tensor ``p``,
            one exponent per channel.
        p: GeM's exponent (``gem``: a float or ``(1,)`` tensor; ``gemmp``: ``(K,)``).
    Returns:
        ``(B, K)`` in the dtype of ``x``, on its device, not normalised.

    Examples:
        >>> import torch
        >>> pool(torch.ones(2, 3, 4, 5), "spoc").shape
        torch.Size([2, 3])
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[-1] * x.shape[-2] == 0:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"pool: expected activations (B, K, H, W) with H, W >= 1, got {shape}")
    if method == "gem":
        return gem(x, p)
    if method == "gemmp":
        p = torch.as_tensor(p, dtype=x.dtype, device=x.device).reshape(-1)
        return x.clamp(min=1e-6).pow(p[:, None, None]).mean(dim=(-2, -1)).pow(1.0 / p)
    if method == "mac":
        return mac(x)
    if method == "spoc":
        return spoc(x)
    raise ValueError(f"unknown pooling {method!r}; known: {POOLINGS}")


def multiscale_aggregate(per_scale: Sequence[torch.Tensor], p: float = 1.0) -> torch.Tensor:
    """Combine per-scale descriptors ``[(B, K)] * S`` (each L2-normalised here) into one ``(B, K)``.

    Power mean over scales, ``(mean_s v_s^p)^(1/p)``, then L2 normalisation: ``p`` = GeM's p for
    GeM networks, 1 (average) for MAC (DSM paper 4.1; cnnimageretrieval-pytorch ``extract_ms``).
    The result has the dtype and device of the inputs (all on one device).

    Examples:
        >>> import torch
        >>> multiscale_aggregate([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 1.0]])])
        tensor([[0.3162, 0.9487]])
    """
    if len(per_scale) == 0:
        raise ValueError("multiscale_aggregate: no scales")
    stacked = torch.stack([F.normalize(v, dim=-1) for v in per_scale])
    combined = stacked.clamp(min=0).pow(p).mean(0).pow(1.0 / p) if p != 1 else stacked.mean(0)
    return F.normalize(combined, dim=-1)


class MAC(nn.Module):
    """L2-normalised MAC: ``(B, K, H, W) -> (B, K)``, dtype and device of the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, H, W)`` floating point -> ``(B, K)`` unit rows, dtype and device of ``x``."""
        return F.normalize(mac(x), dim=-1)


class SPoC(nn.Module):
    """L2-normalised SPoC: ``(B, K, H, W) -> (B, K)``, dtype and device of the input."""

    def __init__(self, center_prior: bool = False):
        super().__init__()
        self.center_prior = center_prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, H, W)`` floating point -> ``(B, K)`` unit rows, dtype and device of ``x``."""
        return F.normalize(spoc(x, self.center_prior), dim=-1)


class GeM(nn.Module):
    """L2-normalised GeM with a learnable ``p`` (default 3, Radenović et al.): ``(B, K, H, W) -> (B, K)``.

    ``p`` is a ``(1,)`` float32 parameter: move the module with ``.to()`` to the input's device
    (and dtype); the result has the input's dtype and device.

    Examples:
        >>> import torch
        >>> GeM(p=3.0)(torch.ones(2, 4, 3, 3)).shape
        torch.Size([2, 4])
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K, H, W)`` floating point on the module's device -> ``(B, K)`` unit rows, dtype of ``x``."""
        return F.normalize(gem(x, self.p, self.eps), dim=-1)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


def multiscale_p(method: str, p: float | torch.Tensor, network_whitening: bool = False) -> float:
    """Exponent used across scales, as cnnimageretrieval-pytorch's test script sets it: GeM's p for
    a ``gem`` network without a whitening layer; 1 (averaging) for MAC, SPoC, ``gemmp`` and any
    network that whitens inside."""
    return float(p) if method == "gem" and not network_whitening else 1.0


__all__ = ["mac", "spoc", "gem", "pool", "multiscale_aggregate", "multiscale_p", "MAC", "SPoC", "GeM", "POOLINGS"]
