"""Any network as a `Backbone`: a plain ``nn.Module`` mapping images to activation maps.

A module with ``forward_features`` (timm's convention) is called through it.

Examples:
    >>> import torch
    >>> import torchvision
    >>> from torch import nn
    >>> trunk = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])  # random weights
    >>> backbone = as_backbone(trunk)  # stride and channels measured, ImageNet normalisation
    >>> backbone.stride, backbone.out_channels, backbone.device, backbone.dtype
    (32, 512, device(type='cpu'), torch.float32)
    >>> with torch.no_grad():
    ...     backbone(torch.rand(2, 3, 64, 96)).shape  # (B, 3, H, W) RGB in [0, 1] -> (B, K, h, w)
    torch.Size([2, 512, 2, 3])
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from gpu_dsm.backbones import IMAGENET_MEAN, IMAGENET_STD
from gpu_dsm.backbones.backbone import Backbone

#: side of the probe image the stride is measured on (pixels); a multiple of every usual stride
_PROBE = 256


def _module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def _probe(features, side_h: int, side_w: int, device: torch.device, dtype: torch.dtype, what: str) -> torch.Tensor:
    out = features(torch.zeros(1, 3, side_h, side_w, device=device, dtype=dtype))
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(f"{what} must map (B, 3, H, W) images to (B, K, h, w) activation maps; it returned {shape} "
                        "for a (1, 3, 256, 256) input (cut the network before its pooling and classifier)")
    return out


def as_backbone(module: nn.Module, stride: int | None = None, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None, activation_bound: float | None = None,
                name: str | None = None) -> Backbone:
    """``module`` as a `Backbone` (returned unchanged when it already is one), on the
    device and in the dtype of the module's first floating point parameter or buffer (the CPU and
    float32 for a module without any).

    Args:
        module: maps RGB images ``(B, 3, H, W)``, normalised by ``mean``/``std``, to activations
            ``(B, K, h, w)``; called through ``module.forward_features`` when it has one (timm).
        stride: input pixels per activation pixel; default measured on a 256 x 256 probe image.
        mean, std: per-channel normalisation of ``[0, 1]`` RGB; default ImageNet's (torchvision).
        activation_bound: largest possible activation (6 for ReLU6 networks) for the detector's
            level mapping; default ``None`` (unbounded, plain ReLU).
        name: a label for messages (default the module's class name).

    Raises:
        TypeError: ``module`` is not an ``nn.Module`` or does not return ``(B, K, h, w)`` maps.
    """
    if isinstance(module, Backbone):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"a backbone must be an nn.Module mapping (B, 3, H, W) images to (B, K, h, w) maps, "
                        f"got {type(module).__name__}")
    name = name or type(module).__name__
    features = getattr(module, "forward_features", module)
    device, dtype = _module_device_dtype(module)
    was_training = module.training
    module.eval()
    try:
        out = _probe(features, _PROBE, _PROBE, device, dtype, name)
        odd = _probe(features, _PROBE + 1, _PROBE + 1, device, dtype, name)
    finally:
        module.train(was_training)
    channels, height = int(out.shape[1]), int(out.shape[2])
    if stride is None:
        ratio = _PROBE / max(height, 1)
        if height < 1 or abs(ratio - round(ratio)) > 1e-6:
            raise TypeError(f"{name}: cannot measure its stride ({_PROBE} px gave {height} rows of activations); "
                            "pass stride=")
        stride = int(round(ratio))
    steps = int(round(math.log2(stride))) if stride > 0 and 2 ** round(math.log2(stride)) == stride else 0
    halvings = ()
    if steps:
        ceil, floor = _PROBE + 1, _PROBE + 1
        for _ in range(steps):
            ceil, floor = -(-ceil // 2), floor // 2
        halvings = ("ceil",) * steps if int(odd.shape[2]) == ceil else ("floor",) * steps if int(odd.shape[2]) == floor else ()
    backbone = Backbone(name=name, features=module, out_channels=channels, stride=int(stride),
                        mean=tuple(mean) if mean is not None else IMAGENET_MEAN,
                        std=tuple(std) if std is not None else IMAGENET_STD,
                        halvings=halvings, activation_bound=activation_bound, weights="user module")
    return backbone.to(device)
