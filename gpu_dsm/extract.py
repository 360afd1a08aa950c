"""Batched multi-scale extraction of last-layer activations (DSM paper 3.6, 4.1).

Images are read and resized to a maximum side by a ``DataLoader`` (optionally in worker
processes), grouped into batches of equal size, scaled by each factor on the backbone's device
and passed through the network. Batches never mix sizes: padding to a common size changes the
activations within a receptive field of the padded border (measured: 75% relative error on
8x8 maps of EfficientNet-Lite0, whose "SAME" padding depends on the input size). Photo
collections have few common sizes (roxford5k-mini: 104 of 133 database images in 4 sizes,
the rest in 27 others), so most batches are full.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from gpu_dsm.backbones import Backbone
from gpu_dsm.config_cli import parse_scales
from gpu_dsm.images import ImageLike, ImageSpec, as_specs, load_image, target_size
from gpu_dsm.progress import progress

#: scale factors of the multi-scale representation (DSM paper 4.1)
DEFAULT_SCALES = (1.0, 1.0 / math.sqrt(2.0), 0.5)


@dataclass
class ExtractConfig:
    """How images become activations."""

    image_size: int = field(default=1024, metadata={
        "flag": "--image-size", "help": "longer image side in pixels", "source": "paper 4.1: \"maximum size of 1024x1024\""})
    scales: tuple[float, ...] = field(default=DEFAULT_SCALES, metadata={
        "flag": "--scales", "type": parse_scales, "default_text": "1, 1/sqrt(2), 1/2", "source": "paper 4.1",
        "help": "comma-separated scale factors, e.g. '1,1/sqrt(2),0.5'"})
    # enlarge images smaller than image_size and bring query crops to it; False is the standard
    # protocol exactly (gpu_dsm.images)
    upscale: bool = field(default=True, metadata={
        "flag": "--no-upscale", "default_text": "enlarge small images and bring query crops to --image-size",
        "help": "the standard image protocol exactly (revisitop / cnnimageretrieval-pytorch: PIL thumbnail, never "
                "enlarging, a query crop keeps its image's scale)",
        "source": "measured: +0.9 mAP M on roxford5k-19q, +3.3 on holidays-811, docs 'Design decisions'"})
    batch_size: int | None = field(default=None, metadata={
        "flag": "--batch-size", "type": int, "help": "images of one size per forward pass",
        "default_text": "1 on the CPU, 16 on a GPU", "source": "measured: 2.0 img/s at 1 vs 1.0 at 4 for "
                        "EfficientNet-Lite0 at 1024 px on the CPU"})
    num_workers: int = field(default=0, metadata={"flag": "--workers", "help": "image-reading processes",
                                                  "source": "the main process reads"})
    # a scale at which the images are smaller than the network needs: "error" (DSM: every scale
    # matters for the descriptors), or "skip" (that scale's maps are None; HOW pools features over
    # 7 scales and an elongated or small image simply has none at its smallest ones)
    small_scales: str = "error"
    progress: bool = field(default=True, metadata={
        "flag": "--no-progress", "help": "hide progress bars", "default_text": "shown",
        "source": "a bar on a terminal, a line per tenth or 30 s in a log (gpu_dsm.progress)"})

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        self.image_size = int(self.image_size)
        if not self.scales or any(not 0 < s <= 4 for s in self.scales):
            raise ValueError(f"scales must be non-empty and in (0, 4], got {self.scales}")
        if self.small_scales not in ("error", "skip"):
            raise ValueError(f"small_scales must be 'error' or 'skip', got {self.small_scales!r}")
        if self.image_size < 1 or (self.batch_size is not None and self.batch_size < 1) or self.num_workers < 0:
            raise ValueError("image_size and batch_size must be >= 1 and num_workers >= 0")


@dataclass
class ActivationBatch:
    """Activations of a batch of images at every scale.

    ``activations[s][i]``: ``(K, h, w)`` map of image ``indices[i]`` at scale ``scales[s]``, in
    the backbone's dtype on its device (``activations[s]`` is ``None`` for a scale skipped as too
    small, ``small_scales="skip"``); ``image_sizes[s][i]``: the ``(height, width)`` in pixels of
    the image the network saw.
    """

    indices: list[int]
    scales: tuple[float, ...]
    activations: list[list[torch.Tensor]]
    image_sizes: list[list[tuple[int, int]]] = field(default_factory=list)

    def of_image(self, i: int) -> list[torch.Tensor]:
        """The per-scale maps ``[(K, h_s, w_s)] * S`` of the ``i``-th image of the batch (the
        backbone's dtype, on its device)."""
        return [per_scale[i] for per_scale in self.activations]


class _ImageDataset(Dataset):
    def __init__(self, specs: Sequence[ImageSpec], cfg: ExtractConfig):
        self.specs = specs
        self.cfg = cfg

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, load_image(self.specs[index], self.cfg.image_size, self.cfg.upscale)


class _SizeBatchSampler(Sampler):
    """Batches of indices of images with the same target size, largest groups first."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int):
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, size in enumerate(sizes):
            groups[size].append(i)
        ordered = [groups[s] for s in sorted(groups, key=lambda s: -len(groups[s]))]
        self.batches = [g[k:k + batch_size] for g in ordered for k in range(0, len(g), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[torch.Tensor]]:
    return [i for i, _ in items], [im for _, im in items]


def _forward_scale(backbone: Backbone, batch: torch.Tensor, scale: float, skip_small: bool = False, recompute: bool = False):
    """One scale of a uint8 batch ``(B, 3, H, W)``: per-image activations (``None`` for images too
    small at this scale when ``skip_small``) and the scaled image size."""
    device, dtype = backbone.device, backbone.dtype
    images = batch.to(device=device, dtype=dtype).div_(255.0)
    if scale != 1.0:
        images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=recompute)
    h, w = images.shape[-2:]
    if min(h, w) < backbone.min_input_size:
        if skip_small:
            return None, (h, w)
        raise ValueError(
            f"image of {w}x{h} px at scale {scale:.3f} is smaller than {backbone.name} needs "
            f"({backbone.min_input_size} px per side); use a larger image_size or drop small scales"
        )
    acts = backbone(images)
    return list(acts.unbind(0)), (h, w)


def default_batch_size(device: torch.device | str) -> int:
    """Images per forward pass when `ExtractConfig.batch_size` is ``None``: 1 on the CPU
    (measured fastest there, see [`ExtractConfig`][gpu_dsm.extract.ExtractConfig]), 16 on an accelerator."""
    return 1 if torch.device(device).type == "cpu" else 16


@torch.no_grad()
def iterate_activations(
    backbone: Backbone, images: Sequence[ImageLike | ImageSpec], cfg: ExtractConfig | None = None, desc: str = "extract",
    recompute_scale_factor: bool = False,
) -> Iterator[ActivationBatch]:
    """Yield [`ActivationBatch`][gpu_dsm.extract.ActivationBatch] es covering ``images`` (in an order chosen for batching).

    Each scale ``s`` is bilinear interpolation to ``floor(H s) x floor(W s)`` sampling at ``1 / s``
    (cnnimageretrieval-pytorch), or with ``recompute_scale_factor`` at ``H / floor(H s)`` (HOW's
    ``how_net.scale_image``, gtolias/how).

    Device and dtype follow ``backbone``; maps stay on that device. Images are read as uint8 RGB
    (paths, or in-memory ``(H, W, 3)`` arrays / ``(3, H, W)`` tensors: [`gpu_dsm.images`][gpu_dsm.images]) and
    scaled to ``[0, 1]`` on the backbone's device. Progress is reported as ``desc`` when
    ``cfg.progress`` (`gpu_dsm.progress.progress`: a bar on a terminal, lines with the rate
    and ETA on stderr otherwise).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from gpu_dsm.backbones.wrap import as_backbone
        >>> _ = torch.manual_seed(0)
        >>> backbone = as_backbone(nn.Sequential(nn.Conv2d(3, 8, kernel_size=8, stride=8), nn.ReLU()))
        >>> images = [torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8)]
        >>> for batch in iterate_activations(backbone, images, ExtractConfig(image_size=64, scales=(1.0, 0.5), progress=False)):
        ...     print(batch.indices, batch.image_sizes, [tuple(m.shape) for m in batch.of_image(0)])
        [0] [[(48, 64)], [(24, 32)]] [(8, 6, 8), (8, 3, 4)]
    """
    cfg = cfg or ExtractConfig()
    specs = as_specs(images)
    if not specs:
        return
    sizes = [target_size(s, cfg.image_size, cfg.upscale) for s in specs]
    batch_size = cfg.batch_size or default_batch_size(backbone.device)
    sampler = _SizeBatchSampler(sizes, batch_size)
    loader = DataLoader(_ImageDataset(specs, cfg), batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=_collate)
    with progress(len(specs), desc, cfg.progress, unit="img") as bar:
        for indices, loaded in loader:
            batch = torch.stack(loaded)
            acts, image_sizes = [], []
            for scale in cfg.scales:
                maps, size = _forward_scale(backbone, batch, scale, cfg.small_scales == "skip", recompute_scale_factor)
                acts.append(maps)
                image_sizes.append([size] * len(indices))
            bar.update(len(indices))
            yield ActivationBatch(indices=indices, scales=cfg.scales, activations=acts, image_sizes=image_sizes)


def extract_activations(
    backbone: Backbone, images: Sequence[ImageLike | ImageSpec], cfg: ExtractConfig | None = None
) -> list[list[torch.Tensor]]:
    """All activations in input order: ``result[i][s]`` is image ``i`` at scale ``s``, ``(K, h, w)``,
    in the backbone's dtype on its device.

    Keeps everything in memory; for a whole database use [`iterate_activations`][gpu_dsm.extract.iterate_activations].

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from gpu_dsm.backbones.wrap import as_backbone
        >>> backbone = as_backbone(nn.Sequential(nn.Conv2d(3, 8, kernel_size=8, stride=8), nn.ReLU()))
        >>> images = [torch.zeros(3, 48, 64, dtype=torch.uint8), torch.zeros(3, 64, 64, dtype=torch.uint8)]
        >>> maps = extract_activations(backbone, images, ExtractConfig(image_size=64, scales=(1.0, 0.5), progress=False))
        >>> [[tuple(m.shape) for m in per_scale] for per_scale in maps]
        [[(8, 6, 8), (8, 3, 4)], [(8, 8, 8), (8, 4, 4)]]
    """
    result: list[list[torch.Tensor] | None] = [None] * len(images)
    for batch in iterate_activations(backbone, images, cfg):
        for i, index in enumerate(batch.indices):
            result[index] = batch.of_image(i)
    return result  # type: ignore[return-value]
