"""From images to what retrieval stores: a global descriptor per image (and, with a detector,
local features), read off the same multi-scale activations in one pass."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gpu_dsm.backbones import Backbone
from gpu_dsm.extract import ExtractConfig, iterate_activations
from gpu_dsm.images import ImageLike, ImageSpec
from gpu_dsm.pooling import POOLINGS, multiscale_aggregate, multiscale_p, pool
from gpu_dsm.whitening import Whitening


@dataclass
class GlobalConfig:
    """How a global descriptor is pooled from the activations."""

    pooling: str = "gem"  # paper 4.1: GeM for off-the-shelf networks ("better than MAC on such networks")
    p: float | None = None  # GeM exponent; None: the checkpoint's learned p, else 3 (Radenović et al. 2018)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; known: {POOLINGS}")
        if self.p is not None and not (math.isfinite(self.p) and self.p > 0):
            raise ValueError(f"GeM p must be > 0, got {self.p}")

    def resolved_p(self, backbone: Backbone) -> float:
        if self.p is not None:
            return float(self.p)
        return backbone.head.gem_p if backbone.head.gem_p is not None else 3.0


def global_descriptor(maps: Sequence[torch.Tensor], pooling: str = "gem", p: float = 3.0) -> torch.Tensor:
    """Multi-scale global descriptor of one image: ``[(K, h_s, w_s)] * S -> (K,)``, L2-normalised.

    Each scale is pooled and L2-normalised, scales are combined by a power mean (GeM: ``p``;
    MAC/SPoC: average) and the result is L2-normalised (paper 4.1).
    """
    per_scale = []
    for m in maps:
        if m.ndim != 3 or m.numel() == 0:
            raise ValueError(f"global_descriptor: expected non-empty (K, h, w) maps, got {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise ValueError("global_descriptor: activations contain NaN or Inf")
        per_scale.append(pool(m[None].float(), pooling, p)[0])
    return multiscale_aggregate(per_scale, multiscale_p(pooling, p))


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
    ``sink(indices [B], global descriptors (B, K), maps per image [[(K, h, w)] * S] * B)``, so the
    sink can process a batch at once (the detector runs one MSER call per map size).

    Global descriptors are the raw (unwhitened) multi-scale ones; whitening is a search-time step.
    """
    config = config or GlobalConfig()
    p = config.resolved_p(backbone)
    for batch in iterate_activations(backbone, images, extract, desc=desc):
        maps_per_image = [batch.of_image(i) for i in range(len(batch.indices))]
        descriptors = torch.stack([global_descriptor(maps, config.pooling, p) for maps in maps_per_image])
        sink(list(batch.indices), descriptors, maps_per_image)


def describe_global(
    backbone: Backbone,
    images: Sequence[ImageLike | ImageSpec],
    extract: ExtractConfig | None = None,
    config: GlobalConfig | None = None,
    whitening: Whitening | None = None,
    desc: str = "global descriptors",
) -> torch.Tensor:
    """Global descriptors ``(N, D)`` of ``images``, float32 on the backbone's device.

    ``whitening`` (or, if None, the whitening a retrieval checkpoint carries) is applied last.
    """
    out = torch.zeros(len(images), backbone.out_channels, device=backbone.device)

    def keep(indices: list[int], descriptors: torch.Tensor, maps_per_image: list[list[torch.Tensor]]) -> None:
        out[indices] = descriptors

    describe_images(backbone, images, keep, extract, config, desc)
    whitening = whitening if whitening is not None else backbone.head.whitening
    return whitening.apply(out) if whitening is not None else out
