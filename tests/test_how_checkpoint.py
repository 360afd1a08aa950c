"""HOW checkpoints in the authors' layout (github.com/gtolias/how): random-weight checkpoints
written with their key names and meta (tests/reference_how_checkpoint.py, both formats, R18 and
-R50) load through build_backbone, and gpu_dsm's HOW features of roxford5k-mini images equal the
features of the authors' test-time code rewritten plainly in that reference. Their training
checkpoints load without trusting pickles; a crafted one is still refused."""
import collections
import os
import warnings

import numpy as np
import pytest
import torch

from gpu_dsm.asmk import ASMKConfig
from gpu_dsm.backbones import build_backbone
from gpu_dsm.backbones.layers import cut_backbone
from gpu_dsm.how import HOWConfig, describe_how, fit_how_whitening, how_checkpoint
from gpu_dsm.io import torch_load_weights
from gpu_dsm.pipeline import DSMRetrieval, RetrievalConfig

import reference_how_checkpoint as reference

pytestmark = pytest.mark.data

IMAGE_SIZE = 160  # smallest scale 0.25: 40 px, over R18's stride 32
NUM_FEATURES = 100  # of 7 scales' 65-520 positions: the selection matters
DIM = 32


def _config(**kw):
    return HOWConfig(image_size=IMAGE_SIZE, num_features=NUM_FEATURES, progress=False, **kw)


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory):
    return reference.write_checkpoint(tmp_path_factory.mktemp("how") / "how_r18.pth", "resnet18", 0, DIM, seed=1)


@pytest.mark.parametrize("architecture, skip_layer, first_format, images", [
    ("resnet18", 0, False, 2), ("resnet18", 0, True, 1), ("resnet50", 1, False, 1)])
def test_features_equal_the_authors_test_time_code(tmp_path, mini, architecture, skip_layer, first_format, images):
    path = reference.write_checkpoint(tmp_path / "how.pth", architecture, skip_layer, DIM, seed=2, first_format=first_format)
    specs = mini.database_specs()[:images]
    ours = describe_how(build_backbone(architecture, weights=path), specs, None, _config())
    theirs = reference.Network(path)
    for i, spec in enumerate(specs):
        desc, att, loc, scl = theirs.forward_local(theirs.load_image(spec.source, IMAGE_SIZE), NUM_FEATURES, reference.HOW_SCALES)
        rows = ours.image_ids == i
        assert int(rows.sum()) == NUM_FEATURES == desc.shape[0]
        # the same positions and scales, in the same order
        assert torch.equal(ours.xy[rows].long(), loc.long())
        assert torch.equal(torch.tensor(ours.scales)[ours.scale[rows]], scl.float())
        # they divide the attention by the image's largest; float32 and another conv layout: 1e-6 relative
        strength = ours.strength[rows]
        torch.testing.assert_close(strength / strength[0], att, rtol=0, atol=1e-5)
        scale = float(desc.abs().max())
        torch.testing.assert_close(ours.descriptors[rows], desc, rtol=0, atol=1e-5 * scale)


def test_the_layout_is_read_into_the_backbone_and_its_reduction(tmp_path, r18_checkpoint):
    raw = torch_load_weights(r18_checkpoint)
    backbone = build_backbone("resnet18", weights=r18_checkpoint)
    how = how_checkpoint(backbone)
    assert (how.layer, how.smoothing, how.format, backbone.out_channels, backbone.stride) == ("layer4", 3, "how/2020", 512, 32)
    assert backbone.classifier is None
    assert torch.equal(how.reduction.projection, raw["state_dict"]["dim_reduction.weight"][:, :, 0, 0])
    assert torch.equal(how.reduction.bias, raw["state_dict"]["dim_reduction.bias"])
    assert torch.equal(backbone.features[0].weight, raw["state_dict"]["features.0.weight"])

    r50 = build_backbone("resnet50", weights=reference.write_checkpoint(tmp_path / "r50.pth", "resnet50", 1, DIM))
    assert (how_checkpoint(r50).layer, r50.out_channels, r50.stride, len(r50.features)) == ("layer3", 1024, 16, 7)
    assert cut_backbone(r50) is r50
    with pytest.raises(ValueError, match="layer4"):
        cut_backbone(r50, "layer4")


def test_the_learned_reduction_replaces_the_fitted_whitening(r18_checkpoint, mini):
    backbone = build_backbone("resnet18", weights=r18_checkpoint)
    reduction = how_checkpoint(backbone).reduction
    assert fit_how_whitening(backbone, mini.database_specs()[:1], _config()) is reduction
    cfg = RetrievalConfig(initial="asmk", rerank=None, how=_config(), asmk=ASMKConfig(codebook_size=8, kmeans_iterations=2))
    module = DSMRetrieval(backbone, cfg).fit_asmk(mini.database_specs()[:2])
    assert torch.equal(module.how_whitening.projection, reduction.projection)
    assert torch.equal(module.how_whitening.bias, reduction.bias)
    assert tuple(module.codebook.shape) == (8, DIM)


def test_bad_checkpoints_and_settings_are_named(tmp_path, r18_checkpoint):
    with pytest.raises(ValueError, match="resnet18 network"):
        build_backbone("resnet50", weights=r18_checkpoint)
    state = torch_load_weights(r18_checkpoint)
    bad = {**state, "net_params": {**state["net_params"], "skip_layer": 2}}
    torch.save(bad, tmp_path / "skip2.pth")
    with pytest.raises(ValueError, match="skip_layer=2"):
        build_backbone("resnet18", weights=tmp_path / "skip2.pth")
    extra = {**state, "state_dict": {**state["state_dict"], "pool.p": torch.ones(1)}}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="refusing to ignore"):
        build_backbone("resnet18", weights=tmp_path / "extra.pth")
    plain = {**state, "state_dict": {k: v for k, v in state["state_dict"].items() if not k.startswith("dim_reduction.")}}
    torch.save(plain, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="without a dimensionality reduction"):
        build_backbone("resnet18", weights=tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="ends at layer3"):
        build_backbone("resnet50", weights=reference.write_checkpoint(tmp_path / "r50.pth", "resnet50", 1, DIM), upsample=True)

    backbone = build_backbone("resnet18", weights=r18_checkpoint)
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="learned on 'layer4'"):
        describe_how(backbone, [image], None, _config(layer="layer3"))
    with pytest.raises(ValueError, match="smoothing=1"):
        describe_how(backbone, [image], None, _config(smoothing=1))
    with pytest.warns(UserWarning, match="random weights"):
        random = build_backbone("resnet18", weights="none")
    with pytest.raises(ValueError, match="not a HOW checkpoint"):
        describe_how(random, [image], None, _config())


@pytest.mark.parametrize("epochs", [0, 5])
def test_the_authors_training_checkpoints_load_without_trusting_pickles(tmp_path, epochs):
    """train.py saves its validation scores, a defaultdict(list) of defaultdict(list) holding
    Python and numpy floats, and the optimizer's (and scheduler's) state in every checkpoint: read
    by the default safe load, the scores as plain dicts of the same items."""
    path = reference.write_checkpoint(tmp_path / f"model_epoch{epochs}.pth", "resnet18", 0, DIM, epochs=epochs)
    written = torch.load(path, weights_only=False)
    assert type(written["scores"]) is collections.defaultdict and written["scores"].default_factory is list
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "trusted" warning: nothing was unpickled in full
        backbone = build_backbone("resnet18", weights=path)
    assert torch.equal(how_checkpoint(backbone).reduction.projection, written["state_dict"]["dim_reduction.weight"][:, :, 0, 0])
    loaded = torch_load_weights(path)
    assert loaded["scores"] == written["scores"] and type(loaded["scores"]["local_descriptor"]) is dict
    assert loaded["epoch"] == epochs and set(loaded) == set(written)
    if epochs:
        assert loaded["scores"]["local_descriptor"]["val_eccv20"] == [(5, np.float64(0.55))] == [(5, loaded["best_score"])]
        assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg_sq"], written["optimizer"]["state"][0]["exp_avg_sq"])


class _System:
    """Unpickling this runs a shell command (``os.system``) that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoints_are_still_refused(tmp_path):
    path = reference.write_checkpoint(tmp_path / "how.pth", "resnet18", 0, DIM, epochs=1)
    state = torch.load(path, weights_only=False)
    marker = tmp_path / "ran"
    crafted = {
        "system": ({**state, "scores": _System(marker)}, r"holds a (posix|nt)\.system object"),
        "factory": ({**state, "scores": collections.defaultdict(collections.OrderedDict)},
                    r"holds a collections\.defaultdict\(collections\.OrderedDict\) object"),
        "no factory": ({**state, "scores": collections.defaultdict(None, {"a": 1})}, r"collections\.defaultdict\(None\)"),
        "code factory": ({**state, "scores": collections.defaultdict(os.getcwd)}, r"holds a (posix|nt)\.getcwd object"),
    }
    for name, (obj, message) in crafted.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        with pytest.raises(ValueError, match=message + r".*--trust-weights-file"):
            build_backbone("resnet18", weights=tmp_path / f"{name}.pth")
    assert not marker.exists()
