"""Plain reference of the diffusion graph: the mutual kNN affinity of Iscen et al. (2017), loop by loop.

``dense_mutual_knn(x, k, gamma)``: ``D^-1/2 W D^-1/2`` with ``W_ij = max(x_i . x_j, 0)^gamma`` when
``i`` and ``j`` are among each other's ``k`` nearest neighbours (ties by index), else 0; float64,
dense ``(N, N)``. `gpu_dsm.graph.build_knn_graph` is checked against it.
"""
from __future__ import annotations

import numpy as np


def dense_mutual_knn(x: np.ndarray, k: int, gamma: float) -> np.ndarray:
    """``D^-1/2 W D^-1/2`` of the mutual kNN graph of unit rows ``x (N, D)`` (numpy, any real
    dtype), with plain loops: a dense ``(N, N)`` float64 numpy array.

    Examples:
        >>> import numpy as np
        >>> dense_mutual_knn(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), k=1, gamma=3.0)
        array([[0., 1., 0.],
               [1., 0., 0.],
               [0., 0., 0.]])
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    sims = x @ x.T
    knn = []
    for i in range(n):
        s = sims[i].copy()
        s[i] = -np.inf
        knn.append(set(np.argsort(-s, kind="stable")[:k].tolist()))
    w = np.zeros((n, n))
    for i in range(n):
        for j in knn[i]:
            if i in knn[j]:
                w[i, j] = max(sims[i, j], 0.0) ** gamma
    d = w.sum(1)
    inv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    return inv[:, None] * w * inv[None, :]
