"""Sparse-matrix times dense-matrix products, the inner loop of diffusion, with a CPU and a GPU path.

``SparseOperator(S)`` wraps a symmetric sparse ``(N, N)`` tensor for repeated products with
dense ``X`` ``(N, Q)``: ``S @ X`` and the conjugate-gradient operator ``X - alpha S X``
(`SparseOperator.shifted_product`). It works in an internal node order; callers move dense
matrices in and out with `to_internal` / `from_internal`. `restricted` gives
the operator of an induced sub-graph (e.g. the connected components a batch of queries reaches,
`reached_by`); `induced_blocks` the block-diagonal operator of one induced sub-graph
per query (truncated diffusion).

- ``"scipy"`` (the CPU path): the reverse Cuthill-McKee order, which puts graph neighbours close
  in memory (1.4x faster products on a 20k-node kNN graph), and scipy's compiled CSR kernel
  ``csr_matvecs``, which accumulates into a preallocated output (a fresh 40 MB result per
  iteration costs page faults) and releases the GIL, so row blocks of equal non-zero counts run
  on ``threads`` threads (1.6x on 2 cores). ``X - alpha S X`` is one pass: the output starts as
  ``X`` and the kernel adds ``(-alpha S) X``. If scipy's private kernel is missing, its public
  product is used (same results, slower).
- ``"torch"`` (any device; the GPU path): torch's CSR product in the given order (cuSPARSE on
  CUDA); on the CPU it is 2x slower than the scipy path.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

BACKENDS = ("auto", "scipy", "torch")


def _csr_matvecs():
    """scipy's ``Y += A X`` kernel for CSR ``A`` (private API), or None."""
    try:
        from scipy.sparse import _sparsetools

        return getattr(_sparsetools, "csr_matvecs", None)
    except ImportError:
        return None


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """An ``(n, n)`` torch CSR tensor, without torch's beta warning.

    Args:
        crow: ``(n + 1,)`` row pointers; col: ``(nnz,)`` column indices; both int64 (or both int32).
        values: ``(nnz,)`` the non-zeros, any dtype; all three on one device.
        n: the rows and columns.
    Returns:
        sparse CSR ``(n, n)`` in the dtype of ``values``, on their device.

    Examples:
        The path graph ``0 - 1 - 2``:

        >>> import torch
        >>> S = csr_tensor(torch.tensor([0, 1, 3, 4]), torch.tensor([1, 0, 2, 1]), torch.ones(4), 3)
        >>> S.layout, S.dtype
        (torch.sparse_csr, torch.float32)
        >>> S.to_dense()
        tensor([[0., 1., 0.],
                [1., 0., 1.],
                [0., 1., 0.]])
    """
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(n, n))


class SparseOperator:
    """Products with a fixed symmetric sparse ``S`` (COO or CSR) in an internal node order.

    Args:
        matrix: ``(N, N)`` sparse tensor, symmetric, any floating point dtype; any device (the
            ``"scipy"`` backend: the CPU). The operator keeps its device (``device``).
        dtype: dtype of the products (float32 or float64): the matrix is converted to it, and
            dense operands must have it.
        reorder: scipy path: reverse Cuthill-McKee node order.
        backend: ``"auto"`` (``"scipy"`` on the CPU, ``"torch"`` elsewhere), ``"scipy"``, ``"torch"``.
        threads: scipy path: threads sharing a product (default: ``torch.get_num_threads()``).

    Dense operands are ``(N, Q)`` in ``dtype`` on ``device``, in the internal order: the scipy
    path may renumber the nodes, so dense matrices go through `to_internal` on the way in
    and `from_internal` on the way out.

    Examples:
        The path graph ``0 - 1 - 2`` and an isolated node ``3``:

        >>> import torch
        >>> S = csr_tensor(torch.tensor([0, 1, 3, 4, 4]), torch.tensor([1, 0, 2, 1]), torch.ones(4), 4)
        >>> op = SparseOperator(S)  # on the CPU: the scipy path
        >>> op.num_nodes, op.backend, op.dtype
        (4, 'scipy', torch.float32)
        >>> x = torch.tensor([[1.0], [0.0], [0.0], [0.0]])
        >>> op.from_internal(op.shifted_product(op.to_internal(x), alpha=0.5))  # x - 0.5 S x
        tensor([[ 1.0000],
                [-0.5000],
                [ 0.0000],
                [ 0.0000]])
        >>> op.from_internal(op.components)
        tensor([0, 0, 0, 1])
        >>> op.from_internal(op.reached_by(op.to_internal(x)))
        tensor([ True,  True,  True, False])
        >>> op.restricted(op.reached_by(op.to_internal(x))).num_nodes
        3

        The torch path (any device) keeps the caller's order, and gives the same products:

        >>> SparseOperator(S, backend="torch").shifted_product(x, alpha=0.5).T
        tensor([[ 1.0000, -0.5000,  0.0000,  0.0000]])
    """

    def __init__(self, matrix: torch.Tensor, dtype: torch.dtype = torch.float32, reorder: bool = True,
                 backend: str = "auto", threads: int | None = None):
        if matrix.layout not in (torch.sparse_csr, torch.sparse_coo):
            raise ValueError(f"SparseOperator expects a sparse COO or CSR tensor, got layout {matrix.layout}")
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"SparseOperator expects a square (N, N) matrix, got {tuple(matrix.shape)}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown sparse backend {backend!r}; known: {BACKENDS}")
        if backend == "auto":
            backend = "scipy" if matrix.device.type == "cpu" else "torch"
        if backend == "scipy" and matrix.device.type != "cpu":
            raise ValueError(f"the scipy sparse backend runs on the CPU, the matrix is on {matrix.device}")
        csr = matrix if matrix.layout == torch.sparse_csr else matrix.coalesce().to_sparse_csr()
        csr = csr.to(dtype)
        self.shape = tuple(csr.shape)
        self.device = csr.device
        self.dtype = dtype
        self.backend = backend
        self.threads = max(1, int(threads or torch.get_num_threads()))
        self._order = self._inverse = None
        self._components = None
        if backend == "torch":
            self._set_torch(csr)
            return
        import scipy.sparse as sp
        from scipy.sparse.csgraph import reverse_cuthill_mckee

        a = sp.csr_matrix((csr.values().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()), shape=self.shape)
        if reorder and a.nnz:
            order = reverse_cuthill_mckee(a, symmetric_mode=True).astype(np.int64)
            a = a[order][:, order].tocsr()
            self._order = torch.from_numpy(order)
            self._inverse = torch.empty_like(self._order)
            self._inverse[self._order] = torch.arange(len(order))
        self._set_scipy(a)

    def _set_torch(self, csr: torch.Tensor) -> None:
        self._torch, self._scipy = csr, None

    def _set_scipy(self, a) -> None:
        a.sort_indices()
        self._torch, self._scipy = None, a
        self._kernel = _csr_matvecs()
        # row blocks with equal numbers of non-zeros, one per thread
        bounds = np.searchsorted(a.indptr, np.linspace(0, a.nnz, self.threads + 1)[1:-1])
        self._rows = [(int(r0), int(r1)) for r0, r1 in zip([0, *bounds], [*bounds, a.shape[0]]) if r1 > r0]
        self._pool = ThreadPoolExecutor(len(self._rows)) if len(self._rows) > 1 else None
        self._scaled_alpha, self._scaled_data = None, None

    def _structure(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(row pointers, column indices)`` on the CPU, internal order."""
        crow, col, _ = self._arrays()
        return crow.cpu().numpy(), col.cpu().numpy()

    @property
    def num_nodes(self) -> int:
        """``N``, the graph's nodes (rows of ``S``)."""
        return self.shape[0]

    @property
    def components(self) -> torch.Tensor:
        """``(N,)`` int64 connected-component label of every node, internal order, on the
        operator's device (computed once, by scipy on the CPU)."""
        if self._components is None:
            import scipy.sparse as sp
            from scipy.sparse.csgraph import connected_components

            indptr, indices = self._structure()
            pattern = sp.csr_matrix((np.ones(len(indices), dtype=np.int8), indices, indptr), shape=self.shape)
            self._components = torch.from_numpy(connected_components(pattern, directed=False)[1].astype(np.int64)).to(self.device)
        return self._components

    def reached_by(self, dense: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool on the operator's device: nodes in a connected component holding a
        non-zero of ``dense`` ``(N, Q)`` (any dtype, internal order, on the operator's device).
        Products of ``dense`` with ``S`` stay zero elsewhere."""
        labels = self.components
        seeded = torch.zeros(int(labels.max()) + 1 if labels.numel() else 0, dtype=torch.bool, device=self.device)
        seeded[labels[(dense != 0).any(1)]] = True
        return seeded[labels]

    def restricted(self, nodes: torch.Tensor) -> "SparseOperator":
        """The operator of the sub-graph induced by ``nodes`` (``(N,)`` bool, internal order, any
        device), in that order (its internal order is the identity). No edge may leave ``nodes``
        for the sub-graph's products to equal the full ones there: pass a union of components.

        Returns:
            an operator of ``nodes.sum()`` nodes with this one's dtype, device, backend and threads.
        """
        keep = nodes.to(self.device)
        sub = object.__new__(SparseOperator)
        sub.device, sub.dtype, sub.backend, sub.threads = self.device, self.dtype, self.backend, self.threads
        sub._order = sub._inverse = None
        n = int(keep.sum())
        sub.shape = (n, n)
        sub._components = self.components[keep]
        if self._scipy is not None:
            index = keep.nonzero().squeeze(1).numpy()
            sub._set_scipy(self._scipy[index][:, index].tocsr())
            return sub
        crow, col, values = self._torch.crow_indices(), self._torch.col_indices(), self._torch.values()
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.device), crow.diff())
        edge = keep[rows] & keep[col]
        new_index = torch.cumsum(keep.long(), 0) - 1
        counts = torch.bincount(new_index[rows[edge]], minlength=n)
        new_crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        sub._set_torch(csr_tensor(new_crow, new_index[col[edge]], values[edge], n))
        return sub

    def induced_blocks(self, nodes: torch.Tensor) -> "SparseOperator":
        """The block-diagonal operator of the sub-graphs induced by each row of ``nodes``.

        Args:
            nodes: ``(B, R)`` integer internal node indices (`internal_index`), distinct
                within a row, any device (moved to the operator's).

        Returns:
            an operator of ``B * R`` nodes, no reordering, the same dtype, device, backend and threads: node
            ``r`` of block ``b`` is row ``b * R + r``, and block ``b`` is the sub-matrix
            ``S[nodes[b]][:, nodes[b]]``: edges leaving a row's nodes are dropped (the truncated
            solve of fyang93/diffusion, ``lap_alpha[ids][:, ids]``).
        """
        if nodes.ndim != 2:
            raise ValueError(f"induced_blocks expects (B, R) node indices, got shape {tuple(nodes.shape)}")
        crow, col, values = self._arrays()
        n, (b, r) = self.shape[0], nodes.shape
        flat = nodes.to(self.device, torch.int64).reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= n):
            raise ValueError(f"induced_blocks: node indices must lie in 0..{n - 1}")
        start, count = crow[flat], crow[flat + 1] - crow[flat]
        row = torch.repeat_interleave(count)  # (E,) block-diagonal row of every edge of a selected node
        first = torch.cumsum(count, 0) - count
        edge = start[row] + torch.arange(row.numel(), device=self.device) - first[row]
        # an edge is kept when its target is a node of the same block: (block, node) keys, searched
        keys, order = (torch.arange(b, device=self.device)[:, None] * n + flat.view(b, r)).reshape(-1).sort()
        wanted = torch.div(row, r, rounding_mode="floor") * n + col[edge].long()
        at = torch.searchsorted(keys, wanted).clamp(max=max(keys.numel() - 1, 0))
        hit = keys[at] == wanted if keys.numel() else torch.zeros_like(wanted, dtype=torch.bool)
        rows, cols, kept = row[hit], order[at[hit]], values[edge[hit]]
        if self.backend == "torch":  # CSR rows with sorted columns (the scipy path sorts its own)
            by_row = torch.argsort(rows * (b * r) + cols)
            rows, cols, kept = rows[by_row], cols[by_row], kept[by_row]
        counts = torch.bincount(rows, minlength=b * r)
        block_crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return SparseOperator(csr_tensor(block_crow, cols, kept, b * r), self.dtype, reorder=False, backend=self.backend,
                              threads=self.threads)

    def _arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CSR ``(row pointers int64, column indices, values)`` in the internal order, on the operator's device."""
        if self._scipy is not None:
            a = self._scipy
            return (torch.from_numpy(a.indptr.astype(np.int64, copy=False)), torch.from_numpy(a.indices),
                    torch.from_numpy(a.data))
        return self._torch.crow_indices().long(), self._torch.col_indices(), self._torch.values()

    def internal_index(self, original: torch.Tensor) -> torch.Tensor:
        """Internal indices of nodes ``original`` given in the caller's order: integer indices of
        any shape, any device; the result has their shape and device (``original`` itself when the
        operator keeps the caller's order)."""
        return original if self._inverse is None else self._inverse.to(original.device)[original]

    def to_internal(self, dense: torch.Tensor) -> torch.Tensor:
        """The rows of ``dense`` ``(N, ...)`` (caller's order) in the internal order: a permuted
        copy of the same dtype and device, or ``dense`` itself when the operator keeps the
        caller's order (the torch path, ``reorder=False``, a graph without edges)."""
        return dense if self._order is None else dense[self._order]

    def from_internal(self, dense: torch.Tensor) -> torch.Tensor:
        """The rows of ``dense`` ``(N, ...)`` (internal order) in the caller's order: the inverse
        of `to_internal`, a permuted copy of the same dtype and device or ``dense`` itself."""
        return dense if self._inverse is None else dense[self._inverse]

    def original_index(self, internal: torch.Tensor) -> torch.Tensor:
        """Node indices in the caller's order of internal indices ``internal`` (integer, any shape,
        any device); the result has their shape and device (``internal`` itself when the
        operator keeps the caller's order)."""
        return internal if self._order is None else self._order.to(internal.device)[internal]

    def _accumulate(self, data: np.ndarray, dense: np.ndarray, out: np.ndarray, start_from_dense: bool) -> None:
        """``out (+)= A X``, ``A`` the operator's structure carrying ``data``; ``out`` starts as
        ``dense`` if ``start_from_dense``, else as it is. Row blocks run in threads."""
        a, n_vecs = self._scipy, dense.shape[1]
        x = dense.reshape(-1)

        def block(rows):
            r0, r1 = rows
            if start_from_dense:
                np.copyto(out[r0:r1], dense[r0:r1])
            p0, p1 = a.indptr[r0], a.indptr[r1]
            self._kernel(r1 - r0, a.shape[1], n_vecs, a.indptr[r0:r1 + 1] - p0, a.indices[p0:p1], data[p0:p1],
                         x, out[r0:r1].reshape(-1))

        if self._pool is None:
            block(self._rows[0])
        else:
            list(self._pool.map(block, self._rows))

    def _check(self, dense: torch.Tensor) -> None:
        if dense.ndim != 2 or dense.shape[0] != self.shape[1]:
            raise ValueError(f"expected a dense ({self.shape[1]}, Q) matrix, got {tuple(dense.shape)}")

    def __matmul__(self, dense: torch.Tensor) -> torch.Tensor:
        """``S @ dense`` with ``dense`` ``(N, Q)`` in the internal order (see `to_internal`),
        in the operator's dtype on its device; the result ``(N, Q)`` likewise."""
        self._check(dense)
        if self._torch is not None:
            return self._torch @ dense
        x = np.ascontiguousarray(dense.detach().numpy(), dtype=self._scipy.dtype)
        if self._kernel is None or not self._rows:
            return torch.from_numpy(np.asarray(self._scipy @ x))
        out = np.zeros_like(x)
        self._accumulate(self._scipy.data, x, out, start_from_dense=False)
        return torch.from_numpy(out)

    def shifted_product(self, dense: torch.Tensor, alpha: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """``dense - alpha * (S @ dense)``, written into ``out`` when given (``(N, Q)``, contiguous).

        ``dense``: ``(N, Q)`` in the operator's dtype, internal order, on its device; ``out`` (and
        the result, ``out`` when given) likewise."""
        self._check(dense)
        if out is None:
            out = torch.empty_like(dense)
        if self._torch is not None or self._kernel is None or not self._rows:
            return torch.add(dense, self @ dense, alpha=-alpha, out=out)
        x = np.ascontiguousarray(dense.detach().numpy(), dtype=self._scipy.dtype)
        target = out.numpy()
        if not target.flags.c_contiguous or target.dtype != x.dtype:
            raise ValueError("shifted_product: out must be a contiguous tensor of the operator's dtype")
        if self._scaled_alpha != alpha:
            self._scaled_alpha, self._scaled_data = alpha, (-alpha * self._scipy.data).astype(x.dtype)
        self._accumulate(self._scaled_data, x, target, start_from_dense=True)
        return out
