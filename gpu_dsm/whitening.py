"""Learned whitening of global descriptors: PCA whitening and supervised whitening (Lw).

A [`Whitening`][gpu_dsm.whitening.Whitening] is an affine map ``y = P x + b`` (``P``: ``(d, D)``, ``b``: ``(d,)``)
followed by L2 normalisation. It is fitted once, saved, loaded and applied:

- [`fit_pca_whitening`][gpu_dsm.whitening.fit_pca_whitening]: PCA whitening learned on a set of descriptors (SPoC paper;
  cnnimageretrieval-pytorch ``pcawhitenlearn``).
- [`fit_supervised_whitening`][gpu_dsm.whitening.fit_supervised_whitening]: Mikolajczyk & Matas' learned whitening from matching pairs
  (cnnimageretrieval-pytorch ``whitenlearn``; DSM paper 4.1 "supervised whitening"):
  ``m = mean(X_q)``, ``S = cov(X_q - X_p)``, ``P = chol(S)^-1``, then rotate by the eigenvectors
  of ``P (X - m) (X - m)^T P^T`` sorted by decreasing eigenvalue.

Examples:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> descriptors = torch.randn(50, 6)  # (N, D) float32
    >>> whitening = fit_pca_whitening(descriptors, dim=4)
    >>> whitening.method, tuple(whitening.projection.shape), whitening.projection.dtype
    ('pca', (4, 6), torch.float32)
    >>> whitened = whitening.apply(descriptors)  # (N, 4), L2-normalised
    >>> whitened.shape, round(float(whitened[0].norm()), 4)
    (torch.Size([50, 4]), 1.0)
    >>> projected = whitening.project(descriptors)  # without L2: identity covariance
    >>> torch.allclose(projected.T @ projected / 50, torch.eye(4), atol=1e-4)
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_dsm.checks import as_tensor
from gpu_dsm.io import torch_load_checked, torch_save

_FORMAT = "gpu_dsm.whitening/1"


@dataclass
class Whitening:
    """Affine whitening ``y = l2n(P[:dim] x + b[:dim])``; rows of ``P`` sorted by importance.

    Fields:
        projection: ``(d, D)`` floating point ``P`` (float32 when fitted here), mapping ``D``-dim
            descriptors to ``d`` dimensions.
        bias: ``(d,)`` ``b``, same dtype and device as ``projection``.
        method: how it was learned: ``"pca"``, ``"supervised"`` (or a checkpoint's label).

    [`apply`][gpu_dsm.whitening.Whitening.apply] and [`project`][gpu_dsm.whitening.Whitening.project] compute in the descriptors' dtype on their device (the
    parameters are moved there); [`save`][gpu_dsm.whitening.Whitening.save] writes them from the CPU.
    """

    projection: torch.Tensor  # (d, D)
    bias: torch.Tensor  # (d,)
    method: str = "pca"

    @classmethod
    def from_mean_projection(cls, mean: torch.Tensor, projection: torch.Tensor, method: str) -> "Whitening":
        """Build from the ``(m, P)`` form ``P (x - m)``: ``mean`` ``(D,)``, ``projection``
        ``(d, D)``, of one dtype on one device (kept as given)."""
        return cls(projection=projection, bias=-(projection @ mean), method=method)

    @property
    def input_dim(self) -> int:
        """``D``, the dimension of the descriptors it takes."""
        return int(self.projection.shape[1])

    @property
    def output_dim(self) -> int:
        """``d``, the largest dimension it produces."""
        return int(self.projection.shape[0])

    def apply(self, descriptors: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """Whiten ``(N, D)`` finite floating point descriptors to ``(N, dim)`` L2-normalised ones
        (``dim`` defaults to all ``d``), in the descriptors' dtype, on their device."""
        return F.normalize(self.project(descriptors, dim), dim=-1)

    def project(self, descriptors: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """The affine map alone, ``(N, D) -> (N, dim)`` ``P[:dim] x + b[:dim]``, without L2
        normalisation (HOW's reduction keeps the raw projected vectors); in the descriptors'
        dtype, on their device."""
        descriptors = as_tensor(descriptors, "descriptors", kind="float", finite=True)
        if descriptors.ndim != 2 or descriptors.shape[1] != self.input_dim:
            raise ValueError(
                f"whitening expects descriptors of shape (N, {self.input_dim}), got {tuple(descriptors.shape)}"
            )
        dim = self.output_dim if dim is None else int(dim)
        if not 0 < dim <= self.output_dim:
            raise ValueError(f"whitening dim must be in 1..{self.output_dim}, got {dim}")
        proj = self.projection[:dim].to(descriptors)
        bias = self.bias[:dim].to(descriptors)
        return descriptors @ proj.T + bias

    def save(self, path: str | Path) -> Path:
        """Write the parameters (moved to the CPU) to ``path`` (``torch.save`` format); returns the path."""
        state = {"format": _FORMAT, "method": self.method, "projection": self.projection.cpu(), "bias": self.bias.cpu()}
        return torch_save(path, state)

    @classmethod
    def load(cls, path: str | Path) -> "Whitening":
        """Read a whitening written by [`save`][gpu_dsm.whitening.Whitening.save]; its tensors are on the CPU."""
        state = torch_load_checked(path, _FORMAT, "whitening")
        return cls(projection=state["projection"], bias=state["bias"], method=state["method"])


def _check_descriptors(x: torch.Tensor, what: str) -> torch.Tensor:
    x = as_tensor(x, f"{what}: descriptors", kind="float")
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what}: expected (N >= 2, D) descriptors, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: descriptors contain NaN or Inf")
    return x.double()


def _sorted_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    order = values.argsort(descending=True)
    return values[order], vectors[:, order]


def fit_pca_whitening(descriptors: torch.Tensor, dim: int | None = None, eps: float = 1e-6) -> Whitening:
    """PCA whitening of ``(N, D)`` finite floating point descriptors (``N >= 2``).

    ``dim`` defaults to the numerical rank (at most ``N - 1``): directions with an eigenvalue
    below ``eps`` times the largest carry no information and would be blown up by 1/sqrt.
    Fitted in float64; the [`Whitening`][gpu_dsm.whitening.Whitening] holds float32 ``(dim, D)`` / ``(dim,)`` tensors on
    the descriptors' device.
    """
    x = _check_descriptors(descriptors, "fit_pca_whitening")
    mean = x.mean(0)
    centred = x - mean
    values, vectors = _sorted_eigh(centred.T @ centred / x.shape[0])
    rank = int((values > eps * values[0].clamp_min(1e-300)).sum())
    dim = rank if dim is None else min(int(dim), rank)
    if dim < 1:
        raise ValueError("fit_pca_whitening: the descriptors have no variance")
    projection = vectors[:, :dim].T / values[:dim].sqrt()[:, None]
    return Whitening.from_mean_projection(mean.float(), projection.float(), method="pca")


def fit_supervised_whitening(
    descriptors: torch.Tensor, query_idx: torch.Tensor, positive_idx: torch.Tensor, eps: float = 1e-9
) -> Whitening:
    """Supervised (Mikolajczyk & Matas) whitening from matching pairs ``(query_idx[i], positive_idx[i])``.

    ``descriptors``: ``(N, D)`` finite floating point, on the CPU; the index tensors: ``(M,)``
    integer rows of ``descriptors``. ``eps`` is a ridge (relative to the mean variance) added to
    the intra-pair covariance, so it is invertible also with fewer pairs than dimensions. Fitted in
    float64; the [`Whitening`][gpu_dsm.whitening.Whitening] holds float32 ``(D, D)`` / ``(D,)`` tensors on the CPU.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> queries = torch.randn(20, 6)
        >>> descriptors = torch.cat([queries, queries + 0.1 * torch.randn(20, 6)])  # image i matches 20 + i
        >>> pairs = torch.arange(20)
        >>> whitening = fit_supervised_whitening(descriptors, pairs, pairs + 20)
        >>> whitening.method, whitening.apply(descriptors).shape
        ('supervised', torch.Size([40, 6]))
    """
    x = _check_descriptors(descriptors, "fit_supervised_whitening")
    query_idx = torch.as_tensor(query_idx, dtype=torch.long)
    positive_idx = torch.as_tensor(positive_idx, dtype=torch.long)
    if query_idx.shape != positive_idx.shape or query_idx.ndim != 1 or len(query_idx) == 0:
        raise ValueError("fit_supervised_whitening: query_idx and positive_idx must be 1-d, non-empty, of equal length")
    mean = x[query_idx].mean(0)
    diff = x[query_idx] - x[positive_idx]
    intra = diff.T @ diff / diff.shape[0]
    ridge = eps * intra.diagonal().mean().clamp_min(1e-12)
    chol = torch.linalg.cholesky(intra + ridge * torch.eye(x.shape[1], dtype=x.dtype))
    proj = torch.linalg.inv(chol)
    rotated = (x - mean) @ proj.T
    _, vectors = _sorted_eigh(rotated.T @ rotated)
    projection = vectors.T @ proj
    return Whitening.from_mean_projection(mean.float(), projection.float(), method="supervised")


def pca_whitening_from_moments(count: int, total: torch.Tensor, outer: torch.Tensor, dim: int | None = None,
                               clip: float = 1e-14) -> Whitening:
    """PCA whitening from streamed moments of ``count`` descriptors: ``total = sum x`` ``(D,)`` and
    ``outer = sum x x^T`` ``(D, D)`` (float64 sums, on one device), so a large set never has to be
    in memory. The [`Whitening`][gpu_dsm.whitening.Whitening] holds float32 ``(dim, D)`` / ``(dim,)`` tensors on their device.

    HOW's rule (the reference's ``pcawhitenlearn_shrinkage`` with shrinkage 1): covariance over
    ``count``, eigenvalues sorted descending and clipped at ``clip``, ``P`` = the first ``dim`` rows
    of ``Lambda^-1/2 E^T``, ``y = P (x - m)``; [`Whitening.project`][gpu_dsm.whitening.Whitening.project] applies it without L2.
    """
    if count < 2:
        raise ValueError(f"PCA whitening needs at least 2 descriptors, got {count}")
    total, outer = total.double(), outer.double()
    if total.ndim != 1 or outer.shape != (total.numel(), total.numel()):
        raise ValueError(f"moments: total {tuple(total.shape)} and outer {tuple(outer.shape)} do not fit together")
    if not (torch.isfinite(total).all() and torch.isfinite(outer).all()):
        raise ValueError("moments contain NaN or Inf")
    mean = total / count
    values, vectors = _sorted_eigh(outer / count - torch.outer(mean, mean))
    dim = total.numel() if dim is None else min(int(dim), total.numel())
    projection = vectors[:, :dim].T / values[:dim].clamp(min=clip).sqrt()[:, None]
    return Whitening.from_mean_projection(mean.float(), projection.float(), method="pca")


def resolve_whitening(choice: "str | Path | Whitening | None", head, num_scales: int) -> tuple[str | None, Whitening | None]:
    """``(label, whitening)`` applied to global descriptors at search time, from one choice:

    - ``None``: the learned whitening of the weights (``head``, a
      `gpu_dsm.backbones.checkpoint.RetrievalHead`: cnnimageretrieval-pytorch's
      ``meta['Lw'][name]['ms']`` for several scales, ``['ss']`` for one) if they carry one, else none;
    - ``"checkpoint"`` or ``"checkpoint:NAME"``: the weights' learned whitening (required);
    - ``"none"``: none;
    - a [`Whitening`][gpu_dsm.whitening.Whitening], or the path of a saved one.
    """
    if isinstance(choice, Whitening):
        return "given", choice
    if choice is None or str(choice).startswith("checkpoint"):
        name = str(choice).split(":", 1)[1] if choice is not None and ":" in str(choice) else None
        learned = head.post_whitening(num_scales, name) if head is not None else None
        if learned is None and choice is not None:
            raise ValueError(f"whitening {choice}: the weights have no learned whitening (meta['Lw'])")
        return learned if learned is not None else (None, None)
    if str(choice) == "none":
        return None, None
    return str(choice), Whitening.load(choice)
