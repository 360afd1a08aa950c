"""Nearest-neighbour search by cosine similarity of L2-normalised global descriptors."""
from __future__ import annotations

import torch

from gpu_dsm.checks import as_tensor


def similarity_topk(
    queries: torch.Tensor, database: torch.Tensor, k: int | None = None, chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` database images per query by inner product, best first.

    Args:
        queries: ``(Q, D)``; database: ``(N, D)``; both L2-normalised, finite, same device
            (numpy arrays are accepted).
        k: how many to return (``None``: all ``N``, a full ranking).
        chunk_size: database rows scored at once; bounds memory to ``Q * (k + chunk_size)`` scores.
    Returns:
        ``(scores (Q, k), indices (Q, k))``; equal scores keep database order.
    """
    queries = as_tensor(queries, "queries", kind="float")
    database = as_tensor(database, "database", kind="float")
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"similarity_topk: expected (Q, D) and (N, D), got {tuple(queries.shape)} and {tuple(database.shape)}")
    if queries.device != database.device:
        raise ValueError(f"similarity_topk: queries on {queries.device}, database on {database.device}")
    # a NaN row would rank first (or leave the database order) without a word
    as_tensor(queries, "queries", finite=True)
    as_tensor(database, "database", finite=True)
    n = database.shape[0]
    if k is not None and int(k) < 0:
        raise ValueError(f"similarity_topk: k must be >= 0, got {k}")
    k = n if k is None else min(int(k), n)
    if n == 0 or k == 0:
        empty = queries.new_zeros(queries.shape[0], 0)
        return empty, empty.long()
    best_scores = best_idx = None
    for start in range(0, n, chunk_size):
        scores = queries @ database[start:start + chunk_size].T
        idx = torch.arange(start, start + scores.shape[1], device=scores.device).expand_as(scores)
        if best_scores is not None:
            scores = torch.cat([best_scores, scores], 1)
            idx = torch.cat([best_idx, idx], 1)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_idx = scores.gather(1, order), idx.gather(1, order)
    return best_scores, best_idx
