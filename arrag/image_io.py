"""Image I/O in one place: read files to RGB, resize + centre crop, map to and from [-1, 1], save, grids.

PIL and numpy only (torchvision can't be installed beside the CPU torch wheel). Two crops:
  original  Resize(short side, bilinear) then CenterCrop, as torchvision does it and as AR-RAG encoded
            its database (img2code_L.py)
  adm       LlamaGen's ADM crop: BOX halving while the short side >= 2x, bicubic, centre crop
High-bit-depth images (16-bit PNG/TIFF) are scaled to 8 bits, not clipped; images whose header says
they are absurdly large or elongated are refused before their pixels are decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from arrag.errors import ArragError
from arrag.fileops import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RESIZE_MODES = ("original", "adm")
MAX_PIXELS = 100_000_000  # decoding more than this (~300 MB as RGB) is refused
MAX_ASPECT = 20.0         # long side / short side; a 64x300,000 strip would need gigabytes once resized
# The largest side arrag crops, encodes or generates at: 128x128 tokens with VQ-16 (Janus-Pro works at 384; its
# VQ's encoder at 2048 px already needs ~20 GB of activations), so a typo cannot ask for gigabytes.
MAX_IMAGE_SIZE = 2048


def check_image_size(size: int, flag: str = "--image-size") -> int:
    """Refuse a crop or generation size outside [1, MAX_IMAGE_SIZE] with one line naming the flag."""
    if not 1 <= int(size) <= MAX_IMAGE_SIZE:
        raise ArragError(f"{flag} {size}: must be in [1, {MAX_IMAGE_SIZE}] pixels (arrag's documented maximum)")
    return int(size)


class ImageRejected(ValueError):
    """An image that is skipped on purpose (too large, too elongated, too small), with the reason."""


def check_size(size: tuple[int, int], max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> None:
    """Refuse an image by its header size, before its pixels are decoded."""
    w, h = size
    if w < 1 or h < 1:
        raise ImageRejected(f"empty image {w}x{h}")
    if w * h > max_pixels:
        raise ImageRejected(f"too many pixels: {w}x{h} > {max_pixels:,}")
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageRejected(f"aspect ratio {max(w, h) / min(w, h):.0f}:1 > {max_aspect:g}:1 ({w}x{h})")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode. 16- and 32-bit integer images are scaled (65535 -> 255), float images taken
    as [0, 1] or [0, 255]; PIL's own convert would clip them to white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(image).astype(np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def open_rgb(source, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """A path or a binary file object -> 8-bit RGB; the size is checked from the header first (ImageRejected)."""
    with Image.open(source) as im:
        check_size(im.size, max_pixels, max_aspect)
        im.load()
        return to_rgb(im)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB; an unreadable, missing or absurdly large file is one clear ArragError."""
    path = Path(path)
    if not path.is_file():
        raise ArragError(f"image not found: {path}")
    try:
        return open_rgb(path)
    except ImageRejected as e:
        raise ArragError(f"refusing image {path}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ArragError(f"cannot read image {path}: {e}") from None


def resize_crop(image: Image.Image, size: int, mode: str = "original") -> Image.Image:
    """Square `size` crop by `mode`: 'original' (Resize + CenterCrop, AR-RAG's encoder) or 'adm' (LlamaGen)."""
    if mode == "adm":
        return center_crop_arr(image, size)
    if mode != "original":
        raise ArragError(f"--resize {mode!r}: choose {' or '.join(RESIZE_MODES)}")
    return resize_center_crop(image, size)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's Resize(size) (short side to size, long side truncated, bilinear) then CenterCrop(size)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if w <= h else (new_long, new_short)
    if new != (w, h):
        image = image.resize(new, resample=Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM-style crop: halve with BOX while the short side >= 2*size, BICUBIC to short side = size, centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


def to_tensor(images: Image.Image | Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL image(s) or uint8 [B,H,W,3]/[H,W,3] -> float [B, 3, H, W] in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    if isinstance(images, Image.Image):
        images = [images]
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images]) if not isinstance(images, np.ndarray) else images
    if arr.ndim == 3:
        arr = arr[None]
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # a read-only view (a PIL image's buffer, a cached render): torch wants its own
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB of each image pair on the [0, 255] scale: uint8 [N, H, W, 3] (or one [H, W, 3]) -> float64 [N]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim == 3:
        a, b = a[None], b[None]
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def to_uint8(images: torch.Tensor, convention: str = "llamagen") -> np.ndarray:
    """float [B, 3, H, W] about [-1, 1] -> uint8 [B, H, W, 3].

    llamagen: clamp(127.5*x + 128, 0, 255), i.e. rounded (exactly inverts to_tensor on uint8 input);
    janus:    clip((x + 1) / 2 * 255, 0, 255), truncated, as Janus-Pro's and AR-RAG's generation scripts
              save their images (half the pixels one level darker than rounding).
    """
    x = images.detach().float()
    if convention == "janus":
        x = ((x + 1) / 2 * 255).clamp(0, 255)
    elif convention == "llamagen":
        x = (x * 127.5 + 128.0).clamp(0, 255)
    else:
        raise ValueError(f"unknown uint8 convention {convention!r}")
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_format(path: str | Path, flag: str = "") -> str:
    """PIL's format for an output image name (png, jpg, webp), or one line saying which names work; commands
    check their output names with it before any work."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(Path(path).suffix.lower())
    if fmt is None:
        raise ArragError(f"{flag + ' ' if flag else ''}cannot save {path}: use a .png, .jpg or .webp name")
    return fmt


def save_image(image: np.ndarray, path: str | Path, quality: int = 95) -> Path:
    """Save uint8 [H, W, 3]; format from the suffix (png, jpg, webp). Written to a temp name, then renamed."""
    path = Path(path)
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format=fmt, **({"quality": quality} if fmt != "PNG" else {}))
    return path


def make_grid(images: np.ndarray | Sequence[np.ndarray], ncol: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] images row-major into one [rows*(H+pad)-pad, ncol*(W+pad)-pad, 3] image."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    grid = np.full((rows * (h + pad) - pad, ncol * (w + pad) - pad, c), fill, dtype=np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncol)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = im
    return grid


def labeled_grid(cells: Sequence[Sequence[np.ndarray]], row_labels: Sequence[str], col_labels: Sequence[str],
                 scale: int = 3, label_width: int = 260, pad: int = 4) -> np.ndarray:
    """A readable comparison grid: cells[r][c] uint8 [H, W, 3] upscaled `scale`x (nearest neighbour, so pixels
    stay sharp), a header row with the column labels and each row's label wrapped to its left."""
    import textwrap

    from PIL import ImageDraw, ImageFont

    h, w = cells[0][0].shape[:2]
    ch, cw = h * scale, w * scale
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    header = 28
    width = label_width + len(col_labels) * (cw + pad)
    height = header + len(cells) * (ch + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(col_labels):
        draw.text((label_width + c * (cw + pad) + 4, 6), label, fill="black", font=font)
    for r, row in enumerate(cells):
        y = header + r * (ch + pad)
        text = "\n".join(textwrap.wrap(row_labels[r], width=max(10, label_width // 9)))
        draw.multiline_text((6, y + 4), text, fill="black", font=font, spacing=2)
        for c, cell in enumerate(row):
            big = np.repeat(np.repeat(np.asarray(cell, dtype=np.uint8), scale, 0), scale, 1)
            canvas.paste(Image.fromarray(big), (label_width + c * (cw + pad), y))
    return np.asarray(canvas)
