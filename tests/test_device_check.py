"""The prepared device check (gpu_dsm.eval.device_check) on the CPU at its tiny size: every
device path (propagate labelling, batched MSER, detection, matching, torch-sparse diffusion,
tensor ASMK search) agrees with an independent reference on real roxford5k-mini activations and
the figures land in one JSON; a kernel broken on purpose fails it; a crashed benchmark fails the
run, by name; benchmarks that do not fit the budget are skipped, by name."""
import json

import pytest
import torch

from gpu_dsm.eval import device_check

pytestmark = pytest.mark.data


def test_device_check_on_the_cpu(tmp_path, data_root):
    out = tmp_path / "check.json"
    report = device_check.main(["--device", "cpu", "--tiny", "--skip-benchmarks", "--data-root", str(data_root),
                                "--out", str(out)])
    assert report["all_ok"] and report["failed"] == [], report
    saved = json.loads(out.read_text())
    for name in device_check.CHECKS:
        entry = saved[name]
        assert entry["ok"] and entry["seconds"] >= 0 and "worst_difference" in entry and entry["difference"], name
        against = entry["against"] if isinstance(entry["against"], list) else [entry["against"]]
        assert against and all(isinstance(a, str) and a for a in against), name
    assert saved["labelling"]["components"] > 0 and saved["labelling"]["worst_difference"] == 0
    assert saved["mser"]["regions"] > 0 and saved["mser"]["worst_difference"] <= 1e-9
    assert saved["match"]["errors"]["one_way"]["pairs"] == 4 and saved["match"]["errors"]["symmetric"]["pairs"] == 4
    assert saved["diffusion"]["worst_difference"] < 1e-4 and saved["asmk"]["entries"] > 0
    assert saved["asmk"]["worst_difference"] <= 1e-9


def _broken_propagate(masks):
    """4-connectivity instead of 8: diagonal neighbours become separate components."""
    from scipy import ndimage

    labels, count = ndimage.label(masks.cpu().numpy(), structure=ndimage.generate_binary_structure(3, 1) &
                                  (torch.arange(3)[:, None, None] == 1).numpy())
    return torch.from_numpy(labels).to(masks.device), int(count)


def test_a_broken_kernel_fails_the_check(monkeypatch, data_root):
    import gpu_dsm.kernels.labelling as labelling

    monkeypatch.setattr(labelling, "_label_propagate", _broken_propagate)
    report = device_check.main(["--device", "cpu", "--tiny", "--skip-benchmarks", "--checks", "labelling,mser",
                                "--data-root", str(data_root)])
    assert not report["all_ok"] and report["failed"] == ["labelling", "mser"]
    assert report["labelling"]["worst_difference"] > 0
    assert report["mser"]["missing_regions"] + report["mser"]["extra_regions"] > 0


def test_a_crashed_benchmark_fails_the_run_and_the_budget_skips_by_name(monkeypatch, data_root):
    from gpu_dsm.eval import bench_diffusion

    def crash(argv):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(bench_diffusion, "main", crash)
    args = ["--device", "cpu", "--tiny", "--checks", "labelling", "--data-root", str(data_root)]
    # the budget fits bench_diffusion's estimate, not bench_detect's
    report = device_check.main(args + ["--benchmarks", "bench_detect,bench_diffusion", "--budget-s", "200"])
    assert report["failed"] == ["bench_diffusion"] and not report["all_ok"]
    assert "illegal memory access" in report["bench_diffusion"]["error"]
    assert set(report["skipped"]) == {"bench_detect"} and "bench_detect" not in report
    assert device_check.run(args + ["--benchmarks", "bench_diffusion"]) == 1
    # nothing fits a zero budget: every benchmark skipped and named, the checks still decide
    report = device_check.main(args + ["--budget-s", "0"])
    assert report["all_ok"] and set(report["skipped"]) == set(device_check.BENCHMARKS)
