"""The DSM detector ``d(A)`` (paper 3.3-3.4): local features read off activations with MSER.

Every channel of every scale is an 8-bit map; its bright-on-dark MSERs become ellipses with a
strength, the channel acting as the visual word. Per image and scale, in order (after the paper
and the reference code; where the rules differ from the authors' feature code, listed in
docs/detector.md, ``DetectorConfig.reference()`` runs theirs, ``gpu_dsm.authors_selection``):

1. activations -> levels 0..255 ([`activations_to_levels`][gpu_dsm.detect.activations_to_levels]), delta from the 60% point of
   the cumulative histogram of the non-zero levels, capped at 12 ([`auto_delta`][gpu_dsm.detect.auto_delta]);
2. MSER on all channels at once ([`gpu_dsm.mser.mser`][gpu_dsm.mser.mser]); [`detect`][gpu_dsm.detect.detect] runs one
   call for all the maps of a batch that share a size (all images, all channels);
3. drop channels with more than 36 regions (cluttered), then regions with a singular covariance
   (the reference code removes singular ones first: ``DetectorConfig.reference()`` follows it);
4. strength = max activation in the region (or mean / GeM); ties (frequent: ReLU6 saturates)
   are ranked by the mean activation;
5. per channel keep the strongest 20 (query) or 10 (database); database images: NMS over the
   boxes of all channels jointly (IoU 0.2); keep the strongest ``max_features`` per scale;
6. over all scales keep the strongest ``max_features``.

Examples:
    Two channels of a ReLU6 network (activations in 0..6), each with one blob of activation:

    >>> import torch
    >>> ys, xs = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    >>> def blob(x, y, sigma):
    ...     return 6 * torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    >>> acts = torch.stack([blob(3, 4, 1.5), blob(8, 7, 2.0)])[None]  # (B=1, K=2, H=12, W=12) float32
    >>> features = detect(acts, activation_bound=6.0)  # LocalFeatures, padded to 512 rows
    >>> features.counts, features.capacity
    (tensor([4]), 512)
    >>> features.xy[0, :2], features.channel[0, :2]  # centres (x, y) in map pixels; channel = visual word
    (tensor([[8., 7.],
            [3., 4.]]), tensor([1, 0]))
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import batched_nms

from gpu_dsm.activations import per_image_maps
from gpu_dsm.features import LocalFeatures
from gpu_dsm.kernels.precision import correctly_rounded_sqrt
from gpu_dsm.authors_selection import reference_delta, reference_levels, select_scale, top_per_group
from gpu_dsm.mser import POLARITIES, MSERRegions, mser

LEVEL_MODES = ("auto", "round", "range", "channel_max")
RULES = ("gpu_dsm", "reference")
STRENGTHS = ("max", "mean", "gem")


@dataclass
class DetectorConfig:
    """Parameters of the DSM detector; defaults from the paper (4.1) and its reference code."""

    # activations -> 8-bit levels: "round" = round and saturate at 255 (reference code, VGG/ResNet);
    # "range" = x * 255 / activation bound (ReLU6 networks: x <= 6); "channel_max" = per channel
    # max -> 255; "auto" = "range" for bounded activations, else "round".
    levels: str = field(default="auto", metadata={
        "flag": "--levels", "choices": LEVEL_MODES,
        "help": "activations -> 8-bit levels: round (reference code), range (x*255/bound, ReLU6 nets), channel_max, "
                "auto = range for bounded activations else round", "source": "ours, docs 'Detector'"})
    # largest possible activation (6 for ReLU6 networks such as EfficientNet-Lite), used by
    # levels="range"/"auto"; None: the one passed to detect() (DSMDetector.from_backbone and the
    # pipeline pass Backbone.activation_bound), else unbounded
    activation_bound: float | None = None
    delta: int | None = field(default=None, metadata={
        "flag": "--delta", "type": int, "help": "fixed MSER delta",
        "default_text": "per image and scale, 60% of the cumulative histogram of non-zero levels capped at 12",
        "source": "paper 4.1 / reference code"})
    delta_quantile: float = 0.6  # paper 4.1: "60% of the cumulative histogram"
    delta_max: int = 12  # reference code caps delta at 12
    max_variation: float = 0.5  # paper 4.1
    min_diversity: float = 0.7  # paper 4.1
    min_area: float = 0.001  # reference code (fraction of the map)
    max_area: float = 0.75  # reference code (fraction of the map)
    polarity: str = "bright"  # paper 3.3: only regions of high activation
    level_step: int = field(default=1, metadata={
        "flag": "--level-step", "help": "MSER threshold spacing; 1 is exact, larger is faster and approximate",
        "source": "every grey level, as MSER"})
    max_regions_per_channel: int = 36  # reference code: a channel with more regions is cluttered
    strength: str = field(default="max", metadata={
        "flag": "--strength", "choices": STRENGTHS, "help": "pooling of a region's activations into its strength",
        "source": "paper 3.4"})
    strength_p: float = 3.0  # exponent of "gem" strength
    per_channel_query: int = field(default=20, metadata={
        "flag": "--per-channel-query", "help": "strongest features kept per channel and scale of a query",
        "source": "paper 4.1 / reference code"})
    per_channel_database: int = field(default=10, metadata={
        "flag": "--per-channel-database", "help": "same for a database image", "source": "paper 4.1 / reference code"})
    nms_iou: float = field(default=0.2, metadata={
        "flag": "--nms-iou", "help": "IoU of the NMS over all channels of a database image", "source": "paper 4.1"})
    max_features: int = field(default=512, metadata={
        "flag": "--max-features", "help": "features kept per image over all scales",
        "source": "paper 4.1: 512 VGG, 2048 ResNet"})
    singular_det: float = 1e-9  # covariance determinant (pixels^4) at or below which a region is dropped
    # MSER backend (gpu_dsm.mser.BACKENDS): "auto" = the C kernel on the CPU, the tensor path with
    # max-pool labelling on the GPU; "native"; "scipy" / "propagate" = the tensor path with that labelling
    labelling: str = "auto"
    # feature selection around the MSER: "gpu_dsm" (the rules in this module's docstring) or
    # "reference" (the DSM authors' code, gpu_dsm.authors_selection; use DetectorConfig.reference()).
    rules: str = field(default="gpu_dsm", metadata={
        "flag": "--detector", "choices": RULES,
        "help": "feature selection around MSER: 'reference' = the DSM authors' feature code, reproduced (both "
                "polarities, strength in the 1-sigma ellipse, NMS before the per-channel cap, MATLAB rounding and tie "
                "order; DetectorConfig.reference(); slower), 'gpu_dsm' = ours (docs, 'Detector')",
        "source": "ours, the faster of the two, docs 'Design decisions'"})
    max_voxels: int = 2**24  # memory budget of one MSER call (level-set voxels, ~40 B each at the peak)

    @classmethod
    def reference(cls, **overrides) -> "DetectorConfig":
        """The DSM authors' detector (reference code): both polarities, MATLAB rounding, delta from
        the float histogram, VLFeat's single-precision moments, singular regions removed before the
        clutter count, strength inside the 1-sigma ellipse as ``poly2mask`` fills it, NMS on ellipse
        boxes before the per-channel cap, the reference's tie order
        (`gpu_dsm.authors_selection`). Other fields keep their defaults (the same values)."""
        return cls(**{"rules": "reference", "polarity": "both", "strength": "max", **overrides})

    def __post_init__(self):
        if self.rules not in RULES:
            raise ValueError(f"rules must be one of {RULES}, got {self.rules!r}")
        if self.rules == "reference" and (self.strength != "max" or self.level_step != 1):
            raise ValueError("rules='reference' takes the max activation in the ellipse (strength='max') and level_step=1")
        if self.levels not in LEVEL_MODES:
            raise ValueError(f"levels must be one of {LEVEL_MODES}, got {self.levels!r}")
        if self.strength not in STRENGTHS:
            raise ValueError(f"strength must be one of {STRENGTHS}, got {self.strength!r}")
        if self.polarity not in POLARITIES:
            raise ValueError(f"polarity must be one of {POLARITIES}, got {self.polarity!r}")
        if self.activation_bound is not None and not (math.isfinite(self.activation_bound) and self.activation_bound > 0):
            raise ValueError(f"activation_bound must be > 0, got {self.activation_bound}")
        if self.delta is not None and not 1 <= self.delta <= 255:
            raise ValueError(f"delta must be in 1..255, got {self.delta}")
        if not 0 < self.delta_quantile < 1 or self.delta_max < 1:
            raise ValueError("delta_quantile must lie in (0, 1) and delta_max be >= 1")
        if not (0 <= self.min_area <= self.max_area <= 1) or self.max_variation < 0 or not 0 <= self.min_diversity <= 1:
            raise ValueError("need 0 <= min_area <= max_area <= 1, max_variation >= 0, 0 <= min_diversity <= 1")
        if self.level_step < 1 or self.max_regions_per_channel < 1 or self.max_features < 1 or self.max_voxels < 1:
            raise ValueError("level_step, max_regions_per_channel, max_features and max_voxels must be >= 1")
        if self.per_channel_query < 1 or self.per_channel_database < 1 or not 0 < self.nms_iou <= 1:
            raise ValueError("per_channel_query/per_channel_database must be >= 1 and nms_iou in (0, 1]")


def _scaled(acts: torch.Tensor, mode: str, bound: float | None) -> torch.Tensor:
    """The float values that are rounded into levels (see `activations_to_levels`)."""
    # the extremes are finite iff every value is (NaN propagates through both): one pass
    if acts.numel() and not torch.isfinite(torch.stack(torch.aminmax(acts))).all():
        raise ValueError(f"activations contain {(~torch.isfinite(acts)).sum().item()} NaN/Inf values")
    x = acts.float()
    if mode == "range":
        if bound is None or bound <= 0:
            raise ValueError("levels='range' needs the activation bound (e.g. 6 for ReLU6 networks)")
        return x * (255.0 / bound)
    if mode == "channel_max":
        return x * (255.0 / x.amax(dim=(-2, -1), keepdim=True).clamp(min=1e-12))
    if mode != "round":
        raise ValueError(f"unknown level mode {mode!r}")
    return x


def activations_to_levels(acts: torch.Tensor, mode: str = "round", bound: float | None = None) -> torch.Tensor:
    """``(..., K, H, W)`` real activations -> uint8 grey levels 0..255 of the same shape, on their device.

    ``"round"``: round and saturate at 255 (reference code). ``"range"``: ``x * 255 / bound``
    (``bound`` in activation units, e.g. 6 for ReLU6). ``"channel_max"``: each channel scaled so
    its maximum is 255. Computed in float32; raises on NaN/Inf.

    Examples:
        >>> import torch
        >>> activations_to_levels(torch.tensor([[[0.0, 1.5, 6.0, 7.0]]]), "range", bound=6.0)
        tensor([[[  0,  64, 255, 255]]], dtype=torch.uint8)
    """
    x = _scaled(acts, mode, bound)
    return x.round().clamp(0, 255).to(torch.uint8)


def auto_delta(levels: torch.Tensor, quantile: float = 0.6, cap: int = 12, bins: int = 1000) -> int:
    """MSER delta of one image and scale (paper 4.1, reference code), in grey levels.

    A ``bins``-bin histogram of the non-zero levels of the whole ``(K, H, W)`` tensor (uint8 or
    any real dtype, any device); the centre of the bin where the cumulative histogram reaches
    ``quantile``, truncated to an integer (as VLFeat's 8-bit ``Delta``), clamped to ``[1, cap]``.
    No non-zero level: ``cap``.

    Examples:
        >>> import torch
        >>> auto_delta(torch.tensor([[[0, 2, 4, 8, 200]]], dtype=torch.uint8))
        8
    """
    if levels.dtype == torch.uint8 and levels.numel() < 2**24:
        return _auto_delta_uint8(levels, quantile, cap, bins)
    nz = levels[levels > 0].float()
    if nz.numel() == 0:
        return int(cap)
    lo, hi = nz.min(), nz.max()
    if hi == lo:
        centre = lo
    else:
        hist = torch.histc(nz, bins=bins, min=float(lo), max=float(hi))
        cumulative = hist.cumsum(0) / hist.sum()
        b = int((cumulative >= quantile).nonzero()[0])
        centre = lo + (b + 0.5) * (hi - lo) / bins
    return int(max(1, min(int(cap), int(centre))))


def _auto_delta_uint8(levels: torch.Tensor, quantile: float, cap: int, bins: int) -> int:
    """`auto_delta` of uint8 levels (fewer than 2^24) from their 256-bin count, the same result.

    Every non-zero level is an integer, so the cumulative histogram of the ``bins`` bins changes
    only at the bins holding a level, and there it equals the cumulative count of the levels up to
    that one (exact in float32 below 2^24 values, as ``histc``'s). The first bin reaching
    ``quantile`` is the bin of the first level whose cumulative share reaches it, found by
    ``histc`` of that one level with the same bounds (the same binning arithmetic)."""
    counts = torch.bincount(levels.reshape(-1), minlength=256)[1:]
    present = counts.nonzero()
    if present.numel() == 0:
        return int(cap)
    lo_level, hi_level = int(present[0]) + 1, int(present[-1]) + 1
    lo, hi = torch.tensor(float(lo_level)), torch.tensor(float(hi_level))
    if hi_level == lo_level:
        centre = lo
    else:
        cumulative = counts.cumsum(0).float()
        share = cumulative / cumulative[-1]
        first = int((share >= quantile).nonzero()[0]) + 1
        one = torch.histc(torch.tensor([float(first)]), bins=bins, min=float(lo), max=float(hi))
        b = int(one.nonzero()[0])
        centre = lo + (b + 0.5) * (hi - lo) / bins
    return int(max(1, min(int(cap), int(centre))))


def _cholesky_lower(cov: torch.Tensor) -> torch.Tensor:
    """Lower-triangular ``A`` with ``A A^T = cov`` for positive definite ``(n, 2, 2)``; the square
    roots correctly rounded (`gpu_dsm.kernels.precision.correctly_rounded_sqrt`), so a frame
    does not depend on MKL's code path, the CPU or how many regions share the call."""
    a = correctly_rounded_sqrt(cov[:, 0, 0].clamp(min=0))
    b = cov[:, 1, 0] / a
    c = correctly_rounded_sqrt((cov[:, 1, 1] - b * b).clamp(min=0))
    frame = torch.zeros_like(cov)
    frame[:, 0, 0], frame[:, 1, 0], frame[:, 1, 1] = a, b, c
    return frame


#: fewest grey levels a rounded map should span; fewer means the activations are too small for
#: "round" (e.g. ReLU6 maps, 0..6) and MSER sees a handful of levels: most regions are lost
_FEW_LEVELS = 16


def _scale_levels(acts: torch.Tensor, cfg: DetectorConfig, bound: float | None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One image at one scale: ``acts`` ``(K, H, W)`` -> levels, delta and the strength source."""
    mode = cfg.levels if cfg.levels != "auto" else ("range" if bound is not None else "round")
    if cfg.rules == "reference":
        scaled = _scaled(acts, mode, bound)
        delta = cfg.delta if cfg.delta is not None else reference_delta(scaled, cfg.delta_quantile, cfg.delta_max)
        return reference_levels(scaled), delta, acts.float()
    levels = activations_to_levels(acts, mode, bound)
    if mode == "round" and levels.numel():
        top = int(levels.max())
        if 0 < top < _FEW_LEVELS:
            warnings.warn(
                f"detect: activations reach only {float(acts.max()):.3g}, so rounding them gives {top + 1} grey levels and "
                "MSER finds few regions. For a bounded network (ReLU6: EfficientNet-Lite) pass its bound: "
                "DetectorConfig(activation_bound=backbone.activation_bound) or DSMDetector.from_backbone(backbone); "
                "otherwise levels='channel_max'",
                stacklevel=4,
            )
    delta = cfg.delta if cfg.delta is not None else auto_delta(levels, cfg.delta_quantile, cfg.delta_max)
    values = acts.float().pow(cfg.strength_p) if cfg.strength == "gem" else acts.float()
    return levels, delta, values


def _regions_of_all(jobs: list[torch.Tensor], cfg: DetectorConfig, bound: float | None) -> list[MSERRegions]:
    """MSER of every ``(K, H, W)`` activation tensor of ``jobs``; tensors of one size share one call."""
    prepared = [_scale_levels(acts, cfg, bound) for acts in jobs]
    out: list[MSERRegions | None] = [None] * len(jobs)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for j, acts in enumerate(jobs):
        by_size.setdefault(tuple(acts.shape), []).append(j)
    for shape, members in by_size.items():
        num_channels = shape[0]
        # (one member: no copy)
        levels = torch.cat([prepared[j][0] for j in members]) if len(members) > 1 else prepared[members[0]][0]
        values = torch.cat([prepared[j][2] for j in members]) if len(members) > 1 else prepared[members[0]][2]
        deltas = torch.tensor([prepared[j][1] for j in members], device=levels.device).repeat_interleave(num_channels)
        regions = mser(
            levels, delta=deltas, max_variation=cfg.max_variation, min_diversity=cfg.min_diversity,
            min_area=cfg.min_area, max_area=cfg.max_area, polarity=cfg.polarity, level_step=cfg.level_step,
            values=values, backend=cfg.labelling, max_voxels=cfg.max_voxels,
        )
        # regions are ordered by map: each job's rows are one slice
        bounds = torch.searchsorted(regions.map_index, torch.arange(len(members) + 1, device=levels.device) * num_channels).tolist()
        for k, j in enumerate(members):
            part = regions.select(slice(bounds[k], bounds[k + 1]))
            part.map_index = part.map_index - k * num_channels
            part.num_maps = num_channels
            out[j] = part
    return out


def _scale_features(regions: MSERRegions, cfg: DetectorConfig, is_query: bool) -> dict[str, torch.Tensor]:
    """Features of one image at one scale from its regions (steps 3-5) -> unpadded dict."""
    per_channel = torch.bincount(regions.map_index, minlength=regions.num_maps)
    keep = per_channel[regions.map_index] <= cfg.max_regions_per_channel
    det = regions.cov[:, 0, 0] * regions.cov[:, 1, 1] - regions.cov[:, 0, 1] * regions.cov[:, 1, 0]
    keep &= det > cfg.singular_det
    regions = regions.select(keep)
    mean = regions.sum_value / regions.area
    if cfg.strength == "max":
        strength = regions.max_value.double()
    elif cfg.strength == "mean":
        strength = mean
    else:
        strength = mean.pow(1.0 / cfg.strength_p)
    # ranking key: strength, ties broken by the mean activation (ReLU6 maps saturate at 6, so
    # many regions share the maximum); mean <= max keeps the tie-break below one strength unit
    rank = strength + 1e-6 * mean / mean.max().clamp(min=1e-12) if len(regions) else strength
    cap = cfg.per_channel_query if is_query else cfg.per_channel_database
    keep = top_per_group(regions.map_index, rank, cap)
    regions, strength, rank = regions.select(keep), strength[keep], rank[keep]
    if not is_query and cfg.nms_iou < 1 and len(regions):
        boxes = regions.bbox.double()
        boxes[:, 2:] += 1  # inclusive pixel bounds -> box edges
        kept = batched_nms(boxes, rank, torch.zeros_like(regions.map_index), cfg.nms_iou)
        regions, strength, rank = regions.select(kept), strength[kept], rank[kept]
    order = torch.argsort(rank, descending=True, stable=True)[: cfg.max_features]
    regions, strength, rank = regions.select(order), strength[order], rank[order]
    return {
        "xy": regions.mean.float(),
        "frame": _cholesky_lower(regions.cov).float(),
        "strength": strength.float(),
        "rank": rank,
        "channel": regions.map_index,
    }


def _scale_features_reference(regions: MSERRegions, acts: torch.Tensor, cfg: DetectorConfig, is_query: bool,
                               bound: float | None) -> dict:
    """Features of one image at one scale by the authors' rules (gpu_dsm.authors_selection)."""
    mode = cfg.levels if cfg.levels != "auto" else ("range" if bound is not None else "round")
    rows, strength, rank = select_scale(
        regions, _scaled(acts, mode, bound), acts, is_query=is_query, max_regions_per_channel=cfg.max_regions_per_channel,
        per_channel=cfg.per_channel_query if is_query else cfg.per_channel_database,
        nms_iou=cfg.nms_iou, max_features=cfg.max_features,
    )
    return {
        "xy": regions.mean[rows].float(),
        "frame": _cholesky_lower(regions.cov[rows]).float(),
        "strength": strength.float(),
        "rank": rank,  # no tie-break: the stable order of the rows decides ties, as in the reference
        "channel": regions.map_index[rows],
    }


def _image_features(regions_per_scale: Sequence[MSERRegions], maps: Sequence[torch.Tensor], cfg: DetectorConfig,
                    is_query: bool, bound: float | None = None) -> dict:
    """Features of one image from its regions at each scale (step 6) -> unpadded dict."""
    per_scale = []
    for s, (regions, acts) in enumerate(zip(regions_per_scale, maps)):
        if cfg.rules == "reference":
            found = _scale_features_reference(regions, acts, cfg, is_query, bound)
        else:
            found = _scale_features(regions, cfg, is_query)
        found["scale"] = torch.full_like(found["channel"], s)
        per_scale.append(found)
    merged = {k: torch.cat([f[k] for f in per_scale]) for k in per_scale[0]} if per_scale else {}
    if merged:
        order = torch.argsort(merged.pop("rank"), descending=True, stable=True)[: cfg.max_features]
        merged = {k: v[order] for k, v in merged.items()}
    return merged


def detect_images(maps_per_image: Sequence[Sequence[torch.Tensor]], cfg: DetectorConfig, is_query: bool,
                   bound: float | None) -> list[dict]:
    """Features of a batch of images, one unpadded dict per image, from per-image activations
    ``[(K, h_s, w_s)] * S`` (floating point or uint8, on one device). All maps of one size (every
    image and channel) share one MSER call. ``bound``: as ``activation_bound`` of [`detect`][gpu_dsm.detect.detect]
    (``None``: ``cfg.activation_bound``).

    Each dict holds ``n <= cfg.max_features`` features, strongest first, on the activations'
    device: ``xy (n, 2)`` float32 centres ``(x, y)`` and ``frame (n, 2, 2)`` float32
    lower-triangular frames, both in feature-map pixels of the feature's scale; ``strength (n,)``
    float32 (activation units); ``channel (n,)`` and ``scale (n,)`` int64.
    [`gpu_dsm.features.LocalFeatures.from_images`][gpu_dsm.features.LocalFeatures.from_images] pads them into a table."""
    bound = bound if bound is not None else cfg.activation_bound
    for maps in maps_per_image:
        for acts in maps:
            if not isinstance(acts, torch.Tensor):
                raise TypeError(f"detect: activations must be torch tensors (K, H, W), got {type(acts).__name__}")
            if acts.ndim != 3:
                raise ValueError(f"detect: expected (K, H, W) activations per scale, got {tuple(acts.shape)}")
            if not acts.is_floating_point() and acts.dtype != torch.uint8:
                raise TypeError(f"detect: activations must be floating point, got {acts.dtype}")
    regions = _regions_of_all([acts for maps in maps_per_image for acts in maps], cfg, bound)
    out, start = [], 0
    for maps in maps_per_image:
        out.append(_image_features(regions[start:start + len(maps)], maps, cfg, is_query, bound))
        start += len(maps)
    return out


def detect(
    maps_per_image: Sequence[Sequence[torch.Tensor]],
    cfg: DetectorConfig | None = None,
    is_query: bool = False,
    scales: Sequence[float] = (),
    activation_bound: float | None = None,
) -> LocalFeatures:
    """DSM local features of a batch of images.

    Args:
        maps_per_image: per image, its activations at each scale ``[(K, h_s, w_s)] * S``; or a
            ``(B, K, H, W)`` tensor (one scale), or a list of them (one per scale). Floating point
            (any dtype; computed in float32), or uint8 levels, all on one device.
        cfg: detector parameters (paper defaults).
        is_query: queries keep 20 per channel and skip NMS; database images 10 and NMS.
        scales: the scale factors (recorded in the table).
        activation_bound: upper bound of the activations (6 for ReLU6: ``backbone.activation_bound``),
            used by ``levels="range"`` / ``"auto"``; default ``cfg.activation_bound``. Without a bound,
            ``"auto"`` rounds the raw activations (VGG/ResNet) and warns if that leaves few levels.
    Returns:
        [`LocalFeatures`][gpu_dsm.features.LocalFeatures] with capacity ``cfg.max_features``, on the activations' device:
        ``xy (B, N, 2)`` float32 centres and ``frame (B, N, 2, 2)`` float32 frames in feature-map
        pixels of each feature's scale, ``strength (B, N)`` float32 in activation units,
        ``channel`` / ``scale (B, N)`` int64, ``valid (B, N)`` bool, ``map_sizes (B, S, 2)``
        int64 ``(h, w)``; features strongest first.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> acts = 6 * torch.rand(2, 8, 12, 12)  # (B, K, H, W): 2 images, 8 channels, one scale
        >>> features = detect(acts, is_query=True, activation_bound=6.0)
        >>> features.xy.shape, features.frame.shape, features.counts
        (torch.Size([2, 512, 2]), torch.Size([2, 512, 2, 2]), tensor([53, 52]))
        >>> features.map_sizes.tolist()  # (h, w) of each image's map at each scale
        [[[12, 12]], [[12, 12]]]
    """
    cfg = cfg or DetectorConfig()
    maps_per_image = per_image_maps(maps_per_image)
    if len(maps_per_image) == 0:
        return LocalFeatures.empty(0, len(scales), scales)
    per_image = detect_images(maps_per_image, cfg, is_query, activation_bound)
    sizes = torch.tensor([[list(m.shape[-2:]) for m in maps] for maps in maps_per_image], dtype=torch.long).view(
        len(maps_per_image), -1, 2)
    num_channels = maps_per_image[0][0].shape[0] if maps_per_image and len(maps_per_image[0]) else 0
    device = maps_per_image[0][0].device if maps_per_image and len(maps_per_image[0]) else "cpu"
    return LocalFeatures.from_images(per_image, sizes, scales, num_channels, capacity=cfg.max_features, device=device)


class DSMDetector(nn.Module):
    """``nn.Module`` wrapper of [`detect`][gpu_dsm.detect.detect] holding a [`DetectorConfig`][gpu_dsm.detect.DetectorConfig] and the activation bound.

    ``forward(maps_per_image, is_query=False, scales=())`` takes the activations [`detect`][gpu_dsm.detect.detect]
    takes and returns its [`LocalFeatures`][gpu_dsm.features.LocalFeatures], on the activations' device. The module holds no
    tensors: it works on any device as is.

    Examples:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> detector = DSMDetector(DetectorConfig(max_features=32), activation_bound=6.0)
        >>> features = detector(6 * torch.rand(2, 8, 12, 12))  # database images: NMS, 10 per channel
        >>> features.xy.shape, features.counts.tolist()
        (torch.Size([2, 32, 2]), [18, 18])
    """

    def __init__(self, config: DetectorConfig | None = None, activation_bound: float | None = None):
        super().__init__()
        self.config = config or DetectorConfig()
        self.activation_bound = activation_bound

    @classmethod
    def from_backbone(cls, backbone, config: DetectorConfig | None = None) -> "DSMDetector":
        """The detector for ``backbone``'s activations (its activation bound: 6 for ReLU6 networks)."""
        return cls(config, backbone.activation_bound)

    def forward(self, maps_per_image, is_query: bool = False, scales: Sequence[float] = ()) -> LocalFeatures:
        """[`detect`][gpu_dsm.detect.detect] with this module's configuration and activation bound."""
        return detect(maps_per_image, self.config, is_query, scales, self.activation_bound)
