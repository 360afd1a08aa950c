"""Nearest-neighbour search by cosine similarity of L2-normalised global descriptors."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    if k == 0:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.long)
    if 4 * k >= width:
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    top = scores.topk(k + 1, dim=1)
    kth = top.values[:, k - 1:k]
    top_indices = top.indices[:, :k]
    # the (k+1)-th below the k-th in every row: no tie at the k-th score (else count the scores that reach it)
    if bool((top.values[:, k] < top.values[:, k - 1]).all()) or bool(((scores >= kth).sum(1) == k).all()):
        positions = top_indices.sort(dim=1).values  # the top k as a set: no tie at the k-th score
    else:
        # of the scores equal to the k-th, the first ones by position fill the row up to k
        above, tied = scores > kth, scores == kth
        keep = above | (tied & (torch.cumsum(tied, 1) <= k - above.sum(1, keepdim=True)))
        positions = keep.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending positions
    order = torch.sort(scores.gather(1, positions), dim=1, descending=True, stable=True).indices
    return positions.gather(1, order)


#: global search backends: exact torch search (the default), compact search re-scored by the full
#: descriptors (torch), or a FAISS index (optional faiss-cpu)
SEARCH_BACKENDS = ("exact", "compact", "faiss-flat", "faiss-ivfpq", "faiss-hnsw")


@dataclass
class SearchConfig:
    """Which index serves the global search, and its parameters (FAISS's usual settings; the compact
    search's measured in docs "Scaling out")."""

    backend: str = field(default="exact", metadata={
        "flag": "--search-backend", "choices": SEARCH_BACKENDS,
        "help": "global search: exact torch products; compact, a scan of projected descriptors whose shortlist is "
                "re-scored exactly; or a FAISS index (optional package): faiss-flat exact, faiss-ivfpq and faiss-hnsw "
                "approximate (recall: python -m gpu_dsm.eval.bench_search)",
        "source": "exact: the reference every other backend is measured against"})
    ivf_lists: int | None = field(default=None, metadata={
        "flag": "--ivf-lists", "type": int, "help": "IVF-PQ coarse cells", "needs": {"backend": ("faiss-ivfpq",)},
        "default_text": "4 sqrt(N), at most N / 39", "source": "FAISS guidelines"})
    pq_bytes: int = field(default=32, metadata={
        "flag": "--pq-bytes", "help": "IVF-PQ bytes per vector (sub-quantisers of 8 bits); must divide the dimension",
        "needs": {"backend": ("faiss-ivfpq",)}, "source": "FAISS's usual setting"})
    nprobe: int = field(default=32, metadata={
        "flag": "--nprobe", "help": "IVF-PQ cells visited per query", "needs": {"backend": ("faiss-ivfpq",)},
        "source": "FAISS's usual setting"})
    hnsw_neighbours: int = field(default=32, metadata={
        "flag": "--hnsw-neighbours", "help": "HNSW links per node (M)", "needs": {"backend": ("faiss-hnsw",)},
        "source": "FAISS's usual setting"})
    ef_search: int = field(default=256, metadata={
        "flag": "--ef-search", "help": "HNSW candidate list while searching (>= k)",
        "needs": {"backend": ("faiss-hnsw",)}, "source": "FAISS's usual setting"})
    seed: int = 1234  # IVF-PQ training sample and k-means; compact: the projection's sample
    # compact: dimensions kept, the leading eigenvectors of the database's second moment; measured
    # (docs "Scaling out"): 64 scans 1/20 of the exact search's bytes of 1280-D descriptors and keeps
    # recall@100 1.0 at 1M simulated images, where 32 keeps 0.85-0.97
    compact_dim: int = field(default=64, metadata={
        "flag": "--compact-dim", "help": "compact search: dimensions of the projected descriptors scanned",
        "needs": {"backend": ("compact",)}, "source": "measured, docs 'Scaling out'"})
    # compact: candidates per query re-scored with the full descriptors; measured: recall@100 0.9997
    # (holidays-811 + 2,698 distractors) and 1.0 (roxford5k-19q + 2,698; 1M simulated); truncated
    # diffusion's R = 1000 images then all carry exact similarities
    shortlist: int = field(default=1000, metadata={
        "flag": "--shortlist", "help": "compact search: candidates per query re-scored with the full descriptors",
        "needs": {"backend": ("compact",)}, "source": "measured, docs 'Scaling out'"})
    compact_sample: int = 100_000  # compact: database rows the projection is learned from (seeded draw)
    # exact and compact: floats a search holds at once, its memory budget (64 MiB of float32): Q x
    # rows of scores per database chunk, the re-scored rows of a group of queries
    chunk_floats: int = 1 << 24

    def __post_init__(self):
        if self.backend not in SEARCH_BACKENDS:
            raise ValueError(f"unknown search backend {self.backend!r}; known: {SEARCH_BACKENDS}")
        for name in ("pq_bytes", "nprobe", "hnsw_neighbours", "ef_search", "compact_dim", "shortlist", "compact_sample",
                     "chunk_floats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)}")


class GlobalIndex:
    """Top-k search of global descriptors behind [`similarity_topk`][gpu_dsm.knn.similarity_topk]'s interface.

    ``GlobalIndex.build(database (N, D), SearchConfig(backend=...))`` then
    ``index.search(queries (Q, D), k) -> (scores (Q, k), indices (Q, k))``, on the queries' device.
    ``"exact"`` is [`similarity_topk`][gpu_dsm.knn.similarity_topk] (it keeps the database tensor, on its device, and moves
    it to the queries' device per search). ``"compact"`` ([`compact_projection`][gpu_dsm.knn.compact_projection]) keeps the
    database too, and beside it its projection on ``compact_dim`` leading eigenvectors of its second
    moment: a search scans the compact descriptors, re-scores each query's best ``shortlist`` by the
    full descriptors and ranks them by those exact similarities; what it loses is the images the
    compact scan leaves out of the shortlist (rows past the shortlist, when ``k`` asks for them, come
    in the compact order with compact scores). The FAISS backends (inner product) copy the database
    to the CPU as float32 and search there: ``"faiss-flat"`` exact, ``"faiss-ivfpq"`` and
    ``"faiss-hnsw"`` approximate (recall@k against exact search: ``python -m gpu_dsm.eval.bench_search``).

    Examples:
        >>> import torch
        >>> database = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # (N, D), L2-normalised
        >>> index = GlobalIndex.build(database, SearchConfig(backend="exact"))
        >>> index.num_images
        3
        >>> index.search(torch.tensor([[0.8, 0.6]]), k=5)  # k is capped at N
        (tensor([[0.9600, 0.8000, 0.6000]]), tensor([[2, 0, 1]]))
        >>> compact = GlobalIndex.build(database, SearchConfig(backend="compact", compact_dim=1, shortlist=2))
        >>> # one dimension: image 0 (0.8) misses the shortlist of 2, and comes third with its compact score
        >>> compact.search(torch.tensor([[0.8, 0.6]]), k=3)
        (tensor([[0.9600, 0.6000, 0.5760]]), tensor([[2, 1, 0]]))
    """

    def __init__(self, config: SearchConfig, database: torch.Tensor | None, faiss_index=None,
                 projection: torch.Tensor | None = None, compact: torch.Tensor | None = None):
        self.config = config
        self.database = database
        self.faiss_index = faiss_index
        self.projection = projection  # compact: (D, d)
        self.compact = compact  # compact: (N, d) database @ projection

    @property
    def num_images(self) -> int:
        """``N``, the database images indexed."""
        return int(self.database.shape[0]) if self.database is not None else int(self.faiss_index.ntotal)

    @classmethod
    def build(cls, database: torch.Tensor, config: SearchConfig | None = None) -> "GlobalIndex":
        """Index ``database`` ``(N, D)``: finite floating point, L2-normalised global descriptors
        (any device for ``"exact"`` and ``"compact"``, whose compact descriptors are on the
        database's device in its dtype; FAISS copies them to the CPU as float32)."""
        cfg = config or SearchConfig()
        database = as_tensor(database, "database", ndim=2, kind="float", finite=True)
        if cfg.backend == "exact":
            return cls(cfg, database)
        if cfg.backend == "compact":
            rows = max(1, int(cfg.chunk_floats) // database.shape[1])
            projection = compact_projection(database, cfg.compact_dim, cfg.compact_sample, cfg.seed, rows)
            compact = database.new_empty(database.shape[0], projection.shape[1])
            for lo in range(0, database.shape[0], rows):
                compact[lo:lo + rows] = database[lo:lo + rows] @ projection
            return cls(cfg, database, projection=projection, compact=compact)
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
            cosine similarities (the queries' dtype for ``"exact"`` and ``"compact"``, float32
            from FAISS) and int64 database rows; an approximate FAISS index marks a missing result
            with index ``-1``; ``"compact"``'s rows past its shortlist carry compact scores.
        """
        queries = as_tensor(queries, "queries", ndim=2, kind="float", finite=True)
        dim = self.database.shape[1] if self.database is not None else self.faiss_index.d
        if queries.shape[1] != dim:
            raise ValueError(f"queries are {queries.shape[1]}-D, the index {dim}-D")
        if int(k) < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if self.compact is not None:
            return self._compact_search(queries, int(k))
        if self.database is not None:
            # the database was checked once when the index was built: a search reads it once, for the products
            return _topk(queries, self.database.to(queries.device), k, self._chunk(queries))
        k = min(int(k), self.num_images)
        scores, indices = self.faiss_index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(indices).long().to(queries.device)

    def _chunk(self, queries: torch.Tensor) -> int:
        """Database rows scored at once: ``Q x rows`` scores within the memory budget."""
        return max(1, int(self.config.chunk_floats) // max(1, queries.shape[0]))

    def _compact_search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``"compact"`` search of checked queries: the compact top ``max(k, shortlist)``, its
        first ``shortlist`` re-scored exactly and re-ranked (equal scores in database order)."""
        k = min(k, self.num_images)
        shortlist = min(int(self.config.shortlist), self.num_images)
        approx, candidates = _topk(queries @ self.projection.to(queries.device), self.compact.to(queries.device),
                                   max(k, shortlist), self._chunk(queries))
        rows = candidates[:, :shortlist].sort(dim=1).values  # database order, so that equal scores keep it
        exact = rescore(queries, self.database, rows, self.config.chunk_floats)
        order = stable_top(exact, min(k, shortlist))
        scores = torch.cat([exact.gather(1, order), approx[:, shortlist:k]], dim=1)
        return scores, torch.cat([rows.gather(1, order), candidates[:, shortlist:k]], dim=1)


def compact_projection(database: torch.Tensor, dim: int, sample: int = 100_000, seed: int = 1234,
                       chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """``(D, d)`` the ``d = min(dim, D)`` leading eigenvectors of the second moment ``E[x x^T]`` of
    ``database`` ``(N, D)`` (at most ``sample`` rows drawn with ``seed``), largest eigenvalue first.

    ``q . x ~ (q P) . (x P)``: the uncentred moment keeps the inner products the search ranks by
    (PCA's centring would drop the mean direction they share). Float64 moments and eigenvectors,
    returned on the database's device in its dtype.

    Examples:
        >>> import torch
        >>> database = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.0, 0.8]])
        >>> compact_projection(database, 1).abs().argmax().item()  # the shared first axis
        0
    """
    n, d = database.shape
    generator = torch.Generator().manual_seed(int(seed))
    rows = torch.randperm(n, generator=generator)[:int(sample)].sort().values if n > sample else torch.arange(n)
    moment = torch.zeros(d, d, dtype=torch.float64, device=database.device)
    for lo in range(0, rows.numel(), chunk_rows):
        x = database[rows[lo:lo + chunk_rows].to(database.device)].double()
        moment += x.T @ x
    _, vectors = torch.linalg.eigh(moment)  # ascending eigenvalues
    keep = vectors[:, -min(int(dim), d):].flip(1)
    # an eigenvector's sign is arbitrary: make its largest entry positive, for one answer on every platform
    keep = keep * torch.sign(keep.gather(0, keep.abs().argmax(0, keepdim=True)))
    return keep.to(database.dtype)


def rescore(queries: torch.Tensor, database: torch.Tensor, rows: torch.Tensor, chunk_floats: int = 1 << 24) -> torch.Tensor:
    """``(Q, S)`` inner products of each query ``(Q, D)`` with its database rows ``rows (Q, S)``.

    The rows are read from ``database (N, D)`` (any device, memory maps included: only the rows
    asked for are read) and scored on the queries' device, as many queries at once as hold at most
    ``chunk_floats`` floats of rows (at least one).
    """
    out = queries.new_empty(rows.shape)
    per_chunk = max(1, chunk_floats // max(1, rows.shape[1] * database.shape[1]))
    for lo in range(0, rows.shape[0], per_chunk):
        block = rows[lo:lo + per_chunk]
        vectors = database[block.reshape(-1).to(database.device)].to(queries.device).view(*block.shape, database.shape[1])
        out[lo:lo + per_chunk] = torch.einsum("qd,qsd->qs", queries[lo:lo + per_chunk], vectors)
    return out


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("FAISS search backends need the faiss-cpu package: pip install -e \".[faiss]\"") from exc
    return faiss
