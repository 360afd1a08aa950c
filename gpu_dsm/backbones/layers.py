"""A backbone cut at an inner layer: the map HOW reads its local descriptors from.

==================== ============================ ===========================================
backbone             layers                       HOW's choice (``HOW_LAYERS``)
==================== ============================ ===========================================
resnet18             ``layer3``, ``layer4``       ``layer4`` (512-D, stride 32; HOW paper 4.1)
resnet50, resnet101  ``layer3``, ``layer4``       ``layer3`` (1024-D, stride 16; HOW "R50-")
vgg16                ``conv5``                    ``conv5`` (512-D, stride 16)
efficientnet_lite*   ``stage5`` .. ``stage7``,    ``stage5`` (112-D, stride 16): measured against
                     ``head``                     ``head`` on holidays-811 (docs/how-asmk.md)
==================== ============================ ===========================================

The cut network shares its modules (and weights) with the backbone it is cut from.
"""
from __future__ import annotations

from torch import nn

from gpu_dsm.backbones.backbone import Backbone

#: the layer HOW's local descriptors are read from, per backbone (see the module docstring)
HOW_LAYERS = {"resnet18": "layer4", "resnet50": "layer3", "resnet101": "layer3", "vgg16": "conv5",
              # measured on holidays-811 (300 queries, 4096 words learned on its database): stage5 (112-D,
              # stride 16, like R50's layer3) beats head (1280-D, stride 32) by +3.54 mAP [+1.01, +6.13]
              "efficientnet_lite0": "stage5", "efficientnet_lite2": "stage5"}

_RESNET_LAYERS = {"layer3": 7, "layer4": 8}  # children of the ResNet features kept
_LITE_STAGES = {"stage5": 5, "stage6": 6, "stage7": 7}  # stages kept (1-based), no head


class _LiteUpTo(nn.Module):
    """EfficientNet-Lite's stem and its first ``num_blocks`` blocks (a linear bottleneck output)."""

    def __init__(self, net: nn.Module, num_blocks: int):
        super().__init__()
        self.net = net
        self.num_blocks = num_blocks

    def forward(self, x):
        net = self.net
        x = nn.functional.relu6(net._bn0(net._conv_stem(x)))
        for block in net._blocks[: self.num_blocks]:
            x = block(x)
        return x


def backbone_layers(name: str) -> list[str]:
    """The layer names `cut_backbone` accepts for backbone ``name``."""
    if name.startswith("resnet"):
        return list(_RESNET_LAYERS)
    if name == "vgg16":
        return ["conv5"]
    if name.startswith("efficientnet_lite"):
        return [*_LITE_STAGES, "head"]
    raise ValueError(f"unknown backbone {name!r}")


def how_checkpoint_layer(backbone: Backbone) -> str | None:
    """The layer a HOW checkpoint's backbone ends at (its reduction's input), else ``None``."""
    how = getattr(getattr(backbone, "head", None), "how", None)
    return how.layer if how is not None else None


def cut_backbone(backbone: Backbone, layer: str | None = None) -> Backbone:
    """``backbone`` up to ``layer`` (default `HOW_LAYERS`; for a HOW checkpoint's backbone,
    the checkpoint's layer, the last it has), as a `Backbone` whose ``forward`` gives that
    layer's map ``(B, K_layer, h, w)`` (``h ~ H / its stride``); the last layer returns ``backbone``.
    The cut network shares the backbone's weights, device and dtype."""
    name = backbone.name
    checkpoint_layer = how_checkpoint_layer(backbone)
    layer = layer or checkpoint_layer or HOW_LAYERS[name]
    known = backbone_layers(name)
    if checkpoint_layer is not None:  # the trunk ends there: no later layer exists
        known = known[: known.index(checkpoint_layer) + 1]
    if layer not in known:
        raise ValueError(f"{name} has no layer {layer!r} for local descriptors; known: {', '.join(known)}")
    last = known[-1]
    if layer == last:
        return backbone
    if backbone.upsampled:
        raise ValueError(f"layer {layer!r} of an upsampled (↑) {name}: cut the plain network instead")
    if name.startswith("resnet"):
        keep = _RESNET_LAYERS[layer]
        features = nn.Sequential(*list(backbone.features.children())[:keep])
        channels = _resnet_channels(features[-1])
        halvings = backbone.halvings[: 4 if layer == "layer3" else 5]
    else:  # efficientnet_lite*, a stage before the head
        net = backbone.features
        stage = _LITE_STAGES[layer]
        end = net.stage_starts[stage] if stage < len(net.stage_starts) else len(net._blocks)
        features = _LiteUpTo(net, end)
        channels = net._blocks[end - 1]._project_conv.out_channels
        strides = [2] + [b._depthwise_conv.stride[0] for b in net._blocks[:end]]
        halvings = backbone.halvings[: sum(1 for s in strides if s == 2)]
    stride = 2 ** len(halvings)
    cut = Backbone(name=name, features=features, out_channels=channels, stride=stride, mean=backbone.mean.flatten().tolist(),
                   std=backbone.std.flatten().tolist(), upsampled=False, head=backbone.head, classifier=None,
                   weights=backbone.weights, halvings=halvings, activation_bound=None)
    return cut.to(device=backbone.device, dtype=backbone.dtype).eval()


def _resnet_channels(layer: nn.Sequential) -> int:
    block = layer[-1]
    conv = getattr(block, "conv3", None) or block.conv2
    return int(conv.out_channels)
