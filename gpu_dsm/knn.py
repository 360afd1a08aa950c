"""Nearest-neighbour search by cosine similarity of L2-normalised global descriptors."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gpu_dsm.checks import as_tensor


#: database rows scored at once by the exact search
CHUNK_ROWS = 65536


def similarity_topk(
    queries: torch.Tensor, database: torch.Tensor, k: int | None = None, chunk_size: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` database images per query by inner product, best first.

    Args:
        queries: ``(Q, D)``; database: ``(N, D)``; floating point of one dtype, L2-normalised,
            finite, on one device (numpy arrays are accepted and stay on the CPU).
        k: how many to return (``None``: all ``N``, a full ranking; capped at ``N``).
        chunk_size: database rows scored at once; bounds memory to ``Q * (k + chunk_size)`` scores.
    Returns:
        ``(scores, indices)``, both ``(Q, k)`` on the inputs' device: cosine similarities in the
        inputs' dtype, and int64 database rows; equal scores keep database order.

    Examples:
        >>> import torch
        >>> database = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
        >>> similarity_topk(torch.tensor([[0.8, 0.6]]), database, k=2)
        (tensor([[0.9600, 0.8000]]), tensor([[2, 0]]))
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
    if k is not None and int(k) < 0:
        raise ValueError(f"similarity_topk: k must be >= 0, got {k}")
    return _topk(queries, database, k, chunk_size)


def _topk(queries: torch.Tensor, database: torch.Tensor, k: int | None, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`similarity_topk` of checked inputs (a checked database is not scanned again)."""
    n = database.shape[0]
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
        order = stable_top(scores, k)
        best_scores, best_idx = scores.gather(1, order), idx.gather(1, order)
    return best_scores, best_idx


def stable_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of each row's ``k`` largest scores, best first, equal scores in position order.

    ``sort(descending, stable)[:, :k]`` exactly, by a top-k selection when ``k`` is a small part of
    the row (a full sort costs as much as the products).

    Args:
        scores: ``(Q, W)`` real scores, any device.
        k: ``0 <= k <= W``.
    Returns:
        ``(Q, k)`` int64 column positions on the device of ``scores``.

    Examples:
        >>> import torch
        >>> stable_top(torch.tensor([[0.1, 0.5, 0.5, 0.2]]), 2)
        tensor([[1, 2]])
    """
    width = scores.shape[1]
    if 4 * k >= width:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    top = scores.topk(k, dim=1)
    kth = top.values[:, -1:]
    if bool(((scores >= kth).sum(1) == k).all()):
        positions = top.indices.sort(dim=1).values  # the top k as a set: no tie at the k-th score
    else:
        # of the scores equal to the k-th, the first ones by position fill the row up to k
        above, tied = scores > kth, scores == kth
        keep = above | (tied & (torch.cumsum(tied, 1) <= k - above.sum(1, keepdim=True)))
        positions = keep.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending positions
    order = torch.sort(scores.gather(1, positions), dim=1, descending=True, stable=True).indices
    return positions.gather(1, order)


#: global search backends: exact torch search (the default), or a FAISS index (optional faiss-cpu)
SEARCH_BACKENDS = ("exact", "faiss-flat", "faiss-ivfpq", "faiss-hnsw")


@dataclass
class SearchConfig:
    """Which index serves the global search, and its parameters (FAISS's usual settings)."""

    backend: str = "exact"  # exact torch search: the reference every other backend is measured against
    ivf_lists: int | None = None  # IVF-PQ: coarse cells; None: 4 sqrt(N) (FAISS guidelines), at most N / 39
    pq_bytes: int = 32  # IVF-PQ: bytes per vector (sub-quantisers of 8 bits); must divide D
    nprobe: int = 32  # IVF-PQ: cells visited per query
    hnsw_neighbours: int = 32  # HNSW: M, links per node
    ef_search: int = 256  # HNSW: candidate list while searching (>= k)
    seed: int = 1234  # IVF-PQ training sample and k-means

    def __post_init__(self):
        if self.backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {self.backend!r}; known: {SEARCH_BACKENDS}")
        for name in ("pq_bytes", "nprobe", "hnsw_neighbours", "ef_search"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)}")


class GlobalIndex:
    """Top-k search of global descriptors behind [`similarity_topk`][gpu_dsm.knn.similarity_topk]'s interface.

    ``GlobalIndex.build(database (N, D), SearchConfig(backend=...))`` then
    ``index.search(queries (Q, D), k) -> (scores (Q, k), indices (Q, k))``, on the queries' device.
    ``"exact"`` is [`similarity_topk`][gpu_dsm.knn.similarity_topk] (it keeps the database tensor, on its device, and moves
    it to the queries' device per search); the FAISS backends (inner product) copy the database to
    the CPU as float32 and search there: ``"faiss-flat"`` exact, ``"faiss-ivfpq"`` and
    ``"faiss-hnsw"`` approximate (their recall@k against exact search:
    ``python -m gpu_dsm.eval.bench_search``).

    Examples:
        >>> import torch
        >>> database = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # (N, D), L2-normalised
        >>> index = GlobalIndex.build(database, SearchConfig(backend="exact"))
        >>> index.num_images
        3
        >>> index.search(torch.tensor([[0.8, 0.6]]), k=5)  # k is capped at N
        (tensor([[0.9600, 0.8000, 0.6000]]), tensor([[2, 0, 1]]))
    """

    def __init__(self, config: SearchConfig, database: torch.Tensor | None, faiss_index=None):
        self.config = config
        self.database = database
        self.faiss_index = faiss_index

    @property
    def num_images(self) -> int:
        """``N``, the database images indexed."""
        return int(self.database.shape[0]) if self.database is not None else int(self.faiss_index.ntotal)

    @classmethod
    def build(cls, database: torch.Tensor, config: SearchConfig | None = None) -> "GlobalIndex":
        """Index ``database`` ``(N, D)``: finite floating point, L2-normalised global descriptors
        (any device for ``"exact"``; FAISS copies them to the CPU as float32)."""
        cfg = config or SearchConfig()
        database = as_tensor(database, "database", ndim=2, kind="float", finite=True)
        if cfg.backend == "exact":
            return cls(cfg, database)
        faiss = _faiss()
        data = database.detach().float().cpu().contiguous().numpy()
        n, d = data.shape
        if cfg.backend == "faiss-flat":
            index = faiss.IndexFlatIP(d)
        elif cfg.backend == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, int(cfg.hnsw_neighbours), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = int(cfg.ef_search)
        else:
            if d % int(cfg.pq_bytes):
                raise ValueError(f"IVF-PQ: pq_bytes={cfg.pq_bytes} must divide the descriptor dimension {d}")
            lists = cfg.ivf_lists or max(1, min(int(4 * n ** 0.5), n // 39))
            if n < 256 or lists > n:
                raise ValueError(f"IVF-PQ needs at least 256 database vectors and one per cell, got {n} for {lists} cells")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, lists, int(cfg.pq_bytes), 8, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = int(cfg.seed)
            index.pq.cp.seed = int(cfg.seed)
            index.train(data)
            index.nprobe = int(cfg.nprobe)
        index.add(data)
        return cls(cfg, None, index)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of ``queries`` ``(Q, D)`` (finite floating point, L2-normalised), best first.

        Returns:
            ``(scores, indices)``, both ``(Q, k)`` (``k`` capped at ``N``) on the queries' device:
            cosine similarities (the queries' dtype for ``"exact"``, float32 from FAISS) and int64
            database rows; an approximate FAISS index marks a missing result with index ``-1``.
        """
        queries = as_tensor(queries, "queries", ndim=2, kind="float", finite=True)
        dim = self.database.shape[1] if self.database is not None else self.faiss_index.d
        if queries.shape[1] != dim:
            raise ValueError(f"queries are {queries.shape[1]}-D, the index {dim}-D")
        if int(k) < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if self.database is not None:
            # the database was checked once when the index was built: a search reads it once, for the products
            return _topk(queries, self.database.to(queries.device), k, CHUNK_ROWS)
        k = min(int(k), self.num_images)
        scores, indices = self.faiss_index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).long().to(queries.device)


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("FAISS search backends need the faiss-cpu package: pip install -e \".[faiss]\"") from exc
    return faiss
