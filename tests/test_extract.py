import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from gpu_dsm.global_descriptors import describe_global
from gpu_dsm.extract import ExtractConfig, extract_activations, iterate_activations
from gpu_dsm.images import ImageSpec, load_image, target_size


def _photos():
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.astronaut()[:300, :400]]


def test_batched_equals_one_image_at_a_time(lite0):
    images = _photos() + [_photos()[0]]
    cfg = ExtractConfig(image_size=256, batch_size=4, progress=False)
    batched = extract_activations(lite0, images, cfg)
    single = extract_activations(lite0, images, ExtractConfig(image_size=256, batch_size=1, progress=False))
    forwards = list(iterate_activations(lite0, images, cfg))
    assert any(len(b.indices) > 1 for b in forwards), "same-size images must share a forward pass"
    for a, b in zip(batched, single):
        assert len(a) == 3
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_scales_and_sizes(lite0):
    cfg = ExtractConfig(image_size=320, progress=False)
    maps = extract_activations(lite0, [_photos()[1]], cfg)[0]  # coffee: 400x600 -> 213x320
    expected_hw = [lite0.output_size(math.floor(213 * s), math.floor(320 * s)) for s in cfg.scales]
    assert [tuple(m.shape[-2:]) for m in maps] == expected_hw
    assert all(m.shape[0] == 1280 and (m >= 0).all() and (m <= 6).all() for m in maps)


def test_upscale_and_crop_box(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(_photos()[0]).save(path)
    spec = ImageSpec(str(path), (100, 50, 300, 250))
    assert target_size(spec, 1024, upscale=False) == (200, 200)
    assert target_size(spec, 1024, upscale=True) == (1024, 1024)
    img = load_image(spec, 100, upscale=False)  # the standard protocol: the crop keeps its image's scale
    assert img.shape == (3, 39, 39) and img.dtype == torch.uint8  # floor(100 * 200 / 512)
    assert load_image(spec, 100, upscale=True).shape == (3, 100, 100)


def test_bad_images(tmp_path, lite0):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        extract_activations(lite0, [str(bad)], ExtractConfig(progress=False))
    with pytest.raises(FileNotFoundError, match="image not found"):
        extract_activations(lite0, [str(tmp_path / "missing.jpg")], ExtractConfig(progress=False))
    tiny = np.zeros((40, 50, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="smaller than efficientnet_lite0 needs"):
        extract_activations(lite0, [tiny], ExtractConfig(image_size=50, upscale=False, progress=False))
    with pytest.raises(ValueError, match="box .* is empty"):
        target_size(ImageSpec(tiny, (60, 0, 80, 10)), 100, False)
    with pytest.raises(ValueError, match="uint8"):
        extract_activations(lite0, [np.zeros((10, 10, 3), dtype=np.float32)], ExtractConfig(progress=False))
    assert extract_activations(lite0, [], ExtractConfig(progress=False)) == []


def test_global_descriptors_follow_device_and_dtype(lite0):
    cfg = ExtractConfig(image_size=128, progress=False)
    d32 = describe_global(lite0, _photos(), cfg)
    assert d32.shape == (4, 1280) and d32.dtype == torch.float32
    torch.testing.assert_close(d32.norm(dim=1), torch.ones(4))
    # image 0 and 3 (a crop of it) are more similar than 0 and 1
    sims = d32 @ d32.T
    assert sims[0, 3] > sims[0, 1]
    # a copy: casting the shared network to bfloat16 and back would round its weights for every later test
    bf16 = describe_global(copy.deepcopy(lite0).to(torch.bfloat16), _photos(), cfg)
    assert bf16.dtype == torch.float32 and (bf16 * d32).sum(1).min() > 0.98


def _cirtorch_image(path, imsize, bbx=None):
    """cnnimageretrieval-pytorch's ImagesFromList.__getitem__ + imresize, literally."""
    with open(path, "rb") as f:
        img = Image.open(f).convert("RGB")
    imfullsize = max(img.size)
    if bbx is not None:
        img = img.crop(bbx)
        img.thumbnail((imsize * max(img.size) / imfullsize,) * 2, Image.LANCZOS)
    else:
        img.thumbnail((imsize, imsize), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


@pytest.mark.data
def test_standard_image_protocol_is_reproduced_exactly(data_root):
    from gpu_dsm.eval.datasets import RevisitopDataset

    dataset = RevisitopDataset.load(data_root, "roxford5k-19q")
    boxed = [s for s in dataset.query_specs() if s.box != (0.0, 0.0, *Image.open(s.source).size)]
    assert len(boxed) >= 10, "the set has queries with a real box on the full photo"
    for spec in boxed + dataset.query_specs()[:3] + dataset.database_specs()[:4]:
        for imsize in (1024, 517, 300):
            expected = _cirtorch_image(spec.source, imsize, spec.box)
            ours = load_image(spec, imsize, upscale=False)
            assert torch.equal(ours, expected), (spec, imsize)
            assert target_size(spec, imsize, upscale=False) == (expected.shape[2], expected.shape[1])


def test_target_sizes_follow_pil_thumbnail_rounding(tmp_path):
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(20, 1600, (300, 2), generator=g).tolist() + [[1024, 768], [768, 1024], [333, 1000], [999, 1]]
    for (w, h), bound in zip(sizes, torch.randint(10, 1100, (len(sizes),), generator=g).tolist()):
        im = Image.new("RGB", (w, h))
        im.thumbnail((bound + 0.7, bound + 0.7))
        spec = ImageSpec(np.zeros((h, w, 3), dtype=np.uint8))
        assert target_size(spec, bound, upscale=False) == im.size, (w, h, bound)
        up = target_size(spec, bound, upscale=True)
        assert max(up) == bound and abs(min(up) - max(1.0, bound * min(w, h) / max(w, h))) <= 1, (w, h, bound, up)
