import numpy as np
import pytest
import torch

from gpu_dsm.detect import DSMDetector, DetectorConfig, activations_to_levels, auto_delta, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.features import LocalFeatures


@pytest.fixture(scope="module")
def real_maps(mini, lite0):
    specs = [mini.query_specs()[0], mini.database_specs()[3]]
    return extract_activations(lite0, specs, ExtractConfig(image_size=512, progress=False))


def test_levels_and_delta():
    acts = torch.tensor([[[0.0, 3.0], [6.0, 7.0]]])
    assert activations_to_levels(acts, "range", 6.0).tolist() == [[[0, 128], [255, 255]]]
    assert activations_to_levels(acts * 100, "round").tolist() == [[[0, 255], [255, 255]]]
    assert activations_to_levels(acts, "channel_max").tolist() == [[[0, 109], [219, 255]]]
    levels = torch.arange(1, 101).view(1, 10, 10)
    # 60% of 1..100 falls in the bin centred at 59.95, truncated as VLFeat's C cast does
    assert auto_delta(levels, 0.6, cap=100) == 59
    assert auto_delta(levels, 0.6, cap=12) == 12
    assert auto_delta(torch.zeros(1, 4, 4, dtype=torch.long)) == 12
    assert auto_delta(torch.full((1, 4, 4), 3)) == 3


def test_detect_on_real_activations(real_maps):
    cfg = DetectorConfig()
    query = detect([real_maps[0]], cfg, is_query=True, scales=(1, 0.7, 0.5), activation_bound=6.0)
    db = detect([real_maps[1]], cfg, is_query=False, scales=(1, 0.7, 0.5), activation_bound=6.0)
    for feats, cap in ((query, cfg.per_channel_query), (db, cfg.per_channel_database)):
        assert feats.capacity == cfg.max_features and feats.num_channels == 1280
        f = feats.image(0)
        n = len(f["xy"])
        assert 0 < n <= cfg.max_features
        # per (scale, channel) cap
        keys = f["scale"] * 10000 + f["channel"]
        assert torch.bincount(keys).max() <= cap
        # frames: lower triangular, positive diagonal, covariance positive definite
        assert (f["frame"][:, 0, 1] == 0).all() and (f["frame"][:, 0, 0] > 0).all() and (f["frame"][:, 1, 1] > 0).all()
        # inside their maps, strength sorted descending, strength in activation units
        sizes = feats.map_sizes[0][f["scale"]]
        assert (f["xy"] >= 0).all() and (f["xy"][:, 0] < sizes[:, 1]).all() and (f["xy"][:, 1] < sizes[:, 0]).all()
        assert (f["strength"][:-1] >= f["strength"][1:]).all() and f["strength"].max() <= 6.0
        assert set(f["scale"].tolist()) <= {0, 1, 2}
    assert query.counts[0] > db.counts[0], "queries keep more per channel and skip NMS"


def test_caps_and_options(real_maps):
    few = detect([real_maps[0]], DetectorConfig(max_features=50), is_query=True, activation_bound=6.0)
    assert few.counts.tolist() == [50] and few.capacity == 50
    fixed = detect([real_maps[1]], DetectorConfig(delta=3, strength="mean", levels="channel_max"), activation_bound=6.0)
    assert fixed.counts[0] > 0
    no_nms = detect([real_maps[1]], DetectorConfig(nms_iou=1.0), activation_bound=6.0)
    with_nms = detect([real_maps[1]], DetectorConfig(), activation_bound=6.0)
    assert no_nms.counts[0] > with_nms.counts[0]


def test_empty_and_degenerate_inputs():
    zeros = [torch.zeros(8, 10, 10), torch.zeros(8, 7, 7)]
    feats = detect([zeros, zeros], DetectorConfig(), scales=(1, 0.7))
    assert feats.counts.tolist() == [0, 0] and feats.map_sizes.shape == (2, 2, 2)
    assert detect([], scales=(1.0,)).num_images == 0
    tiny = detect([[torch.rand(8, 2, 2) * 6]], DetectorConfig(), activation_bound=6.0)
    assert tiny.counts.tolist() == [0]
    with pytest.raises(ValueError, match="NaN/Inf"):
        detect([[torch.full((2, 5, 5), float("nan"))]])
    with pytest.raises(ValueError, match="levels"):
        DetectorConfig(levels="log")


def test_local_features_table(real_maps):
    feats = DSMDetector(activation_bound=6.0)(real_maps, is_query=False, scales=(1, 0.7, 0.5))
    assert feats.num_images == 2
    one = feats[1]
    assert one.num_images == 1 and torch.equal(one.xy, feats.xy[1:2])
    both = LocalFeatures.cat([feats[0], feats[1]])
    assert torch.equal(both.counts, feats.counts)
    torch.testing.assert_close(feats.cov, feats.frame @ feats.frame.transpose(-1, -2))
    trimmed = feats.trimmed()
    assert trimmed.capacity == int(feats.counts.max())
    moved = feats.to("meta")
    assert moved.xy.device.type == "meta" and moved.map_sizes.device.type == "meta"


def test_batched_detection_equals_one_image_at_a_time(real_maps):
    """Images of one size share MSER calls; each image's features are those it gets alone."""
    from gpu_dsm.detect import detect_images

    cfg = DetectorConfig()
    half = [[m[:, :, : m.shape[-1] // 2] for m in maps] for maps in real_maps]  # another size per scale
    batch = [real_maps[0], real_maps[1], half[0], real_maps[0]]
    together = detect_images(batch, cfg, is_query=False, bound=6.0)
    for maps, got in zip(batch, together):
        alone = detect_images([maps], cfg, is_query=False, bound=6.0)[0]
        assert alone.keys() == got.keys() and len(alone["xy"]) > 20
        for key in alone:
            assert torch.equal(alone[key], got[key]), key
