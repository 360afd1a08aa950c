"""eval/bench_asmk.py at toy sizes: it runs every part and backend, and its own correctness checks
hold (our scores against the authors' package where it is installed). No timing is asserted."""
import json

import pytest
import torch

from gpu_dsm.eval import bench_asmk
from gpu_dsm.how import HOWFeatures

def test_simulated_inverted_file_every_backend(tmp_path, native_kernel, asmk_oracle):
    out = tmp_path / "sim.json"
    report = bench_asmk.main(["--part", "simulated", "--images", "300", "--words-per-image", "20", "--queries", "3",
                              "--query-words", "40", "--out", str(out)])
    sim = report["simulated"]
    assert json.loads(out.read_text())["simulated"] == sim
    assert sim["entries"] == 6000 and sim["bytes_per_image"] == 20 * (16 + 4)
    assert {"ms_per_query_torch", "ms_one_query_torch", "ms_per_query_native", "ms_one_query_native"} <= set(sim)
    if asmk_oracle:  # the package searched our own inverted file: the same top-100 scores (float32 there)
        assert sim["package_max_abs_top100_score_difference"] < 1e-5 and sim["speedup_search"] > 0


def test_package_part_on_a_how_features_file(tmp_path, native_kernel, asmk_oracle):
    g = torch.Generator().manual_seed(0)
    images, per_image, dim = 14, 40, 32
    centres = torch.randn(12, dim, generator=g)
    descriptors = centres[torch.randint(0, 12, (images * per_image,), generator=g)] \
        + 0.3 * torch.randn(images * per_image, dim, generator=g)
    f = images * per_image
    HOWFeatures(descriptors=descriptors, image_ids=torch.arange(images).repeat_interleave(per_image),
                xy=torch.zeros(f, 2), scale=torch.zeros(f, dtype=torch.long), strength=torch.ones(f),
                num_images=images).save(tmp_path / "how.pt")
    args = ["--part", "package", "--descriptors", str(tmp_path / "how.pt"), "--db-images", "10", "--queries", "3",
            "--words", "16"]
    result = bench_asmk.main(args)["package"]
    assert result["db_images"] == 10 and result["queries"] == 3 and result["dim"] == dim
    assert result["comparisons_per_query"] > 0 and result["ours_search_backend"] == "native"
    if asmk_oracle:
        assert result["max_abs_score_difference"] < 1e-5 and result["top100_agreement"] == 1.0
    with pytest.raises(ValueError, match="fewer than --db-images 12 \\+ --queries 3"):
        bench_asmk.main(["--part", "package", "--descriptors", str(tmp_path / "how.pt"), "--db-images", "12",
                         "--queries", "3"])
