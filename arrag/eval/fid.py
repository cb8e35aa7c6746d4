"""`arrag eval fid`: Fréchet Inception Distance between two image folders (or cached statistics).

Features: arrag's FID Inception (arrag/eval/inception.py), pytorch-fid's network and weights file, so the
numbers are pytorch-fid's: images are read as RGB uint8, resized to 299x299 inside the network (bilinear),
and the 2048 pool3 features are used. No torchvision or torch-fidelity is needed. With `--resize N` each
image is first centre-cropped to a square and resized to N x N with PIL bicubic (for example 256, the usual
MSCOCO-30K protocol, so that generated 384-px images and COCO photos meet at one size).
Statistics: running sums in float64 (feature sum, outer-product sum, count), so any number of images
streams through in batches; FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), the trace of the
square root taken as the sum of the square roots of the eigenvalues of S1 S2 (tested equal to
torchmetrics' FrechetInceptionDistance on the same features). `--save-stats` writes the sums plus mu and
sigma to an .npz, tagged with the feature extractor and resize so that it is only compared with like.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from arrag.errors import ArragError
from arrag.fileops import atomic_path
from arrag.image_io import IMAGE_SUFFIXES


class FeatureStats:
    """Running float64 sums of features [N, F]: their mean and covariance, saved and loaded as .npz."""

    def __init__(self, dim: int, extractor: str, resize: int | None):
        self.skipped: list[dict] = []  # images that could not be read (folder_stats)
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))
        self.count = 0
        self.extractor, self.resize = extractor, resize

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu().numpy()
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += len(f)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ArragError(f"FID needs at least 2 images on each side, got {self.count}")
        mu = self.total / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def save(self, path: str | Path) -> Path:
        mu, sigma = self.mean_cov()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez would append .npz to a name
            np.savez(f, features_sum=self.total, features_cov_sum=self.outer, num_samples=self.count, mu=mu,
                     sigma=sigma, extractor=self.extractor, resize=-1 if self.resize is None else self.resize)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, extractor: str, resize: int | None) -> FeatureStats:
        """Saved statistics; refused when made with another extractor or resize."""
        try:
            z = np.load(path)
            saved = (str(z["extractor"]), int(z["resize"]))
            total, outer, count = z["features_sum"], z["features_cov_sum"], int(z["num_samples"])
        except (OSError, KeyError, ValueError) as e:
            raise ArragError(f"--real {path}: not an arrag FID statistics file ({e})") from None
        want = (extractor, -1 if resize is None else resize)
        if saved != want:
            raise ArragError(f"--real {path} was computed with extractor {saved[0]}, resize {saved[1]}; this run "
                             f"uses {want[0]}, resize {want[1]}")
        stats = cls(len(total), extractor, resize)
        stats.total, stats.outer, stats.count = total.astype(np.float64), outer.astype(np.float64), count
        return stats


def is_stats_file(path: str | Path) -> bool:
    """True when `path` holds FID statistics that arrag saved (--save-stats)."""
    try:
        with np.load(path) as z:
            return {"features_sum", "extractor", "num_samples"} <= set(z.files)
    except (OSError, ValueError, EOFError):
        return False


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2)."""
    mu_a, s_a = a.mean_cov()
    mu_b, s_b = b.mean_cov()
    eig = torch.linalg.eigvals(torch.from_numpy(s_a) @ torch.from_numpy(s_b))
    trace_sqrt = float(eig.sqrt().real.sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_sqrt)


def image_files(folder: str | Path) -> list[Path]:
    """Image files under `folder`, sorted: in a folder of `arrag generate --layout`, its sample files only (never
    the prompt grids of --prompt-grids); elsewhere every image, recursively."""
    from arrag.eval.layouts import layout_of

    folder = Path(folder)
    if not folder.is_dir():
        raise ArragError(f"{folder}: not a folder of images")
    layout = layout_of(folder)
    files = layout.sample_files() if layout is not None else \
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
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


def extractor_name(feature: nn.Module) -> str:
    """What made the features: pytorch-fid's Inception (relabelled when its weights are not pytorch-fid's)."""
    from arrag.eval.inception import FEATURES, FIDInception

    return getattr(feature, "label", FEATURES) if isinstance(feature, FIDInception) else \
        f"custom:{type(feature).__name__}"


@torch.no_grad()
def folder_stats(feature: nn.Module, folder: str | Path, *, resize: int | None = None, batch_size: int = 50,
                 device: str | torch.device = "cpu", progress: bool = True) -> FeatureStats:
    """Features of every image of `folder`, streamed in batches of one image size."""
    files = image_files(folder)
    stats = None
    batch: list[torch.Tensor] = []
    skipped: list[dict] = []

    def flush():
        nonlocal stats
        feats = feature(torch.stack(batch).to(device))
        if stats is None:
            stats = FeatureStats(feats.shape[1], extractor_name(feature), resize)
        stats.add(feats)
        batch.clear()

    for f in tqdm(files, desc=f"features {Path(folder).name}", unit="img", disable=not progress):
        try:
            image = load_uint8(f, resize)
        except ArragError as e:  # encode's policy: an unreadable image is skipped, counted and listed
            skipped.append({"file": str(f.relative_to(folder)), "reason": str(e)[:200]})
            continue
        if batch and (image.shape != batch[0].shape or len(batch) == batch_size):
            flush()
        batch.append(image)
    if batch:
        flush()
    if stats is None or stats.count < 2:
        raise ArragError(f"{folder}: FID needs at least 2 readable images; {len(skipped)} of {len(files)} could not be "
                         f"read ({skipped[0]['file']}: {skipped[0]['reason']})" if skipped else
                         f"{folder}: FID needs at least 2 images")
    if skipped:
        print(f"arrag: {folder}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['file']}",
              file=sys.stderr)
    stats.skipped = skipped
    return stats


def compute_fid(real: str | Path, fake: str | Path, *, feature: nn.Module | None = None,
                inception_weights: str | None = None, save_stats_to: str | Path | None = None,
                resize: int | None = None, batch_size: int = 50, device: str | torch.device = "cpu",
                progress: bool = True) -> dict:
    """FID between `real` (a folder or a saved .npz) and the `fake` folder. `feature` (a module mapping uint8
    images [B, 3, H, W] to features) replaces the FID Inception, e.g. for ShapesWorld's realism score."""
    if batch_size < 1:
        raise ArragError(f"--batch-size must be >= 1, got {batch_size}")
    if feature is None:
        from arrag.eval.inception import load_fid_inception

        feature = load_fid_inception(inception_weights, device)
    feature = feature.to(device).eval()
    real = Path(real)
    if real.is_file():
        real_stats = FeatureStats.load(real, extractor_name(feature), resize)
    else:
        real_stats = folder_stats(feature, real, resize=resize, batch_size=batch_size, device=device,
                                  progress=progress)
        if save_stats_to:
            real_stats.save(save_stats_to)
            print(f"arrag: reference statistics of {real_stats.count} images -> {save_stats_to}", file=sys.stderr)
    fake_stats = folder_stats(feature, fake, resize=resize, batch_size=batch_size, device=device, progress=progress)
    skipped = {"real": getattr(real_stats, "skipped", []), "fake": fake_stats.skipped}
    return {"fid": frechet_distance(real_stats, fake_stats), "real": str(real), "fake": str(fake),
            "num_real": real_stats.count, "num_fake": fake_stats.count, "extractor": extractor_name(feature),
            "resize": resize, "num_skipped": {k: len(v) for k, v in skipped.items()},
            "skipped": {k: v[:1000] for k, v in skipped.items()}}
