"""cnnimageretrieval-pytorch checkpoints: every supported format gives the reference descriptors,
every other one is refused with an error naming it."""
import math

import numpy as np
import pytest
import torch
from skimage import data as skdata

from gpu_dsm.backbones import build_backbone, save_retrieval_checkpoint
from gpu_dsm.global_descriptors import describe_global
from gpu_dsm.extract import ExtractConfig
from gpu_dsm.images import ImageSpec, load_image

import reference_cirtorch as ref

MS = (1.0, 1.0 / math.sqrt(2.0), 0.5)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    net = build_backbone("resnet50", weights="none")
    for m in net.features.modules():  # BN statistics that keep activations in a sensible range
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net


def _images():
    return [skdata.astronaut()[::4, ::4].copy(), skdata.coffee()[::3, ::3].copy()]


def _formats(d, g):
    whiten = (torch.randn(64, d, generator=g) / math.sqrt(d), torch.randn(64, generator=g) * 0.01)
    lw = {"m": np.random.default_rng(0).normal(size=(d, 1)) * 0.01, "P": np.random.default_rng(1).normal(size=(32, d))}
    lw_ss = {"m": lw["m"] * 2, "P": lw["P"][::-1].copy()}
    return {
        "gem": dict(pooling="gem", p=torch.tensor([2.7])),
        "mac": dict(pooling="mac", p=None),
        "spoc": dict(pooling="spoc", p=None),
        "gemmp": dict(pooling="gemmp", p=1.5 + 3 * torch.rand(d, generator=g)),
        "gem+whiten": dict(pooling="gem", p=torch.tensor([3.3]), whiten=whiten),
        "gem+Lw": dict(pooling="gem", p=torch.tensor([3.0]), lw={"retrieval-SfM-120k": {"ss": lw_ss, "ms": lw}}),
    }


@pytest.mark.parametrize("fmt", ["gem", "mac", "spoc", "gemmp", "gem+whiten", "gem+Lw"])
@pytest.mark.parametrize("scales", [(1.0,), MS], ids=["ss", "ms"])
def test_checkpoint_descriptors_equal_the_reference(tmp_path, resnet50, fmt, scales):
    g = torch.Generator().manual_seed(1)
    spec = _formats(resnet50.out_channels, g)[fmt]
    whiten = spec.get("whiten")
    from gpu_dsm.whitening import Whitening

    save_retrieval_checkpoint(
        resnet50, tmp_path / "c.pth", gem_p=spec["p"], pooling=spec["pooling"],
        whitening=Whitening(whiten[0], whiten[1]) if whiten is not None else None, learned_whitening=spec.get("lw"),
    )
    net = build_backbone("resnet50", weights=tmp_path / "c.pth")
    images = _images()
    cfg = ExtractConfig(image_size=160, scales=scales, upscale=False, progress=False)
    ours = describe_global(net, images, cfg)
    for i, image in enumerate(images):
        x = net.normalize(load_image(ImageSpec(image), 160)[None].float() / 255)
        p = spec["p"] if spec["p"] is None or spec["pooling"] == "gemmp" else spec["p"].item()
        expected = ref.extract(net.features, spec["pooling"], p, whiten, x, scales)
        if "lw" in spec:
            learned = spec["lw"]["retrieval-SfM-120k"]["ms" if len(scales) > 1 else "ss"]
            expected = torch.from_numpy(ref.whitenapply(expected.double().numpy()[:, None], learned["m"], learned["P"])[:, 0])
        assert ours[i].shape == expected.shape
        torch.testing.assert_close(ours[i].double(), expected.double(), rtol=0, atol=2e-5)


def _checkpoint(tmp_path, net, **meta_and_keys):
    state = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    state.update(meta_and_keys.pop("keys", {}))
    meta = {"architecture": "resnet50", "pooling": "gem", "whitening": False, "regional": False, "local_whitening": False,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": 2048, **meta_and_keys}
    torch.save({"state_dict": state, "meta": meta}, tmp_path / "c.pth")
    return tmp_path / "c.pth"


@pytest.mark.parametrize("meta, keys, message", [
    ({"pooling": "rmac"}, {}, r"pooling 'rmac' \(meta\['pooling'\]\) is not supported"),
    ({"regional": True}, {"pool.rpool.p": torch.ones(1), "pool.whiten.weight": torch.eye(4)}, "regional pooling"),
    ({"local_whitening": True}, {"pool.p": torch.ones(1) * 3, "lwhiten.weight": torch.eye(4)}, "local whitening"),
    ({}, {"pool.p": torch.ones(1) * 3, "extra.weight": torch.ones(2)}, r"keys of layers gpu_dsm does not apply.*extra\.weight"),
    ({"architecture": "resnet101"}, {"pool.p": torch.ones(1) * 3}, "a resnet101 network"),
    ({"pooling": "gem"}, {"pool.p": torch.ones(5)}, "a gemmp checkpoint"),
    ({"whitening": True}, {"pool.p": torch.ones(1) * 3}, "no 'whiten.weight'"),
])
def test_unsupported_checkpoints_are_refused_by_name(tmp_path, resnet50, meta, keys, message):
    path = _checkpoint(tmp_path, resnet50, keys=keys, **meta)
    with pytest.raises(ValueError, match=message):
        build_backbone("resnet50", weights=path)


def test_evaluate_applies_the_checkpoints_learned_whitening(tmp_path, tiny_root, capsys):
    from gpu_dsm.cli import main
    import json

    lite = build_backbone("efficientnet_lite0")
    rng = np.random.default_rng(0)
    lw = {"m": rng.normal(size=(1280, 1)) * 0.01, "P": rng.normal(size=(40, 1280))}
    save_retrieval_checkpoint(lite, tmp_path / "c.pth", gem_p=3.0, learned_whitening={"sfm": {"ss": lw, "ms": lw}})
    args = ["evaluate", "--data-root", str(tiny_root), "--dataset", "tiny", "--image-size", "128", "--scales", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu", "--weights", str(tmp_path / "c.pth")]
    assert main(args + ["--out", str(tmp_path / "w.json")]) == 0
    assert "whitening: checkpoint Lw[sfm][ss], 1280 -> 40 dimensions" in capsys.readouterr().out
    report = json.loads((tmp_path / "w.json").read_text())
    assert report["options"]["whitening"] == "checkpoint Lw[sfm][ss]"
    assert report["options"]["global"]["resolved"] == {"pooling": "gem", "p": 3.0, "multiscale_power": 3.0,
                                                       "network_whitening": False}
    assert main(args + ["--whitening", "none", "--out", str(tmp_path / "n.json")]) == 0
    assert json.loads((tmp_path / "n.json").read_text())["options"]["whitening"] is None
    assert main(args + ["--whitening", "checkpoint:other"]) == 2
    assert "no learned whitening 'other'" in capsys.readouterr().err
