"""Every image mode decodes to the 8-bit RGB the network expects (gpu_dsm.images.to_rgb).

A real photo of roxford5k-mini is saved in each mode; decoding it must give back the 8-bit
original within the tolerance stated per mode (0 where the mode holds the photo exactly).
"""
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from gpu_dsm.images import ImageSpec, load_image

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def photo(mini) -> Image.Image:
    """A small RGB photo (at most 96 px per side) of the database."""
    with Image.open(mini.image_path(mini.imlist[0])) as im:
        image = im.convert("RGB")
    image.thumbnail((96, 96), Image.LANCZOS)
    return image


def _decode(path) -> np.ndarray:
    """``(H, W, 3)`` uint8 as extraction sees it (never resized: the bound exceeds the image)."""
    return load_image(ImageSpec(path), max_size=4096, upscale=False).permute(1, 2, 0).numpy()


def _grey(photo) -> np.ndarray:
    return np.asarray(photo.convert("L"))


def _rgb_of_grey(grey) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


def _max_diff(a, b) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def _png16(path, samples: np.ndarray) -> None:
    """Write ``(H, W, C)`` uint16 samples as a 16-bit PNG (C = 3: RGB, 4: RGBA); PIL cannot."""
    h, w, c = samples.shape
    colour_type = {3: 2, 4: 6}[c]
    rows = samples.astype(">u2").reshape(h, w * c)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif")])
def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path, photo, mode, suffix):
    grey = _grey(photo)
    # exact 16-bit versions of the 8-bit levels (v * 257), and a version half a level up
    for offset, tolerance in ((0, 0), (128, 1)):
        levels = grey.astype(np.int64) * 257 + offset
        levels = np.minimum(levels, 65535)
        if mode == "I;16":
            image = Image.fromarray(levels.astype(np.uint16))
        elif mode == "I;16B":
            image = Image.frombytes("I;16B", photo.size, levels.astype(">u2").tobytes())
        else:
            image = Image.fromarray(levels.astype(np.int32))
        assert image.mode == mode
        path = tmp_path / f"grey{offset}.{suffix}"
        image.save(path)
        with Image.open(path) as saved:
            assert saved.mode == mode
        assert _max_diff(_decode(path), _rgb_of_grey(grey)) <= tolerance


def test_16_bit_rgb_and_rgba_png(tmp_path, photo):
    rgb = np.asarray(photo)
    samples = rgb.astype(np.uint16) * 257
    _png16(tmp_path / "rgb16.png", samples)
    alpha = np.linspace(0, 65535, samples.shape[1]).astype(np.uint16)[None, :, None].repeat(samples.shape[0], 0)
    _png16(tmp_path / "rgba16.png", np.concatenate([samples, alpha], 2))
    for name in ("rgb16.png", "rgba16.png"):
        assert _max_diff(_decode(tmp_path / name), rgb) <= 1  # PIL keeps the high byte: within one level


def test_palette_with_and_without_transparency(tmp_path, photo):
    rgb = np.asarray(photo)
    quantized = photo.quantize(256)
    expected = np.asarray(quantized.convert("RGB"))
    assert np.abs(expected.astype(int) - rgb).mean() < 6  # the palette itself is close to the photo
    quantized.save(tmp_path / "p.png")
    alphas = bytes(np.linspace(0, 255, 256).astype(np.uint8))  # per-entry alpha: a tRNS table
    quantized.save(tmp_path / "p_alpha.png", transparency=alphas)
    quantized.save(tmp_path / "p_key.png", transparency=int(np.asarray(quantized)[0, 0]))
    for name in ("p.png", "p_alpha.png", "p_key.png"):
        with Image.open(tmp_path / name) as saved:
            assert saved.mode == "P"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL warns when a P image with a tRNS table goes straight to RGB
            decoded = _decode(tmp_path / name)
        assert _max_diff(decoded, expected) == 0, name  # transparent pixels keep their colour, as convert('RGB')


def test_alpha_modes_keep_the_colours(tmp_path, photo):
    rgb = np.asarray(photo)
    grey = _grey(photo)
    alpha = np.linspace(0, 255, rgb.shape[1]).astype(np.uint8)[None, :].repeat(rgb.shape[0], 0)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    assert _max_diff(_decode(tmp_path / "la.png"), _rgb_of_grey(grey)) == 0
    assert _max_diff(_decode(tmp_path / "rgba.png"), rgb) == 0


def test_cmyk(tmp_path, photo):
    rgb = np.asarray(photo)
    cmyk = photo.convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    for name in ("cmyk.tif", "cmyk.jpg"):
        with Image.open(tmp_path / name) as saved:
            assert saved.mode == "CMYK"
    assert _max_diff(_decode(tmp_path / "cmyk.tif"), rgb) == 0
    assert np.abs(_decode(tmp_path / "cmyk.jpg").astype(int) - rgb).mean() < 1.5  # JPEG's loss at quality 100


def test_one_bit(tmp_path, photo):
    grey = _grey(photo)
    bits = photo.convert("1")  # Floyd-Steinberg dithered
    bits.save(tmp_path / "bits.png")
    decoded = _decode(tmp_path / "bits.png")
    assert _max_diff(decoded, _rgb_of_grey(np.asarray(bits).astype(np.uint8) * 255)) == 0
    # dithering keeps the local mean: 8x8 block means within 32 levels of the photo's on average
    h, w = (s // 8 * 8 for s in grey.shape)
    block = lambda a: a[:h, :w].reshape(h // 8, 8, w // 8, 8).mean((1, 3))  # noqa: E731
    assert np.abs(block(decoded[:, :, 0].astype(float)) - block(grey.astype(float))).mean() < 32


def test_float(tmp_path, photo):
    grey = _grey(photo)
    Image.fromarray(grey.astype(np.float32), "F").save(tmp_path / "levels.tif")
    Image.fromarray(grey.astype(np.float32) / 255, "F").save(tmp_path / "unit.tif")
    assert _max_diff(_decode(tmp_path / "levels.tif"), _rgb_of_grey(grey)) == 0
    assert _max_diff(_decode(tmp_path / "unit.tif"), _rgb_of_grey(grey)) <= 1


def test_exif_orientation_is_not_applied(tmp_path, photo):
    """The reference (cnnimageretrieval-pytorch's pil_loader) never transposes: pixels as stored."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    photo.save(tmp_path / "plain.jpg", quality=95)
    photo.save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "rotated.jpg") as saved:
        assert saved.getexif().get(0x0112) == 6
    plain, tagged = _decode(tmp_path / "plain.jpg"), _decode(tmp_path / "rotated.jpg")
    assert tagged.shape == (photo.size[1], photo.size[0], 3)
    assert _max_diff(tagged, plain) == 0


def test_images_that_cannot_be_made_rgb_are_named(tmp_path, photo):
    grey = _grey(photo).astype(np.float32)
    Image.fromarray(grey - 10, "F").save(tmp_path / "negative.tif")
    Image.fromarray(grey * 1000, "F").save(tmp_path / "huge.tif")
    nan = grey.copy()
    nan[0, 0] = np.nan
    Image.fromarray(nan, "F").save(tmp_path / "nan.tif")
    Image.fromarray(grey.astype(np.int32) * 1000, "I").save(tmp_path / "wide.tif")
    photo.save(tmp_path / "truncated.jpg")
    data = (tmp_path / "truncated.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    for name in ("negative.tif", "huge.tif", "nan.tif", "wide.tif", "truncated.jpg"):
        with pytest.raises(ValueError) as err:
            _decode(tmp_path / name)
        message = str(err.value)
        assert str(tmp_path / name) in message and "\n" not in message, message
