"""Reading images for extraction: crop to a box, resize to a maximum side, as uint8 RGB tensors.

The standard image protocol of revisitop and cnnimageretrieval-pytorch, exactly: RGB
conversion, PIL's crop, PIL's ``thumbnail`` (never enlarging; Lanczos), and a query crop scaled
as its full image is. ``upscale=True`` departs from it on purpose (see [`crop_bound`][gpu_dsm.images.crop_bound]).

Decoding ([`to_rgb`][gpu_dsm.images.to_rgb]): the reference loads every image with ``Image.open(path).convert('RGB')``
(cnnimageretrieval-pytorch ``datasets/datahelpers.py: pil_loader``; revisitop's example code
does the same). That is kept for every 8-bit mode; where PIL's conversion would silently
destroy an image, the levels are mapped instead:

============================ =============================================================
mode                         8-bit RGB
============================ =============================================================
RGB, L, 1, YCbCr, CMYK, ...  PIL's ``convert('RGB')`` (CMYK: PIL's plain conversion, no ICC)
P, PA, LA, RGBA              the colour channels; alpha is dropped, as ``convert('RGB')`` does
I;16, I;16B, I;16L, I        16-bit levels ``v`` -> ``round(v * 255 / 65535)`` on every channel
                             (PIL clips them to 255: a 16-bit PNG would become white). Mode I
                             values outside 0..65535 are refused
16-bit RGB / RGBA PNG        PIL keeps each sample's high byte, ``floor(v / 256)``: within one
                             level of ``round(v * 255 / 65535)``
F (float)                    values in [0, 1] -> ``round(255 v)``; otherwise values in [0, 255]
                             -> ``round(v)`` (PIL's convention); anything else (negative,
                             beyond 255, NaN) is refused
============================ =============================================================

EXIF orientation is **not** applied, as in the reference (no ``ImageOps.exif_transpose``): the
pixels are used as stored, which is also the frame revisitop's query boxes are given in.
An image that cannot be made RGB raises a one-line ``ValueError`` naming the file.
"""
from __future__ import annotations

import math
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
    """One image to extract: its source and an optional box ``(x0, y0, x1, y1)`` in its pixels.

    ``source`` is a path, an ``(H, W)`` / ``(H, W, 3|4)`` uint8 numpy array, or a ``(3, H, W)``
    uint8 tensor (any device; read on the CPU). The box is in pixels of the source, right and
    bottom exclusive, rounded as PIL's ``crop`` rounds.
    """

    source: ImageLike
    box: tuple[float, float, float, float] | None = None

    @property
    def name(self) -> str:
        """The path, or ``<ndarray>`` / ``<Tensor>`` for an in-memory image (for messages)."""
        return str(self.source) if isinstance(self.source, (str, Path)) else f"<{type(self.source).__name__}>"


_ALPHA_MODES = ("P", "PA", "LA", "La", "RGBA", "RGBa")


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _grey_rgb(levels: np.ndarray) -> Image.Image:
    """``(H, W)`` uint8 levels -> an RGB image with them on every channel."""
    return Image.fromarray(np.repeat(levels[:, :, None], 3, axis=2), "RGB")


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """``image`` as 8-bit RGB, whatever its mode (table in the module docstring); ``name`` is used
    in the ``ValueError`` raised for an image that cannot be made RGB."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        levels = np.asarray(image)
        if mode == "I" and levels.size and (int(levels.min()) < 0 or int(levels.max()) > 65535):
            raise ValueError(f"cannot make image {name} RGB: its 32-bit integer levels span {int(levels.min())}.."
                             f"{int(levels.max())}, beyond the 16-bit range 0..65535")
        levels = levels.astype(np.int64)
        return _grey_rgb(((levels * 255 + 32767) // 65535).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise ValueError(f"cannot make image {name} RGB: its float values include NaN or Inf")
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise ValueError(f"cannot make image {name} RGB: its float values span [{lo:g}, {hi:g}]; only [0, 1] "
                             "and [0, 255] are understood")
        scaled = values * 255 if hi <= 1 else values
        return _grey_rgb(np.rint(scaled).astype(np.uint8))
    try:
        if mode in _ALPHA_MODES:  # the colours of every pixel, transparent or not; no PIL warning for P
            image = image.convert("RGBA")
        return image.convert("RGB")
    except Exception as exc:
        raise ValueError(f"cannot make image {name} RGB (mode {mode}): {_one_line(exc)}") from exc


def _open(spec: ImageSpec) -> Image.Image:
    src = spec.source
    if isinstance(src, (str, Path)):
        try:
            im = Image.open(src)
        except FileNotFoundError:
            raise FileNotFoundError(f"image not found: {src}") from None
        except Exception as exc:
            raise ValueError(f"cannot read image {src}: {_one_line(exc)}") from exc
        with im:
            try:
                im.load()
            except Exception as exc:
                raise ValueError(f"cannot read image {src}: {_one_line(exc)}") from exc
            rgb = to_rgb(im, str(src))
            return rgb.copy() if rgb is im else rgb  # closing ``im`` releases its pixels
    if isinstance(src, torch.Tensor):
        if src.ndim != 3 or src.shape[0] != 3 or src.dtype != torch.uint8:
            raise ValueError(f"an in-memory image tensor must be uint8 (3, H, W), got {src.dtype} {tuple(src.shape)}")
        src = src.permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(src)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"an in-memory image array must be uint8 (H, W) or (H, W, 3|4), got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr).convert("RGB")


def source_size(spec: ImageSpec) -> tuple[int, int]:
    """``(width, height)`` in pixels of the source before cropping, read from the file header when possible."""
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
    """The box PIL's ``Image.crop`` uses: each coordinate rounded (Python's ``round``). It must
    overlap the image; parts outside it are black, as PIL (and so cnnimageretrieval-pytorch) pads them."""
    if spec.box is None:
        return 0, 0, width, height
    x0, y0, x1, y1 = (int(round(v)) for v in spec.box)
    if min(x1, width) <= max(x0, 0) or min(y1, height) <= max(y0, 0):
        raise ValueError(f"box {spec.box} of {spec.name} is empty inside its {width}x{height} image")
    return x0, y0, x1, y1


def _aspect_size(width: int, height: int, bound: int) -> tuple[int, int]:
    """Largest size within ``bound x bound`` with the aspect of ``width x height``, rounded as PIL's
    ``Image.thumbnail`` rounds (``preserve_aspect_ratio``: of floor and ceil, the one closer in aspect)."""
    aspect = width / height
    if 1 >= aspect:  # bound / bound >= aspect: height is the binding side
        x = min(math.floor(bound * aspect), math.ceil(bound * aspect), key=lambda n: abs(aspect - n / bound))
        return max(x, 1), bound
    y = min(math.floor(bound / aspect), math.ceil(bound / aspect), key=lambda n: 0 if n == 0 else abs(aspect - bound / n))
    return bound, max(y, 1)


def resized_size(width: int, height: int, max_size: float, upscale: bool) -> tuple[int, int]:
    """``(width, height)`` in pixels after fitting a ``width x height`` image into
    ``max_size x max_size`` (``max_size`` floored, as PIL does).

    Without ``upscale`` this is exactly PIL's ``Image.thumbnail((max_size, max_size))``, which
    cnnimageretrieval-pytorch and revisitop use: never enlarged. With ``upscale`` an image smaller
    than the bound is enlarged to it, with the same rounding.
    """
    bound = math.floor(max_size)
    if bound < 1:
        raise ValueError(f"image size bound must be >= 1 pixel, got {max_size}")
    if bound >= width and bound >= height and (not upscale or bound == max(width, height)):
        return width, height
    return _aspect_size(width, height, bound)


def crop_bound(spec: ImageSpec, width: int, height: int, max_size: int, upscale: bool) -> float:
    """The ``max_size`` a (cropped) image is fitted into, given its source's ``width x height``.

    The standard protocol (revisitop, cnnimageretrieval-pytorch), ``upscale=False``: a query crop
    keeps the scale its full image gets, ``max_size * crop's longer side / image's longer side``.
    With ``upscale`` the crop's longer side is brought to ``max_size`` itself. All in pixels.
    """
    if spec.box is None or upscale:
        return float(max_size)
    x0, y0, x1, y1 = _crop_box(spec, width, height)
    return max_size * max(x1 - x0, y1 - y0) / max(width, height)


def target_size(spec: ImageSpec, max_size: int, upscale: bool) -> tuple[int, int]:
    """``(width, height)`` the image will have after cropping and resizing, without decoding it."""
    width, height = source_size(spec)
    x0, y0, x1, y1 = _crop_box(spec, width, height)
    return resized_size(x1 - x0, y1 - y0, crop_bound(spec, width, height, max_size, upscale), upscale)


def load_image(spec: ImageSpec, max_size: int = 1024, upscale: bool = False) -> torch.Tensor:
    """Load, crop to ``spec.box`` and resize: uint8 RGB ``(3, H, W)`` on the CPU, longer side at
    most ``max_size`` pixels.

    Downscaling is PIL's ``thumbnail`` with Lanczos filtering (its default two-step reduction,
    ``reducing_gap=2``), as cnnimageretrieval-pytorch's ``imresize``; with ``upscale`` a smaller
    image is enlarged by a Lanczos ``resize``. See [`crop_bound`][gpu_dsm.images.crop_bound] for the size of query crops.

    Examples:
        A 200 x 150 crop of a 400 x 300 image keeps the scale of its full image (fitted into
        100 px: half the size), unless ``upscale`` brings the crop itself to 100 px:

        >>> import torch
        >>> image = torch.zeros(3, 300, 400, dtype=torch.uint8)  # (3, H, W) uint8 RGB
        >>> load_image(ImageSpec(image, box=(0, 0, 200, 150)), max_size=100).shape
        torch.Size([3, 38, 50])
        >>> load_image(ImageSpec(image, box=(0, 0, 200, 150)), max_size=100, upscale=True).shape
        torch.Size([3, 75, 100])
    """
    image = _open(spec)
    width, height = image.size
    box = _crop_box(spec, width, height)
    if box != (0, 0, width, height):
        image = image.crop(box)
    bound = crop_bound(spec, width, height, max_size, upscale)
    size = resized_size(*image.size, bound, upscale)
    if size[0] < image.size[0] or size[1] < image.size[1]:
        image.thumbnail((bound, bound), Image.LANCZOS)
    elif size != image.size:
        image = image.resize(size, Image.LANCZOS)
    if image.size != size:
        raise RuntimeError(f"{spec.name}: resized to {image.size}, expected {size}")
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def as_specs(images: Sequence[ImageLike | ImageSpec]) -> list[ImageSpec]:
    """Every item as an [`ImageSpec`][gpu_dsm.images.ImageSpec] (an image without a box when it is not one already)."""
    return [im if isinstance(im, ImageSpec) else ImageSpec(im) for im in images]
