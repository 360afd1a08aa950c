"""The one-call path: images -> global ranking -> DSM re-ranking, in memory."""
import numpy as np
import skimage.data
import torch

from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.images import ImageSpec
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig


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


def test_activations_path_equals_images_path(lite0):
    cfg = RetrievalConfig(extract=ExtractConfig(image_size=256, progress=False))
    retrieval = DSMRetrieval(lite0, cfg)
    images = _database()[:2]
    from_images = retrieval.describe(images)
    from_acts = retrieval.describe_activations(extract_activations(lite0, images, cfg.extract))
    torch.testing.assert_close(from_images.global_descriptors, from_acts.global_descriptors)
    assert torch.equal(from_images.local.counts, from_acts.local.counts)
    torch.testing.assert_close(from_images.local.xy, from_acts.local.xy)
