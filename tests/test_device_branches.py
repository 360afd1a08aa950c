"""The branches that only a GPU would take, run on the CPU: the inverted-file device guard and
the ASMK search backend choice, the shard device choice under torchrun, and feature_to_image with
inputs off the CPU's float32 (the torch-sparse diffusion path and vecdot: tests/test_diffusion.py;
propagate labelling: tests/test_labelling.py and tests/test_mser.py)."""
import pytest
import torch

from gpu_dsm.asmk.index import choose_search_backend
from gpu_dsm.kernels import inverted_file, native
from gpu_dsm.shards import Ranks
from gpu_dsm.visualize import feature_to_image


def test_the_c_kernel_refuses_tensors_off_the_cpu():
    """Meta tensors stand for a GPU's: the guard names the first tensor off the CPU before any
    pointer is read."""
    rows, entries = 4, 6
    args = dict(query=torch.zeros(rows, dtype=torch.long), word=torch.zeros(rows, dtype=torch.long),
                codes=torch.zeros(rows, 2, dtype=torch.uint8), offsets=torch.tensor([0, entries]),
                image_ids=torch.zeros(entries, dtype=torch.int32), db_codes=torch.zeros(entries, 2, dtype=torch.uint8))
    for name in args:
        moved = {**args, name: args[name].to("meta")}
        with pytest.raises(ValueError, match=f"runs on the CPU; {name} is on meta"):
            inverted_file.inverted_file_scores(**moved, num_queries=1, num_images=1,
                                               weight_of_distance=torch.zeros(17, dtype=torch.float64))


def test_search_backend_choice_on_a_gpu_and_on_the_cpu():
    builds, fails = (lambda: None), (lambda: "no C compiler")
    cuda = torch.device("cuda:0")  # a device object needs no GPU
    assert choose_search_backend("auto", cuda, torch.int32, builds) == "torch"
    assert choose_search_backend("torch", cuda, torch.int32, builds) == "torch"
    with pytest.raises(ValueError, match="runs on the CPU with int32 image ids; this index is on cuda:0"):
        choose_search_backend("native", cuda, torch.int32, builds)
    assert choose_search_backend("auto", torch.device("cpu"), torch.int32, builds) == "native"
    assert choose_search_backend("auto", torch.device("cpu"), torch.long, builds) == "torch"
    with pytest.raises(ValueError, match="int64 ids"):
        choose_search_backend("native", "cpu", torch.long, builds)
    with pytest.warns(RuntimeWarning, match="C kernel is unavailable .no C compiler"):
        assert choose_search_backend("auto", "cpu", torch.int32, fails) == "torch"
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        choose_search_backend("native", "cpu", torch.int32, fails)


@pytest.mark.parametrize("env, asked, want", [
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, "cuda", "cuda:1"),
    ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, "cuda", "cuda:0"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, "cpu", "cpu"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, "cuda:2", "cuda:2"),
    ({}, "cuda", "cuda"),
])
def test_each_torchrun_rank_takes_its_local_gpu(monkeypatch, env, asked, want):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ranks = Ranks.from_environment()
    assert ranks.device(asked) == want
    assert (ranks.rank, ranks.world, ranks.local_rank) == (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                                                           int(env.get("LOCAL_RANK", 0)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_feature_to_image_keeps_the_inputs_device_and_dtype(dtype):
    xy = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    frame = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.1], [0.1, 0.5]]])
    want_xy = torch.tensor([[4.5, 3.5], [34.5, 11.5]])  # (xy + 0.5) * (10, 8) - 0.5: a (4, 5) map shown at 50 x 32
    got_xy, got_frame = feature_to_image(xy.to(dtype), frame.to(dtype), (4, 5), (50, 32))
    assert got_xy.dtype == dtype and got_frame.dtype == dtype
    torch.testing.assert_close(got_xy.float(), want_xy, rtol=1e-2, atol=0)
    torch.testing.assert_close(got_frame.float(), frame * torch.tensor([10.0, 8.0]).view(1, 2, 1), rtol=1e-2, atol=0)
    # meta tensors stand for a GPU's: the scale is built where the inputs are
    meta_xy, meta_frame = feature_to_image(xy.to("meta", dtype), frame.to("meta", dtype), (4, 5), (50, 32))
    assert meta_xy.device.type == "meta" and meta_frame.device.type == "meta" and meta_xy.dtype == dtype
