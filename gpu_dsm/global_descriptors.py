"""From images to what retrieval stores: a global descriptor per image (and, with a detector,
local features), read off the same multi-scale activations in one pass."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from gpu_dsm.backbones import Backbone
from gpu_dsm.backbones.checkpoint import RetrievalHead
from gpu_dsm.extract import ExtractConfig, iterate_activations
from gpu_dsm.images import ImageLike, ImageSpec
from gpu_dsm.pooling import POOLINGS, multiscale_aggregate, multiscale_p, pool
from gpu_dsm.whitening import Whitening, resolve_whitening


@dataclass
class GlobalConfig:
    """How a global descriptor is pooled from the activations."""

    pooling: str | None = field(default=None, metadata={
        "flag": "--pooling", "type": str, "choices": POOLINGS, "help": "global descriptor pooling",
        "default_text": "the checkpoint's meta['pooling'], else gem",
        "source": "paper 4.1: GeM for off-the-shelf networks, \"better than MAC on such networks\""})
    p: float | None = field(default=None, metadata={
        "flag": "--gem-p", "type": float, "help": "GeM exponent", "default_text": "the checkpoint's learned p, else 3",
        "source": "Radenović et al. 2018"})
    # exponent of the power mean over scales; None: cnnimageretrieval-pytorch's rule (multiscale_p):
    # GeM's p for gem networks without a whitening layer, else 1
    multiscale_power: float | None = None

    def __post_init__(self):
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; known: {POOLINGS}")
        for name in ("p", "multiscale_power"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be > 0, got {value}")

    def resolve(self, source: Backbone | RetrievalHead) -> "GlobalRecipe":
        """The pooling, exponents and in-network whitening for a backbone's weights (or its head)."""
        head = source.head if isinstance(source, Backbone) else source
        pooling = self.pooling or head.pooling or "gem"
        if self.p is not None:
            p: float | torch.Tensor = float(self.p)
        elif head.gem_p is not None and pooling in ("gem", "gemmp"):
            p = head.gem_p
        else:
            p = 3.0
        whitening = head.network_whitening
        power = self.multiscale_power if self.multiscale_power is not None else multiscale_p(pooling, p, whitening is not None)
        return GlobalRecipe(pooling, p, power, whitening)


@dataclass
class GlobalRecipe:
    """A [`GlobalConfig`][gpu_dsm.global_descriptors.GlobalConfig] resolved for one backbone: what [`global_descriptor`][gpu_dsm.global_descriptors.global_descriptor] is called with."""

    pooling: str
    p: float | torch.Tensor
    multiscale_power: float
    network_whitening: Whitening | None

    def options(self) -> dict:
        """The recipe as plain data (``p`` a float or a list), for result files and cache keys."""
        p = self.p.tolist() if isinstance(self.p, torch.Tensor) else self.p
        return {"pooling": self.pooling, "p": p, "multiscale_power": self.multiscale_power,
                "network_whitening": self.network_whitening is not None}

    def descriptor_dim(self, num_channels: int) -> int:
        """``D`` of the descriptors of a network with ``num_channels`` channels (the in-network
        whitening's output dimension when there is one)."""
        return self.network_whitening.output_dim if self.network_whitening is not None else num_channels

    def __call__(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """[`global_descriptor`][gpu_dsm.global_descriptors.global_descriptor] of one image's maps ``[(K, h_s, w_s)] * S`` -> ``(D,)``."""
        return global_descriptor(maps, self.pooling, self.p, self.multiscale_power, self.network_whitening)


def global_descriptor(maps: Sequence[torch.Tensor], pooling: str = "gem", p: float | torch.Tensor = 3.0,
                      multiscale_power: float | None = None, network_whitening: Whitening | None = None) -> torch.Tensor:
    """Multi-scale global descriptor of one image: ``[(K, h_s, w_s)] * S -> (D,)``, L2-normalised.

    Each scale is pooled and L2-normalised (and, with ``network_whitening``, whitened and
    L2-normalised again: a whitening layer inside the network, as in cnnimageretrieval-pytorch);
    scales are combined by a power mean with ``multiscale_power`` (default [`multiscale_p`][gpu_dsm.pooling.multiscale_p]:
    GeM's p, or 1) and the result is L2-normalised (paper 4.1; cnnimageretrieval-pytorch ``extract_ms``).

    Args:
        maps: the image's finite activations at each scale, ``(K, h_s, w_s)``, any floating dtype,
            on one device.
        pooling, p: as [`gpu_dsm.pooling.pool`][gpu_dsm.pooling.pool] (``p`` a float, or a tensor on the maps' device).
        multiscale_power: exponent of the power mean over scales.
        network_whitening: a [`Whitening`][gpu_dsm.whitening.Whitening] applied per scale (``D`` = its output dimension,
            else ``K``).
    Returns:
        ``(D,)`` float32 on the maps' device.

    Examples:
        >>> import torch
        >>> maps = [torch.tensor([[[1.0, 2.0]], [[2.0, 2.0]]])]  # one scale, K = 2 channels of 1 x 2
        >>> global_descriptor(maps, "mac")
        tensor([0.7071, 0.7071])
    """
    per_scale = []
    for m in maps:
        if m.ndim != 3 or m.numel() == 0:
            raise ValueError(f"global_descriptor: expected non-empty (K, h, w) maps, got {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise ValueError("global_descriptor: activations contain NaN or Inf")
        v = F.normalize(pool(m[None].float(), pooling, p), dim=-1)
        if network_whitening is not None:
            v = network_whitening.apply(v)
        per_scale.append(v[0])
    if multiscale_power is None:
        multiscale_power = multiscale_p(pooling, p, network_whitening is not None)
    return multiscale_aggregate(per_scale, multiscale_power)


@torch.no_grad()
def describe_images(
    backbone: Backbone,
    images: Sequence[ImageLike | ImageSpec],
    sink: Callable[[list[int], torch.Tensor, list[list[torch.Tensor]]], None],
    extract: ExtractConfig | None = None,
    config: GlobalConfig | None = None,
    desc: str = "describe",
) -> None:
    """One pass over ``images``; for each batch of the network,
    ``sink(indices [B], global descriptors (B, D), maps per image [[(K, h, w)] * S] * B)``, so the
    sink can process a batch at once (the detector runs one MSER call per map size). Descriptors
    are float32, L2-normalised; descriptors and maps (the backbone's dtype) are on the backbone's
    device.

    Global descriptors are the network's multi-scale ones (a checkpoint's whitening layer included,
    as the network applies it); learned whitening (``Lw``, ``--whitening``) is a search-time step.
    """
    config = config or GlobalConfig()
    recipe = config.resolve(backbone)
    for batch in iterate_activations(backbone, images, extract, desc=desc):
        maps_per_image = [batch.of_image(i) for i in range(len(batch.indices))]
        descriptors = torch.stack([recipe(maps) for maps in maps_per_image])
        sink(list(batch.indices), descriptors, maps_per_image)


def describe_global(
    backbone: Backbone,
    images: Sequence[ImageLike | ImageSpec],
    extract: ExtractConfig | None = None,
    config: GlobalConfig | None = None,
    whitening: Whitening | None = None,
    desc: str = "global descriptors",
) -> torch.Tensor:
    """Global descriptors ``(N, D)`` of ``images``, float32, L2-normalised, on the backbone's device.

    ``whitening`` (or, if None, the learned whitening a retrieval checkpoint carries, ``Lw[..]['ms']``
    for several scales and ``['ss']`` for one) is applied last. Row ``i`` describes ``images[i]``.

    Examples:
        A tiny random network (stride 8, 8 channels) on two random in-memory images:

        >>> import torch
        >>> from torch import nn
        >>> from gpu_dsm.backbones.wrap import as_backbone
        >>> _ = torch.manual_seed(0)
        >>> backbone = as_backbone(nn.Sequential(nn.Conv2d(3, 8, kernel_size=8, stride=8), nn.ReLU()))
        >>> images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8),  # (3, H, W) uint8 RGB
        ...           torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)]
        >>> config = ExtractConfig(image_size=64, scales=(1.0, 0.5), progress=False)
        >>> descriptors = describe_global(backbone, images, config)
        >>> descriptors.shape, descriptors.dtype, descriptors.norm(dim=1)
        (torch.Size([2, 8]), torch.float32, tensor([1., 1.]))
    """
    extract = extract or ExtractConfig()
    recipe = (config or GlobalConfig()).resolve(backbone)
    out = torch.zeros(len(images), recipe.descriptor_dim(backbone.out_channels), device=backbone.device)

    def keep(indices: list[int], descriptors: torch.Tensor, maps_per_image: list[list[torch.Tensor]]) -> None:
        out[indices] = descriptors

    describe_images(backbone, images, keep, extract, config, desc)
    whitening = resolve_whitening(whitening, backbone.head, len(extract.scales))[1]
    return whitening.apply(out) if whitening is not None else out
