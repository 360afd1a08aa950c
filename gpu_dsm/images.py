"""Reading images for extraction: crop to a box, resize to a maximum side, as uint8 RGB tensors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

#: An image given by file path, or in memory as an ``(H, W, 3)`` / ``(H, W)`` uint8 array or
#: a ``(3, H, W)`` uint8 tensor.
ImageLike = Union[str, Path, np.ndarray, torch.Tensor]


@dataclass(frozen=True)
class ImageSpec:
    """One image to extract: its source and an optional box ``(x0, y0, x1, y1)`` in its pixels."""

    source: ImageLike
    box: tuple[float, float, float, float] | None = None

    @property
    def name(self) -> str:
        return str(self.source) if isinstance(self.source, (str, Path)) else f"<{type(self.source).__name__}>"


def _open(spec: ImageSpec) -> Image.Image:
    src = spec.source
    if isinstance(src, (str, Path)):
        try:
            with Image.open(src) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {src}") from None
        except Exception as exc:
            raise ValueError(f"cannot read image {src}: {exc}") from exc
    if isinstance(src, torch.Tensor):
        if src.ndim != 3 or src.shape[0] != 3 or src.dtype != torch.uint8:
            raise ValueError(f"an in-memory image tensor must be uint8 (3, H, W), got {src.dtype} {tuple(src.shape)}")
        src = src.permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(src)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"an in-memory image array must be uint8 (H, W) or (H, W, 3|4), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def source_size(spec: ImageSpec) -> tuple[int, int]:
    """``(width, height)`` of the source before cropping, read from the file header when possible."""
    src = spec.source
    if isinstance(src, (str, Path)):
        try:
            with Image.open(src) as im:
                return im.size
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {src}") from None
        except Exception as exc:
            raise ValueError(f"cannot read image {src}: {exc}") from exc
    if isinstance(src, torch.Tensor):
        return int(src.shape[2]), int(src.shape[1])
    arr = np.asarray(src)
    return int(arr.shape[1]), int(arr.shape[0])


def _crop_box(spec: ImageSpec, width: int, height: int) -> tuple[int, int, int, int]:
    if spec.box is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = spec.box
    box = (max(0, int(round(x0))), max(0, int(round(y0))), min(width, int(round(x1))), min(height, int(round(y1))))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"box {spec.box} of {spec.name} is empty inside its {width}x{height} image")
    return box


def resized_size(width: int, height: int, max_size: int, upscale: bool) -> tuple[int, int]:
    """Size after scaling the longer side to ``max_size`` (only down unless ``upscale``).

    As PIL's ``thumbnail`` in cnnimageretrieval-pytorch, which never enlarges; the shorter
    side is rounded to the nearest pixel.
    """
    factor = max_size / max(width, height)
    if factor >= 1 and not upscale:
        return width, height
    if width >= height:
        return max_size, max(1, round(height * factor))
    return max(1, round(width * factor)), max_size


def target_size(spec: ImageSpec, max_size: int, upscale: bool) -> tuple[int, int]:
    """``(width, height)`` the image will have after cropping and resizing, without decoding it."""
    width, height = source_size(spec)
    x0, y0, x1, y1 = _crop_box(spec, width, height)
    return resized_size(x1 - x0, y1 - y0, max_size, upscale)


def load_image(spec: ImageSpec, max_size: int = 1024, upscale: bool = False) -> torch.Tensor:
    """Load, crop to ``spec.box`` and resize (Lanczos, longer side ``max_size``): uint8 ``(3, H, W)``."""
    image = _open(spec)
    box = _crop_box(spec, *image.size)
    if box != (0, 0, *image.size):
        image = image.crop(box)
    size = resized_size(*image.size, max_size, upscale)
    if size != image.size:
        image = image.resize(size, Image.LANCZOS)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def as_specs(images: Sequence[ImageLike | ImageSpec]) -> list[ImageSpec]:
    return [im if isinstance(im, ImageSpec) else ImageSpec(im) for im in images]
