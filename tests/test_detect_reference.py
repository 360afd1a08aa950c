"""DetectorConfig.reference(): the batched authors' rules equal the plain loop-by-loop reference of the
authors' feature code (gpu_dsm.reference.detect) on real activations."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from gpu_dsm.detect import DetectorConfig, detect
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.reference import detect as ref
from gpu_dsm.authors_selection import (cholesky_fails, ellipse_polygons, fused_multiply_add, reference_delta,
                                         reference_levels, round_half_away, vlfeat_moments)
from gpu_dsm.mser import mser


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
    stats = {}
    expected = ref.authors_image_features([m.numpy() for m in maps[which]], 6.0, is_query, stats=stats)
    got = detect([maps[which]], DetectorConfig.reference(), is_query=is_query, scales=cfg.scales, activation_bound=6.0)
    keep = got.valid[0]
    ours = [{"scale": s, "channel": c, "x": x, "y": y} for s, c, (x, y) in
            zip(got.scale[0][keep].tolist(), got.channel[0][keep].tolist(), got.xy[0][keep].tolist())]
    assert len(expected) > 100
    assert len(expected) == len(ours)
    assert _as_set(ours) == _as_set(expected)
    strengths = sorted(got.strength[0][keep].tolist())
    np.testing.assert_allclose(strengths, sorted(f["strength"] for f in expected), rtol=1e-6)
    if not is_query:
        assert stats["nms_suppressed"] > 0


@pytest.mark.slow
def test_vlfeat_moments_polygons_and_cholesky_on_real_regions(real_maps):
    """Per region: the float32 moments, the fused vertices and the chol() test equal the plain ones."""
    _, maps = real_maps
    acts = maps[0][0][:256]
    levels = reference_levels(acts * (255.0 / 6))
    regions = mser(levels, delta=8, polarity="both")
    assert len(regions) > 200
    mean32, moments = vlfeat_moments(regions)
    x, y = ellipse_polygons(mean32, moments)
    fails = cholesky_fails(moments)
    width = levels.shape[-1]
    assert bool(fails.any()) and not bool(fails.all())
    for r in range(0, len(regions), 2):
        k, bright, level = int(regions.map_index[r]), bool(regions.bright[r]), int(regions.level[r])
        x0, y0, x1, y1 = regions.bbox[r].tolist()
        # the region's pixels: its component of the level set inside its box, found by area and box
        plane = (levels[k] >= level) if bright else (levels[k] <= level)
        lab = ndimage.label(plane.numpy(), structure=np.ones((3, 3)))[0]
        comps = [c for c in np.unique(lab[y0:y1 + 1, x0:x1 + 1]) if c and (lab == c).sum() == int(regions.area[r])]
        pix = np.flatnonzero(lab == comps[0])
        xs, ys = (pix % width).tolist(), (pix // width).tolist()
        frame = ref.vl_mser_frame(xs, ys)
        assert frame[:2] == (float(mean32[r, 0]) + 1.0, float(mean32[r, 1]) + 1.0)
        assert frame[2:] == tuple(moments[r].double().tolist())
        assert bool(fails[r]) == (not ref.chol_ok(*frame[2:]))
        if not fails[r]:
            vx, vy = ref.ellipse_vertices(frame)
            assert vx == x[r].tolist() and vy == y[r].tolist()


def test_fused_multiply_add_is_rounded_once():
    from fractions import Fraction

    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2000, generator=g, dtype=torch.float64) * 10 for _ in range(3))
    got = fused_multiply_add(a, b, c)
    exact = [float(Fraction(x) * Fraction(y) + Fraction(z)) for x, y, z in zip(a.tolist(), b.tolist(), c.tolist())]
    assert got.tolist() == exact
    assert (a * b + c).tolist() != exact  # the unfused sum differs somewhere: the test can see it


def test_poly2mask_port_on_small_polygons():
    """The plain port of Octave's poly2mask on shapes whose masks are known."""
    square = ref.poly2mask([2, 5, 5, 2, 2], [2, 2, 5, 5, 2], 8, 8)
    # scanline fill: left edges excluded except where a span is one pixel, bottom edge excluded
    assert square == {(r, c) for r in (3, 4, 5) for c in (3, 4, 5)}
    assert ref.poly2mask([1, 4, 1], [3, 3, 3], 5, 5) == set()  # flat polygon: empty (MATLAB's behaviour)
    diamond = ref.poly2mask([3, 5, 3, 1, 3], [1, 3, 5, 3, 1], 6, 6)
    assert (3, 3) in diamond and (1, 3) not in diamond and len(diamond) > 4


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
