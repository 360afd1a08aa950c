"""ASMK on tensors against a plain float64 loop (gpu_dsm.reference.asmk): assignment, codes,
the inverted file and batched search; bad input; save/load."""
import numpy as np
import pytest
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, aggregate_residuals, kmeans_objective, nearest_words, train_codebook

from gpu_dsm.reference import asmk as reference_asmk


def _clustered(num, dim, centres, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(centres, dim, generator=g, dtype=torch.float64) * 2
    pick = torch.randint(0, centres, (num,), generator=g)
    return base[pick] + spread * torch.randn(num, dim, generator=g, dtype=torch.float64)


def _problem(dim=16, words=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = _clustered(words, dim, words, seed, spread=0.0) + 0.1 * torch.randn(words, dim, generator=g, dtype=torch.float64)
    db = _clustered(90, dim, words, seed + 1)
    db_ids = torch.randint(0, 7, (90,), generator=g)
    db_ids[db_ids == 5] = 4  # image 5 has no features
    q = _clustered(30, dim, words, seed + 2)
    q_ids = torch.randint(0, 3, (30,), generator=g)  # query 3 has none
    return codebook, db, db_ids, q, q_ids


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("dim", [16, 12, 112])
def test_search_matches_the_plain_loop(binary, dim, backend, native_kernel):
    codebook, db, db_ids, q, q_ids = _problem(dim=dim)
    cfg = ASMKConfig(binary=binary, memory_budget=1 << 16, search_backend=backend)
    index = ASMKIndex.build(codebook, db, db_ids, cfg, num_images=8)
    assert index.search_backend() == backend
    scores, order = index.search(q, q_ids, num_queries=4)
    want = reference_asmk.scores(codebook.numpy(), db.numpy(), db_ids.tolist(), 8, q.numpy(), q_ids.tolist(), 4,
                                 binary=binary)
    got = torch.zeros(4, 8, dtype=torch.float64).scatter_(1, order, scores).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    assert scores.dtype == torch.float64 and (scores[:, :-1] >= scores[:, 1:]).all()
    assert (got[3] == 0).all() and (got[:, 5] == 0).all() and (got[:, 7] == 0).all()
    # rankings equal the reference's up to ties (stable: ties keep the database order)
    for row in range(4):
        assert order[row].tolist() == sorted(range(8), key=lambda i: (-want[row, i], i))


def test_self_score_is_one_and_budgets_do_not_change_results():
    codebook, db, db_ids, _, _ = _problem()
    cfg = ASMKConfig(query_assignments=1)
    index = ASMKIndex.build(codebook, db, db_ids, cfg)
    scores, order = index.search(db, db_ids, k=1)
    has_words = index.image_words > 0
    assert torch.allclose(scores[has_words, 0], torch.ones(int(has_words.sum()), dtype=torch.float64))
    assert order[has_words, 0].tolist() == torch.nonzero(has_words).flatten().tolist()
    small = ASMKIndex.build(codebook, db, db_ids, ASMKConfig(query_assignments=1, memory_budget=1 << 16))
    big_scores, big_order = index.search(db, db_ids)
    small_scores, small_order = small.search(db, db_ids)
    assert torch.equal(big_order, small_order) and torch.allclose(big_scores, small_scores, atol=1e-12, rtol=0)


def test_inverted_file_layout_and_memory():
    codebook, db, db_ids, _, _ = _problem()
    index = ASMKIndex.build(codebook, db, db_ids)
    vectors = aggregate_residuals(db, db_ids, codebook, 1)
    assert index.num_entries == vectors.image.numel() == int(index.image_words.sum())
    for w in range(index.num_words):
        rows = slice(int(index.offsets[w]), int(index.offsets[w + 1]))
        assert index.image_ids[rows].tolist() == vectors.image[vectors.word == w].tolist()
    assert index.codes.dtype == torch.uint8 and index.codes.shape[1] == 2  # 16 bits
    assert index.image_ids.dtype == torch.int32  # 2 bytes of code + 4 of id per entry
    assert index.bytes_per_image() == pytest.approx(index.num_entries * (2 + 4) / index.num_images)


def test_nearest_words_and_kmeans():
    x = _clustered(400, 8, 5, seed=3, spread=0.1)
    codebook = train_codebook(x, 5, iterations=10, seed=0)
    words, dists = nearest_words(x, codebook, k=2, memory_budget=1 << 16)
    exact = torch.cdist(x, codebook) ** 2
    assert torch.equal(words[:, 0], exact.argmin(1)) and torch.allclose(dists[:, 0], exact.min(1).values, atol=1e-9)
    # Lloyd iterations never raise the objective; with more words than the 5 well separated
    # clusters every cluster holds a word, and the objective falls below the within-cluster spread
    objectives = [kmeans_objective(x, train_codebook(x, 20, iterations=i, seed=0)) for i in (0, 1, 5, 10)]
    assert all(b <= a + 1e-12 for a, b in zip(objectives, objectives[1:]))
    assert objectives[-1] < 8 * 0.1 ** 2
    with pytest.raises(ValueError, match="needs at least 500 training descriptors, got 400"):
        train_codebook(x, 500)


def test_bad_input_is_refused_or_scores_zero():
    codebook, db, db_ids, q, q_ids = _problem()
    index = ASMKIndex.build(codebook, db, db_ids)
    bad = q.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="query_descriptors contains 1 NaN/Inf"):
        index.search(bad, q_ids)
    with pytest.raises(ValueError, match="12-D, the index's codebook 16-D"):
        index.search(q[:, :12], q_ids)
    with pytest.raises(ValueError, match="one per descriptor"):
        ASMKIndex.build(codebook, db, db_ids[:-1])
    scores, _ = index.search(q[:0], q_ids[:0], num_queries=2)
    assert scores.shape == (2, index.num_images) and (scores == 0).all()
    empty = ASMKIndex.build(codebook, db[:0], db_ids[:0], num_images=3)
    scores, order = empty.search(q, q_ids)
    assert (scores == 0).all() and order[0].tolist() == [0, 1, 2]


def test_save_and_load_round_trip(tmp_path):
    codebook, db, db_ids, q, q_ids = _problem()
    index = ASMKIndex.build(codebook, db, db_ids)
    path = index.save(tmp_path / "index.pt")
    loaded = ASMKIndex.load(path)
    assert torch.equal(loaded.search(q, q_ids)[1], index.search(q, q_ids)[1])
    state = torch.load(path, weights_only=True)
    state["offsets"][-1] += 1
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="corrupt ASMK index"):
        ASMKIndex.load(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="cannot read ASMK index"):
        ASMKIndex.load(tmp_path / "junk.pt")


@pytest.mark.parametrize("width", [16, 15, 1])
def test_hamming_distance_of_packed_codes(width):
    from gpu_dsm.kernels.bits import hamming

    g = torch.Generator().manual_seed(width)
    a = torch.randint(0, 256, (300, width), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (300, width), dtype=torch.uint8, generator=g)
    b[0] = a[0]
    b[1] = 255 - a[1]
    want = [sum(bin(x ^ y).count("1") for x, y in zip(r, t)) for r, t in zip(a.tolist(), b.tolist())]
    assert hamming(a, b).tolist() == want and want[0] == 0 and want[1] == 8 * width


def test_popcount_paths_agree():
    from gpu_dsm.kernels.bits import gather_rows, popcount64

    g = torch.Generator().manual_seed(7)
    x = torch.randint(-2 ** 63, 2 ** 63 - 1, (5000,), generator=g)
    x[:3] = torch.tensor([-1, 0, -2 ** 63])
    want = [bin(v & (2 ** 64 - 1)).count("1") for v in x.tolist()]
    assert popcount64(x).tolist() == want and popcount64(x, native=False).tolist() == want
    codes = torch.randint(0, 256, (50, 16), dtype=torch.uint8, generator=g)
    rows = torch.tensor([7, 0, 49, 7])
    assert torch.equal(gather_rows(codes, rows), codes[rows]) and torch.equal(gather_rows(codes[:, :15], rows), codes[rows, :15])


def test_scores_equal_the_authors_asmk_package(require):
    """The authors' implementation (PyPI ``asmk``, needs faiss-cpu) given the same descriptors and
    codebook. Its residual sums and quantisation run in float32: scores agree to 1e-5."""
    require("faiss", "the authors' asmk package needs it")
    asmk = require("asmk", "the authors' ASMK is this test's oracle")
    from gpu_dsm.eval.bench_asmk import _package_search

    codebook, db, db_ids, q, q_ids = _problem(dim=32, words=24, seed=5)
    codebook, db, q = codebook.float(), db.float(), q.float()
    cfg = ASMKConfig()
    index = ASMKIndex.build(codebook, db, db_ids, cfg)
    scores, order = index.search(q, q_ids)
    ours = torch.zeros(order.shape, dtype=torch.float64).scatter_(1, order, scores).numpy()
    _, _, theirs, stages = _package_search(codebook.numpy(), db.numpy(), db_ids.numpy(), q.numpy(), q_ids.numpy(), cfg)
    assert asmk is not None and theirs.shape == (3, 7) and set(stages) == {"quantize_aggregate", "search"}
    np.testing.assert_allclose(ours[:3], theirs, atol=1e-5, rtol=0)
    assert (theirs > 0).sum() > 10


def test_faiss_codebook_backend(require):
    require("faiss", "the faiss codebook backend is an optional extra")
    x = _clustered(600, 8, 5, seed=4, spread=0.1).float()
    words = train_codebook(x, 20, iterations=10, seed=1234, backend="faiss")
    assert words.shape == (20, 8) and words.dtype == torch.float32
    assert kmeans_objective(x, words) < 8 * 0.1 ** 2 * 1.2


def test_codebook_size_scales_with_the_training_descriptors():
    """Default codebook size: the power of two at or below descriptors / 300 within [1024, 65536]
    (HOW's 65,536 for ~20M descriptors), never more words than descriptors; a set size wins."""
    cfg = ASMKConfig()
    assert cfg.codebook_size is None
    sizes = {n: cfg.words_for(n) for n in (500, 165_000, 511_000, 1_000_000, 2_690_000, 20_000_000, 10**9)}
    assert sizes == {500: 500, 165_000: 1024, 511_000: 1024, 1_000_000: 2048, 2_690_000: 8192, 20_000_000: 65536,
                     10**9: 65536}
    assert ASMKConfig(codebook_size=4096).words_for(10**6) == 4096
    with pytest.raises(ValueError, match="codebook_size"):
        ASMKConfig(codebook_size=0)
