"""Global search backends (gpu_dsm.knn.GlobalIndex): exact torch search is similarity_topk;
FAISS flat returns the same top-k; HNSW and IVF-PQ are approximate, measured by recall@k
against the exact search; bad settings are named."""
import pytest
import torch

from gpu_dsm.knn import GlobalIndex, SearchConfig, similarity_topk
from gpu_dsm.eval.bench_diffusion import clustered
from gpu_dsm.eval.bench_search import recall_at_k


def _data(n=3000, q=20, dim=64):
    return clustered(n, dim, 30, seed=1), clustered(q, dim, 30, seed=2)


def test_exact_backend_is_similarity_topk():
    db, q = _data(500)
    scores, idx = GlobalIndex.build(db).search(q, 10)
    want_scores, want_idx = similarity_topk(q, db, 10)
    assert torch.equal(idx, want_idx) and torch.equal(scores, want_scores)


def test_faiss_backends_against_exact_search(require):
    require("faiss", "FAISS backends are an optional extra (pip install -e '.[faiss]')")
    db, q = _data()
    want_scores, want = similarity_topk(q, db, 50)
    scores, flat = GlobalIndex.build(db, SearchConfig(backend="faiss-flat")).search(q, 50)
    assert recall_at_k(flat, want) == 1.0 and torch.allclose(scores, want_scores, atol=1e-5)
    _, hnsw = GlobalIndex.build(db, SearchConfig(backend="faiss-hnsw")).search(q, 50)
    assert recall_at_k(hnsw, want) > 0.95
    index = GlobalIndex.build(db, SearchConfig(backend="faiss-ivfpq", pq_bytes=16))
    _, ivfpq = index.search(q, 50)
    assert 0.3 < recall_at_k(ivfpq, want) <= 1.0 and index.num_images == 3000
    assert recall_at_k(want[:, :25], want) == 0.5  # the measure itself
    with pytest.raises(ValueError, match="pq_bytes=24 must divide the descriptor dimension 64"):
        GlobalIndex.build(db, SearchConfig(backend="faiss-ivfpq", pq_bytes=24))
    with pytest.raises(ValueError, match="at least 256 database vectors"):
        GlobalIndex.build(db[:100], SearchConfig(backend="faiss-ivfpq"))
    with pytest.raises(ValueError, match="queries are 32-D, the index 64-D"):
        GlobalIndex.build(db, SearchConfig(backend="faiss-flat")).search(q[:, :32], 5)
    with pytest.raises(ValueError, match="k must be >= 0"):
        GlobalIndex.build(db, SearchConfig(backend="faiss-flat")).search(q, -1)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        SearchConfig(backend="annoy")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        SearchConfig(nprobe=0)
    with pytest.raises(ValueError, match="NaN"):
        GlobalIndex.build(torch.tensor([[float("nan"), 1.0]]))
    # the exact index checks its database once, when built, and every query it is given
    exact = GlobalIndex.build(torch.nn.functional.normalize(torch.randn(10, 4), dim=1))
    with pytest.raises(ValueError, match="queries contains 1 NaN"):
        exact.search(torch.tensor([[float("nan"), 0.0, 0.0, 1.0]]), 3)
    with pytest.raises(ValueError, match="queries are 3-D, the index 4-D"):
        exact.search(torch.ones(1, 3), 3)
    with pytest.raises(ValueError, match="k must be >= 0"):
        exact.search(torch.ones(1, 4), -1)


def test_top_k_selection_is_the_stable_sort():
    """similarity_topk's chunk merge selects by top-k: the same positions, in the same order, as
    a stable descending sort, ties (many here) in position order."""
    from gpu_dsm.knn import stable_top

    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        width = int(torch.randint(5, 400, (1,), generator=g))
        k = int(torch.randint(1, width + 1, (1,), generator=g))
        s = torch.randint(0, 6, (3, width), generator=g).float() if trial % 2 else torch.randn(3, width, generator=g)
        assert torch.equal(stable_top(s, k), torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]), trial
    # across chunks: equal database rows keep the database order
    db = torch.nn.functional.normalize(torch.randint(0, 3, (1000, 8), generator=g).float() + 0.1, dim=1)
    q = db[:4]
    scores, idx = similarity_topk(q, db, 50, chunk_size=64)
    full = torch.sort(q @ db.T, dim=1, descending=True, stable=True)
    assert torch.equal(idx, full.indices[:, :50]) and torch.equal(scores, full.values[:, :50])


@pytest.fixture(scope="module")
def mini_global(lite0, mini):
    """Real global descriptors: roxford5k-mini's database (133) and queries, 256 px, one scale."""
    from gpu_dsm.extract import ExtractConfig
    from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig

    retrieval = DSMRetrieval(lite0, RetrievalConfig(extract=ExtractConfig(image_size=256, scales=(1.0,), progress=False),
                                                    rerank=None))
    database = retrieval.describe(mini.database_specs()).global_descriptors
    queries = retrieval.describe(mini.query_specs(), is_query=True).global_descriptors
    return database, torch.cat([queries, database])  # every database image is a query too


def test_compact_search_covering_the_database_is_exact_search(mini_global):
    """A shortlist of every image: the compact backend re-scores all of them, so its ranking is
    the exact search's (scores to float32 rounding: a batched product against a matrix product)."""
    database, queries = mini_global
    want_scores, want = similarity_topk(queries, database)
    for dim in (8, 64):
        index = GlobalIndex.build(database, SearchConfig(backend="compact", compact_dim=dim, shortlist=len(database)))
        scores, got = index.search(queries, len(database))
        assert torch.equal(got, want) and (scores - want_scores).abs().max() < 1e-6


def test_compact_search_rescores_its_shortlist_exactly(mini_global):
    """A shortlist of 30 of 133: the first 30 are ranked by their exact similarities (float64
    products, to float32 rounding), the rest follow in the compact order with compact scores; a
    small chunk budget (one query at a time) changes nothing."""
    database, queries = mini_global
    cfg = SearchConfig(backend="compact", compact_dim=16, shortlist=30)
    index = GlobalIndex.build(database, cfg)
    scores, got = index.search(queries, 60)
    exact = torch.einsum("qd,qkd->qk", queries.double(), database.double()[got[:, :30]])
    assert (scores[:, :30].double() - exact).abs().max() < 1e-6
    assert bool((scores[:, :29] >= scores[:, 1:30]).all())
    compact = torch.einsum("qd,qkd->qk", queries @ index.projection, index.compact[got[:, 30:]])
    assert torch.allclose(scores[:, 30:], compact, atol=1e-6) and bool((compact[:, :-1] >= compact[:, 1:]).all())
    assert all(len(set(row.tolist())) == 60 for row in got)
    small = GlobalIndex.build(database, SearchConfig(backend="compact", compact_dim=16, shortlist=30,
                                                     chunk_floats=database.shape[1] * 30))
    small_scores, small_got = small.search(queries, 60)
    assert torch.equal(small_got, got) and torch.allclose(small_scores, scores, atol=1e-6)
    # the projection: orthonormal columns, the leading eigenvectors of the second moment
    p = index.projection.double()
    assert torch.allclose(p.T @ p, torch.eye(16, dtype=torch.float64), atol=1e-5)
    values = torch.linalg.eigvalsh(database.double().T @ database.double()).flip(0)
    assert torch.allclose(torch.diag(p.T @ database.double().T @ database.double() @ p), values[:16], rtol=1e-4)


def test_compact_search_recall_on_real_descriptors(mini_global):
    """recall@k against exact search on real descriptors, with a shortlist of a quarter of the
    database: the default 64 dimensions find the exact top 10 of every query; 2 dimensions
    re-scoring only the top 10 do not (what the measure catches)."""
    database, queries = mini_global
    _, want = similarity_topk(queries, database, 10)
    _, got = GlobalIndex.build(database, SearchConfig(backend="compact", shortlist=33)).search(queries, 10)
    assert recall_at_k(got, want) >= 0.99
    _, poor = GlobalIndex.build(database, SearchConfig(backend="compact", compact_dim=2, shortlist=10)).search(queries, 10)
    assert recall_at_k(poor, want) < 0.9


def test_compact_search_follows_the_inputs_and_names_bad_settings():
    db, q = _data(500, 5, 32)
    index = GlobalIndex.build(db.double(), SearchConfig(backend="compact", compact_dim=8, shortlist=50))
    scores, idx = index.search(q.double(), 20)
    assert scores.dtype == torch.float64 and index.compact.dtype == torch.float64 and idx.dtype == torch.int64
    assert GlobalIndex.build(db[:0], SearchConfig(backend="compact")).search(q, 5)[1].shape == (5, 0)
    with pytest.raises(ValueError, match="shortlist must be >= 1"):
        SearchConfig(backend="compact", shortlist=0)
    with pytest.raises(ValueError, match="queries are 16-D, the index 32-D"):
        index.search(q[:, :16].double(), 5)
