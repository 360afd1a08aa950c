"""The C kernels (gpu_dsm.kernels.native, kernels/asmk_scores.c): built once into a cache, equal
to the tensor path of ASMK search (a plain float64 loop checks both in test_asmk.py and, on real
HOW descriptors, test_how.py), threads that share work, indices checked before the C code reads
memory, and a clear fallback or error where no compiler works. Also the grouped top-k of the
nearest-word assignment against torch.topk."""
import dataclasses

import pytest
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex
from gpu_dsm.asmk.codebook import smallest
from gpu_dsm.asmk.codes import distance_weights
from gpu_dsm.kernels import inverted_file, native


def _index(backend="native", binary=True, images=40, words=30, dim=112, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(words, dim, generator=g, dtype=torch.float64)
    db = codebook[torch.randint(0, words, (images * 25,), generator=g)] + torch.randn(images * 25, dim, generator=g,
                                                                                      dtype=torch.float64)
    db_ids = torch.arange(images).repeat_interleave(25)
    cfg = ASMKConfig(binary=binary, search_backend=backend, query_assignments=3)
    q = db[torch.randperm(db.shape[0], generator=g)[:200]] + 0.3 * torch.randn(200, dim, generator=g, dtype=torch.float64)
    q_ids = torch.randint(0, 7, (200,), generator=g)
    return ASMKIndex.build(codebook, db, db_ids, cfg), q, q_ids


def _with_backend(index, backend):
    return dataclasses.replace(index, config=dataclasses.replace(index.config, search_backend=backend))


@pytest.mark.parametrize("binary", [True, False])
def test_native_search_equals_the_tensor_path(binary, native_kernel):
    index, q, q_ids = _index(binary=binary)
    ours = index.search(q, q_ids)
    tensors = _with_backend(index, "torch").search(q, q_ids)
    assert torch.allclose(ours[0], tensors[0], atol=1e-12, rtol=0) and torch.equal(ours[1], tensors[1])
    assert (ours[0][:, 0] > 0).all()


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
@pytest.mark.parametrize("queries", [1, 2, 7])
def test_threads_split_the_work_without_changing_scores(threads, queries, native_kernel):
    """With fewer queries than threads every thread sums into a block of its own; with more,
    threads own whole queries: the scores are the one-thread scores either way."""
    index, q, q_ids = _index()
    keep = q_ids < queries
    vectors = index_query_codes(index, q[keep], q_ids[keep])
    weights = distance_weights(index.codes.shape[1], index.dim, 3.0, 0.0)
    args = (*vectors, index.offsets, index.image_ids, index.codes, queries, index.num_images)
    one = inverted_file.inverted_file_scores(*args, weight_of_distance=weights, threads=1)
    many = inverted_file.inverted_file_scores(*args, weight_of_distance=weights, threads=threads, comparisons_per_thread=1)
    assert one.shape == (queries, index.num_images) and (one > 0).sum() > queries
    query, word = vectors[0], vectors[1]
    ranges, whole = inverted_file._ranges(query, index.offsets[word + 1] - index.offsets[word], queries, threads)
    assert len(ranges) == (1 if threads == 1 else min(threads, queries) if whole else threads)
    assert whole == (queries >= threads) and ranges[0][0] == 0 and ranges[-1][1] == query.numel()
    assert torch.allclose(one, many, atol=1e-12, rtol=0)


def index_query_codes(index, q, q_ids):
    from gpu_dsm.asmk.codes import aggregate_residuals, binary_codes

    v = aggregate_residuals(q, q_ids, index.codebook, index.config.query_assignments)
    return v.image, v.word, binary_codes(v.vector)


def test_indices_are_checked_before_the_c_code_reads_memory(native_kernel):
    index, q, q_ids = _index()
    query, word, codes = index_query_codes(index, q, q_ids)
    weights = distance_weights(index.codes.shape[1], index.dim, 3.0, 0.0)
    base = dict(offsets=index.offsets, image_ids=index.image_ids, db_codes=index.codes, num_queries=7,
                num_images=index.num_images)

    def call(**change):
        kwargs = {"query": query, "word": word, "codes": codes, **base, **change}
        return inverted_file.inverted_file_scores(weight_of_distance=weights, **kwargs)

    bad_word = word.clone()
    bad_word[3] = index.num_words
    with pytest.raises(ValueError, match="known words"):
        call(word=bad_word)
    with pytest.raises(ValueError, match="sorted by query"):
        call(query=query.flip(0))
    with pytest.raises(ValueError, match="queries in range"):
        call(num_queries=2)
    with pytest.raises(ValueError, match="image_ids as torch.int32"):
        call(image_ids=index.image_ids.long())
    with pytest.raises(ValueError, match="do not fit together"):
        call(codes=codes[:, :5])
    with pytest.raises(ValueError, match="weight_of_distance"):
        inverted_file.inverted_file_scores(query, word, codes, **base, weight_of_distance=weights[:-1])
    # offsets and image ids are checked by the kernel as it reads them
    with pytest.raises(ValueError, match=r"\d+ rows or entries point outside the inverted file"):
        call(image_ids=torch.where(torch.arange(index.num_entries) == int(index.offsets[word[0]]),
                                   torch.tensor(index.num_images, dtype=torch.int32), index.image_ids))
    with pytest.raises(ValueError, match=r"point outside the inverted file \(offsets beyond its"):
        call(offsets=index.offsets * 2)
    # an inverted file whose offsets point past its entries is refused when it is made
    with pytest.raises(ValueError, match="do not fit together"):
        dataclasses.replace(index, offsets=index.offsets + 1)
    empty = call(query=query[:0], word=word[:0], codes=codes[:0])
    assert empty.shape == (7, index.num_images) and not empty.any()


def test_the_library_is_built_once_into_its_cache(tmp_path, monkeypatch, native_kernel):
    monkeypatch.setenv("GPU_DSM_KERNEL_CACHE", str(tmp_path / "kernels"))
    native._build.cache_clear()
    try:
        assert native.available("asmk_scores") is None
        built = sorted(p.name for p in (tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].startswith("asmk_scores-") and built[0].endswith(".so")
        native._build.cache_clear()
        stamp = (tmp_path / "kernels" / built[0]).stat().st_mtime_ns
        assert native.available("asmk_scores") is None  # a new process loads it, does not rebuild it
        assert (tmp_path / "kernels" / built[0]).stat().st_mtime_ns == stamp
    finally:
        native._build.cache_clear()


def test_without_a_compiler_auto_falls_back_and_native_names_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_DSM_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    native._build.cache_clear()
    try:
        assert "no C compiler" in inverted_file.unavailable()
        index, q, q_ids = _index(backend="auto")
        with pytest.warns(RuntimeWarning, match="the C kernel is unavailable .no C compiler"):
            assert index.search_backend() == "torch"
        want = _with_backend(index, "torch").search(q, q_ids)
        with pytest.warns(RuntimeWarning, match="scoring with tensor passes"):
            got = index.search(q, q_ids)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        with pytest.raises(native.NativeUnavailable, match="search_backend='native': no C compiler"):
            _with_backend(index, "native").search(q, q_ids)
    finally:
        native._build.cache_clear()
    with pytest.raises(ValueError, match="search_backend must be one of"):
        ASMKConfig(search_backend="fast")


def test_a_failed_build_leaves_no_library(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake-cc 1.0; exit 0; fi\n"
                    "echo 'error: broken' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("GPU_DSM_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setenv("CC", str(fake))
    native._build.cache_clear()
    try:
        reason = native.available("asmk_scores")
        assert "compiling asmk_scores.c failed" in reason and "error: broken" in reason
        assert list((tmp_path / "kernels").iterdir()) == []
    finally:
        native._build.cache_clear()


@pytest.mark.parametrize("width,k", [(4096, 5), (1000, 5), (4096, 1), (97, 5), (65, 3), (300, 40)])
def test_grouped_smallest_equals_topk(width, k):
    g = torch.Generator().manual_seed(width + k)
    values = torch.randint(0, 50, (300, width), generator=g).float()  # many ties
    values[0] = 7.0  # a row of one value
    best, columns = smallest(values, k)
    want = torch.topk(values, k, dim=1, largest=False, sorted=True).values
    assert torch.equal(best, want)
    assert torch.equal(values.gather(1, columns), best)
    assert all(len(set(row)) == k for row in columns.tolist())  # k distinct columns per row
    distinct = torch.randn(50, width, generator=g)
    assert torch.equal(smallest(distinct, k)[1], torch.topk(distinct, k, dim=1, largest=False, sorted=True).indices)
