"""The one-call path: images -> global ranking -> DSM re-ranking, in memory."""
import numpy as np
import pytest
import skimage.data
import torch

from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.images import ImageSpec
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig
from gpu_dsm.knn import SearchConfig


def _database():
    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
            np.ascontiguousarray(skimage.data.astronaut()[40:400, 60:480])]


def test_search_finds_the_same_scene_and_verifies_it(lite0):
    retrieval = DSMRetrieval(lite0, RetrievalConfig(extract=ExtractConfig(image_size=320, progress=False)))
    index = retrieval.index(_database())
    assert index.global_descriptors.shape == (5, 1280) and index.local.num_images == 5
    query = ImageSpec(skimage.data.astronaut(), box=(100, 50, 450, 420))
    result = retrieval.search([query], index)
    assert set(result.reranked.indices[0, :2].tolist()) == {0, 4}, "both astronaut images come first"
    inliers = dict(zip(result.reranked.indices[0].tolist(), result.reranked.inliers[0].tolist()))
    assert min(inliers[0], inliers[4]) > max(inliers[1], inliers[2], inliers[3])


def test_faiss_search_backend_in_the_module(lite0, require):
    """RetrievalConfig(search=...): the module's global search runs on that index; FAISS flat
    (exact) gives the exact search's candidates and the same re-ranking."""
    require("faiss", "FAISS backends are an optional extra (pip install -e '.[faiss]')")
    extract = ExtractConfig(image_size=256, progress=False)
    exact = DSMRetrieval(lite0, RetrievalConfig(extract=extract))
    flat = DSMRetrieval(lite0, RetrievalConfig(extract=extract, search=SearchConfig(backend="faiss-flat")))
    index = exact.index(_database())
    assert index.search_index.faiss_index is None
    flat_index = flat.index(_database())
    assert flat_index.search_index.faiss_index is not None
    queries = exact.describe([ImageSpec(skimage.data.astronaut(), box=(100, 50, 450, 420))], is_query=True)
    a, b = exact.search(queries, index), flat.search(queries, flat_index)
    assert torch.equal(a.initial, b.initial) and torch.allclose(a.similarities, b.similarities, atol=1e-5)
    assert torch.equal(a.reranked.indices, b.reranked.indices) and torch.equal(a.reranked.inliers, b.reranked.inliers)


def test_activations_path_equals_images_path(lite0):
    cfg = RetrievalConfig(extract=ExtractConfig(image_size=256, progress=False))
    retrieval = DSMRetrieval(lite0, cfg)
    images = _database()[:2]
    from_images = retrieval.describe(images)
    from_acts = retrieval.describe_activations(extract_activations(lite0, images, cfg.extract))
    torch.testing.assert_close(from_images.global_descriptors, from_acts.global_descriptors)
    assert torch.equal(from_images.local.counts, from_acts.local.counts)
    torch.testing.assert_close(from_images.local.xy, from_acts.local.xy)


def test_asmk_initial_ranking_in_the_module(lite0):
    """initial="asmk": fit on other images, index, search; the initial ranking is the ASMK index's."""
    from gpu_dsm.asmk import ASMKConfig
    from gpu_dsm.how import HOWConfig
    import pytest

    how = HOWConfig(image_size=256, num_features=150, progress=False)
    cfg = RetrievalConfig(extract=ExtractConfig(image_size=320, progress=False), initial="asmk", how=how,
                          asmk=ASMKConfig(codebook_size=32, kmeans_iterations=4))
    retrieval = DSMRetrieval(lite0, cfg)
    with pytest.raises(ValueError, match="fit_asmk"):
        retrieval.index(_database())
    retrieval.fit_asmk([skimage.data.coffee(), skimage.data.rocket(), skimage.data.immunohistochemistry()])
    index = retrieval.index(_database())
    assert index.asmk.num_images == 5 and index.how.counts().tolist() == [150] * 5
    query = ImageSpec(skimage.data.astronaut(), box=(100, 50, 450, 420))
    described = retrieval.describe([query], is_query=True)
    result = retrieval.search(described, index)
    scores, ranks = index.asmk.search(described.how.descriptors, described.how.image_ids, k=5, num_queries=1)
    assert torch.equal(result.initial, ranks) and torch.allclose(result.similarities.double(), scores, atol=1e-6)
    assert set(result.initial[0, :2].tolist()) == {0, 4}, "ASMK puts both astronaut images first"
    assert set(result.reranked.indices[0, :2].tolist()) == {0, 4}
