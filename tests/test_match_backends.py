"""Both backends of spatial verification (the C kernel and tensor passes) against the plain float64
matcher on small many-to-many tables (inlier counts, inlier correspondences, scale pairs,
transforms); the kernel's threads, input checks and the fallback without a compiler; the chunk
plan and the tensor passes' four device reads; the tensor passes' decisions under every float32
matmul precision setting. The real tables: test_match_real.py."""
import dataclasses

import numpy as np
import pytest
import torch

from gpu_dsm.features import LocalFeatures
from gpu_dsm.kernels import fsm, native
from gpu_dsm.match import ERRORS, MatchConfig, _plan_chunks, choose_backend, spatial_verify, tentative_correspondences
from gpu_dsm.reference.match import verify_pair_details

def _plain(query, candidates, query_index, cfg):
    return [verify_pair_details(query.image(int(query_index[p])), candidates.image(p), cfg)
            for p in range(candidates.num_images)]


def _compare(result, expected, transform_tolerance):
    """Pairs whose count, scale pair or inliers differ from the plain matcher's ``expected``;
    largest transform difference."""
    wrong, worst = [], 0.0
    for p, want in enumerate(expected):
        m = result.matches[p]
        got_matches = [tuple(r) for r in m[m[:, 0] >= 0].tolist()]
        if int(result.inliers[p]) != want["inliers"] or got_matches != want["matches"]:
            wrong.append(p)
            continue
        if want["inliers"] == 0:
            assert result.scale_pair[p].tolist() == [-1, -1] and torch.isnan(result.transform[p]).all()
            continue
        if tuple(result.scale_pair[p].tolist()) != want["scale_pair"]:
            wrong.append(p)
            continue
        diff = float(np.abs(result.transform[p].numpy() - want["transform"]).max())
        worst = max(worst, diff)
        if diff > transform_tolerance * (1 + float(np.abs(want["transform"]).max())):
            wrong.append(p)
    return wrong, worst


def _random_tables(seed, pairs=6, n=60, channels=12):
    """Small tables with many-to-many correspondences (few channels), three scales, a shared
    transform on part of the features, and a few duplicated feature positions."""
    g = torch.Generator().manual_seed(seed)

    def image():
        frame = torch.zeros(n, 2, 2)
        frame[:, 0, 0] = torch.rand(n, generator=g) + 0.5
        frame[:, 1, 0] = torch.randn(n, generator=g) * 0.3
        frame[:, 1, 1] = torch.rand(n, generator=g) + 0.5
        return {"xy": torch.rand(n, 2, generator=g) * 30, "frame": frame, "strength": torch.ones(n),
                "channel": torch.randint(0, channels, (n,), generator=g), "scale": torch.randint(0, 3, (n,), generator=g)}

    q = image()
    cands = []
    for p in range(pairs):
        c = image()
        k = 10 * p
        T = torch.tensor([[1.2, 0.0], [0.1, 0.9]])
        c["xy"][:k] = q["xy"][:k] @ T.T + 2 + 0.5 * torch.randn(k, 2, generator=g)
        c["frame"][:k] = T @ q["frame"][:k]
        c["channel"][:k], c["scale"][:k] = q["channel"][:k], q["scale"][:k]
        c["xy"][k:k + 3] = c["xy"][k]  # three features at one position
        cands.append(c)
    sizes = torch.tensor([[[32, 32], [23, 23], [16, 16]]])
    return (LocalFeatures.from_images([q], sizes, (1.0, 0.707, 0.5), channels),
            LocalFeatures.from_images(cands, sizes.expand(pairs, 3, 2), (1.0, 0.707, 0.5), channels))


@pytest.mark.parametrize("cfg", [MatchConfig(), MatchConfig(threshold=2.0, error="symmetric"),
                                 MatchConfig(lo_hypotheses=0), MatchConfig(lo_rounds=0, threshold=3.0),
                                 MatchConfig(lo_hypotheses=1, lo_rounds=5, lo_factor=2.0, max_scale_change=1.5)])
def test_native_equals_the_plain_matcher_on_many_to_many_tables(cfg, native_kernel):
    for seed in range(3):
        q, c = _random_tables(seed)
        qi = torch.zeros(c.num_images, dtype=torch.long)
        result = spatial_verify(q, c, qi, dataclasses.replace(cfg, backend="native"))
        wrong, worst = _compare(result, _plain(q, c, qi, cfg), transform_tolerance=0.0)
        assert wrong == [] and worst == 0.0
        assert result.inliers.max() >= 12  # the shared transform found
        torch_result = spatial_verify(q, c, qi, dataclasses.replace(cfg, backend="torch"))
        assert torch.equal(torch_result.inliers, result.inliers) and torch.equal(torch_result.matches, result.matches)


_KERNEL_SETTINGS = dict(threshold=4.0, max_scale_change=3.0, symmetric=False, lo_hypotheses=5, lo_factor=4.0,
                        lo_rounds=2, lo_min_inliers=4)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_threads_split_the_pairs_without_changing_results(threads, native_kernel):
    q, c = _random_tables(0)
    qi = torch.zeros(c.num_images, dtype=torch.long)
    one = fsm.verify_pairs(q, c, qi, 3, 12, **_KERNEL_SETTINGS, threads=1)
    many = fsm.verify_pairs(q, c, qi, 3, 12, **_KERNEL_SETTINGS, threads=threads, evaluations_per_thread=1)
    assert 1 < len(fsm._Pairs(q, c, qi, 3, 12).ranges(threads, 1)) <= threads
    for name in ("inliers", "scale_pair", "matches", "correspondences"):
        assert torch.equal(one[name], many[name]), name
    assert torch.equal(one["transform"].isnan(), many["transform"].isnan())
    assert torch.equal(one["transform"].nan_to_num(), many["transform"].nan_to_num())
    assert int(one["inliers"].max()) >= 12


def test_kernel_correspondences_equal_the_sort_merge_join(native_kernel):
    q, c = _random_tables(3)
    qi = torch.tensor([0, 0, 0, 0, 0, 0])
    want = tentative_correspondences(q, c, qi, 3, 12)
    got = fsm.correspondences(q, c, qi, 3, 12)
    assert want["pair"].numel() > 100 and all(torch.equal(got[k], want[k]) for k in want)


def test_kernel_inputs_are_checked_before_the_c_code_reads_memory(native_kernel):
    q, c = _random_tables(0)
    qi = torch.zeros(c.num_images, dtype=torch.long)
    with pytest.raises(ValueError, match="query_index points outside"):
        fsm.verify_pairs(q, c, qi + 1, 3, 12, **_KERNEL_SETTINGS)
    with pytest.raises(ValueError, match="query_index must be"):
        fsm.verify_pairs(q, c, qi[:-1], 3, 12, **_KERNEL_SETTINGS)
    bad = dataclasses.replace(c, channel=c.channel.clone())
    bad.channel[1, 0] = -1
    with pytest.raises(ValueError, match="1 valid feature rows have a scale outside 0..2 or a channel outside 0..11"):
        fsm.verify_pairs(q, bad, qi, 3, 12, **_KERNEL_SETTINGS)
    with pytest.raises(ValueError, match="channel outside 0..4"):
        fsm.correspondences(q, c, qi, 3, 5)
    with pytest.raises(ValueError, match="do not fit"):
        fsm.verify_pairs(q, dataclasses.replace(c, xy=c.xy[:, :-1]), qi, 3, 12, **_KERNEL_SETTINGS)
    with pytest.raises(ValueError, match="runs on the CPU"):
        fsm.verify_pairs(q, c.to("meta"), qi, 3, 12, **_KERNEL_SETTINGS)
    with pytest.raises(ValueError, match="backend='native' runs on the CPU"):
        choose_backend("native", "meta")
    with pytest.raises(ValueError, match="backend must be one of"):
        MatchConfig(backend="cuda")
    assert choose_backend("auto", "meta") == "torch"


def test_native_backend_reads_the_sizes_from_the_tables_where_the_recorded_ones_are_short(native_kernel):
    q, c = _random_tables(5)
    qi = torch.zeros(c.num_images, dtype=torch.long)
    short = [dataclasses.replace(t, num_channels=5, scales=(1.0,)) for t in (q, c)]
    want = spatial_verify(q, c, qi, MatchConfig(backend="native"))
    got = spatial_verify(*short, qi, MatchConfig(backend="native"))
    assert torch.equal(got.inliers, want.inliers) and torch.equal(got.matches, want.matches)
    assert torch.equal(got.scale_pair, want.scale_pair) and want.inliers.max() >= 12
    bad = dataclasses.replace(c, scale=c.scale.clone())
    bad.scale[2, 3] = -1
    with pytest.raises(ValueError, match="1 valid feature rows have a scale outside"):
        spatial_verify(q, bad, qi, MatchConfig(backend="native"))
    with pytest.raises(ValueError, match="query_index points outside"):
        spatial_verify(q, c, qi + 1, MatchConfig(backend="native"))


def test_kernel_reads_float64_tables_as_they_are(native_kernel):
    q, c = _random_tables(4)
    qi = torch.zeros(c.num_images, dtype=torch.long)
    wide = [dataclasses.replace(t, xy=t.xy.double() + 1e-9, frame=t.frame.double()) for t in (q, c)]
    cfg = MatchConfig(backend="native")
    got = spatial_verify(*wide, qi, cfg)
    wrong, worst = _compare(got, _plain(*wide, qi, cfg), transform_tolerance=0.0)
    assert wrong == [] and worst == 0.0 and got.inliers.max() >= 12


def test_without_a_compiler_auto_falls_back_and_native_names_the_reason(tmp_path, monkeypatch):
    q, c = _random_tables(1)
    expected = spatial_verify(q, c, config=MatchConfig(backend="torch"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("GPU_DSM_KERNEL_CACHE", str(tmp_path / "cache"))
    native._build.cache_clear()
    fsm._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="the C kernel is unavailable .no C compiler"):
            got = spatial_verify(q, c)
        assert torch.equal(got.inliers, expected.inliers) and torch.equal(got.matches, expected.matches)
        with pytest.raises(native.NativeUnavailable, match="backend='native': no C compiler"):
            spatial_verify(q, c, config=MatchConfig(backend="native"))
    finally:
        native._build.cache_clear()
        fsm._library.cache_clear()



@pytest.mark.parametrize("budget", [2**25, 3000, 1])
def test_torch_backend_reads_the_device_four_times_whatever_the_chunks(budget):
    from gpu_dsm.eval.timing import count_launches

    q, c = _random_tables(2)
    cfg = MatchConfig(backend="torch", max_elements=budget)
    count, result = count_launches(spatial_verify, q, c, None, cfg)
    # numbers of scales and channels, of correspondences, the group sizes, the longest match list
    assert count.host_syncs == 4, count.by_op
    assert torch.equal(result.inliers, spatial_verify(q, c, config=MatchConfig(backend="torch")).inliers)


def test_chunk_plan_covers_every_group_once_within_the_budget():
    sizes = [250, 100, 41, 40, 13, 8, 5, 3, 2, 1, 1]
    for budget, cost in ((10**4, 1), (10**6, 10**5), (1, 0), (10**9, 10**9)):
        plan = _plan_chunks(sizes, lambda w: w * w, budget, cost)
        assert [start for start, _, _ in plan] == [0] + [stop for _, stop, _ in plan[:-1]]
        assert plan[-1][1] == len(sizes)
        for start, stop, width in plan:
            assert width == sizes[start] and ((stop - start) * width * width <= budget or stop - start == 1)
    assert len(_plan_chunks(sizes, lambda w: w * w, 10**9, 10**9)) == 1  # launches cost more than padding
    assert len(_plan_chunks(sizes, lambda w: w * w, 10**9, 0)) == 9  # padding costs: one chunk per rung

_B = torch.backends
_PRECISION = {"global": _B, "cuda.matmul": _B.cuda.matmul, "mkldnn.matmul": _B.mkldnn.matmul}


@pytest.mark.parametrize("setting", ["allow_tf32=True", "matmul_precision=highest", "matmul_precision=high",
                                     "matmul_precision=medium", "fp32_precision=tf32", "mkldnn=bf16"])
def test_torch_backend_decisions_do_not_depend_on_the_float32_matmul_precision(setting, monkeypatch):
    """TF32 and bfloat16 settings lower float32 products only (PyTorch docs, "TensorFloat-32 (TF32)
    on Ampere (and later) devices"); the tensor passes have none: their one product, the
    least-squares sums, is float64. Under every setting the counts, inliers, scale pairs and
    transforms are the plain matcher's, and the caller's settings are left as they were."""
    saved = {name: obj.fp32_precision for name, obj in _PRECISION.items()}
    seen = []
    bmm = torch.bmm

    def recording_bmm(a, b):
        seen.append((a.dtype, b.dtype))
        return bmm(a, b)

    kind, value = setting.split("=")
    try:
        if kind == "allow_tf32":
            _B.cuda.matmul.allow_tf32 = True
        elif kind == "matmul_precision":
            torch.set_float32_matmul_precision(value)
        elif kind == "mkldnn":
            _B.mkldnn.matmul.fp32_precision = value
        else:
            _B.fp32_precision = value
        before = {name: obj.fp32_precision for name, obj in _PRECISION.items()}
        monkeypatch.setattr(torch, "bmm", recording_bmm)
        for error in ERRORS:
            cfg = MatchConfig(backend="torch", error=error, threshold=2.0)
            for seed in range(2):
                q, c = _random_tables(seed)
                qi = torch.zeros(c.num_images, dtype=torch.long)
                result = spatial_verify(q, c, qi, cfg)
                assert _compare(result, _plain(q, c, qi, cfg), transform_tolerance=0.0) == ([], 0.0)
                assert result.inliers.max() >= 12  # the shared transform found
        monkeypatch.undo()
        assert seen and all(s == (torch.float64, torch.float64) for s in seen)  # the refinement's sums
        assert {name: obj.fp32_precision for name, obj in _PRECISION.items()} == before
    finally:
        for name, value in saved.items():
            _PRECISION[name].fp32_precision = value
