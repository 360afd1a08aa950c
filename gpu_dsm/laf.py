"""DSM features as kornia local affine frames (LAFs), and back.

kornia's LAF of a feature is a ``(2, 3)`` matrix ``[A | c]`` in image pixels: the unit circle
``u`` maps to the feature's outline ``A u + c`` (``kornia.feature.laf_to_boundary_points``). A
DSM feature is an ellipse in feature-map pixels of its own scale with centre ``xy`` and frame
``F`` (``F F^T`` = the region's covariance), so its LAF is ``[radius * S F | S (xy + 1/2) - 1/2]``
with ``S = diag(image width / map width, image height / map height)`` for that scale: activation
pixels sit at the centres of their cells (as `gpu_dsm.visualize.feature_to_image` draws
them). ``radius`` 1 is the 1-sigma ellipse (the reference code's ellipse); 2 is the outline of the
uniform region with the region's second moments.

With these, features can be drawn and used with ``kornia.feature`` (``laf_to_boundary_points``,
``extract_patches_from_pyramid``, ``get_laf_scale``...) and converted back after kornia moved them.
"""
from __future__ import annotations

import dataclasses

import torch

from gpu_dsm.checks import as_tensor, check_shape
from gpu_dsm.features import LocalFeatures


def _cell_scale(features: LocalFeatures, image_sizes: torch.Tensor) -> torch.Tensor:
    """``(B, N, 2)`` pixels per feature-map pixel (x, y) for every feature, from ``image_sizes``
    ``(B, 2)`` = (width, height) of each image and its map size at the feature's scale."""
    sizes = as_tensor(image_sizes, "image_sizes", kind="number", device=features.device)
    check_shape(sizes, (features.num_images, 2), "image_sizes (width, height per image)")
    if sizes.numel() and bool((sizes <= 0).any()):
        raise ValueError("image_sizes must be positive (width, height) in pixels")
    maps = features.map_sizes.to(features.device)  # (B, S, 2) = (h, w)
    hw = maps.gather(1, features.scale.clamp(min=0)[..., None].expand(-1, -1, 2))  # (B, N, 2)
    wh = hw.flip(-1).to(features.xy.dtype).clamp(min=1)
    return sizes.to(features.xy.dtype)[:, None, :] / wh


def features_to_laf(features: LocalFeatures, image_sizes: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """LAFs of ``features`` in pixels of images of ``image_sizes``.

    Args:
        features: a [`LocalFeatures`][gpu_dsm.features.LocalFeatures] table of ``B`` images, ``N`` rows each.
        image_sizes: ``(B, 2)`` ``(width, height)`` in image pixels (integer or float; a tensor,
            array or list), on the features' device.
        radius: the outline drawn, in standard deviations (1: the 1-sigma ellipse).
    Returns:
        ``(B, N, 2, 3)`` float32 LAFs ``[A | c]`` in image pixels, on the features' device.
        Padded rows (``features.valid == False``) get a zero-size LAF at the origin; keep using
        ``features.valid`` as the mask.

    Examples:
        A feature at map pixel ``(2, 3)`` with a unit frame, in a 48 x 40 image whose map is
        12 x 10 (4 image pixels per map pixel):

        >>> import torch
        >>> one = {"xy": torch.tensor([[2.0, 3.0]]), "frame": torch.eye(2)[None], "strength": torch.tensor([5.0]),
        ...        "channel": torch.tensor([7]), "scale": torch.tensor([0])}
        >>> features = LocalFeatures.from_images([one], map_sizes=torch.tensor([[[10, 12]]]), scales=(1.0,))
        >>> laf = features_to_laf(features, torch.tensor([[48, 40]]))
        >>> laf
        tensor([[[[ 4.0000,  0.0000,  9.5000],
                  [ 0.0000,  4.0000, 13.5000]]]])
        >>> laf_to_features(laf, features, torch.tensor([[48, 40]])).xy
        tensor([[[2., 3.]]])
    """
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    scale = _cell_scale(features, image_sizes)
    centre = (features.xy + 0.5) * scale - 0.5
    frame = radius * scale[..., :, None] * features.frame
    laf = torch.cat([frame, centre[..., None]], dim=-1)
    return torch.where(features.valid[..., None, None], laf, torch.zeros_like(laf))


def laf_to_features(laf: torch.Tensor, template: LocalFeatures, image_sizes: torch.Tensor, radius: float = 1.0) -> LocalFeatures:
    """The inverse of [`features_to_laf`][gpu_dsm.laf.features_to_laf]: ``template`` with centres and frames read off ``laf``
    ``(B, N, 2, 3)`` (floating point, image pixels, on the template's device; channels, scales,
    strengths and validity are kept). ``image_sizes`` and ``radius`` as for [`features_to_laf`][gpu_dsm.laf.features_to_laf];
    the new ``xy`` and ``frame`` are float32 in feature-map pixels.

    A LAF's ``A`` may be any invertible matrix (kornia rotates and shears them); the frame kept is
    the lower-triangular (upright) Cholesky factor of ``A A^T``, which describes the same ellipse.
    """
    laf = as_tensor(laf, "laf", kind="float", device=template.device)
    check_shape(laf, (template.num_images, template.capacity, 2, 3), "laf")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    scale = _cell_scale(template, image_sizes)
    xy = (laf[..., 2] + 0.5) / scale - 0.5
    a = laf[..., :2] / (radius * scale[..., :, None])
    cov = a @ a.transpose(-1, -2)
    valid = template.valid
    eye = torch.eye(2, dtype=cov.dtype, device=cov.device).expand_as(cov)
    cov = torch.where(valid[..., None, None], cov, eye)
    if not torch.isfinite(cov).all() or bool((torch.linalg.det(cov[valid]) <= 0).any()):
        raise ValueError("laf holds degenerate (singular or non-finite) frames for valid features")
    frame = torch.linalg.cholesky(cov)
    frame = torch.where(valid[..., None, None], frame, template.frame)
    xy = torch.where(valid[..., None], xy, template.xy)
    return dataclasses.replace(template, xy=xy.to(template.xy.dtype), frame=frame.to(template.frame.dtype))
