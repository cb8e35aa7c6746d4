"""The demo's pictures, drawn with PIL (no plotting library): accuracy against training frequency, one line per
method, and the frames that mark the scorer's verdict on a grid's images."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#222222", "#d62728", "#1f77b4", "#7fa6c9", "#f2a2a2", "#9467bd", "#2ca02c"]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def frequency_plot(lines: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                   boundaries: Sequence[tuple[float, str]] = (), title: str = "",
                   size: tuple[int, int] = (760, 440)) -> np.ndarray:
    """uint8 [H, W, 3]: for each label, (x values > 0, y values in [0, 1], standard errors) drawn as a line with
    markers and error bars over a log x axis (training images of the concept); `boundaries` are (x, name) marks
    (e.g. where the tail begins), drawn as dotted verticals."""
    w, h = size
    left, right, top, bottom = 64, 180, 36, 52
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(12)
    xs = [x for xy in lines.values() for x in xy[0] if x > 0]
    lo = 10 ** math.floor(math.log10(min(xs))) if xs else 1
    hi = 10 ** math.ceil(math.log10(max(xs))) if xs else 10
    if hi <= lo:
        hi = lo * 10

    def px(x: float, y: float) -> tuple[float, float]:
        u = (math.log10(x) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        return left + u * (w - left - right), top + (1 - y) * (h - top - bottom)

    x0, y0 = px(lo, 0)
    x1, y1 = px(hi, 1)
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for tick in range(round(math.log10(lo)), round(math.log10(hi)) + 1):
        x, _ = px(10 ** tick, 0)
        draw.line([x, y0, x, y0 + 5], fill="black")
        draw.text((x - 12, y0 + 8), f"{10 ** tick:,}", fill="black", font=small)
    for k in range(6):
        y = k / 5
        _, py = px(lo, y)
        draw.line([x0 - 5, py, x0, py], fill="black")
        draw.line([x0, py, x1, py], fill="#e6e6e6")
        draw.text((x0 - 36, py - 7), f"{y:.1f}", fill="black", font=small)
    for x, name in boundaries:
        bx, _ = px(x, 0)
        for yy in range(int(y1), int(y0), 6):
            draw.line([bx, yy, bx, yy + 3], fill="#999999")
        draw.text((bx + 3, y1 + 3), name, fill="#666666", font=small)
    draw.text((left, 10), title, fill="black", font=font)
    draw.text(((x0 + x1) / 2 - 150, h - 22), "training images of the concept (log scale)", fill="black", font=small)
    draw.text((8, top - 22), "accuracy", fill="black", font=small)
    for i, (label, (x, y, se)) in enumerate(lines.items()):
        color = PALETTE[i % len(PALETTE)]
        points = [px(a, b) for a, b in zip(x, y, strict=True) if a > 0]
        if len(points) > 1:
            draw.line(points, fill=color, width=3 if i < 3 else 2)
        for (a, b, e), (qx, qy) in zip(((a, b, e) for a, b, e in zip(x, y, se, strict=True) if a > 0), points,
                                       strict=True):
            if e > 0:
                _, top_e = px(a, min(1.0, b + e))
                _, bot_e = px(a, max(0.0, b - e))
                draw.line([qx, top_e, qx, bot_e], fill=color, width=1)
            draw.ellipse([qx - 3.5, qy - 3.5, qx + 3.5, qy + 3.5], fill=color)
        ly = top + 6 + i * 22
        draw.line([x1 + 14, ly + 8, x1 + 38, ly + 8], fill=color, width=3)
        draw.text((x1 + 44, ly), label, fill="black", font=small)
    return np.asarray(img)


def framed(image: np.ndarray, passed: bool | None, width: int = 2) -> np.ndarray:
    """The image with a thin green (passed) or red (failed) frame; None: unframed (ground truth)."""
    if passed is None:
        return image
    out = image.copy()
    color = np.array((40, 170, 60) if passed else (220, 40, 40), np.uint8)
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out
