"""The prepared device check (gpu_dsm.eval.device_check) runs on the CPU at its tiny size: the
device paths (propagate labelling, batched MSER, detection, matching, diffusion, ASMK) agree with
the CPU paths on real roxford5k-mini activations, and the figures land in one JSON."""
import json

import pytest

from gpu_dsm.eval.device_check import main

pytestmark = pytest.mark.data


def test_device_check_on_the_cpu(tmp_path, data_root):
    out = tmp_path / "check.json"
    report = main(["--device", "cpu", "--tiny", "--skip-benchmarks", "--data-root", str(data_root), "--out", str(out)])
    assert report["all_ok"], report
    saved = json.loads(out.read_text())
    assert saved["labelling"]["components"] > 0 and saved["mser"]["regions"] > 0
    assert saved["match"]["pairs"] == 4 and saved["asmk"]["entries"] > 0
    assert saved["diffusion"]["relative_difference"] < 1e-4
    assert all(saved[k]["seconds"] >= 0 for k in ("labelling", "mser", "detect", "match", "diffusion", "asmk"))
