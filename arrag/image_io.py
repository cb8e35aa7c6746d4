"""Image I/O in one place: read files to RGB, ADM centre crop, map to and from [-1, 1], save, grids.

PIL and numpy only (torchvision can't be installed beside the CPU torch wheel).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from arrag.errors import ArragError
from arrag.fileops import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file as RGB; an unreadable or missing file is one clear ArragError."""
    path = Path(path)
    if not path.is_file():
        raise ArragError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ArragError(f"cannot read image {path}: {e}") from None


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
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return t / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] about [-1, 1] -> uint8 [B, H, W, 3], as LlamaGen: clamp(127.5*x + 128, 0, 255)."""
    x = (images.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image(image: np.ndarray, path: str | Path, quality: int = 95) -> Path:
    """Save uint8 [H, W, 3]; format from the suffix (png, jpg, webp). Written to a temp name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower())
    if fmt is None:
        raise ArragError(f"cannot save {path}: use a .png, .jpg or .webp name")
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
