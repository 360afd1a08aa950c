import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F

from gpu_dsm.diffusion import ConvergenceWarning, DiffusionConfig, conjugate_gradient, diffuse, diffusion_ranking, dsm_seeds, plain_seeds
from gpu_dsm.graph import GraphConfig, KnnGraph, build_knn_graph
from gpu_dsm.reference.graph import dense_mutual_knn


def _clustered(n, d=32, clusters=20, noise=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return F.normalize(centres[labels] + noise * torch.randn(n, d, generator=g), dim=1), centres


def _reference_affinity(x, k, gamma):
    """Dense mutual kNN affinity with plain loops (``gpu_dsm.reference.graph``)."""
    return dense_mutual_knn(x.double().numpy(), k, gamma)


def test_graph_matches_plain_loops():
    x, _ = _clustered(60)
    g = build_knn_graph(x, GraphConfig(k=7))
    dense = g.affinity.to_dense().double().numpy()
    np.testing.assert_allclose(dense, _reference_affinity(x, 7, 3.0), atol=1e-6)
    np.testing.assert_allclose(dense, dense.T, atol=1e-7)
    assert np.all(np.diag(dense) == 0)
    union = build_knn_graph(x, GraphConfig(k=7, mutual=False))
    assert union.num_edges > g.num_edges


def test_isolated_nodes_and_clamped_k(tmp_path):
    x, _ = _clustered(30)
    padded = F.pad(x, (0, 1))
    outlier = torch.zeros(1, x.shape[1] + 1)
    outlier[0, -1] = 1.0  # orthogonal to everything: similarity 0, so no weighted edge
    g = build_knn_graph(torch.cat([padded, outlier]), GraphConfig(k=5))
    assert g.affinity.to_dense()[30].abs().sum() == 0
    big = build_knn_graph(x[:6], GraphConfig(k=50))
    assert big.k == 5
    one = build_knn_graph(x[:1])
    assert one.num_edges == 0
    with pytest.raises(ValueError, match="NaN"):
        build_knn_graph(torch.full((4, 3), float("nan")))
    g.save(tmp_path / "g.pt")
    loaded = KnnGraph.load(tmp_path / "g.pt")
    assert torch.equal(loaded.affinity.to_dense(), g.affinity.to_dense()) and loaded.k == 5
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot read graph file"):
        KnnGraph.load(tmp_path / "bad.pt")


def test_cg_agrees_with_scipy():
    x, centres = _clustered(3000, seed=1)
    g = build_knn_graph(x, GraphConfig(k=30))
    q = F.normalize(centres[:12] + 0.6 * torch.randn(12, centres.shape[1]), dim=1)
    sims, ranks = torch.sort(q @ x.T, dim=1, descending=True)
    y = plain_seeds(sims, ranks, len(x))
    f, info = diffuse(g.affinity, y, DiffusionConfig(alpha=0.99, max_iter=100))
    assert info.relative_residual.max() <= 1e-6
    coo = g.affinity.to_sparse_coo().coalesce()
    a = sp.csr_matrix((coo.values().double().numpy(), coo.indices().numpy()), shape=coo.shape)
    system = sp.eye(a.shape[0]) - 0.99 * a
    for i in range(12):
        expected, status = sla.cg(system, y[:, i].double().numpy(), rtol=1e-8, maxiter=1000)
        assert status == 0
        got = f[:, i].double().numpy()
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
        assert set(np.argsort(-got)[:100]) == set(np.argsort(-expected)[:100])


def test_cg_edge_cases():
    x, _ = _clustered(50)
    g = build_knn_graph(x, GraphConfig(k=5))
    y = torch.zeros(50, 3)
    y[4, 1] = 1.0
    f, info = conjugate_gradient(g.affinity, y)
    assert torch.equal(f[:, 0], torch.zeros(50)) and f[4, 1] >= 1.0
    with pytest.raises(ValueError, match="NaN"):
        conjugate_gradient(g.affinity, torch.full((50, 1), float("nan")))
    with pytest.raises(ValueError, match=r"\(50, Q\)"):
        conjugate_gradient(g.affinity, torch.zeros(49, 1))


def test_seeds():
    sims = torch.tensor([[0.9, 0.5, -0.2]])
    ranks = torch.tensor([[2, 0, 1]])
    y = plain_seeds(sims, ranks, 4, query_k=2, gamma=2.0)
    torch.testing.assert_close(y[:, 0], torch.tensor([0.25, 0.0, 0.81, 0.0]))
    y = plain_seeds(torch.tensor([[-0.1, -0.3]]), torch.tensor([[0, 1]]), 2)
    assert y.abs().sum() == 0  # no positive similarity: no seed
    idx = torch.arange(10).view(1, 10)
    s = torch.linspace(0.9, 0.45, 10).view(1, 10)
    inl = torch.tensor([[10, 0, 5, 8, 1, 2, 0, 9, 3, 4]])
    y = dsm_seeds(s, idx, inl, 12, keep=5)
    weights = inl.float() / 10 * s
    expected = torch.zeros(12)
    best = torch.argsort(weights[0], descending=True)[:5]
    expected[best] = weights[0, best]
    torch.testing.assert_close(y[:, 0], expected)
    assert (dsm_seeds(s, idx, inl, 12, keep=4)[:, 0] > 0).sum() == 4
    fallback = dsm_seeds(s, idx, torch.zeros_like(inl), 12, keep=5, gamma=3.0)
    torch.testing.assert_close(fallback[:5, 0], s[0, :5] ** 3)


def test_ranking_keeps_initial_order_for_ties():
    initial = torch.tensor([[3, 1, 0, 2]])
    scores = torch.tensor([[0.0], [0.5], [0.0], [0.0]])
    assert diffusion_ranking(scores, initial).tolist() == [[1, 3, 0, 2]]


def test_faiss_backend_finds_the_exact_graph_on_small_data(require):
    require("faiss", "the faiss graph backend is an optional extra")
    x, _ = _clustered(2000, seed=3)
    exact = build_knn_graph(x, GraphConfig(k=10)).affinity.to_dense() > 0
    approx = build_knn_graph(x, GraphConfig(k=10, backend="faiss")).affinity.to_dense() > 0
    assert (exact & approx).sum() >= 0.99 * exact.sum()


def _reached_by_loops(dense_affinity, seeded_nodes):
    """Nodes connected to a seeded node, by breadth-first search over a dense matrix."""
    n = len(dense_affinity)
    reached, frontier = set(seeded_nodes), list(seeded_nodes)
    while frontier:
        i = frontier.pop()
        for j in range(n):
            if dense_affinity[i, j] != 0 and j not in reached:
                reached.add(j)
                frontier.append(j)
    return reached


def test_sparse_operator_backends_and_threads_agree():
    from gpu_dsm.kernels.sparse import SparseOperator

    x, _ = _clustered(400, clusters=30, noise=0.3, seed=3)
    g = build_knn_graph(x, GraphConfig(k=8))
    dense = g.affinity.to_dense().double()
    rhs = torch.randn(400, 7, dtype=torch.float64)
    expected_product = dense @ rhs
    expected_shifted = rhs - 0.9 * expected_product
    for kwargs in (dict(), dict(threads=1), dict(threads=3), dict(reorder=False), dict(backend="torch")):
        op = SparseOperator(g.affinity, torch.float64, **kwargs)
        internal = op.to_internal(rhs)
        torch.testing.assert_close(op.from_internal(op @ internal), expected_product, rtol=1e-12, atol=1e-12)
        out = torch.empty_like(internal)
        assert op.shifted_product(internal, 0.9, out=out) is out
        torch.testing.assert_close(op.from_internal(out), expected_shifted, rtol=1e-12, atol=1e-12)
        # the connected components a set of seeds reaches, against a breadth-first search
        seeds = torch.zeros(400, 2, dtype=torch.float64)
        seeds[[5, 77], 0] = 1.0
        seeds[300, 1] = 2.0
        expected = _reached_by_loops(dense.numpy(), [5, 77, 300])
        reached = op.from_internal(op.reached_by(op.to_internal(seeds)))
        assert set(reached.nonzero().squeeze(1).tolist()) == expected
        assert 0 < len(expected) < 400
        # the operator of the reached sub-graph gives the full products there
        sub = op.restricted(op.reached_by(op.to_internal(seeds)))
        keep = op.reached_by(op.to_internal(seeds))
        full = op.shifted_product(op.to_internal(seeds), 0.9)
        torch.testing.assert_close(sub.shifted_product(op.to_internal(seeds)[keep], 0.9), full[keep], rtol=1e-12, atol=1e-12)
        assert torch.equal(full[~keep], torch.zeros_like(full[~keep]))
    with pytest.raises(ValueError, match="unknown sparse backend"):
        SparseOperator(g.affinity, backend="cuda")
    with pytest.raises(ValueError, match="square"):
        SparseOperator(torch.zeros(3, 4).to_sparse())


def test_restricted_solve_equals_the_whole_graph_solve():
    """Solving only on the components the seeds reach gives the whole-graph solution."""
    x, centres = _clustered(1500, clusters=40, noise=0.3, seed=4)
    g = build_knn_graph(x, GraphConfig(k=10))
    op = g.operator()
    assert int(op.components.max()) + 1 > 10  # a fragmented graph
    q = F.normalize(centres[:6] + 0.3 * torch.randn(6, centres.shape[1]), dim=1)
    sims, ranks = torch.sort(q @ x.T, dim=1, descending=True)
    y = plain_seeds(sims, ranks, len(x))
    assert op.reached_by(op.to_internal(y)).float().mean() < 0.5
    restricted, info_r = conjugate_gradient(op, y)
    whole, info_w = conjugate_gradient(op, y, restrict=False)
    assert info_r.iterations == info_w.iterations
    torch.testing.assert_close(restricted, whole, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(info_r.relative_residual, info_w.relative_residual, rtol=1e-3, atol=1e-9)
    # diffuse() on the graph reuses its operator (and says that 20 iterations did not reach tol)
    with pytest.warns(ConvergenceWarning, match="queries above tol"):
        f, _ = diffuse(g, y, DiffusionConfig(alpha=0.99))
    assert g.operator() is op and torch.equal(f, restricted)


def test_column_dots_against_float64_loops():
    from gpu_dsm.kernels.dots import column_dots

    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(5000, 6, generator=g), torch.rand(5000, 6, generator=g) - 0.3
    expected = [sum(float(a[i, j]) * float(b[i, j]) for i in range(5000)) for j in range(6)]
    got = column_dots(a, b, chunk_rows=700)
    assert got.dtype == torch.float32 and got.shape == (6,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=2e-6)
    torch.testing.assert_close(column_dots(a.double(), b.double()), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert torch.equal(column_dots(torch.zeros(0, 3), torch.zeros(0, 3)), torch.zeros(3))
    with pytest.raises(ValueError, match="one shape"):
        column_dots(a, b[:, :5])


def _scipy_solutions(affinity, y, alpha):
    coo = affinity.to_sparse_coo().coalesce()
    a = sp.csr_matrix((coo.values().double().numpy(), coo.indices().numpy()), shape=coo.shape)
    system = sp.eye(a.shape[0]) - alpha * a
    columns = []
    for i in range(y.shape[1]):
        expected, status = sla.cg(system, y[:, i].double().numpy(), rtol=1e-10, maxiter=1000)
        assert status == 0
        columns.append(expected)
    return np.stack(columns, 1)


@pytest.mark.parametrize("fragmented", [False, True])
def test_gpu_path_torch_sparse_cg_on_the_cpu_agrees_with_scipy(monkeypatch, fragmented):
    """The GPU path of diffusion (torch CSR products, torch.linalg.vecdot reductions), forced on
    the CPU through ``diffuse`` (KnnGraph.operator and a raw affinity), against scipy's CG; on a
    fragmented graph the restricted sub-graph solve runs on the torch backend too."""
    x, centres = _clustered(800, clusters=40 if fragmented else 20, noise=0.3 if fragmented else 0.6, seed=5)
    g = build_knn_graph(x, GraphConfig(k=10))
    q = F.normalize(centres[:5] + 0.3 * torch.randn(5, centres.shape[1]), dim=1)
    sims, ranks = torch.sort(q @ x.T, dim=1, descending=True)
    y = plain_seeds(sims, ranks, len(x))
    expected = _scipy_solutions(g.affinity, y, 0.9)
    calls = []
    vecdot = torch.linalg.vecdot
    monkeypatch.setattr(torch.linalg, "vecdot", lambda *a, **k: calls.append(1) or vecdot(*a, **k))
    cfg = DiffusionConfig(alpha=0.9, max_iter=200, tol=1e-7, sparse_backend="torch")
    op = g.operator(torch.float32, "torch")
    assert op.backend == "torch" and g.operator(torch.float32) is not op
    if fragmented:
        assert op.reached_by(op.to_internal(y)).float().mean() < 0.8  # the restricted solve runs
    seeds = y.clone()
    for graph in (g, g.affinity):
        calls.clear()
        f, info = diffuse(graph, y, cfg)
        assert calls and info.relative_residual.max() <= 1e-7
        assert torch.equal(y, seeds)  # the solve works on its own copy of the seeds
        got = f.double().numpy()
        assert np.abs(got - expected).max() / np.abs(expected).max() < 1e-5
        for i in range(5):
            assert set(np.argsort(-got[:, i])[:50]) == set(np.argsort(-expected[:, i])[:50])
    assert g.operator(torch.float32, "torch") is op  # kept per (dtype, backend)
    calls.clear()
    diffuse(g, y, DiffusionConfig(alpha=0.9, max_iter=200, tol=1e-7))  # the CPU path: no vecdot
    assert not calls
    with pytest.raises(ValueError, match="sparse_backend must be one of"):
        DiffusionConfig(sparse_backend="cuda")


def test_column_dots_gpu_path_on_the_cpu():
    """``torch.linalg.vecdot``, the reductions' path off the CPU, forced here: the same sums."""
    from gpu_dsm.kernels.dots import column_dots

    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(3000, 5, generator=g, dtype=torch.float64), torch.rand(3000, 5, generator=g, dtype=torch.float64) - 0.3
    expected = [sum(float(a[i, j]) * float(b[i, j]) for i in range(3000)) for j in range(5)]
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        got = column_dots(a.to(dtype), b.to(dtype), backend="torch")
        assert got.dtype == dtype and got.shape == (5,)
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=rtol)
    with pytest.raises(ValueError, match="unknown column_dots backend"):
        column_dots(a, b, backend="cuda")
    with pytest.raises(ValueError, match="numpy column_dots backend runs on the CPU"):
        column_dots(a.to("meta"), b.to("meta"), backend="numpy")


@pytest.mark.parametrize("kwargs", [dict(backend="torch"), dict(backend="scipy", reorder=False), dict()])
def test_the_solve_leaves_the_callers_seeds_alone(kwargs):
    """CG overwrites its right-hand side: with an operator that keeps the caller's node order
    (the torch backend, the GPU path; scipy without reordering) that must be a copy."""
    from gpu_dsm.kernels.sparse import SparseOperator

    x, _ = _clustered(300, seed=6)
    g = build_knn_graph(x, GraphConfig(k=8))
    y = torch.zeros(300, 3)
    y[[3, 50, 200], [0, 1, 2]] = 1.0
    before = y.clone()
    op = SparseOperator(g.affinity, torch.float32, **kwargs)
    first, _ = conjugate_gradient(op, y, alpha=0.9, tol=1e-7, max_iter=100, restrict=False)
    assert torch.equal(y, before)
    again, _ = conjugate_gradient(op, y, alpha=0.9, tol=1e-7, max_iter=100)
    assert torch.equal(y, before) and torch.allclose(first, again, atol=1e-6) and first[3, 0] >= 1.0


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_truncated_solve_equals_each_querys_sub_matrix_solve(backend):
    """Truncated diffusion: column q equals a direct solve of the sub-matrix of I - alpha S on the
    query's top R (fyang93/diffusion's truncated solve), zero elsewhere; R = N is the whole solve."""
    from gpu_dsm.diffusion import truncated_conjugate_gradient
    from gpu_dsm.kernels.sparse import SparseOperator

    x, centres = _clustered(500, seed=3)
    g = build_knn_graph(x, GraphConfig(k=12))
    q = F.normalize(centres[:4] + 0.5 * torch.randn(4, centres.shape[1], generator=torch.Generator().manual_seed(4)), dim=1)
    sims, ranks = (q @ x.T).sort(dim=1, descending=True)
    y = plain_seeds(sims, ranks, 500, 10, 3.0).double()
    op = SparseOperator(g.affinity, torch.float64, backend=backend)  # reordered nodes on the scipy path
    s = sp.csr_matrix(g.affinity.to_dense().double().numpy())
    r = 80
    f, info = truncated_conjugate_gradient(op, y, ranks[:, :r], alpha=0.95, tol=1e-13, max_iter=500)
    assert f.shape == (500, 4) and info.iterations > 1
    for j in range(4):
        ids = ranks[j, :r].numpy()
        expected = sla.spsolve((sp.eye(r) - 0.95 * s[ids][:, ids]).tocsc(), y[ids, j].numpy())
        np.testing.assert_allclose(f[ids, j].numpy(), expected, rtol=1e-9, atol=1e-12)
        outside = np.setdiff1d(np.arange(500), ids)
        assert torch.all(f[outside, j] == 0)
    whole, _ = conjugate_gradient(op, y, alpha=0.95, tol=1e-13, max_iter=500)
    every, _ = truncated_conjugate_gradient(op, y, ranks, alpha=0.95, tol=1e-13, max_iter=500)
    torch.testing.assert_close(every, whole, rtol=1e-9, atol=1e-12)


def test_truncated_diffusion_config_and_bad_input():
    from gpu_dsm.diffusion import truncated_conjugate_gradient

    x, _ = _clustered(200, seed=5)
    g = build_knn_graph(x, GraphConfig(k=8))
    sims, ranks = (x[:3] @ x.T).sort(dim=1, descending=True)
    y = plain_seeds(sims, ranks, 200, 10, 3.0)
    cfg = DiffusionConfig(alpha=0.9, truncation_size=50)
    f, _ = diffuse(g, y, cfg, ranks)
    assert int((f != 0).sum(0).max()) <= 50
    with pytest.raises(ValueError, match="needs each query's ranking"):
        diffuse(g, y, cfg)
    with pytest.raises(ValueError, match="must hold the seeds"):
        DiffusionConfig(truncation_size=5)
    with pytest.raises(ValueError, match="seeds outside its 20 candidates"):
        truncated_conjugate_gradient(g.affinity, y, ranks[:, 5:25])
    with pytest.raises(ValueError, match="database indices"):
        truncated_conjugate_gradient(g.affinity, y, ranks[:, :20] + 500)
    # a truncated ranking: the top R re-ordered by diffusion, then the rest in the initial order
    order = diffusion_ranking(f, ranks)
    assert torch.equal(order[:, 50:], ranks[:, 50:])
    assert torch.equal(order[:, :50].sort(1).values, ranks[:, :50].sort(1).values)
