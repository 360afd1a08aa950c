"""``LocalFeatures``: padded per-image tables of DSM local features (paper 3.4).

A feature is an ellipse read off one channel of the activations at one scale: its centre
``xy`` and its frame ``A`` (lower-triangular, ``A A^T = Sigma``, the Cholesky factor of the
region's covariance), its strength and its channel (the "visual word"). Coordinates are in
pixels of the feature map of the feature's own scale, x = column, y = row, 0-based.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class LocalFeatures:
    """Features of ``B`` images, padded to ``N`` per image (``valid`` marks real rows).

    Fields:
        xy: ``(B, N, 2)`` float32, ellipse centres (feature-map pixels of their scale).
        frame: ``(B, N, 2, 2)`` float32, lower-triangular ``A`` with ``A A^T`` = covariance.
        strength: ``(B, N)`` float32, pooled activation of the region (max by default).
        channel: ``(B, N)`` int64, channel (visual word) index.
        scale: ``(B, N)`` int64, index into ``scales``.
        valid: ``(B, N)`` bool.
        map_sizes: ``(B, S, 2)`` int64, ``(height, width)`` of each scale's feature map.
        scales: the scale factors, shared by all images.
        num_channels: channels of the network (visual words), for checks when matching.
    Padded rows hold zeros (and an identity frame) and ``valid == False``. All tensors are on one
    device ([`device`][gpu_dsm.features.LocalFeatures.device]; the activations' device when made by [`gpu_dsm.detect.detect`][gpu_dsm.detect.detect]).

    Examples:
        >>> import torch
        >>> one = {"xy": torch.tensor([[2.0, 3.0]]), "frame": torch.eye(2)[None], "strength": torch.tensor([5.0]),
        ...        "channel": torch.tensor([7]), "scale": torch.tensor([0])}
        >>> features = LocalFeatures.from_images([one, {}], map_sizes=torch.tensor([[[10, 12]], [[10, 12]]]),
        ...                                      scales=(1.0,), num_channels=16, capacity=4)
        >>> features.num_images, features.capacity, features.counts
        (2, 4, tensor([1, 0]))
        >>> features.xy.shape, features.xy.dtype, features.channel.dtype
        (torch.Size([2, 4, 2]), torch.float32, torch.int64)
        >>> features.trimmed().capacity, features[1].num_images
        (1, 1)
    """

    xy: torch.Tensor
    frame: torch.Tensor
    strength: torch.Tensor
    channel: torch.Tensor
    scale: torch.Tensor
    valid: torch.Tensor
    map_sizes: torch.Tensor
    scales: tuple[float, ...] = ()
    num_channels: int = 0

    _TENSORS = ("xy", "frame", "strength", "channel", "scale", "valid", "map_sizes")

    @property
    def num_images(self) -> int:
        """``B``, the images of the table."""
        return int(self.valid.shape[0])

    @property
    def capacity(self) -> int:
        """``N``, the rows per image (valid and padded)."""
        return int(self.valid.shape[1])

    @property
    def counts(self) -> torch.Tensor:
        """``(B,)`` int64 number of valid features per image, on [`device`][gpu_dsm.features.LocalFeatures.device]."""
        return self.valid.sum(1)

    @property
    def device(self) -> torch.device:
        """The device of the tensors."""
        return self.xy.device

    @property
    def cov(self) -> torch.Tensor:
        """``(B, N, 2, 2)`` float32 covariances ``A A^T``, feature-map pixels^2, on [`device`][gpu_dsm.features.LocalFeatures.device]."""
        return self.frame @ self.frame.transpose(-1, -2)

    def to(self, device: torch.device | str) -> "LocalFeatures":
        """The same table with every tensor on ``device``."""
        return self._replace(**{name: getattr(self, name).to(device) for name in self._TENSORS})

    def _replace(self, **tensors) -> "LocalFeatures":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(tensors)
        return LocalFeatures(**values)

    def __getitem__(self, index) -> "LocalFeatures":
        """Images ``index`` (int, slice, list or int64 / bool tensor on the table's device); an int
        keeps the batch dimension."""
        if isinstance(index, int):
            index = [index]
        return self._replace(**{name: getattr(self, name)[index] for name in self._TENSORS})

    def trimmed(self) -> "LocalFeatures":
        """The same table with the padding cut to the largest count."""
        n = int(self.counts.max()) if self.num_images else 0
        return self._replace(**{name: getattr(self, name)[:, :n] for name in self._TENSORS if name != "map_sizes"})

    def image(self, i: int) -> dict[str, torch.Tensor]:
        """The valid rows of image ``i`` as a dict of unpadded tensors, on [`device`][gpu_dsm.features.LocalFeatures.device]:
        ``xy (n, 2)``, ``frame (n, 2, 2)``, ``strength (n,)`` (float32), ``channel (n,)``,
        ``scale (n,)`` (int64)."""
        keep = self.valid[i]
        return {name: getattr(self, name)[i][keep] for name in ("xy", "frame", "strength", "channel", "scale")}

    @staticmethod
    def empty(num_images: int, num_scales: int, scales: Sequence[float] = (), num_channels: int = 0,
              device: torch.device | str = "cpu", capacity: int = 0) -> "LocalFeatures":
        """``num_images`` images without features, padded to ``capacity`` rows, on ``device``
        (``map_sizes`` all zero)."""
        return LocalFeatures.from_images([{}] * num_images, torch.zeros(num_images, num_scales, 2, dtype=torch.long),
                                         scales, num_channels, capacity=capacity, device=device)

    @staticmethod
    def from_images(per_image: Sequence[dict[str, torch.Tensor]], map_sizes: torch.Tensor,
                    scales: Sequence[float] = (), num_channels: int = 0, capacity: int | None = None,
                    device: torch.device | str | None = None) -> "LocalFeatures":
        """Pad per-image dicts into a table.

        Args:
            per_image: per image a dict of ``xy (n, 2)``, ``frame (n, 2, 2)`` (feature-map pixels),
                ``strength (n,)``, ``channel (n,)``, ``scale (n,)`` (any real / integer dtypes:
                stored as float32 and int64); an empty dict for an image without features.
            map_sizes: ``(B, S, 2)`` integer ``(height, width)`` of each image's map per scale.
            scales, num_channels: recorded as given.
            capacity: rows per image (default: the largest ``n``).
            device: where the table is made (default: that of the first non-empty dict, else of
                ``map_sizes``).
        """
        counts = [int(d["xy"].shape[0]) if d else 0 for d in per_image]
        n = max(counts, default=0) if capacity is None else int(capacity)
        if counts and max(counts) > n:
            raise ValueError(f"LocalFeatures: an image has {max(counts)} features, more than the capacity {n}")
        if device is None:
            device = next((d["xy"].device for d in per_image if d), map_sizes.device)
        b = len(per_image)
        out = LocalFeatures(
            xy=torch.zeros(b, n, 2, device=device),
            frame=torch.eye(2, device=device).expand(b, n, 2, 2).clone(),
            strength=torch.zeros(b, n, device=device),
            channel=torch.zeros(b, n, dtype=torch.long, device=device),
            scale=torch.zeros(b, n, dtype=torch.long, device=device),
            valid=torch.zeros(b, n, dtype=torch.bool, device=device),
            map_sizes=map_sizes.to(device=device, dtype=torch.long),
            scales=tuple(float(s) for s in scales),
            num_channels=int(num_channels),
        )
        for i, (d, c) in enumerate(zip(per_image, counts)):
            if c == 0:
                continue
            out.xy[i, :c] = d["xy"].to(device, torch.float32)
            out.frame[i, :c] = d["frame"].to(device, torch.float32)
            out.strength[i, :c] = d["strength"].to(device, torch.float32)
            out.channel[i, :c] = d["channel"].to(device, torch.long)
            out.scale[i, :c] = d["scale"].to(device, torch.long)
            out.valid[i, :c] = True
        return out

    @staticmethod
    def cat(parts: Sequence["LocalFeatures"]) -> "LocalFeatures":
        """Concatenate batches of images (padding to the largest count), on the device of the first part."""
        if not parts:
            raise ValueError("LocalFeatures.cat: nothing to concatenate")
        per_image = [p.image(i) for p in parts for i in range(p.num_images)]
        sizes = torch.cat([p.map_sizes.to(parts[0].device) for p in parts])
        return LocalFeatures.from_images(per_image, sizes, parts[0].scales, parts[0].num_channels, device=parts[0].device)
