"""DetectorConfig.reference(): the batched authors' rules equal a plain loop-by-loop reference on real activations."""
import math

import numpy as np
import pytest
import torch

import reference_detect as ref
from gpu_dsm.detect import DetectorConfig, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.reference_selection import reference_delta, reference_levels, round_half_away


@pytest.fixture(scope="module")
def real_maps(lite0, mini):
    cfg = ExtractConfig(image_size=448, progress=False)
    return cfg, extract_activations(lite0, [mini.database_specs()[5], mini.query_specs()[2]], cfg)


def _as_set(features):
    return {(int(f["scale"]), int(f["channel"]), round(float(f["x"]), 4), round(float(f["y"]), 4)) for f in features}


@pytest.mark.slow
@pytest.mark.parametrize("which, is_query", [(0, False), (1, True)], ids=["database", "query"])
def test_reference_rules_equal_the_plain_reference(real_maps, which, is_query):
    cfg, maps = real_maps
    expected = ref.image_features([m.numpy() for m in maps[which]], 6.0, is_query)
    got = detect([maps[which]], DetectorConfig.reference(), is_query=is_query, scales=cfg.scales, activation_bound=6.0)
    keep = got.valid[0]
    ours = [{"scale": s, "channel": c, "x": x, "y": y} for s, c, (x, y) in
            zip(got.scale[0][keep].tolist(), got.channel[0][keep].tolist(), got.xy[0][keep].tolist())]
    assert len(expected) > 100
    assert _as_set(ours) == _as_set(expected)
    strengths = sorted(got.strength[0][keep].tolist())
    np.testing.assert_allclose(strengths, sorted(f["strength"] for f in expected), rtol=1e-6)
    # the polarity rule matters: some kept features are dark-on-bright regions
    assert len(expected) == len(ours)


def test_matlab_rounding_and_delta():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 2.4999, 254.5, 300.0])
    assert round_half_away(x).tolist() == [1.0, 2.0, 3.0, -1.0, 2.0, 255.0, 300.0]
    assert reference_levels(x).tolist() == [1, 2, 3, 0, 2, 255, 255]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scaled = (torch.rand(8, 6, 5, generator=g) ** 3 * 255) * (torch.rand(8, 6, 5, generator=g) > 0.6)
        assert reference_delta(scaled) == ref.hist_delta(scaled.numpy())
    assert reference_delta(torch.zeros(3, 4, 4)) == 12
    assert reference_delta(torch.full((2, 3, 3), 7.0)) == 7


def test_reference_preset_fields():
    cfg = DetectorConfig.reference()
    assert cfg.rules == "reference" and cfg.polarity == "both" and cfg.max_regions_per_channel == 36
    assert (cfg.per_channel_query, cfg.per_channel_database, cfg.nms_iou, cfg.max_features) == (20, 10, 0.2, 512)
    with pytest.raises(ValueError, match="strength='max'"):
        DetectorConfig.reference(strength="mean")
    with pytest.raises(ValueError, match="rules must be one of"):
        DetectorConfig(rules="matlab")
