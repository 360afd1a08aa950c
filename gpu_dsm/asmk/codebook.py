"""Visual words: nearest-word assignment by squared L2 and a k-means codebook, in torch.

Both run on the descriptors' device, chunked so that a block of distances stays within a memory
budget. The reference trains its codebook with faiss; a torch k-means does not give the same
centroids (other initialisation and empty-cluster rule), so codebooks are judged by their
k-means objective and by retrieval, and exactness tests take the codebook as an input.
"""
from __future__ import annotations

import importlib.util
import math

import torch

from gpu_dsm.checks import as_tensor
from gpu_dsm.kernels.precision import ieee_float32_matmul


# elements of one block of distances at most (64 MB in float32), whatever the budget allows: a
# block that fits in memory twice over is reused from chunk to chunk without new page faults
_BLOCK_ELEMENTS = 1 << 24


def _rows_per_chunk(num_words: int, itemsize: int, budget: int) -> int:
    return max(1, int(budget) // max(1, 3 * num_words * itemsize))


def nearest_words(descriptors: torch.Tensor, codebook: torch.Tensor, k: int = 1, memory_budget: int = 1 << 30
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest words of every descriptor by squared L2, nearest first.

    Args:
        descriptors: ``(F, d)`` finite floating point, any device; codebook: ``(K, d)`` finite
            floating point on the same device (cast to the descriptors' dtype).
        k: words per descriptor (``k <= K``).
        memory_budget: bytes of one block of distances (``rows x K``).
    Returns:
        ``(words (F, k) int64, squared distances (F, k))`` on the descriptors' device, the
        distances in their dtype, computed as ``|x|^2 + (|c|^2 - 2 x.c)``, words ranked by the
        bracket (float64 inputs give exact assignments up to ties). The products are IEEE float32
        for float32 inputs whatever the caller's TF32 / matmul precision settings
        ([`gpu_dsm.kernels.precision.ieee_float32_matmul`][kernels.precision.ieee_float32_matmul]).

    Examples:
        >>> import torch
        >>> codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])  # (K = 3, d = 2)
        >>> nearest_words(torch.tensor([[1.0, 1.0], [1.0, 8.0]]), codebook, k=2)
        (tensor([[0, 1],
                [2, 0]]), tensor([[ 2., 82.],
                [ 5., 65.]]))
    """
    x = as_tensor(descriptors, "descriptors", ndim=2, kind="float", finite=True)
    c = as_tensor(codebook, "codebook", ndim=2, kind="float", device=x.device, finite=True)
    if x.shape[1] != c.shape[1]:
        raise ValueError(f"descriptors are {x.shape[1]}-D but the codebook's words are {c.shape[1]}-D")
    if not 1 <= k <= c.shape[0]:
        raise ValueError(f"k must lie in 1..{c.shape[0]} (the codebook size), got {k}")
    return nearest_words_checked(x, c, k, memory_budget)


def nearest_words_checked(x: torch.Tensor, c: torch.Tensor, k: int, memory_budget: int = 1 << 30
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_words` of inputs its caller has already checked (finite floating point, same
    device and width, ``1 <= k <= K``): the library's own loops call it so a block is not checked
    twice. Same results (dtypes, device) as `nearest_words`."""
    c = c.to(x.dtype)
    # |x - c|^2 = |x|^2 + (|c|^2 - 2 x.c): words are ranked by the bracket, which one product of
    # [x, 1] with [-2c, |c|^2] gives without a pass for the sum; |x|^2 is added to the k kept
    augmented = torch.cat([-2 * c, (c * c).sum(1, keepdim=True)], 1).T
    rows = min(_rows_per_chunk(c.shape[0], x.element_size(), memory_budget), max(1, _BLOCK_ELEMENTS // c.shape[0]))
    words = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    # one distance block for all chunks (a fresh block per chunk costs its page faults every time)
    partial = torch.empty(min(rows, x.shape[0]), c.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        out = partial[:block.shape[0]]
        with ieee_float32_matmul():
            torch.mm(torch.cat([block, block.new_ones(block.shape[0], 1)], 1), augmented, out=out)
        best, idx = smallest(out, k)
        words[start:start + rows] = idx
        dists[start:start + rows] = (best + (block * block).sum(1, keepdim=True)).clamp(min=0)
    return words, dists


def _group_size(n: int, k: int) -> int | None:
    """A divisor of ``n`` near ``sqrt(n / k)`` (the group length that minimises the work of
    `smallest`), or ``None`` if there is none within a factor of 2."""
    target = math.sqrt(n / k)
    sizes = range(max(2, math.ceil(target / 2)), math.floor(2 * target) + 1)
    return next((s for s in sorted(sizes, key=lambda s: abs(s - target)) if n % s == 0), None)


def smallest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of every row of ``values (R, K)`` (real, any device), ascending,
    with their int64 columns, both ``(R, k)`` on the device of ``values``: what
    ``torch.topk(values, k, largest=False)`` gives (the same values; among equal values possibly
    other columns).

    Long rows go through group minima: the row is cut into groups of about ``sqrt(K / k)``
    columns; the ``k`` smallest entries lie in the ``k`` groups with the smallest minima (a group
    holding one of them has its minimum below it, and ``k`` groups with smaller minima would hold
    ``k`` smaller entries), so one cheap pass of minima and a top-k over ``k`` groups replace a
    top-k over the whole row (1.6x faster for 4096 words, k = 5, on the CPU)."""
    r, n = values.shape
    if k == 1:
        best, column = values.min(1, keepdim=True)
        return best, column
    size = _group_size(n, k)
    if size is None or n // size <= 2 * k:
        return torch.topk(values, k, dim=1, largest=False, sorted=True)
    minima = values.contiguous().view(r, n // size, size).amin(2)
    groups = torch.topk(minima, k, dim=1, largest=False, sorted=False).indices
    columns = (groups[:, :, None] * size + torch.arange(size, device=values.device)).flatten(1)
    best, position = torch.topk(values.gather(1, columns), k, dim=1, largest=False, sorted=True)
    return best, columns.gather(1, position)


def kmeans_objective(descriptors: torch.Tensor, codebook: torch.Tensor, memory_budget: int = 1 << 30) -> float:
    """Mean squared distance of ``descriptors (F, d)`` to their nearest word of ``codebook (K, d)``
    (squared descriptor units, computed in float64 from [`nearest_words`][gpu_dsm.asmk.nearest_words]; lower is better).

    Examples:
        >>> import torch
        >>> codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
        >>> kmeans_objective(torch.tensor([[1.0, 1.0], [9.0, 0.0]]), codebook)  # (2 + 1) / 2
        1.5
    """
    return float(nearest_words(descriptors, codebook, 1, memory_budget)[1].double().mean())


def train_codebook(descriptors: torch.Tensor, size: int, iterations: int = 10, seed: int = 1234,
                   memory_budget: int = 1 << 30, backend: str = "torch", points_per_word: int | None = 256) -> torch.Tensor:
    """A ``(size, d)`` k-means codebook of ``descriptors (F, d)`` (finite floating point), in their
    dtype, on their device.

    ``backend="torch"``: Lloyd iterations from ``size`` distinct descriptors drawn with ``seed``;
    a word that loses all its descriptors is moved onto the descriptor farthest from its word
    (so every word stays in use). ``points_per_word``: at most ``size * points_per_word``
    descriptors, drawn with ``seed``, are clustered (faiss' default subsampling, 256; ``None``: all).
    ``backend="faiss"`` (optional ``faiss-cpu``): ``faiss.Kmeans`` with the same iterations and
    seed, as the reference trains it (it subsamples the same way).

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> descriptors = torch.randn(200, 4)
        >>> codebook = train_codebook(descriptors, size=8, iterations=5)
        >>> codebook.shape, codebook.dtype
        (torch.Size([8, 4]), torch.float32)
        >>> kmeans_objective(descriptors, codebook) < kmeans_objective(descriptors, descriptors[:8])
        True
    """
    x = as_tensor(descriptors, "descriptors", ndim=2, kind="float", finite=True)
    if not 1 <= int(size):
        raise ValueError(f"codebook size must be >= 1, got {size}")
    if size > x.shape[0]:
        raise ValueError(f"a codebook of {size} words needs at least {size} training descriptors, got {x.shape[0]}")
    if points_per_word is not None and backend == "torch" and x.shape[0] > int(size) * int(points_per_word):
        sample = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))[: int(size) * int(points_per_word)]
        x = x[torch.sort(sample).values.to(x.device)]
    if backend == "faiss":
        if importlib.util.find_spec("faiss") is None:
            raise ImportError("train_codebook(backend='faiss') needs the faiss-cpu package: pip install -e \".[faiss]\"")
        import faiss

        km = faiss.Kmeans(x.shape[1], int(size), niter=int(iterations), seed=int(seed), verbose=False)
        km.train(x.detach().cpu().float().contiguous().numpy())
        return torch.from_numpy(km.centroids).to(device=x.device, dtype=x.dtype)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    start = torch.randperm(x.shape[0], generator=generator)[: int(size)].to(x.device)
    words = x[start].clone()
    for _ in range(int(iterations)):
        assigned, dists = nearest_words_checked(x, words, 1, memory_budget)
        assigned, dists = assigned[:, 0], dists[:, 0]
        counts = torch.bincount(assigned, minlength=words.shape[0])
        sums = torch.zeros_like(words).index_add_(0, assigned, x)
        empty = torch.nonzero(counts == 0).flatten()
        words = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None].to(x.dtype), words)
        if empty.numel():
            farthest = torch.topk(dists, min(empty.numel(), x.shape[0]), largest=True).indices
            words[empty[: farthest.numel()]] = x[farthest]
    return words

