"""Global search backends (gpu_dsm.search.GlobalIndex): exact torch search is similarity_topk;
FAISS flat returns the same top-k; HNSW and IVF-PQ are approximate, measured by recall@k
against the exact search; bad settings are named."""
import pytest
import torch

from gpu_dsm.search import GlobalIndex, SearchConfig, similarity_topk
from gpu_dsm.eval.bench_diffusion import clustered
from gpu_dsm.eval.bench_search import recall_at_k


def _data(n=3000, q=20, dim=64):
    return clustered(n, dim, 30, seed=1), clustered(q, dim, 30, seed=2)


def test_exact_backend_is_similarity_topk():
    db, q = _data(500)
    scores, idx = GlobalIndex.build(db).search(q, 10)
    want_scores, want_idx = similarity_topk(q, db, 10)
    assert torch.equal(idx, want_idx) and torch.equal(scores, want_scores)


def test_faiss_backends_against_exact_search():
    pytest.importorskip("faiss", reason="FAISS backends are an optional extra (pip install -e '.[faiss]')")
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


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown search backend 'annoy'"):
        SearchConfig(backend="annoy")
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        SearchConfig(nprobe=0)
    with pytest.raises(ValueError, match="NaN"):
        GlobalIndex.build(torch.tensor([[float("nan"), 1.0]]))
