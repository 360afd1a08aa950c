"""The `Backbone` module: RGB images -> last convolutional activations."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from gpu_dsm.backbones.checkpoint import RetrievalHead


class Backbone(nn.Module):
    """A fully convolutional network ``f`` of the DSM paper (section 3.2).

    ``forward``: ``(B, 3, H, W)`` RGB in ``[0, 1]`` (any float dtype, on the module's device)
    -> activations ``(B, K, h, w)`` after the last ReLU, ``h ~ H / stride``.

    Attributes:
        name: registry name, e.g. ``"efficientnet_lite0"``.
        out_channels: ``K``.
        stride: input pixels per activation pixel (16 or 32; halved by ``upsampled``).
        upsampled: whether activation upsampling "↑" (paper 4.1) is applied.
        min_input_size: smallest image side (pixels) the network accepts; one ``stride`` gives
            a single activation pixel.
        head: pooling ``p`` / whitening / normalisation carried by a retrieval checkpoint.
        activation_bound: largest possible activation (6 for ReLU6 networks), else ``None``.
        halvings: rounding ("ceil" or "floor") of each stride-2 step, giving `output_size`.
        classifier: the ImageNet classifier on top of ``features`` when the weights have one
            (``logits = classifier(activations)``), else ``None``.
    """

    def __init__(
        self,
        name: str,
        features: nn.Module,
        out_channels: int,
        stride: int,
        mean: Sequence[float],
        std: Sequence[float],
        upsampled: bool = False,
        head: RetrievalHead | None = None,
        classifier: nn.Module | None = None,
        weights: str = "none",
        halvings: Sequence[str] = (),
        activation_bound: float | None = None,
    ):
        super().__init__()
        self.name = name
        self.features = features
        self.out_channels = int(out_channels)
        self.stride = int(stride)
        self.upsampled = bool(upsampled)
        self.min_input_size = self.stride
        self.head = head or RetrievalHead()
        self.classifier = classifier
        self.weights = weights
        self.halvings = tuple(halvings)
        self.activation_bound = activation_bound
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._features_fn = getattr(features, "forward_features", features)

    @property
    def device(self) -> torch.device:
        """The device of the module's buffers and weights."""
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's weights (images are cast to it by extraction)."""
        return next(self.features.parameters()).dtype

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Activation map ``(h, w)`` (activation pixels) for an input of ``height x width`` pixels."""
        for rounding in self.halvings:
            if rounding == "ceil":
                height, width = -(-height // 2), -(-width // 2)
            else:
                height, width = height // 2, width // 2
        return height, width

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` per RGB channel: ``(B, 3, H, W)`` floating point in ``[0, 1]``
        on the module's device -> the network's input, same shape, dtype and device."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` RGB in ``[0, 1]`` (the network's dtype, on its device; ``H, W >=
        min_input_size``) -> activations ``(B, K, h, w)``, ``(h, w) = output_size(H, W)``, same
        dtype and device (channels-last memory layout)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: expected RGB images (B, 3, H, W), got {tuple(images.shape)}")
        if min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"{self.name}: image of {images.shape[-1]}x{images.shape[-2]} px is smaller than the network "
                f"needs ({self.min_input_size} px per side, its stride)"
            )
        # channels-last runs the depthwise/pointwise convolutions 1.5-2x faster on CPU (oneDNN)
        # and lets cuDNN use tensor-core layouts; values are unchanged.
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        return self._features_fn(x)
