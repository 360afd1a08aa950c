"""A plain reference of cnnimageretrieval-pytorch's descriptors (Radenović et al.), written from
its rules: ``ImageRetrievalNet.forward`` (features -> pooling -> L2 -> optional ``whiten`` layer
-> L2), ``extract_ss`` / ``extract_ms`` (scales averaged with power ``msp``, then L2), the test
script's choice of ``msp`` and of ``Lw['ss']`` / ``Lw['ms']``, and ``whitenapply``.

Inputs are already normalised image tensors; the network is any ``features`` module.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def l2n(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / (torch.norm(x, p=2, dim=1, keepdim=True) + eps).expand_as(x)


def pool(x: torch.Tensor, pooling: str, p: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    if pooling == "mac":
        return F.max_pool2d(x, (x.size(-2), x.size(-1)))
    if pooling == "spoc":
        return F.avg_pool2d(x, (x.size(-2), x.size(-1)))
    if pooling == "gem":
        return F.avg_pool2d(x.clamp(min=eps).pow(p), (x.size(-2), x.size(-1))).pow(1.0 / p)
    if pooling == "gemmp":
        pp = p.unsqueeze(-1).unsqueeze(-1)
        return F.avg_pool2d(x.clamp(min=eps).pow(pp), (x.size(-2), x.size(-1))).pow(1.0 / pp)
    raise ValueError(pooling)


def net_forward(features, pooling: str, p, whiten, x: torch.Tensor) -> torch.Tensor:
    o = features(x)
    o = l2n(pool(o, pooling, p)).squeeze(-1).squeeze(-1)
    if whiten is not None:
        o = l2n(F.linear(o, whiten[0], whiten[1]))
    return o.permute(1, 0)


def msp_of(pooling: str, p, scales, network_whitening: bool) -> float:
    """test.py: ``msp = net.pool.p`` if several scales, gem, not regional, no whitening layer; else 1."""
    if len(scales) > 1 and pooling == "gem" and not network_whitening:
        return float(p)
    return 1.0


def extract(features, pooling: str, p, whiten, image: torch.Tensor, scales) -> torch.Tensor:
    """``extract_ss`` for one scale, ``extract_ms`` for several: ``image`` (1, 3, H, W) normalised."""
    with torch.no_grad():
        if len(scales) == 1 and scales[0] == 1:
            return net_forward(features, pooling, p, whiten, image).squeeze()
        msp = msp_of(pooling, p, scales, whiten is not None)
        v = None
        for s in scales:
            x = image.clone() if s == 1 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False)
            out = net_forward(features, pooling, p, whiten, x).pow(msp).squeeze()
            v = out if v is None else v + out
        v = v / len(scales)
        v = v.pow(1.0 / msp)
        return v / v.norm()


def whitenapply(x: np.ndarray, m: np.ndarray, P: np.ndarray) -> np.ndarray:
    """cnnimageretrieval-pytorch ``whitenapply`` on column vectors ``x (D, N)``."""
    x = np.dot(P, x - m)
    return x / (np.linalg.norm(x, ord=2, axis=0, keepdims=True) + 1e-6)
