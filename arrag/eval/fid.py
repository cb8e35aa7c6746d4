"""`arrag eval fid`: Fréchet Inception Distance between two image folders (or cached statistics), via torchmetrics.

Resizing: images are read as RGB uint8 at their stored size and handed to torchmetrics' FID Inception
network (torch-fidelity's port of the TF FID graph), which resizes them to 299x299 with TF1-style bilinear
interpolation, as the original TF code, pytorch-fid and torch-fidelity do. With `--resize N` each image is
first centre-cropped to a square and resized to N x N with PIL bicubic (for example 256, the usual
MSCOCO-30K protocol, so that generated 384-px images and COCO photos meet at one size).
Statistics (`--save-stats`) are the metric's own running sums (features sum, outer-product sum, count)
plus mu and sigma, in an .npz, tagged with the feature extractor and resize so that they are only
compared with like.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from arrag.errors import ArragError, one_line
from arrag.fileops import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_NAME = "inception-v3-compat:2048"


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively: GenEval's samples/ folders count), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArragError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ArragError(f"{folder}: FID needs at least 2 images, found {len(files)}")
    return files


def load_uint8(path: Path, resize: int | None = None) -> torch.Tensor:
    """uint8 [3, H, W]; with `resize`, centre-cropped to a square and bicubic-resized to resize x resize."""
    from PIL import Image

    from arrag.image_io import load_rgb

    image = load_rgb(path)
    if resize:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((resize, resize), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def make_metric(feature: nn.Module | None = None, inception_weights: str | None = None):
    """torchmetrics FrechetInceptionDistance with the standard Inception (default) or a custom extractor."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise ArragError("FID needs torchmetrics: pip install torchmetrics (the `eval` extra)") from None
    if feature is not None:
        return FrechetInceptionDistance(feature=feature, reset_real_features=False)
    if inception_weights and not Path(inception_weights).is_file():
        raise ArragError(f"--inception-weights {inception_weights}: no such file; download {INCEPTION_URL} there")
    try:
        import torch_fidelity  # noqa: F401
    except Exception:  # ImportError, or a torchvision that does not match torch failing at import
        raise ArragError("FID's Inception network comes from torch-fidelity: pip install torch-fidelity (with a "
                         "torchvision built for your torch)") from None
    try:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                        feature_extractor_weights_path=inception_weights)
    except Exception as e:  # the download failed: offline machine, proxy, ...
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise ArragError(f"Inception weights are not cached and cannot be downloaded ({one_line(e)}"
                         f"); download {INCEPTION_URL} and pass --inception-weights PATH (or put the file in "
                         f"{hub})") from None


def extractor_name(metric) -> str:
    return INCEPTION_NAME if not metric.used_custom_model else f"custom:{type(metric.inception).__name__}"


def add_folder(metric, folder: str | Path, real: bool, *, resize: int | None = None, batch_size: int = 50,
               device: str | torch.device = "cpu", progress: bool = True) -> int:
    """Feed every image of `folder` to the metric's real or fake side; returns the count."""
    files = image_files(folder)
    images = [load_uint8(f, resize) for f in tqdm(files, desc=f"read {Path(folder).name}", unit="img",
                                                    disable=not progress)]
    by_size: dict = {}
    for im in images:  # batches need one size; mixed folders are grouped
        by_size.setdefault(tuple(im.shape), []).append(im)
    for group in by_size.values():
        for s in range(0, len(group), batch_size):
            metric.update(torch.stack(group[s:s + batch_size]).to(device), real=real)
    return len(files)


def save_stats(metric, path: str | Path, *, resize: int | None) -> Path:
    """The real side's statistics as .npz (written under a temporary name, then renamed)."""
    n = int(metric.real_features_num_samples)
    total = metric.real_features_sum.double().cpu().numpy()
    outer = metric.real_features_cov_sum.double().cpu().numpy()
    mu = total / n
    sigma = (outer - n * np.outer(mu, mu)) / (n - 1)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
        np.savez(f, features_sum=total, features_cov_sum=outer, num_samples=n, mu=mu, sigma=sigma,
                 extractor=extractor_name(metric), resize=-1 if resize is None else resize)
    return path


def load_stats(metric, path: str | Path, *, resize: int | None) -> int:
    """Put saved statistics on the metric's real side; refuses another extractor or resize."""
    try:
        z = np.load(path)
        saved = (str(z["extractor"]), int(z["resize"]))
    except (OSError, KeyError, ValueError) as e:
        raise ArragError(f"--real {path}: not an arrag FID statistics file ({e})") from None
    want = (extractor_name(metric), -1 if resize is None else resize)
    if saved != want:
        raise ArragError(f"--real {path} was computed with extractor {saved[0]}, resize {saved[1]}; this run uses "
                         f"{want[0]}, resize {want[1]}")
    dev = metric.real_features_sum.device
    metric.real_features_sum = torch.from_numpy(z["features_sum"]).to(dev)
    metric.real_features_cov_sum = torch.from_numpy(z["features_cov_sum"]).to(dev)
    metric.real_features_num_samples = torch.tensor(int(z["num_samples"]), device=dev)
    return int(z["num_samples"])


def compute_fid(real: str | Path, fake: str | Path, *, feature: nn.Module | None = None,
                inception_weights: str | None = None, save_stats_to: str | Path | None = None,
                resize: int | None = None, batch_size: int = 50, device: str | torch.device = "cpu",
                progress: bool = True) -> dict:
    """FID between `real` (a folder or a saved .npz) and the `fake` folder."""
    metric = make_metric(feature, inception_weights).to(device)
    real = Path(real)
    if real.is_file():
        n_real = load_stats(metric, real, resize=resize)
    else:
        n_real = add_folder(metric, real, True, resize=resize, batch_size=batch_size, device=device,
                            progress=progress)
        if save_stats_to:
            save_stats(metric, save_stats_to, resize=resize)
            print(f"arrag: reference statistics of {n_real} images -> {save_stats_to}", file=sys.stderr)
    n_fake = add_folder(metric, fake, False, resize=resize, batch_size=batch_size, device=device, progress=progress)
    value = float(metric.compute())
    return {"fid": value, "real": str(real), "fake": str(fake), "num_real": n_real, "num_fake": n_fake,
            "extractor": extractor_name(metric), "resize": resize}
