"""Aggregated residuals per (image, visual word) and their codes (ASMK, Tolias et al. 2013; HOW).

For every feature ``x`` of an image and each of its nearest words ``c`` the residual ``x - c`` is
added to the image's vector for ``c``: ``V_c = sum (x - c)``. A binary code keeps the sign after
aggregation (bit = ``V_c > 0``; an exact 0 is the "-1" bit), packed 8 bits per byte; the
non-binary code is ``V_c / (||V_c|| + 1e-6)``. Similarity of two codes: ``s = b.b' / d`` in
[-1, 1], for packed bits ``1 - 2 hamming / d``. A dimension that is not a multiple of 8 is padded
with zero bits in every code, so the padding never differs and ``d`` stays the true dimension.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from gpu_dsm.checks import as_tensor, check_shape
from gpu_dsm.asmk.codebook import nearest_words_checked
from gpu_dsm.kernels.bits import hamming

_BIT_WEIGHTS = [1 << i for i in range(8)]


@dataclass
class WordVectors:
    """Aggregated residuals, one row per (image, word) pair present, sorted by image then word.

    ``image (E,)`` int64, ``word (E,)`` int64, ``vector (E, d)`` float64 sums of residuals
    (descriptor units), all on the descriptors' device.
    """

    image: torch.Tensor
    word: torch.Tensor
    vector: torch.Tensor


def aggregate_residuals(descriptors: torch.Tensor, image_ids: torch.Tensor, codebook: torch.Tensor, assignments: int,
                        memory_budget: int = 1 << 30) -> WordVectors:
    """[`WordVectors`][gpu_dsm.asmk.WordVectors] of ``descriptors (F, d)`` of images ``image_ids (F,)`` (int >= 0), each
    feature assigned to its ``assignments`` nearest words of ``codebook (K, d)``.

    ``descriptors`` and ``codebook`` are finite floating point, ``image_ids`` integer, all on one
    device. Residuals are summed in float64 (a float32 sum in another order could flip the sign of
    a near-zero sum). Features are processed image-contiguously in chunks within ``memory_budget``
    bytes; no loop runs per feature, word or image.

    Examples:
        Three features of two images, each assigned to its nearest of three words:

        >>> import torch
        >>> codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
        >>> features = torch.tensor([[1.0, 1.0], [9.0, 1.0], [1.0, 8.0]])
        >>> vectors = aggregate_residuals(features, torch.tensor([0, 0, 1]), codebook, assignments=1)
        >>> vectors.image, vectors.word
        (tensor([0, 0, 1]), tensor([0, 1, 2]))
        >>> vectors.vector  # feature - its word, summed per (image, word)
        tensor([[ 1.,  1.],
                [-1.,  1.],
                [ 1., -2.]], dtype=torch.float64)
    """
    x = as_tensor(descriptors, "descriptors", ndim=2, kind="float", finite=True)
    ids = as_tensor(image_ids, "image_ids", ndim=1, kind="int", device=x.device)
    check_shape(ids, (x.shape[0],), "image_ids (one per descriptor)")
    c = as_tensor(codebook, "codebook", ndim=2, kind="float", device=x.device, finite=True).to(x.dtype)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("image_ids must be >= 0")
    d, k = x.shape[1], c.shape[0]
    if c.shape[1] != d:
        raise ValueError(f"descriptors are {d}-D but the codebook's words are {c.shape[1]}-D")
    if not 1 <= assignments <= k:
        raise ValueError(f"assignments must lie in 1..{k} (the codebook size), got {assignments}")
    if x.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return WordVectors(empty, empty.clone(), torch.zeros(0, d, dtype=torch.float64, device=x.device))
    order = torch.argsort(ids, stable=True)
    x, ids = x[order], ids[order].long()
    per_row = assignments * d * 8 * 3 + k * x.element_size() * 3
    rows = max(1, int(memory_budget) // per_row)
    # cut chunks at image boundaries so that no (image, word) pair spans two chunks
    bounds = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1,
                        torch.full((1,), x.shape[0], dtype=torch.long, device=x.device)]).tolist()
    cuts, begin = [], 0
    while begin < x.shape[0]:
        end = bounds[bisect.bisect_right(bounds, begin + rows) - 1]
        if end <= begin:  # one image alone exceeds the budget: it still goes in one chunk
            end = bounds[bisect.bisect_right(bounds, begin)]
        cuts.append((begin, end))
        begin = end
    images, words, vectors = [], [], []
    for lo, hi in cuts:
        block, block_ids = x[lo:hi], ids[lo:hi]
        nearest, _ = nearest_words_checked(block, c, assignments, memory_budget)
        residual = (block[:, None, :].double() - c[nearest].double()).reshape(-1, d)
        keys = (block_ids[:, None] * k + nearest).reshape(-1)
        unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        sums = torch.zeros(unique.numel(), d, dtype=torch.float64, device=x.device).index_add_(0, inverse, residual)
        images.append(unique // k)
        words.append(unique % k)
        vectors.append(sums)
    return WordVectors(torch.cat(images), torch.cat(words), torch.cat(vectors))


def binary_codes(vectors: torch.Tensor) -> torch.Tensor:
    """``(E, ceil(d / 8))`` uint8 from real ``vectors (E, d)``, on their device: bit ``j`` (least
    significant first) of a code is ``vectors[:, j] > 0`` (zero padded).

    Examples:
        >>> import torch
        >>> binary_codes(torch.tensor([[1.0, -2.0, 0.0, 3.0]]))  # bits 0 and 3: 1 + 8
        tensor([[9]], dtype=torch.uint8)
    """
    e, d = vectors.shape
    bits = vectors > 0
    pad = (-d) % 8
    if pad:
        bits = torch.cat([bits, torch.zeros(e, pad, dtype=torch.bool, device=bits.device)], 1)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=bits.device)
    return (bits.view(e, bits.shape[1] // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def normalized_codes(vectors: torch.Tensor) -> torch.Tensor:
    """Non-binary codes ``V / (||V|| + 1e-6)`` of ``vectors (E, d)``: same shape, dtype (float64
    from `aggregate_residuals`, as the reference) and device."""
    return vectors / (vectors.norm(dim=1, keepdim=True) + 1e-6)


def code_similarity(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """Row-wise ``s`` of codes ``a``, ``b`` (same shape ``(E, B)``, same device): packed bits
    (uint8) -> ``1 - 2 hamming / dim``; float codes -> their dot product. ``(E,)`` float64.

    Examples:
        >>> import torch
        >>> code_similarity(torch.tensor([[0b1011]], dtype=torch.uint8), torch.tensor([[0b0011]], dtype=torch.uint8), dim=4)
        tensor([0.5000], dtype=torch.float64)
    """
    if a.dtype == torch.uint8:
        return 1.0 - 2.0 * hamming(a, b).double() / dim
    return (a * b).sum(-1).double()


def match_weights(a: torch.Tensor, b: torch.Tensor, dim: int, alpha: float, tau: float) -> torch.Tensor:
    """Row-wise ``sigma(s)`` of codes ``a``, ``b`` (``(E, B)``, one device): ``(E,)`` float64.
    Packed bits: ``s`` takes one of the ``d + 1`` values ``1 - 2 h / d``, so ``sigma`` is read from
    a table indexed by the Hamming distance ``h`` (the same float64 values `selectivity`
    computes, in one gather)."""
    if a.dtype == torch.uint8:
        return distance_weights(a.shape[-1], dim, alpha, tau, a.device)[hamming(a, b)]
    return selectivity(code_similarity(a, b, dim), alpha, tau)


def distance_weights(width: int, dim: int, alpha: float, tau: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(8 width + 1,)`` float64 on ``device``: ``sigma(1 - 2 h / dim)`` for every Hamming
    distance ``h`` (bits) of packed codes of ``width`` bytes."""
    distances = torch.arange(8 * width + 1, device=device, dtype=torch.float64)
    return selectivity(1.0 - 2.0 * distances / dim, alpha, tau)


def selectivity(s: torch.Tensor, alpha: float, tau: float) -> torch.Tensor:
    """``sigma(s) = sign(s) |s|^alpha`` where ``s >= tau``, else 0 (for ``tau = 0``: ``s^alpha`` or 0);
    elementwise, in the dtype and on the device of ``s``.

    Examples:
        >>> import torch
        >>> selectivity(torch.tensor([-0.5, 0.0, 0.5, 1.0]), alpha=3.0, tau=0.0)
        tensor([0.0000, 0.0000, 0.1250, 1.0000])
    """
    return torch.where(s >= tau, torch.sign(s) * s.abs().pow(alpha), torch.zeros_like(s))
