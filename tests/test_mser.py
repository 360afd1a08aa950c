"""The batched MSER against a plain port of VLFeat's algorithm, on synthetic and real activations."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from gpu_dsm.detect import activations_to_levels, auto_delta
from gpu_dsm.mser import mser
from gpu_dsm.reference.mser import mser_reference, region_stats

DSM = dict(max_variation=0.5, min_diversity=0.7, min_area=0.001, max_area=0.75)


def _smooth_maps(n, h, w, seed=0):
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((n, h, w)), (0, 1.5, 1.5))
    x = (x - x.min((1, 2), keepdims=True)) / (np.ptp(x, axis=(1, 2), keepdims=True) + 1e-9)
    return np.round(np.maximum(x - 0.4, 0) * 255 / 0.6).astype(np.int64)


def _reference_regions(maps, delta, polarity="bright", **params):
    """Per region: (map, level, area, bbox) -> (mean, cov, max level), from the reference."""
    out = {}
    deltas = np.broadcast_to(np.asarray(delta), (len(maps),))
    for i, m in enumerate(maps):
        for bright in ([True, False] if polarity == "both" else [polarity == "bright"]):
            u = 255 - m if bright else m
            for r in mser_reference(u, int(deltas[i]), **params):
                ys, xs = np.divmod(np.asarray(r["pixels"]), m.shape[1])
                level = 255 - r["value"] if bright else r["value"]
                area, mean, cov = region_stats(r["pixels"], m.shape[1])
                key = (i, int(level), bright, area, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
                out[key] = (mean, cov, int(m.ravel()[r["pixels"]].max()))
    return out


def _batched_regions(maps, delta, polarity="bright", **params):
    res = mser(torch.from_numpy(maps), delta=delta, polarity=polarity, **params)
    out = {}
    for k in range(len(res)):
        key = (int(res.map_index[k]), int(res.level[k]), bool(res.bright[k]), int(res.area[k]),
               tuple(int(v) for v in res.bbox[k]))
        out[key] = (res.mean[k].numpy(), res.cov[k].numpy(), int(res.max_value[k]))
    return out


def _assert_same(got, expected):
    assert set(got) == set(expected), f"{len(set(got) - set(expected))} extra, {len(set(expected) - set(got))} missing"
    for key, (mean, cov, peak) in expected.items():
        g_mean, g_cov, g_peak = got[key]
        np.testing.assert_allclose(g_mean, mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(g_cov, cov, rtol=0, atol=1e-9)
        assert g_peak == peak


@pytest.mark.parametrize("polarity", ["bright", "dark", "both"])
@pytest.mark.parametrize("delta", [1, 4, 12])
def test_matches_reference_on_smooth_maps(polarity, delta):
    maps = _smooth_maps(24, 19, 26, seed=delta)
    expected = _reference_regions(maps, delta, polarity, **DSM)
    assert len(expected) > 50
    _assert_same(_batched_regions(maps, delta, polarity, **DSM), expected)


def test_other_parameters_and_per_map_delta():
    maps = _smooth_maps(16, 21, 17, seed=7)
    params = dict(max_variation=0.25, min_diversity=0.2, min_area=0.01, max_area=0.4)
    _assert_same(_batched_regions(maps, 5, **params), _reference_regions(maps, 5, **params))
    no_div = dict(DSM, min_diversity=1.0)
    _assert_same(_batched_regions(maps, 3, **no_div), _reference_regions(maps, 3, **no_div))
    deltas = np.arange(16) % 7 + 1
    _assert_same(_batched_regions(maps, torch.from_numpy(deltas), **DSM), _reference_regions(maps, deltas, **DSM))


def test_memory_chunks_do_not_change_the_result():
    maps = torch.from_numpy(_smooth_maps(30, 16, 16, seed=3))
    whole = mser(maps, delta=4)
    chunked = mser(maps, delta=4, max_voxels=3000)
    for name in ("map_index", "area", "level", "bbox"):
        assert torch.equal(getattr(whole, name), getattr(chunked, name))


def test_leading_dimensions_and_values():
    maps = torch.from_numpy(_smooth_maps(6, 15, 15, seed=4))
    flat = mser(maps, delta=3)
    shaped = mser(maps.view(2, 3, 15, 15), delta=3)
    assert torch.equal(flat.map_index, shaped.map_index) and shaped.num_maps == 6
    values = maps.double() / 10
    with_values = mser(maps, delta=3, values=values)
    torch.testing.assert_close(with_values.max_value, flat.max_value.double() / 10)
    assert (with_values.sum_value <= with_values.max_value * with_values.area.double() + 1e-9).all()


def test_defined_results_for_degenerate_maps():
    assert len(mser(torch.zeros(4, 10, 10, dtype=torch.long), delta=2)) == 0
    assert len(mser(torch.full((3, 8, 8), 200, dtype=torch.long), delta=2)) == 0
    assert len(mser(torch.randint(0, 255, (5, 2, 9)), delta=2)) == 0  # smaller than 3x3
    empty = mser(torch.zeros(0, 10, 10, dtype=torch.long), delta=2)
    assert len(empty) == 0 and empty.mean.shape == (0, 2)
    one = torch.zeros(1, 12, 12, dtype=torch.long)
    one[0, 4:7, 3:8] = 100  # a plateau on zero: one bright region
    res = mser(one, delta=5, min_diversity=0.7)
    assert len(res) == 1 and int(res.area[0]) == 15 and int(res.level[0]) == 100
    torch.testing.assert_close(res.mean[0], torch.tensor([5.0, 5.0], dtype=torch.float64))


def test_bad_input():
    with pytest.raises(ValueError, match="integer tensor"):
        mser(torch.rand(2, 5, 5), delta=2)
    with pytest.raises(ValueError, match="0..255"):
        mser(torch.full((1, 5, 5), 300), delta=2)
    with pytest.raises(ValueError, match="delta"):
        mser(torch.zeros(1, 5, 5, dtype=torch.long), delta=0)
    with pytest.raises(ValueError, match="polarity"):
        mser(torch.zeros(1, 5, 5, dtype=torch.long), delta=1, polarity="up")
    with pytest.raises(ValueError, match="NaN/Inf"):
        activations_to_levels(torch.tensor([[[float("nan")]]]))


def test_level_step_is_a_coarser_detector():
    maps = torch.from_numpy(_smooth_maps(40, 24, 24, seed=11))
    exact = mser(maps, delta=8)
    coarse = mser(maps, delta=8, level_step=4)
    exact_keys = {(int(m), int(a)) for m, a in zip(exact.map_index, exact.area)}
    coarse_keys = {(int(m), int(a)) for m, a in zip(coarse.map_index, coarse.area)}
    recall = len(exact_keys & coarse_keys) / len(exact_keys)
    assert 0.2 < recall < 1.0
    # thresholds lie on the coarse grid: levels >= 255 - 4k
    assert ((255 - coarse.level) % 4 == 0).all()


@pytest.mark.slow
def test_matches_reference_on_real_activations(mini, lite0):
    """All 1280 channels of EfficientNet-Lite0 on real roxford5k-mini photos, DSM parameters."""
    from gpu_dsm.extract import ExtractConfig, extract_activations

    images = [mini.database_specs()[i] for i in (0, 40)] + [mini.query_specs()[2]]
    acts = extract_activations(lite0, images, ExtractConfig(image_size=768, scales=(1.0, 0.5), progress=False))
    compared = 0
    for per_scale in acts:
        for a in per_scale:
            levels = activations_to_levels(a, "range", 6.0)
            delta = auto_delta(levels)
            maps = levels.long().numpy()
            expected = _reference_regions(maps, delta, **DSM)
            _assert_same(_batched_regions(maps, delta, **DSM), expected)
            compared += len(expected)
    assert compared > 5000


def test_gpu_labelling_path_and_packing_give_the_same_regions(mini, lite0, monkeypatch):
    """The GPU path's labelling (``propagate``, run here on the CPU) and any page size for the
    packed level-set tiles give exactly the regions of the default CPU path, on real activations."""
    import gpu_dsm.mser as mser_module
    from gpu_dsm.extract import ExtractConfig, extract_activations

    acts = extract_activations(lite0, [mini.database_specs()[7]], ExtractConfig(image_size=512, scales=(1.0,), progress=False))
    levels = activations_to_levels(acts[0][0][:320], "range", 6.0)
    delta = auto_delta(levels)
    expected = mser(levels, delta=delta, values=acts[0][0][:320], **DSM)
    assert len(expected) > 300
    monkeypatch.setattr(mser_module, "_PAGE_SIDE", 40)  # many small pages
    for backend in ("scipy", "propagate"):
        got = mser(levels, delta=delta, values=acts[0][0][:320], backend=backend, **DSM)
        for name in ("map_index", "area", "level", "bbox", "mean", "cov", "max_value"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (backend, name)
        torch.testing.assert_close(got.sum_value, expected.sum_value, rtol=1e-12, atol=0)


def test_dense_maps_without_zeros():
    """Maps with no background (the support is almost the whole map) match the reference."""
    rng = np.random.default_rng(5)
    x = ndimage.gaussian_filter(rng.random((12, 18, 22)), (0, 1.5, 1.5))
    maps = np.round((x - x.min()) / np.ptp(x) * 200 + 30).astype(np.int64)
    _assert_same(_batched_regions(maps, 3, "both", **DSM), _reference_regions(maps, 3, "both", **DSM))


@pytest.mark.slow
def test_c_kernel_equals_the_tensor_path_on_real_maps(mini, lite0, native_kernel):
    """The C kernel (the CPU default) and the tensor path give the same regions, every field bit
    for bit, on all 1280 channels of a real 1024-px image at 3 scales, both polarities; and the
    detector's features are the same with either."""
    from gpu_dsm.detect import DetectorConfig, detect
    from gpu_dsm.extract import ExtractConfig, extract_activations

    acts = extract_activations(lite0, [mini.database_specs()[7]], ExtractConfig(image_size=1024, progress=False))[0]
    compared = 0
    for a in acts:
        levels = activations_to_levels(a, "range", 6.0)
        delta = auto_delta(levels)
        fast = mser(levels, delta=delta, values=a, polarity="both", backend="native", **DSM)
        plain = mser(levels, delta=delta, values=a, polarity="both", backend="scipy", **DSM)
        for name in ("map_index", "area", "level", "mean", "cov", "max_value", "sum_value", "bbox", "bright", "seed"):
            got, expected = getattr(fast, name), getattr(plain, name)
            assert got.dtype == expected.dtype and torch.equal(got, expected), name
        compared += len(plain)
    assert compared > 10000
    for is_query in (False, True):
        fast = detect([acts], DetectorConfig(), is_query=is_query, activation_bound=6.0)
        plain = detect([acts], DetectorConfig(labelling="scipy"), is_query=is_query, activation_bound=6.0)
        assert int(fast.counts[0]) > 100
        for name in ("xy", "frame", "strength", "channel", "scale", "valid"):
            assert torch.equal(getattr(fast, name), getattr(plain, name)), (is_query, name)


def test_without_the_c_kernel_auto_falls_back_to_the_tensor_path(monkeypatch):
    """Where the C kernel does not build, "auto" warns and runs the tensor path (the same regions);
    an explicit "native" raises with the reason."""
    import gpu_dsm.kernels.mser as kernel
    from gpu_dsm.kernels.native import NativeUnavailable

    maps = torch.from_numpy(_smooth_maps(6, 20, 24, seed=3))
    expected = mser(maps, delta=5, polarity="both", backend="scipy", **DSM)
    monkeypatch.setattr(kernel, "unavailable", lambda: "no C compiler: 'cc' cannot run")
    with pytest.warns(RuntimeWarning, match="C kernel is unavailable"):
        got = mser(maps, delta=5, polarity="both", **DSM)
    for name in ("map_index", "area", "level", "mean", "cov", "bbox", "seed"):
        assert torch.equal(getattr(got, name), getattr(expected, name)), name
    assert len(expected) > 10
    with pytest.raises(NativeUnavailable, match="no C compiler"):
        mser(maps, delta=5, backend="native", **DSM)
    with pytest.raises(ValueError, match="backend must be one of"):
        mser(maps, delta=5, backend="cuda", **DSM)
