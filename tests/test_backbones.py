import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from gpu_dsm.backbones import BACKBONES, build_backbone, save_retrieval_checkpoint
from gpu_dsm.whitening import Whitening

# ImageNet-1k classes of domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT_CLASSES = {281, 282, 283, 284, 285}


def _chelsea(size=(260, 390)) -> torch.Tensor:
    img = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(img, size=size, mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_bundled_weights_classify_a_cat(name):
    backbone = build_backbone(name)
    with torch.no_grad():
        logits = backbone.classifier(backbone(_chelsea()))
    top5 = set(logits.topk(5).indices[0].tolist())
    assert top5 & CAT_CLASSES, f"{name} top-5 {top5} has no cat class"
    # a random network does not see a cat (checks the test can fail)
    random = build_backbone(name, weights="none")
    with torch.no_grad():
        rand_top1 = random.classifier(random(_chelsea())).argmax().item()
    assert logits.argmax().item() in CAT_CLASSES and rand_top1 not in CAT_CLASSES


def _random_state(module):
    for key, p in module.state_dict().items():
        if key.endswith("running_var"):
            p.copy_(torch.rand_like(p) + 0.5)
        elif p.dtype.is_floating_point:
            p.copy_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_plain_state_dict_round_trip(tmp_path, name):
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    torch.save(net.state_dict(), tmp_path / "plain.pth")
    backbone = build_backbone(name, weights=tmp_path / "plain.pth")
    net.eval()
    if name == "vgg16":
        reference = torch.nn.Sequential(*list(net.features.children())[:-1])
    else:
        reference = torch.nn.Sequential(*list(net.children())[:-2])
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        same_layout = backbone.normalize(x).contiguous(memory_format=torch.channels_last)
        assert torch.equal(backbone(x), reference.to(memory_format=torch.channels_last)(same_layout))
    assert backbone.classifier is not None


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "resnet101", "efficientnet_lite0"])
def test_retrieval_checkpoint_round_trip(tmp_path, name):
    source = build_backbone(name, weights="none")
    _random_state(source)
    whitening = Whitening(projection=torch.randn(16, source.out_channels), bias=torch.randn(16), method="test")
    save_retrieval_checkpoint(source, tmp_path / "ckpt.pth", gem_p=2.5, whitening=whitening)
    loaded = build_backbone(name, weights=tmp_path / "ckpt.pth")
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    assert loaded.head.gem_p == pytest.approx(2.5)
    assert torch.equal(loaded.head.network_whitening.projection, whitening.projection)
    raw = torch.load(tmp_path / "ckpt.pth", weights_only=False)
    assert set(raw) == {"state_dict", "meta"} and all(k.startswith(("features.", "pool.", "whiten.")) for k in raw["state_dict"])


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"do not fit resnet101.*missing.*layer3\.6"):
        build_backbone("resnet101", weights=tmp_path / "r50.pth")
    sd = torchvision.models.vgg16(weights=None).state_dict()
    sd["features.0.weight"] = sd["features.0.weight"][:8]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"other shapes.*features\.0\.weight"):
        build_backbone("vgg16", weights=tmp_path / "bad.pth")


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="known backbones: .*efficientnet_lite0.*resnet101"):
        build_backbone("alexnet")
    with pytest.raises(ValueError, match="no bundled weights"):
        build_backbone("resnet50")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_backbone("resnet50", weights=tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights file"):
        build_backbone("resnet50", weights=tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="vgg16 is not one"):
        build_backbone("vgg16", weights="none", upsample=True)
    assert set(BACKBONES) >= {"efficientnet_lite0", "efficientnet_lite2", "vgg16", "resnet50", "resnet101"}


def test_image_smaller_than_the_network_needs(lite0):
    with pytest.raises(ValueError, match="smaller than the network needs"):
        lite0(torch.rand(1, 3, 20, 64))


@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "default"), ("vgg16", "none"), ("resnet50", "none")])
def test_output_size_matches_the_network(name, weights):
    backbone = build_backbone(name, weights)
    for h, w in [(64, 64), (100, 77), (129, 255)]:
        with torch.no_grad():
            out = backbone(torch.rand(1, 3, h, w))
        assert tuple(out.shape[-2:]) == backbone.output_size(h, w)
        assert out.shape[1] == backbone.out_channels


def _stage_input_parity(backbone, h):
    """Size of the map entering the (formerly) last strided stage: input size halved 4 times (ceil)."""
    for _ in range(4):
        h = -(-h // 2)
    return h


@pytest.mark.parametrize("name,weights", [("resnet50", "none"), ("efficientnet_lite0", "default")])
@pytest.mark.parametrize("size", [(160, 224), (176, 240)])
def test_upsampling_is_a_denser_grid_of_the_same_activations(name, weights, size):
    """↑ computes the original stride-32 map on a stride-16 grid: sub-sampling it gives the original.

    PyTorch padding (ResNet) keeps even positions; TF "SAME" padding (EfficientNet) keeps odd
    positions when the map entering the stage has an even size, even positions otherwise.
    """
    base = build_backbone(name, weights)
    up = build_backbone(name, weights, upsample=True)
    if weights == "none":
        up.load_state_dict(base.state_dict())
    base, up = base.double(), up.double()  # float64, so that only the grid can differ
    x = torch.rand(1, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        a, b = base(x), up(x)
    assert up.stride == 16 and base.stride == 32
    assert tuple(b.shape[-2:]) == up.output_size(*size)
    offsets = []
    for dim in (0, 1):
        n = _stage_input_parity(base, size[dim])
        offsets.append(1 if name.startswith("efficientnet") and n % 2 == 0 else 0)
    sub = b[..., offsets[0]::2, offsets[1]::2][..., : a.shape[-2], : a.shape[-1]]
    assert sub.shape == a.shape
    torch.testing.assert_close(sub, a, atol=1e-9, rtol=1e-9)
    # and the denser grid really holds new values in between
    between = b[..., 1 - offsets[0]::2, offsets[1]::2]
    h, w = min(between.shape[-2], a.shape[-2]), min(between.shape[-1], a.shape[-1])
    assert not torch.allclose(between[..., :h, :w], a[..., :h, :w], atol=1e-3)


def test_device_and_dtype_follow_the_model(lite0):
    half = build_backbone("efficientnet_lite0").to(torch.bfloat16)
    with torch.no_grad():
        out = half(torch.rand(1, 3, 64, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    assert np.isfinite(out.float().numpy()).all()
