"""Both backends of spatial verification against the plain float64 matcher on every pair of the real
roxford5k-mini top-100 tables (8 queries x 100 candidates, 1024 px), with both error types at the
default and the paper's thresholds: inlier counts, inlier correspondences, scale pairs, transforms; and
the C kernel's tentative correspondences against the tensor path's sort-merge join there."""
import dataclasses

import pytest
import torch

from gpu_dsm.eval.bench_match import real_tables
from gpu_dsm.kernels import fsm
from gpu_dsm.match import MatchConfig, _batch_facts, spatial_verify, tentative_correspondences
from test_match_backends import _compare, _plain

CONFIGS = {
    "default": MatchConfig(),  # one-way, 4 px
    "paper": MatchConfig(threshold=2.0, error="symmetric"),
    "one_way_2px": MatchConfig(threshold=2.0, error="one_way"),
    "symmetric_4px": MatchConfig(threshold=4.0, error="symmetric"),
}


@pytest.fixture(scope="module")
def top100(data_root):
    """Every query of roxford5k-mini against the top 100 of its global ranking, at the default 1024 px."""
    return real_tables(data_root, "roxford5k-mini", top_k=100)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_backends_equal_the_plain_matcher_on_every_real_pair(top100, name, native_kernel):
    query, candidates, query_index = top100
    cfg = CONFIGS[name]
    assert candidates.num_images == 8 * 100
    native_result = spatial_verify(query, candidates, query_index, dataclasses.replace(cfg, backend="native"))
    torch_result = spatial_verify(query, candidates, query_index, dataclasses.replace(cfg, backend="torch"))
    # the C kernel repeats the plain matcher's float64 operations: transforms equal to the last bit
    expected = _plain(query, candidates, query_index, cfg)
    wrong, worst = _compare(native_result, expected, transform_tolerance=0.0)
    assert wrong == [] and worst == 0.0, f"native: pairs {wrong[:10]} differ from the plain matcher ({len(wrong)})"
    # tensor passes solve the least-squares fit by LU: transforms equal to rounding
    wrong, worst = _compare(torch_result, expected, transform_tolerance=1e-9)
    assert wrong == [], f"torch: pairs {wrong[:10]} differ from the plain matcher ({len(wrong)})"
    # real geometric matches among the pairs (the refinement ran on them): 6-67 pairs with >= 10
    assert (native_result.inliers >= 10).sum() >= 3 and native_result.inliers.max() >= 15




def test_kernel_correspondences_equal_the_join_on_every_real_pair(top100, native_kernel):
    query, candidates, query_index = top100
    _, num_scales, num_channels = _batch_facts(query, candidates, query_index)
    want = tentative_correspondences(query, candidates, query_index, num_scales, num_channels)
    got = fsm.correspondences(query, candidates, query_index, num_scales, num_channels)
    assert want["pair"].numel() > 100_000 and torch.unique(want["pair"]).numel() == 800
    for name in ("pair", "qrow", "crow", "group"):
        assert torch.equal(got[name], want[name]), name
