"""Global descriptors pooled from activations: MAC, SPoC, GeM, and their multi-scale aggregate.

Pure functions take activations ``(B, K, H, W)`` and return ``(B, K)`` (not normalised);
the ``nn.Module`` wrappers hold the parameters (GeM's ``p``) and L2-normalise.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

POOLINGS = ("gem", "mac", "spoc", "gemmp")  # gemmp: GeM with one p per channel (cnnimageretrieval-pytorch)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Max pooling (MAC, Tolias et al.): ``(B, K, H, W) -> (B, K)``."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor, center_prior: bool = False) -> torch.Tensor:
    """Sum pooling (SPoC, Babenko & Lempitsky 2015), as a mean over positions: ``(B, K, H, W) -> (B, K)``.

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
    """Generalised mean pooling (Radenović et al.): ``mean(clamp(x, eps)^p)^(1/p)``; ``(B, K, H, W) -> (B, K)``."""
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def pool(x: torch.Tensor, method: str, p: float | torch.Tensor = 3.0) -> torch.Tensor:
    """Dispatch to :func:`gem`, :func:`mac` or :func:`spoc` by name (``gemmp``: :func:`gem` with a
    ``(K,)`` tensor ``p``, one exponent per channel); ``x``: ``(B, K, H, W)``, H, W >= 1."""
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
    """Combine L2-normalised per-scale descriptors ``[(B, K)] * S`` into one ``(B, K)``.

    Power mean over scales, ``(mean_s v_s^p)^(1/p)``, then L2 normalisation: ``p`` = GeM's p for
    GeM networks, 1 (average) for MAC (DSM paper 4.1; cnnimageretrieval-pytorch ``extract_ms``).
    """
    if len(per_scale) == 0:
        raise ValueError("multiscale_aggregate: no scales")
    stacked = torch.stack([F.normalize(v, dim=-1) for v in per_scale])
    combined = stacked.clamp(min=0).pow(p).mean(0).pow(1.0 / p) if p != 1 else stacked.mean(0)
    return F.normalize(combined, dim=-1)


class MAC(nn.Module):
    """L2-normalised MAC: ``(B, K, H, W) -> (B, K)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(mac(x), dim=-1)


class SPoC(nn.Module):
    """L2-normalised SPoC: ``(B, K, H, W) -> (B, K)``."""

    def __init__(self, center_prior: bool = False):
        super().__init__()
        self.center_prior = center_prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(spoc(x, self.center_prior), dim=-1)


class GeM(nn.Module):
    """L2-normalised GeM with a learnable ``p`` (default 3, Radenović et al.): ``(B, K, H, W) -> (B, K)``."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(gem(x, self.p, self.eps), dim=-1)

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4f}, eps={self.eps}"


def multiscale_p(method: str, p: float | torch.Tensor, network_whitening: bool = False) -> float:
    """Exponent used across scales, as cnnimageretrieval-pytorch's test script sets it: GeM's p for
    a ``gem`` network without a whitening layer; 1 (averaging) for MAC, SPoC, ``gemmp`` and any
    network that whitens inside."""
    return float(p) if method == "gem" and not network_whitening else 1.0


__all__ = ["mac", "spoc", "gem", "pool", "multiscale_aggregate", "multiscale_p", "MAC", "SPoC", "GeM", "POOLINGS"]
