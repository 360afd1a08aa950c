"""eval/bench_match.py at toy size: both backends timed and equal, OpenCV compared where it is
installed and reported unavailable where it is not, the JSON record complete."""
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
    assert result["reference"]["agree"] is True
    try:
        import cv2  # noqa: F401,F811
    except ImportError:
        assert result["opencv"].startswith("unavailable")
