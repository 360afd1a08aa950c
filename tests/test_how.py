"""HOW descriptors (gpu_dsm.how) against the plain loops of tests/reference_how.py on real
EfficientNet-Lite0 maps of roxford5k-mini; layers; the whitening; ASMK on real HOW descriptors
against the plain float64 ASMK (gpu_dsm.reference.asmk)."""
import numpy as np
import pytest
import torch

from gpu_dsm.asmk import ASMKConfig, ASMKIndex, train_codebook
from gpu_dsm.backbones import build_backbone
from gpu_dsm.backbones.layers import HOW_LAYERS, cut_backbone
from gpu_dsm.extract import extract_activations
from gpu_dsm.how import HOWConfig, HOWFeatures, describe_how, fit_how_whitening, select_features, smooth
from gpu_dsm.whitening import fit_pca_whitening, pca_whitening_from_moments

from gpu_dsm.reference import asmk as reference_asmk
import reference_how

pytestmark = pytest.mark.data

# the head layer: the maps these tests read with extract_activations are the full backbone's
SMALL = dict(layer="head", image_size=224, scales=(1.0, 0.707, 0.5), num_features=60, progress=False)


@pytest.fixture(scope="module")
def how_setup(mini, lite0):
    """A whitening fitted on 4 database images and real maps of 2 others, at 224 px."""
    cfg = HOWConfig(**SMALL)
    whitening = fit_how_whitening(lite0, mini.database_specs()[10:14], cfg)
    maps = extract_activations(lite0, mini.database_specs()[:2], cfg.extract_config())
    return cfg, whitening, maps


def test_selection_and_descriptors_equal_the_plain_loop_on_real_maps(how_setup):
    cfg, whitening, maps = how_setup
    for image_maps in maps:
        got = select_features([m[None] for m in image_maps], whitening, cfg.num_features, cfg.smoothing, cfg.dim)
        want = reference_how.features([m.numpy() for m in image_maps], whitening.projection.numpy(), whitening.bias.numpy(),
                                      cfg.num_features)
        assert got["descriptors"].shape == (1, cfg.num_features, cfg.dim)
        assert [(s, x, y) for _, s, x, y, _ in want] == [
            (int(s), int(x), int(y)) for s, (x, y) in zip(got["scale"][0], got["xy"][0])]
        np.testing.assert_allclose(got["strength"][0].numpy(), [a for a, *_ in want], rtol=1e-5)
        np.testing.assert_allclose(got["descriptors"][0].double().numpy(), np.stack([v for *_, v in want]), rtol=0, atol=2e-3)
        # the reduction keeps raw vectors: no L2 normalisation
        norms = got["descriptors"][0].norm(dim=1)
        assert (norms - 1).abs().max() > 0.1


def test_raw_selection_for_the_whitening_equals_the_plain_loop(how_setup):
    cfg, _, maps = how_setup
    image_maps = maps[0][:1]
    got = select_features([m[None] for m in image_maps], None, 20, cfg.smoothing)
    want = reference_how.features([m.numpy() for m in image_maps], None, None, 20)
    np.testing.assert_allclose(got["descriptors"][0].double().numpy(), np.stack([v for *_, v in want]), rtol=1e-5, atol=1e-6)


def test_smoothing_averages_valid_neighbours_only_and_commutes_with_the_reduction(how_setup):
    _, whitening, maps = how_setup
    u = maps[0][0][None]
    s = smooth(u)
    assert torch.allclose(s[0, :, 0, 0], u[0, :, :2, :2].mean((1, 2)), atol=1e-6)  # a corner: 4 valid cells
    assert torch.allclose(s[0, :, 0, 3], u[0, :, :2, 2:5].mean((1, 2)), atol=1e-6)  # an edge: 6
    proj, bias = whitening.projection, whitening.bias
    reduced_first = smooth(torch.einsum("dk,bkhw->bdhw", proj, u) + bias[None, :, None, None])
    smoothed_first = torch.einsum("dk,bkhw->bdhw", proj, s) + bias[None, :, None, None]
    assert torch.allclose(reduced_first, smoothed_first, atol=1e-3, rtol=1e-4)


def test_whitening_from_moments_is_pca_without_l2(how_setup, mini, lite0):
    cfg, whitening, _ = how_setup
    maps = extract_activations(lite0, mini.database_specs()[10:14], cfg.extract_config(scales=(1.0,)))
    raw = torch.cat([select_features([m[0][None]], None, cfg.num_features)["descriptors"][0] for m in maps]).double()
    streamed = pca_whitening_from_moments(raw.shape[0], raw.sum(0), raw.T @ raw, cfg.dim)
    assert torch.allclose(streamed.projection, whitening.projection, atol=1e-4, rtol=1e-3)
    y = whitening.project(raw.float()).double()
    # the training descriptors come out centred with unit variance along the kept directions
    assert y.mean(0).abs().max() < 1e-3
    assert torch.allclose(y.T @ y / y.shape[0], torch.eye(cfg.dim, dtype=torch.float64), atol=2e-2)
    # same leading directions as the repository's PCA whitening (up to sign)
    pca = fit_pca_whitening(raw, dim=8)
    cos = torch.nn.functional.cosine_similarity(pca.projection.double(), streamed.projection[:8].double(), dim=1).abs()
    assert (cos > 0.999).all()


def test_describe_how_batches_equal_one_image_at_a_time(mini, lite0, how_setup):
    cfg, whitening, _ = how_setup
    specs = mini.database_specs()[:3]
    one = describe_how(lite0, specs, whitening, HOWConfig(**SMALL, batch_size=1))
    many = describe_how(lite0, specs, whitening, HOWConfig(**SMALL, batch_size=3))
    assert one.counts().tolist() == [cfg.num_features] * 3 and one.num_images == 3
    assert torch.equal(one.image_ids, many.image_ids) and torch.equal(one.scale, many.scale)
    # batched convolutions and the 1280-channel reduction sum in another order: ~2e-4 on values up to ~200
    assert torch.allclose(one.descriptors, many.descriptors, atol=1e-3, rtol=1e-4)


def test_how_features_save_load_and_corrupt_files(tmp_path, mini, lite0, how_setup):
    _, whitening, _ = how_setup
    feats = describe_how(lite0, mini.database_specs()[:1], whitening, HOWConfig(**SMALL))
    path = feats.save(tmp_path / "f.pt")
    back = HOWFeatures.load(path)
    assert torch.equal(back.descriptors, feats.descriptors) and back.scales == feats.scales
    torch.save({"format": "gpu_dsm.how_features/1", "descriptors": torch.zeros(3, 4)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="corrupt HOW features"):
        HOWFeatures.load(tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a file")
    with pytest.raises(ValueError):
        HOWFeatures.load(tmp_path / "junk.pt")


def test_bad_input_is_named(lite0, how_setup):
    _, whitening, maps = how_setup
    u = maps[0][0][None].clone()
    u[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select_features([u], whitening, 10)
    with pytest.raises(ValueError, match="whitening takes 1280-D"):
        select_features([torch.rand(1, 320, 4, 4)], whitening, 10)
    with pytest.raises(ValueError, match="no layer 'layer9'"):
        cut_backbone(lite0, "layer9")
    with pytest.raises(ValueError, match="at least 2"):
        pca_whitening_from_moments(1, torch.zeros(3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="non-empty"):
        select_features([torch.rand(1, 8, 0, 4)], None, 10)


def test_scales_at_which_an_image_is_too_small_give_no_features(mini, lite0, how_setup):
    _, whitening, _ = how_setup
    specs = mini.database_specs()[:2]
    # at 100 px the 0.353 and 0.25 scales are under 32 px: skipped; at 20 px every scale is
    feats = describe_how(lite0, specs, whitening, HOWConfig(layer="head", image_size=100, num_features=10_000, progress=False))
    assert feats.scale.max() <= 4 and feats.counts().min() > 0
    alone = describe_how(lite0, specs, whitening, HOWConfig(layer="head", image_size=100, scales=HOWConfig().scales[:5], num_features=10_000,
                                                             progress=False))
    assert torch.equal(feats.scale, alone.scale) and torch.allclose(feats.descriptors, alone.descriptors)
    none = describe_how(lite0, specs, whitening, HOWConfig(layer="head", image_size=12, progress=False))
    assert none.descriptors.shape == (0, 128) and none.counts().tolist() == [0, 0]
    # DSM extraction still refuses such an image, naming it
    from gpu_dsm.extract import ExtractConfig
    with pytest.raises(ValueError, match=r"at scale 0\.707 is smaller than efficientnet_lite0 needs"):
        extract_activations(lite0, specs[:1], ExtractConfig(image_size=50, progress=False))


@pytest.mark.parametrize("name,layer,channels,stride", [
    ("resnet18", "layer4", 512, 32), ("resnet50", "layer3", 1024, 16), ("vgg16", "conv5", 512, 16),
    ("efficientnet_lite0", "stage5", 112, 16), ("efficientnet_lite0", "head", 1280, 32)])
def test_cut_backbones_give_the_named_layer(name, layer, channels, stride):
    backbone = build_backbone(name, "none" if name != "efficientnet_lite0" else "default")
    cut = cut_backbone(backbone, layer)
    x = torch.rand(1, 3, 96, 160)
    with torch.no_grad():
        out = cut(x)
    assert out.shape[1] == cut.out_channels == channels and cut.stride == stride
    assert tuple(out.shape[-2:]) == cut.output_size(96, 160)
    if name == "resnet50":  # conv1 .. layer3 of torchvision's ResNet, nothing else
        net = torch.nn.Sequential(*list(backbone.features.children())[:7])
        with torch.no_grad():
            assert torch.allclose(out, net(backbone.normalize(x)), atol=1e-5)
    if layer == HOW_LAYERS[name] == "conv5":
        assert cut is backbone


def test_asmk_on_real_how_descriptors_equals_the_plain_loop(mini, lite0, how_setup, native_kernel):
    cfg, whitening, _ = how_setup
    db = describe_how(lite0, mini.database_specs()[:6], whitening, cfg)
    queries = describe_how(lite0, mini.query_specs()[:2], whitening, cfg)
    train = describe_how(lite0, mini.database_specs()[10:14], whitening, cfg)
    codebook = train_codebook(train.descriptors.double(), 24, iterations=5, seed=0)
    want = reference_asmk.scores(codebook.numpy(), db.descriptors.double().numpy(), db.image_ids.tolist(), 6,
                                 queries.descriptors.double().numpy(), queries.image_ids.tolist(), 2)
    assert (want > 0).sum() >= 6  # real descriptors share words: the comparison is not of zeros
    for backend in ("native", "torch"):  # the C kernel and the tensor passes
        index = ASMKIndex.build(codebook, db.descriptors.double(), db.image_ids, ASMKConfig(search_backend=backend),
                                num_images=6)
        scores, order = index.search(queries.descriptors.double(), queries.image_ids, num_queries=2)
        got = torch.zeros(2, 6, dtype=torch.float64).scatter_(1, order, scores).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
        for row in range(2):
            assert order[row].tolist() == sorted(range(6), key=lambda i: (-want[row, i], i))
