"""The default detector rules (DetectorConfig()): gpu_dsm.detect equals the plain loop-by-loop reference
(gpu_dsm.reference.detect.default_image_features) on real activations, database and query, with every
cap reached (cluttered channels, the per-channel cap, NMS, the per-scale and per-image caps)."""
import numpy as np
import pytest

from gpu_dsm.detect import DetectorConfig, activations_to_levels, auto_delta, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.reference import detect as ref


@pytest.fixture(scope="module")
def real_maps(lite0, mini):
    cfg = ExtractConfig(image_size=1024, progress=False)
    return cfg, extract_activations(lite0, [mini.database_specs()[7], mini.query_specs()[0]], cfg)


@pytest.mark.slow
@pytest.mark.parametrize("which, is_query, max_features, per_channel", [(0, False, 100, 10), (1, True, 512, 12)],
                         ids=["database", "query"])
def test_default_rules_equal_the_plain_reference(real_maps, which, is_query, max_features, per_channel):
    """Defaults but the caps that these maps would not reach: 100 features (database), 12 per channel (query)."""
    cfg, maps = real_maps
    stats = {}
    expected = ref.default_image_features([m.numpy() for m in maps[which]], 6.0, is_query, max_features=max_features,
                                          per_channel=per_channel, stats=stats)
    for cap in ("cluttered_channels", "capped_channels", "scale_capped", "image_capped") + (() if is_query else ("nms_suppressed",)):
        assert stats.get(cap, 0) > 0, f"{cap} not reached: {stats}"
    got = detect([maps[which]], DetectorConfig(max_features=max_features, per_channel_query=per_channel,
                                                  per_channel_database=per_channel), is_query=is_query, scales=cfg.scales,
                 activation_bound=6.0)
    keep = got.valid[0]
    assert int(keep.sum()) == len(expected) == max_features
    ours = list(zip(got.scale[0][keep].tolist(), got.channel[0][keep].tolist(),
                    [(round(x, 4), round(y, 4)) for x, y in got.xy[0][keep].tolist()], got.strength[0][keep].tolist()))
    theirs = [(f["scale"], f["channel"], (round(f["x"], 4), round(f["y"], 4)), f["strength"]) for f in expected]
    # the same features, in decreasing strength
    assert {t[:3] for t in ours} == {t[:3] for t in theirs}
    np.testing.assert_allclose([t[3] for t in ours], [t[3] for t in theirs], rtol=1e-6)
    if is_query:
        # in the same order: equal ranks (saturated regions, all pixels at the bound) in the order of
        # (scale, channel, level, first pixel). After NMS (database images) torchvision's
        # batched_nms returns equal scores in an unspecified order
        assert [t[:3] for t in ours] == [t[:3] for t in theirs]


@pytest.mark.slow
def test_default_delta_equals_the_plain_one(real_maps):
    _, maps = real_maps
    for per_image in maps:
        for acts in per_image:
            levels = activations_to_levels(acts, "range", 6.0)
            assert auto_delta(levels) == ref.default_delta(ref.default_levels(acts.numpy(), 6.0))
            assert (levels.long().numpy() == ref.default_levels(acts.numpy(), 6.0)).all()
