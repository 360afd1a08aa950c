"""Sharded extraction under torchrun (gloo, 2 processes on the CPU): the merged stores equal what
one process writes, image by image; a failed rank fails the job, no final store appears, and a
rerun keeps the finished shard and extracts only the missing one. Slices are balanced by pixels."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_dsm.how import HOWFeatures, merge_how_features
from gpu_dsm.shards import balanced_slices
from gpu_dsm.whitening import Whitening
from gpu_dsm.store import FeatureStore

from conftest import TINY

pytestmark = pytest.mark.data

HELPER = Path(__file__).parent / "helpers" / "failing_rank.py"


def _extract(tiny_root, out, procs, *, fail_rank=None, fail_at="store", extra=()):
    args = ["extract", "--data-root", str(tiny_root), "--dataset", TINY, "--image-size", "128", "--scales", "1",
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_DSM_FAIL_AT": fail_at}
    if procs == 1:
        command = [sys.executable, "-m", "gpu_dsm", *args]
    else:
        target = [str(HELPER), str(fail_rank)] if fail_rank is not None else ["-m", "gpu_dsm"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                   *target, *args]
    # its own process group, so a timeout ends torchrun's workers too, not only the agent
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _stores(folder):
    return {p.name.split("-")[1]: FeatureStore(p) for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and "shard" not in p.name}


def _same(a: FeatureStore, b: FeatureStore):
    assert a.names == b.names and a.options == b.options
    assert torch.equal(a.global_descriptors(), b.global_descriptors())
    fa, fb = a.local_features(), b.local_features()
    assert torch.equal(fa.counts, fb.counts) and torch.equal(fa.map_sizes, fb.map_sizes)
    for name in ("xy", "frame", "strength", "channel", "scale"):
        assert torch.equal(getattr(fa, name)[fa.valid], getattr(fb, name)[fb.valid]), name


def test_two_processes_write_the_stores_one_process_writes(tmp_path, tiny_root):
    one = _extract(tiny_root, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr
    two = _extract(tiny_root, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "merged 2 shards" in two.stdout and "rank 1/2: 4 of 8 images" in two.stdout
    singles, merged = _stores(tmp_path / "one"), _stores(tmp_path / "two")
    assert set(singles) == set(merged) == {"database", "queries"}
    for split in singles:
        _same(singles[split], merged[split])
    assert not list((tmp_path / "two").glob("*shard*")), "shards are removed once merged"


def test_a_failed_rank_fails_the_job_and_a_rerun_keeps_the_finished_shard(tmp_path, tiny_root):
    out = tmp_path / "stores"
    failed = _extract(tiny_root, out, 2, fail_rank=1)
    assert failed.returncode != 0
    assert "rank 1 stopped on purpose" in failed.stdout + failed.stderr
    finished = [p.name for p in out.iterdir() if p.is_dir() and "shard" in p.name]
    assert len(finished) == 1 and finished[0].startswith(f"{TINY}-queries-") and finished[0].endswith(".shard-0of2")
    # the database was complete before the failure; the queries store is not published without every shard
    assert set(_stores(out)) == {"database"}
    again = _extract(tiny_root, out, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rank 0: reusing finished shard" in again.stdout and "rank 1/2" in again.stdout
    reference = _extract(tiny_root, tmp_path / "one", 1)
    assert reference.returncode == 0
    for split, store in _stores(out).items():
        _same(_stores(tmp_path / "one")[split], store)


HOW = ["--initial", "asmk", "--how-image-size", "160", "--how-features", "60"]


def _same_how(a: HOWFeatures, b: HOWFeatures):
    assert a.num_images == b.num_images and a.descriptors.shape[0] > 0
    assert torch.equal(a.image_ids, b.image_ids) and torch.equal(a.scale, b.scale) and torch.equal(a.xy, b.xy)
    assert torch.allclose(a.strength, b.strength, rtol=1e-5)
    assert torch.allclose(a.descriptors, b.descriptors, atol=1e-3)  # whitening from moments summed in another order


def test_how_descriptors_sharded_equal_one_process(tmp_path, tiny_root):
    one = _extract(tiny_root, tmp_path / "one", 1, extra=HOW)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _extract(tiny_root, tmp_path / "two", 2, extra=HOW)
    assert two.returncode == 0, two.stderr[-3000:]
    # the whitening's moments are summed over the ranks; database and queries described in 2 shards each
    assert two.stdout.count("merged 2 shards") == 4  # 2 stores + 2 HOW feature sets
    names = sorted(p.name for p in (tmp_path / "one").glob("how-*.pt"))
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "two").glob("how-*.pt"))
    for name in names:
        if name.startswith("how-whitening"):
            a, b = Whitening.load(tmp_path / "one" / name), Whitening.load(tmp_path / "two" / name)
            assert torch.allclose(a.projection, b.projection, atol=1e-4, rtol=1e-3) and torch.allclose(a.bias, b.bias, atol=1e-4)
            continue
        _same_how(HOWFeatures.load(tmp_path / "one" / name), HOWFeatures.load(tmp_path / "two" / name))
    assert not list((tmp_path / "two").glob("*shard*"))
    # evaluate --initial asmk on that folder reuses what the job extracted
    evaluated = subprocess.run(
        [sys.executable, "-m", "gpu_dsm", "evaluate", "--data-root", str(tiny_root), "--dataset", TINY, "--image-size", "128",
         "--scales", "1", "--cache-dir", str(tmp_path / "two"), "--no-progress", "--device", "cpu", "--rerank", "none",
         "--codebook-size", "16", *HOW], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "HOW whitening: reusing" in evaluated.stdout and f"HOW {TINY}-queries: reusing" in evaluated.stdout


def test_a_rank_failing_in_how_keeps_the_finished_how_shard(tmp_path, tiny_root):
    out = tmp_path / "stores"
    failed = _extract(tiny_root, out, 2, fail_rank=1, fail_at="how", extra=HOW)
    assert failed.returncode != 0 and "rank 1 stopped on purpose" in failed.stdout + failed.stderr
    shards = [p.name for p in out.glob("how-*shard*")]
    assert len(shards) == 1 and f"{TINY}-queries-" in shards[0] and shards[0].endswith(".shard-0of2")
    assert not list(out.glob(f"how-{TINY}-queries-*.pt")), "no queries' HOW file without every shard"
    again = _extract(tiny_root, out, 2, extra=HOW)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rank 0: reusing finished shard how-" in again.stdout and "HOW whitening: reusing" in again.stdout
    reference = _extract(tiny_root, tmp_path / "one", 1, extra=HOW)
    assert reference.returncode == 0
    for path in (tmp_path / "one").glob(f"how-{TINY}-*.pt"):
        _same_how(HOWFeatures.load(path), HOWFeatures.load(out / path.name))


def test_merged_how_features_keep_every_image_in_order():
    def part(ids, num_images, start):
        n = len(ids)
        return HOWFeatures(torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 4), torch.tensor(ids),
                           torch.zeros(n, 2), torch.zeros(n, dtype=torch.long), torch.ones(n), num_images)

    # part 0 holds images 1 and 3 (image 3 has no features), part 1 images 0 and 2
    merged = merge_how_features([part([0, 0], 2, 0), part([0, 1, 1], 2, 10)], [[1, 3], [0, 2]], 4)
    assert merged.image_ids.tolist() == [0, 1, 1, 2, 2] and merged.num_images == 4
    assert merged.descriptors[:, 0].tolist() == [10, 0, 1, 11, 12]
    with pytest.raises(ValueError, match="not each of"):
        merge_how_features([part([0], 1, 0)], [[1]], 1)


def test_slices_are_balanced_by_cost_and_cover_every_image():
    costs = [9, 1, 1, 1, 4, 4, 8, 2]
    slices = balanced_slices(costs, 3)
    assert sorted(i for s in slices for i in s) == list(range(8))
    totals = [sum(costs[i] for i in s) for s in slices]
    assert max(totals) - min(totals) <= 1 and all(s == sorted(s) for s in slices)
    assert balanced_slices(costs, 1) == [list(range(8))]
    assert balanced_slices([5, 5], 4) == [[0], [1], [], []]
    with pytest.raises(ValueError, match="world must be >= 1"):
        balanced_slices(costs, 0)
