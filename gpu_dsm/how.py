"""HOW local descriptors at test time (Tolias, Jenicek, Chum, ECCV 2020), batched.

For each image and each of 7 scales, the map ``u`` of a backbone layer (``gpu_dsm.backbones.layers``)
gives, per position:

- attention ``w = sqrt(sum_k u_k^2 + 1e-10)``, on the RAW map (before smoothing and reduction);
- a descriptor: ``u`` smoothed by a 3x3 average whose border cells average their valid
  neighbours only, then reduced by a PCA whitening ``P (u - m)`` to 128-D, with no L2
  normalisation. Smoothing and the affine reduction commute (the average's weights sum to 1),
  so the map is reduced first and the 128-D map smoothed;

then the top ``n`` positions by attention over all scales of the image are kept (ties: scale
order, then row-major position). Each feature keeps its position (feature-map pixels of its
scale, ``x`` = column), its scale index and its attention (``strength``).

Images of one size share a forward pass and a selection call; they are never padded. The
whitening is fitted on other images ([`fit_how_whitening`][gpu_dsm.how.fit_how_whitening]) from streamed moments of their
scale-1 descriptors (top ``n`` by attention, smoothed, not reduced).

A backbone built from a HOW checkpoint (``build_backbone(name, weights="how_r18.pth")``, the
layout of gtolias/how; `gpu_dsm.backbones.checkpoint.split_how_checkpoint`) carries the
learned reduction: [`describe_how`][gpu_dsm.how.describe_how] uses it when given no whitening, [`fit_how_whitening`][gpu_dsm.how.fit_how_whitening]
returns it without fitting, the layer defaults to the checkpoint's, and each scale is sampled as
the authors' ``how_net.scale_image`` does (``recompute_scale_factor=True``). The features then
equal the authors' ``HOWNet.forward_local`` (strength = their attention times the image's
largest attention: they divide by it, which changes no selection).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from gpu_dsm.backbones import Backbone
from gpu_dsm.backbones.checkpoint import HOWCheckpoint
from gpu_dsm.backbones.layers import cut_backbone
from gpu_dsm.checks import as_tensor
from gpu_dsm.extract import ExtractConfig, iterate_activations
from gpu_dsm.images import ImageLike, ImageSpec
from gpu_dsm.io import torch_load_checked, torch_save
from gpu_dsm.kernels.precision import ieee_float32_matmul
from gpu_dsm.whitening import Whitening, pca_whitening_from_moments

#: HOW's test scales, the reference's literal decimals (HOW paper 4.1, eval config)
HOW_SCALES = (2.0, 1.414, 1.0, 0.707, 0.5, 0.353, 0.25)

_FORMAT = "gpu_dsm.how_features/1"


@dataclass
class HOWConfig:
    """How HOW descriptors are read off a backbone."""

    layer: str | None = field(default=None, metadata={
        "flag": "--how-layer", "type": str, "help": "backbone layer HOW reads",
        "default_text": "per backbone, gpu_dsm.backbones.layers.HOW_LAYERS: R18 layer4, R50 layer3, VGG conv5, Lite head",
        "source": "HOW's"})
    scales: tuple[float, ...] = HOW_SCALES  # HOW paper 4.1: 7 scales, 2.0 ... 0.25
    num_features: int = field(default=1000, metadata={
        "flag": "--how-features", "help": "local descriptors per image, top by attention over all scales",
        "source": "HOW paper Table 2, n = 1000"})
    dim: int = 128  # PCA-whitening reduction (HOW paper 3.1: 128-D); at most the layer's channels
    smoothing: int = 3  # 3x3 average smoothing (HOW paper 3.1; reference: count_include_pad=False)
    image_size: int = field(default=1024, metadata={
        "flag": "--how-image-size", "help": "longer side for HOW, never enlarged; scales 2.0 ... 0.25 of it",
        "source": "HOW eval config: imsize 1024"})
    upscale: bool = False  # the reference never enlarges an image
    batch_size: int | None = None  # images per forward; None: ExtractConfig's rule (1 on the CPU, 16 on a GPU)
    progress: bool = True

    def __post_init__(self):
        self.scales = tuple(float(s) for s in self.scales)
        if int(self.num_features) < 1 or int(self.dim) < 1:
            raise ValueError(f"HOWConfig: num_features and dim must be >= 1, got {self.num_features}, {self.dim}")
        if int(self.smoothing) < 1 or int(self.smoothing) % 2 == 0:
            raise ValueError(f"HOWConfig.smoothing must be an odd size >= 1, got {self.smoothing}")
        self.extract_config()  # validates scales, image_size, batch_size

    def extract_config(self, scales: Sequence[float] | None = None) -> ExtractConfig:
        """The [`ExtractConfig`][gpu_dsm.extract.ExtractConfig] HOW's maps are computed with: ``image_size``, ``upscale``,
        ``batch_size`` and ``progress`` of this config, ``scales`` (default: this config's), and
        ``small_scales="skip"``: a scale at which an image is too small for the network gives
        no maps instead of an error."""
        return ExtractConfig(image_size=self.image_size, scales=tuple(scales or self.scales), upscale=self.upscale,
                             batch_size=self.batch_size, small_scales="skip", progress=self.progress)

    def options(self) -> dict:
        """Every field that changes the features (all but ``progress``), as a plain dict: what a
        results file records of HOW."""
        out = dataclasses.asdict(self)
        out.pop("progress")
        return out


@dataclass
class HOWFeatures:
    """HOW features of ``num_images`` images, flat and grouped by image (image 0's rows first).

    ``descriptors (F, d)`` float32, ``image_ids (F,)`` int64, ``xy (F, 2)`` float32 (feature-map
    pixels of the feature's scale, ``x`` = column), ``scale (F,)`` int64 index into ``scales``,
    ``strength (F,)`` float32 attention.
    """

    descriptors: torch.Tensor
    image_ids: torch.Tensor
    xy: torch.Tensor
    scale: torch.Tensor
    strength: torch.Tensor
    num_images: int
    scales: tuple[float, ...] = HOW_SCALES

    def counts(self) -> torch.Tensor:
        """``(num_images,)`` int64 features per image, on the device of ``image_ids``."""
        return torch.bincount(self.image_ids, minlength=self.num_images)

    def save(self, path: str | Path) -> Path:
        """Write atomically (an interrupted save leaves the old file or none)."""
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        return torch_save(path, {"format": _FORMAT, **state, "scales": list(self.scales)})

    @classmethod
    def load(cls, path: str | Path) -> "HOWFeatures":
        """Read features written by [`save`][gpu_dsm.how.HOWFeatures.save], on the CPU. A file of another format, arrays of
        different lengths, image ids outside ``0..num_images - 1`` or non-finite descriptors
        raise ``ValueError``."""
        state = torch_load_checked(path, _FORMAT, "HOW features")
        try:
            feats = cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})
        except KeyError as exc:
            raise ValueError(f"corrupt HOW features {path}: no {exc}") from None
        feats.scales = tuple(feats.scales)
        f = feats.descriptors.shape[0]
        fits = (feats.descriptors.ndim == 2 and all(t.shape[0] == f for t in (feats.image_ids, feats.xy, feats.scale, feats.strength))
                and (f == 0 or 0 <= int(feats.image_ids.min()) <= int(feats.image_ids.max()) < feats.num_images))
        if not fits:
            raise ValueError(f"corrupt HOW features {path}: arrays of different lengths or image ids out of range")
        if not torch.isfinite(feats.descriptors).all():
            raise ValueError(f"corrupt HOW features {path}: descriptors contain NaN or Inf")
        return feats


def merge_how_features(parts: Sequence[HOWFeatures], indices: Sequence[Sequence[int]], num_images: int) -> HOWFeatures:
    """One [`HOWFeatures`][gpu_dsm.how.HOWFeatures] of ``num_images`` images from ``parts[s]`` holding images
    ``indices[s]`` (in that order): each image's rows in their order, images in index order."""
    if sorted(i for rows in indices for i in rows) != list(range(num_images)):
        raise ValueError(f"merge_how_features: the parts hold {sum(len(r) for r in indices)} images, not each of "
                         f"0..{num_images - 1} once")
    for part, rows in zip(parts, indices):
        if part.num_images != len(rows):
            raise ValueError(f"merge_how_features: a part of {part.num_images} images for {len(rows)} indices")
    if len({p.scales for p in parts}) > 1 or len({p.descriptors.shape[1] for p in parts}) > 1:
        raise ValueError("merge_how_features: parts of different scales or descriptor dimensions")
    ids = torch.cat([torch.as_tensor(list(rows), dtype=torch.long, device=p.image_ids.device)[p.image_ids]
                     for p, rows in zip(parts, indices)])
    order = torch.argsort(ids, stable=True)  # stable: an image's rows keep their order
    cat = {name: torch.cat([getattr(p, name) for p in parts])[order] for name in ("descriptors", "xy", "scale", "strength")}
    return HOWFeatures(image_ids=ids[order], num_images=num_images, scales=parts[0].scales, **cat)


def attention(maps: torch.Tensor) -> torch.Tensor:
    """``(B, K, h, w) -> (B, h, w)``: the L2 norm over channels, ``sqrt(sum u^2 + 1e-10)``.

    ``maps``: real, any dtype and device; the result is float32 on their device (computed in float32).

    Examples:
        >>> import torch
        >>> maps = torch.tensor([[[[3.0, 0.0]], [[4.0, 0.0]]]])  # (1, 2, 1, 2): two channels
        >>> attention(maps)  # an all-zero position keeps sqrt(1e-10)
        tensor([[[5.0000e+00, 1.0000e-05]]])
    """
    return (maps.float().pow(2).sum(1) + 1e-10).sqrt()


def smooth(maps: torch.Tensor, size: int = 3) -> torch.Tensor:
    """``(B, K, h, w)`` averaged over ``size x size`` windows, stride 1; a border cell averages
    its valid neighbours only (``count_include_pad=False``).

    ``maps``: floating point, any device; ``size``: odd. The result has their shape, dtype and
    device (``maps`` itself for ``size=1``).

    Examples:
        >>> import torch
        >>> smooth(torch.arange(9.0).view(1, 1, 3, 3))  # corner: mean(0, 1, 3, 4); centre: mean of all 9
        tensor([[[[2.0000, 2.5000, 3.0000],
                  [3.5000, 4.0000, 4.5000],
                  [5.0000, 5.5000, 6.0000]]]])
    """
    if size == 1:
        return maps
    return F.avg_pool2d(maps, size, stride=1, padding=size // 2, count_include_pad=False)


def reduce_map(maps: torch.Tensor, whitening: Whitening | None, dim: int) -> torch.Tensor:
    """The 1x1 reduction ``P[:dim] (u - m)`` of ``(B, K, h, w)`` -> ``(B, dim, h, w)`` float32 on
    the maps' device (identity without whitening). The product is IEEE float32 whatever TF32 or
    matmul precision the caller set ([`gpu_dsm.kernels.precision.ieee_float32_matmul`][kernels.precision.ieee_float32_matmul]): the
    descriptors feed ASMK's word assignment."""
    if whitening is None:
        return maps.float()
    proj = whitening.projection[:dim].to(maps.device, torch.float32)
    bias = whitening.bias[:dim].to(maps.device, torch.float32)
    with ieee_float32_matmul():
        reduced = torch.einsum("dk,bkhw->bdhw", proj, maps.float())
    return reduced + bias[None, :, None, None]


def select_features(maps_per_scale: Sequence[torch.Tensor], whitening: Whitening | None, num_features: int,
                    smoothing: int = 3, dim: int | None = None) -> dict[str, torch.Tensor]:
    """HOW features of a batch of images of one size, from their raw maps at every scale.

    Args:
        maps_per_scale: ``[(B, K, h_s, w_s)] * S`` raw layer maps (finite floating point, on one
            device); ``None`` for a scale at which the images were too small for the network (it
            gives no features).
        whitening: the reduction (``None``: raw smoothed ``K``-D descriptors, for fitting it).
        num_features: ``n``, kept per image over all scales (fewer if the maps are smaller).
        dim: reduction dimension (default: the whitening's).
    Returns:
        ``descriptors (B, n, d)`` float32, ``xy (B, n, 2)`` float32 (feature-map pixels, ``x`` =
        column), ``scale (B, n)`` int64 index into ``maps_per_scale``, ``strength (B, n)`` float32
        attention, on the maps' device, best first (ties: scale order, then row-major position).
    """
    present = [m for m in maps_per_scale if m is not None]
    if not present:
        raise ValueError("select_features: no scale has maps (the images are smaller than the network needs at every scale)")
    b, k = present[0].shape[:2]
    for m in present:
        if m.ndim != 4 or m.shape[0] != b or m.shape[1] != k or m.numel() == 0:
            raise ValueError(f"select_features: expected non-empty (B, K, h, w) maps of one batch, got {tuple(m.shape)}")
        as_tensor(m, "layer maps", kind="float", finite=True)
    if whitening is not None:
        dim = whitening.output_dim if dim is None else min(int(dim), whitening.output_dim)
        if whitening.input_dim != k:
            raise ValueError(f"the whitening takes {whitening.input_dim}-D maps, the layer gives {k}-D")
    strengths, descriptors, xy, scale = [], [], [], []
    for s, maps in enumerate(maps_per_scale):
        if maps is None:
            continue
        h, w = maps.shape[-2:]
        strengths.append(attention(maps).reshape(b, -1))
        descriptors.append(smooth(reduce_map(maps, whitening, dim), smoothing).reshape(b, -1, h * w))
        ys, xs = torch.meshgrid(torch.arange(h, device=maps.device), torch.arange(w, device=maps.device), indexing="ij")
        xy.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).float())
        scale.append(torch.full((h * w,), s, dtype=torch.long, device=maps.device))
    strength = torch.cat(strengths, 1)
    keep = min(int(num_features), strength.shape[1])
    order = torch.sort(strength, dim=1, descending=True, stable=True).indices[:, :keep]
    descriptors = torch.cat(descriptors, 2).gather(2, order[:, None, :].expand(-1, descriptors[0].shape[1], -1))
    return {"descriptors": descriptors.transpose(1, 2).contiguous(), "xy": torch.cat(xy)[order],
            "scale": torch.cat(scale)[order], "strength": strength.gather(1, order)}


def _maps_by_scale(batch) -> list[torch.Tensor | None]:
    return [None if per_scale is None else torch.stack(per_scale) for per_scale in batch.activations]


def how_checkpoint(backbone) -> HOWCheckpoint | None:
    """The HOW checkpoint ``backbone`` was built from (`HOWCheckpoint`: learned reduction,
    layer, smoothing), else ``None``."""
    return getattr(getattr(backbone, "head", None), "how", None)


def _check_checkpoint_config(checkpoint: HOWCheckpoint, config: HOWConfig) -> None:
    if config.layer is not None and config.layer != checkpoint.layer:
        raise ValueError(f"HOWConfig.layer={config.layer!r}, but the HOW checkpoint's reduction was learned on "
                         f"{checkpoint.layer!r}: leave layer=None")
    if config.smoothing != checkpoint.smoothing:
        raise ValueError(f"HOWConfig.smoothing={config.smoothing}, but the HOW checkpoint was trained with "
                         f"{checkpoint.smoothing}x{checkpoint.smoothing} smoothing: set smoothing={checkpoint.smoothing}")


@torch.no_grad()
def describe_how(backbone: Backbone, images: Sequence[ImageLike | ImageSpec], whitening: Whitening | None = None,
                 config: HOWConfig | None = None, desc: str = "HOW") -> HOWFeatures:
    """[`HOWFeatures`][gpu_dsm.how.HOWFeatures] of ``images`` (in input order) from ``backbone`` cut at ``config.layer``;
    on the backbone's device.

    ``whitening``: the reduction ``(d, K)``; ``None`` takes the learned reduction of the HOW
    checkpoint ``backbone`` was built from ([`how_checkpoint`][gpu_dsm.how.how_checkpoint]; an error without one). With
    such a backbone, ``config.layer`` must be ``None`` or the checkpoint's and ``config.smoothing``
    the checkpoint's, and scales are sampled as the authors' code does (``recompute_scale_factor``).
    """
    config = config or HOWConfig()
    checkpoint = how_checkpoint(backbone)
    if checkpoint is not None:
        _check_checkpoint_config(checkpoint, config)
    if whitening is None:
        if checkpoint is None:
            raise ValueError("describe_how: no whitening given and the backbone is not a HOW checkpoint's: "
                             "fit one with fit_how_whitening")
        whitening = checkpoint.reduction
    net = cut_backbone(backbone, config.layer)
    if whitening.input_dim != net.out_channels:
        raise ValueError(f"the HOW whitening takes {whitening.input_dim}-D maps but {backbone.name}'s layer "
                         f"{config.layer or 'default'} gives {net.out_channels}-D: fit it on this layer")
    per_image: list[dict | None] = [None] * len(images)
    batches = iterate_activations(net, images, config.extract_config(), desc=desc, recompute_scale_factor=checkpoint is not None)
    for batch in batches:
        maps = _maps_by_scale(batch)
        if all(m is None for m in maps):
            continue  # smaller than the network needs at every scale: no features (ASMK scores it 0)
        found = select_features(maps, whitening, config.num_features, config.smoothing, config.dim)
        for i, index in enumerate(batch.indices):
            per_image[index] = {k: v[i] for k, v in found.items()}
    return _flatten(per_image, config.scales, net.device, min(config.dim, whitening.output_dim))


def _flatten(per_image: list[dict | None], scales, device, dim: int) -> HOWFeatures:
    parts = [p for p in per_image if p is not None]
    if not parts:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return HOWFeatures(torch.zeros(0, dim, device=device), empty, torch.zeros(0, 2, device=device), empty.clone(),
                           torch.zeros(0, device=device), len(per_image), tuple(scales))
    ids = torch.cat([torch.full((p["strength"].numel(),), i, dtype=torch.long, device=device)
                     for i, p in enumerate(per_image) if p is not None])
    return HOWFeatures(descriptors=torch.cat([p["descriptors"] for p in parts]).float(), image_ids=ids,
                       xy=torch.cat([p["xy"] for p in parts]), scale=torch.cat([p["scale"] for p in parts]),
                       strength=torch.cat([p["strength"] for p in parts]), num_images=len(per_image), scales=tuple(scales))


@torch.no_grad()
def how_moments(backbone: Backbone, images: Sequence[ImageLike | ImageSpec], config: HOWConfig | None = None,
                desc: str = "HOW whitening") -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(count, sum (K,), sum of outer products (K, K))`` of the scale-1 descriptors (top
    ``num_features`` by attention, smoothed) of ``images`` at ``backbone``'s HOW layer: an int
    and two float64 tensors on the backbone's device, what [`fit_how_whitening`][gpu_dsm.how.fit_how_whitening] learns
    from. Moments of disjoint image sets add up, so processes can each sum a slice
    (`gpu_dsm.shards`)."""
    config = config or HOWConfig()
    net = cut_backbone(backbone, config.layer)
    k = net.out_channels
    count, total = 0, torch.zeros(k, dtype=torch.float64, device=net.device)
    outer = torch.zeros(k, k, dtype=torch.float64, device=net.device)
    for batch in iterate_activations(net, images, config.extract_config(scales=(1.0,)), desc=desc):
        maps = _maps_by_scale(batch)
        if maps[0] is None:
            continue
        x = select_features(maps, None, config.num_features, config.smoothing)["descriptors"]
        x = x.reshape(-1, k).double()
        count += x.shape[0]
        total += x.sum(0)
        outer += x.T @ x
    return count, total, outer


def fit_how_whitening(backbone: Backbone, images: Sequence[ImageLike | ImageSpec], config: HOWConfig | None = None,
                      desc: str = "HOW whitening") -> Whitening:
    """HOW's PCA whitening of ``backbone``'s layer, learned on ``images`` (not the evaluated
    queries): the moments of [`how_moments`][gpu_dsm.how.how_moments], ``dim`` rows ([`pca_whitening_from_moments`][gpu_dsm.whitening.pca_whitening_from_moments]).

    A backbone built from a HOW checkpoint returns the checkpoint's learned reduction instead
    (nothing is fitted, ``images`` are not read)."""
    config = config or HOWConfig()
    checkpoint = how_checkpoint(backbone)
    if checkpoint is not None:
        _check_checkpoint_config(checkpoint, config)
        return checkpoint.reduction
    if len(images) == 0:
        raise ValueError("fit_how_whitening: no images")
    return pca_whitening_from_moments(*how_moments(backbone, images, config, desc), config.dim)
