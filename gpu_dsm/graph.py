"""The k-nearest-neighbour graph of a database's global descriptors, for diffusion (Iscen et al. 2017).

``build_knn_graph`` keeps mutual neighbours (``j`` among the ``k`` nearest of ``i`` and ``i``
among those of ``j``), weights ``max(s, 0)^gamma``, zero diagonal, and stores the symmetrically
normalised affinity ``S = D^-1/2 W D^-1/2`` as a sparse CSR matrix. Isolated nodes (no mutual
neighbour) keep an empty row: diffusion cannot reach them and leaves their score at the seed's.

Neighbours are exact by default (chunked matrix products on the descriptors' device); the
``"faiss"`` backend (optional ``faiss-cpu`` package) searches approximately for databases too
large for that, behind the same interface.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpu_dsm.checks import as_tensor
from gpu_dsm.io import torch_load_checked, torch_save
from gpu_dsm.kernels.sparse import SparseOperator, csr_tensor

_FORMAT = "gpu_dsm.knn_graph/1"
BACKENDS = ("exact", "faiss")


@dataclass
class GraphConfig:
    """kNN graph parameters; defaults from the DSM paper's diffusion setting (Iscen et al. 2017)."""

    # neighbours per node; None: scaled to the database, neighbours(N) = round(k_fraction * N)
    # clamped to [k_min, k_max]; an int: that k
    k: int | None = field(default=None, metadata={
        "flag": "--graph-k", "type": int, "help": "neighbours per node of the mutual kNN graph",
        "default_text": "scaled to the database, 0.01 x images within [3, 50]: the paper's 50 from 5000 images on, "
                        "3 for a 133-image set",
        "source": "measured, docs 'Design decisions'"})
    k_fraction: float = 0.01  # 50 at the 5k images of R-Oxford/R-Paris, the paper's setting (measured, docs/design-decisions.md)
    k_min: int = 3  # the floor that keeps a 133-image database intact (measured on roxford5k-mini, docs/design-decisions.md)
    k_max: int = 50  # Iscen et al. and the DSM reference code use k = 50 for 5k to 1M images
    gamma: float = 3.0  # similarity exponent of the weights (Iscen et al.)
    mutual: bool = True  # keep mutual neighbours only (Iscen et al.)
    backend: str = field(default="exact", metadata={
        "flag": "--graph-backend", "choices": BACKENDS,
        "help": "exact chunked products, or approximate FAISS (optional package)", "source": "exact, as the paper"})
    chunk_size: int = 4096  # database rows per similarity block (exact backend): memory = chunk_size x N

    def __post_init__(self):
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1 (or None: scaled to the database), got {self.k}")
        if not (1 <= self.k_min <= self.k_max) or not (math.isfinite(self.k_fraction) and self.k_fraction > 0):
            raise ValueError(f"need 1 <= k_min <= k_max and k_fraction > 0, got {self.k_min}, {self.k_max}, {self.k_fraction}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"graph gamma must be > 0, got {self.gamma}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def neighbours(self, num_nodes: int) -> int:
        """The k used for a database of ``num_nodes`` images (at most ``num_nodes - 1``)."""
        k = self.k if self.k is not None else min(self.k_max, max(self.k_min, round(self.k_fraction * num_nodes)))
        return max(0, min(int(k), int(num_nodes) - 1))


@dataclass
class KnnGraph:
    """A database's kNN graph, as built by [`build_knn_graph`][gpu_dsm.graph.build_knn_graph].

    Fields:
        affinity: ``(N, N)`` sparse CSR float32 ``S = D^-1/2 W D^-1/2`` (symmetric, zero diagonal),
            on the device of the descriptors it was built from (or where [`load`][gpu_dsm.graph.KnnGraph.load] put it).
        k: neighbours per node used; gamma: the similarity exponent; mutual: mutual neighbours only.
    """

    affinity: torch.Tensor
    k: int
    gamma: float
    mutual: bool = True
    _operators: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def operator(self, dtype: torch.dtype = torch.float32, backend: str = "auto") -> SparseOperator:
        """The product operator of ``affinity`` for diffusion (node reordering, threads, connected
        components), built on first use and kept per ``(dtype, backend)``; ``backend`` as
        `SparseOperator`'s (``"torch"``, the GPU path, runs on any device)."""
        key = (dtype, backend)
        if key not in self._operators:
            self._operators[key] = SparseOperator(self.affinity, dtype, backend=backend)
        return self._operators[key]

    @property
    def num_nodes(self) -> int:
        """``N``, the database images."""
        return int(self.affinity.shape[0])

    @property
    def device(self) -> torch.device:
        """The device of ``affinity``."""
        return self.affinity.device

    @property
    def num_edges(self) -> int:
        """Stored non-zeros of ``affinity`` (each undirected edge counts twice)."""
        return int(self.affinity._nnz())

    def to(self, device: torch.device | str) -> "KnnGraph":
        """The same graph with ``affinity`` on ``device``."""
        return KnnGraph(self.affinity.to(device), self.k, self.gamma, self.mutual)

    def save(self, path: str | Path) -> Path:
        """Write the graph (its CSR arrays, from the CPU) to ``path``; returns the path."""
        a = self.affinity.cpu()
        state = {"format": _FORMAT, "k": self.k, "gamma": self.gamma, "mutual": self.mutual, "size": list(a.shape),
                 "crow": a.crow_indices(), "col": a.col_indices(), "values": a.values()}
        return torch_save(path, state)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "KnnGraph":
        """Read a graph written by [`save`][gpu_dsm.graph.KnnGraph.save], its affinity on ``device``."""
        state = torch_load_checked(path, _FORMAT, "graph")
        n = state["size"][0]
        if state["crow"].numel() != n + 1 or state["col"].numel() != state["values"].numel():
            raise ValueError(f"corrupt graph file {path}: index arrays do not match its size")
        affinity = csr_tensor(state["crow"], state["col"], state["values"], n)
        return cls(affinity.to(device), state["k"], state["gamma"], state["mutual"])


def _coo_to_csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (n, n)).coalesce().to_sparse_csr()


def exact_neighbours(x: torch.Tensor, k: int, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` nearest neighbours by inner product of every row of ``x``, itself excluded.

    Args:
        x: ``(N, D)`` floating point descriptors, any device; ``1 <= k <= N - 1``.
        chunk_size: rows per similarity block (memory: ``chunk_size x N`` scores).
    Returns:
        ``(similarities, indices)``, both ``(N, k)`` on the device of ``x``, best first:
        inner products in the dtype of ``x`` and int64 rows of ``x``.

    Examples:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
        >>> exact_neighbours(x, 1)
        (tensor([[0.8000],
                [0.8000],
                [0.6000]]), tensor([[1],
                [0],
                [1]]))
    """
    n = x.shape[0]
    sims, idx = [], []
    for start in range(0, n, chunk_size):
        block = x[start:start + chunk_size] @ x.T
        rows = torch.arange(start, start + block.shape[0], device=x.device)
        block[torch.arange(block.shape[0], device=x.device), rows] = float("-inf")
        s, i = block.topk(k, dim=1)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


def faiss_neighbours(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate neighbours with FAISS (HNSW, inner product); self excluded.

    Same arguments and results as [`exact_neighbours`][gpu_dsm.graph.exact_neighbours] (the search runs on the CPU in float32;
    similarities come back float32, indices int64, on the device of ``x``).
    """
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("the 'faiss' graph backend needs the faiss-cpu package (pip install gpu_dsm[faiss])") from exc
    data = x.detach().float().cpu().numpy()
    index = faiss.IndexHNSWFlat(data.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = max(2 * (k + 1), 64)
    index.add(data)
    sims, idx = index.search(data, k + 1)
    sims, idx = torch.from_numpy(sims), torch.from_numpy(idx)
    not_self = idx != torch.arange(len(idx))[:, None]
    # drop self (or the last neighbour when self was not returned)
    keep = torch.cumsum(not_self, 1) <= k
    keep &= not_self
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :k]
    return sims.gather(1, order).to(x.device), idx.gather(1, order).to(x.device).long()


def build_knn_graph(descriptors: torch.Tensor, config: GraphConfig | None = None) -> KnnGraph:
    """Mutual kNN graph of L2-normalised ``descriptors (N, D)``, on their device.

    ``k`` is ``config.neighbours(N)`` (a k larger than ``N - 1`` is clamped to ``N - 1``: every
    other node is a neighbour).

    Args:
        descriptors: ``(N, D)`` finite floating point (computed in float32), ``N > 0``, any device.
        config: neighbours, weight exponent and backend (default [`GraphConfig`][gpu_dsm.graph.GraphConfig]).
    Returns:
        [`KnnGraph`][gpu_dsm.graph.KnnGraph] whose ``affinity`` is an ``(N, N)`` sparse CSR float32 tensor on the
        descriptors' device.

    Examples:
        Two pairs of similar images; each image's nearest neighbour is its pair:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> x = F.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=1)
        >>> graph = build_knn_graph(x, GraphConfig(k=1))
        >>> graph.num_nodes, graph.num_edges, graph.affinity.layout
        (4, 4, torch.sparse_csr)
        >>> graph.affinity.to_dense().round(decimals=4)
        tensor([[0., 1., 0., 0.],
                [1., 0., 0., 0.],
                [0., 0., 0., 1.],
                [0., 0., 1., 0.]])
    """
    cfg = config or GraphConfig()
    descriptors = as_tensor(descriptors, "descriptors", kind="float")
    if descriptors.ndim != 2 or descriptors.shape[0] == 0:
        raise ValueError(f"build_knn_graph: expected (N > 0, D) descriptors, got {tuple(descriptors.shape)}")
    if not torch.isfinite(descriptors).all():
        raise ValueError("build_knn_graph: descriptors contain NaN or Inf")
    x = descriptors.float()
    n = x.shape[0]
    device = x.device
    k = cfg.neighbours(n)
    if k < 1:
        empty = csr_tensor(torch.zeros(n + 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), n).to(device)
        return KnnGraph(empty, k, cfg.gamma, cfg.mutual)
    sims, idx = exact_neighbours(x, k, cfg.chunk_size) if cfg.backend == "exact" else faiss_neighbours(x, k)
    rows = torch.arange(n, device=device).repeat_interleave(k)
    cols = idx.reshape(-1)
    weights = sims.reshape(-1).clamp(min=0).pow(cfg.gamma)
    if cfg.mutual:
        # (i, j) is kept when (j, i) is also an edge: look the reverse key up among the sorted keys
        key = rows * n + cols
        sorted_key, _ = torch.sort(key)
        reverse = cols * n + rows
        pos = torch.searchsorted(sorted_key, reverse).clamp(max=key.numel() - 1)
        keep = (sorted_key[pos] == reverse) & (weights > 0)
        rows, cols, weights = rows[keep], cols[keep], weights[keep]
    else:
        # union of both directions, an edge found twice keeps its (equal) weight once
        key = torch.cat([rows * n + cols, cols * n + rows])
        unique, inverse = torch.unique(key, return_inverse=True)
        weights = torch.zeros(unique.numel(), device=device).scatter_reduce_(0, inverse, torch.cat([weights, weights]), "amax")
        rows, cols = unique // n, unique % n
        keep = weights > 0
        rows, cols, weights = rows[keep], cols[keep], weights[keep]
    return KnnGraph(normalised_affinity(rows, cols, weights, n), k, cfg.gamma, cfg.mutual)


def normalised_affinity(rows: torch.Tensor, cols: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """``S = D^-1/2 W D^-1/2`` as a sparse ``(n, n)`` CSR tensor from the edges of a symmetric ``W``
    (each edge listed in both directions, weights > 0); a node without edges keeps an empty row.

    ``rows``, ``cols``: ``(E,)`` int64 node indices; ``weights``: ``(E,)`` floating point, on their
    device. The result has the dtype and device of ``weights``.

    Examples:
        >>> import torch
        >>> S = normalised_affinity(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2.0, 2.0]), 3)
        >>> S.to_dense().round(decimals=4)
        tensor([[0., 1., 0.],
                [1., 0., 0.],
                [0., 0., 0.]])
    """
    degree = torch.zeros(n, device=weights.device, dtype=weights.dtype).index_add_(0, rows, weights)
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1e-30).rsqrt(), torch.zeros_like(degree))
    return _coo_to_csr(rows, cols, weights * inv_sqrt[rows] * inv_sqrt[cols], n)
