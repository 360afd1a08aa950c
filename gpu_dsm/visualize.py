"""Pictures of what DSM does, drawn with Pillow (no plotting library needed).

- `draw_matches`: a query and a candidate side by side with the inlier ellipses and the
  correspondence lines (the DSM paper's figure 5).
- `draw_inlier_histogram`: distributions of inlier counts of positive and negative
  images over all queries (the paper's figure 6).
"""
from __future__ import annotations

import colorsys
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def _colour(i: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def feature_to_image(xy: torch.Tensor, frame: torch.Tensor, map_size: Sequence[int], image_size: Sequence[int]):
    """Map centres ``(n, 2)`` and frames ``(n, 2, 2)`` from feature-map pixels (map ``(h, w)``) to
    pixels of an image shown at ``(width, height)``: activation pixel centres sit at the centres
    of their receptive-field cells. The inputs are floating point; the results keep each input's
    device and dtype.

    Examples:
        >>> import torch
        >>> xy, frame = feature_to_image(torch.tensor([[2.0, 3.0]]), torch.eye(2)[None], map_size=(10, 12),
        ...                              image_size=(48, 40))
        >>> xy, frame[0]
        (tensor([[ 9.5000, 13.5000]]), tensor([[4., 0.],
                [0., 4.]]))
    """
    h, w = int(map_size[0]), int(map_size[1])
    sx, sy = image_size[0] / w, image_size[1] / h
    scale = torch.tensor([sx, sy], dtype=xy.dtype, device=xy.device)
    frame_scale = torch.tensor([sx, sy], dtype=frame.dtype, device=frame.device)
    return (xy + 0.5) * scale - 0.5, frame * frame_scale.view(1, 2, 1)


def _ellipse(draw: ImageDraw.ImageDraw, centre, frame, colour, offset=(0, 0), width=2):
    t = np.linspace(0, 2 * math.pi, 40)
    circle = np.stack([np.cos(t), np.sin(t)])
    # the uniform region with these second moments is the ellipse mu + 2 A u, |u| = 1
    pts = centre.numpy()[:, None] + 2 * frame.numpy() @ circle
    draw.line([(float(x) + offset[0], float(y) + offset[1]) for x, y in pts.T], fill=colour, width=width)


def draw_matches(
    query_image: Image.Image,
    candidate_image: Image.Image,
    query_points: tuple[torch.Tensor, torch.Tensor],
    candidate_points: tuple[torch.Tensor, torch.Tensor],
    title: str | None = None,
) -> Image.Image:
    """Side-by-side picture of inlier correspondences.

    ``query_points`` / ``candidate_points``: ``(xy (m, 2), frame (m, 2, 2))`` floating point CPU
    tensors of the ``m`` inlier correspondences, already in pixels of the respective images
    (`feature_to_image`). Returns an RGB image, the two side by side (and the title above).
    """
    gap = 10
    height = max(query_image.height, candidate_image.height) + (24 if title else 0)
    top = 24 if title else 0
    canvas = Image.new("RGB", (query_image.width + gap + candidate_image.width, height), (255, 255, 255))
    canvas.paste(query_image.convert("RGB"), (0, top))
    offset = (query_image.width + gap, top)
    canvas.paste(candidate_image.convert("RGB"), offset)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    (qxy, qframe), (cxy, cframe) = query_points, candidate_points
    for i in range(len(qxy)):
        colour = _colour(i)
        _ellipse(draw, qxy[i], qframe[i], colour, (0, top))
        _ellipse(draw, cxy[i], cframe[i], colour, offset)
        draw.line([(float(qxy[i, 0]), float(qxy[i, 1]) + top),
                   (float(cxy[i, 0]) + offset[0], float(cxy[i, 1]) + offset[1])], fill=colour, width=1)
    return canvas


def draw_inlier_histogram(positive: Sequence[int], negative: Sequence[int], title: str = "inliers per image",
                          width: int = 640, height: int = 360) -> Image.Image:
    """Normalised histograms of inlier counts of positive (green) and negative (red) images."""
    pos, neg = np.asarray(positive, dtype=int), np.asarray(negative, dtype=int)
    top_count = int(max(pos.max(initial=0), neg.max(initial=0))) + 1
    bins = np.arange(top_count + 1)
    hp = np.histogram(pos, bins)[0] / max(len(pos), 1)
    hn = np.histogram(neg, bins)[0] / max(len(neg), 1)
    peak = max(hp.max(initial=0), hn.max(initial=0), 1e-9)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 10, 30, height - 40
    draw.text((left, 8), f"{title}: positives (green, n={len(pos)}) vs negatives (red, n={len(neg)})", fill=(0, 0, 0))
    draw.line([(left, bottom), (right, bottom)], fill=(0, 0, 0))
    draw.line([(left, top), (left, bottom)], fill=(0, 0, 0))
    step = (right - left) / max(top_count, 1)
    for b in range(top_count):
        x0 = left + b * step
        for value, colour, shift in ((hn[b], (220, 50, 50), 0.05), (hp[b], (40, 170, 60), 0.5)):
            h = (bottom - top) * value / peak
            draw.rectangle([x0 + shift * step, bottom - h, x0 + (shift + 0.45) * step, bottom], fill=colour)
        if top_count <= 40 or b % max(1, top_count // 20) == 0:
            draw.text((x0 + 0.3 * step, bottom + 4), str(b), fill=(0, 0, 0))
    draw.text((left, bottom + 20), "inliers", fill=(0, 0, 0))
    draw.text((4, top), f"{peak:.2f}", fill=(0, 0, 0))
    return img


def draw_delta_plot(panels: Sequence[tuple[str, Sequence[float | None]]], title: str = "per-query AP difference",
                    width: int = 720, panel_height: int = 200) -> Image.Image:
    """Per-query differences (one panel per ``(label, deltas)``), sorted from largest gain to
    largest loss: green bars gain, red bars lose, the dashed line is the mean; ``None`` (a query
    undefined in that setup) is left out."""
    panels = list(panels)
    img = Image.new("RGB", (width, 28 + panel_height * max(len(panels), 1)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill=(0, 0, 0))
    for p, (label, deltas) in enumerate(panels):
        values = np.sort(np.asarray([d for d in deltas if d is not None], dtype=np.float64))[::-1]
        top = 28 + p * panel_height + 18
        bottom = 28 + (p + 1) * panel_height - 10
        left, right = 60, width - 10
        mid = (top + bottom) / 2
        peak = max(float(np.abs(values).max(initial=0.0)), 1e-9)
        draw.text((8, top - 16), f"{label}: {values.size} queries, mean {values.mean() if values.size else 0:+.2f}, "
                                 f"{int((values > 1e-9).sum())} gain, {int((values < -1e-9).sum())} lose", fill=(0, 0, 0))
        draw.line([(left, top), (left, bottom)], fill=(0, 0, 0))
        draw.line([(left, mid), (right, mid)], fill=(0, 0, 0))
        draw.text((4, top), f"{peak:+.1f}", fill=(0, 0, 0))
        draw.text((4, bottom - 10), f"{-peak:+.1f}", fill=(0, 0, 0))
        step = (right - left) / max(values.size, 1)
        half = (bottom - top) / 2
        for i, v in enumerate(values):
            y = mid - half * v / peak
            colour = (40, 170, 60) if v > 1e-9 else (220, 50, 50) if v < -1e-9 else (150, 150, 150)
            draw.rectangle([left + i * step, min(mid, y), left + i * step + max(step * 0.8, 1), max(mid, y)], fill=colour)
        if values.size:
            y = mid - half * values.mean() / peak
            for x in range(left, right, 8):
                draw.line([(x, y), (min(x + 4, right), y)], fill=(30, 30, 200))
    return img
