"""Visual words: nearest-word assignment by squared L2 and a k-means codebook, in torch.

Both run on the descriptors' device, chunked so that a block of distances stays within a memory
budget. The reference trains its codebook with faiss; a torch k-means does not give the same
centroids (other initialisation and empty-cluster rule), so codebooks are judged by their
k-means objective and by retrieval, and exactness tests take the codebook as an input.
"""
from __future__ import annotations

import importlib.util

import torch

from gpu_dsm.checks import as_tensor


def _rows_per_chunk(num_words: int, itemsize: int, budget: int) -> int:
    return max(1, int(budget) // max(1, 3 * num_words * itemsize))


def nearest_words(descriptors: torch.Tensor, codebook: torch.Tensor, k: int = 1, memory_budget: int = 1 << 30
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest words of every descriptor by squared L2, nearest first.

    Args:
        descriptors: ``(F, d)`` float; codebook: ``(K, d)`` of the same dtype and device.
        k: words per descriptor (``k <= K``).
        memory_budget: bytes of one block of distances (``rows x K``).
    Returns:
        ``(words (F, k) int64, squared distances (F, k))``, computed in the inputs' dtype as
        ``|x|^2 - 2 x.c + |c|^2`` (float64 inputs give exact assignments up to ties).
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
    """:func:`nearest_words` of inputs its caller has already checked (finite, same device and
    width, ``1 <= k <= K``): the library's own loops call it so a block is not checked twice."""
    c = c.to(x.dtype)
    c2 = (c * c).sum(1)
    rows = _rows_per_chunk(c.shape[0], x.element_size(), memory_budget)
    words = torch.empty(x.shape[0], k, dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start:start + rows]
        d = (block * block).sum(1, keepdim=True) - 2 * block @ c.T + c2
        best, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
        words[start:start + rows], dists[start:start + rows] = idx, best.clamp(min=0)
    return words, dists


def kmeans_objective(descriptors: torch.Tensor, codebook: torch.Tensor, memory_budget: int = 1 << 30) -> float:
    """Mean squared distance of the descriptors to their nearest word (lower is better)."""
    return float(nearest_words(descriptors, codebook, 1, memory_budget)[1].double().mean())


def train_codebook(descriptors: torch.Tensor, size: int, iterations: int = 10, seed: int = 1234,
                   memory_budget: int = 1 << 30, backend: str = "torch", points_per_word: int | None = 256) -> torch.Tensor:
    """A ``(size, d)`` k-means codebook of ``descriptors (F, d)``, on their device.

    ``backend="torch"``: Lloyd iterations from ``size`` distinct descriptors drawn with ``seed``;
    a word that loses all its descriptors is moved onto the descriptor farthest from its word
    (so every word stays in use). ``points_per_word``: at most ``size * points_per_word``
    descriptors, drawn with ``seed``, are clustered (faiss' default subsampling, 256; ``None``: all).
    ``backend="faiss"`` (optional ``faiss-cpu``): ``faiss.Kmeans`` with the same iterations and
    seed, as the reference trains it (it subsamples the same way).
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

