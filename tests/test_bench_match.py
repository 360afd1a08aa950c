"""eval/bench_match.py at toy size: both backends timed and equal, OpenCV compared where it is
installed and reported unavailable where it is not, the torch backend's launches and host syncs
counted, the JSON record complete."""
import json

import torch

from gpu_dsm.eval import bench_match


def test_bench_match_runs_on_cached_tables(tmp_path, native_kernel):
    q, c = bench_match.synthetic_tables(64, 10, 6)
    torch.save((q, c, torch.zeros(6, dtype=torch.long)), tmp_path / "tables.pt")
    out = tmp_path / "bench.json"
    result = bench_match.main(["--device", "cpu", "--tables-cache", str(tmp_path / "tables.pt"), "--threads", "2",
                               "--repeat", "1", "--reference-pairs", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tables"]["pairs"] == 6 and result["tables"]["queries"] == 1
    assert set(result["runs"]) == {"1_threads", "2_threads"}
    assert result["machine"]["gpu"] == "none" and result["machine"]["cpu_cores"] >= 1
    assert "bench_match" in result["command"] and result["date"].startswith("20")
    for run in result["runs"].values():
        assert run["native_equals_torch"] and run["native"]["ms_per_query"] > 0 and run["torch"]["ms_per_query"] > 0
        try:
            import cv2  # noqa: F401
        except ImportError:
            assert "estimateAffine2D" not in run
        else:
            assert 0 <= run["estimateAffine2D"]["pairs_within_one_inlier"] <= 6
            assert run["estimateAffinePartial2D"]["ratio_vs_native"] > 0
            assert 0 <= run["estimateAffine2D_per_pair"]["pairs_within_one_inlier"] <= 6
            assert run["estimateAffinePartial2D_per_pair"]["ms_per_query"] > 0
    assert result["reference"]["agree"] is True
    counted = result["torch_launches"]
    assert counted["batches"] == 1 and counted["launches_per_batch"] > 0 and counted["host_syncs_per_batch"] >= 1
    assert counted["launches_max"] >= counted["launches_per_batch"] and counted["per_batch_by_operator"]
    assert counted["host_syncs_per_batch"] == result["torch_launches_gpu_plan"]["host_syncs_per_batch"] == 4
    try:
        import cv2  # noqa: F401,F811
    except ImportError:
        assert result["opencv"].startswith("unavailable")


def test_count_launches_sees_kernels_and_host_syncs():
    from gpu_dsm.eval.timing import count_launches

    def work(x):
        y = torch.where(x > 3, x * 2, x)  # kernels, no sync
        n = int(y.max())  # a scalar read
        return y[y > n // 2].tolist()  # boolean indexing (nonzero) and a host copy

    count, out = count_launches(work, torch.arange(10))
    assert out == [10, 12, 14, 16, 18]
    assert count.host_syncs == 3 and count.launches >= 4
    assert count.by_op["aten::nonzero"]["host_syncs"] == 1 and count.by_op["host_copy::tolist"]["host_syncs"] == 1
    assert "tolist" not in torch.Tensor.__dict__  # the annotation is removed again
