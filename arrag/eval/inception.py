"""The FID Inception-v3: the network of the TF FID code (graph 2015-12-05) as pytorch-fid ports it, no torchvision.

Loads pytorch-fid's weights file `pt_inception-2015-12-05-6726825d.pth` (torchvision's Inception key names:
Conv2d_1a_3x3.conv.weight, Mixed_5b.branch1x1.bn.running_mean, ..., fc.weight [1008, 2048]). The TF graph
differs from torchvision's Inception in its pooling, which pytorch-fid's FIDInception blocks reproduce and
so do the blocks here: average pools exclude the padding, and the last block max-pools.
Input: uint8 images [B, 3, H, W] (0..255), resized to 299x299 (bilinear, align_corners False), scaled to
[-1, 1]; output: the 2048 pool3 features [B, 2048], pytorch-fid's default FID features.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arrag.errors import ArragError, one_line

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
FEATURES = "pytorch-fid-inception-2015-12-05:pool3"
WEIGHTS_SHA256_PREFIX = "6726825d"  # pytorch-fid's file, named as torch hub names files: sha256's first 8 digits


class Conv(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU: torchvision's BasicConv2d names."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # the TF graph ignores the padding


class MixedA(nn.Module):  # Mixed_5b/5c/5d
    def __init__(self, cin: int, pool: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg(x))], 1)


class MixedB(nn.Module):  # Mixed_6a: grid reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class MixedC(nn.Module):  # Mixed_6b..6e: factorised 7x7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x))], 1)


class MixedD(nn.Module):  # Mixed_7a: grid reduction
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class MixedE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool, as the TF graph)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """uint8 images [B, 3, H, W] -> pool3 features float32 [B, 2048]."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = MixedA(192, 32), MixedA(256, 64), MixedA(288, 64)
        self.Mixed_6a = MixedB(288)
        self.Mixed_6b, self.Mixed_6c = MixedC(768, 128), MixedC(768, 160)
        self.Mixed_6d, self.Mixed_6e = MixedC(768, 160), MixedC(768, 192)
        self.Mixed_7a = MixedD(768)
        self.Mixed_7b, self.Mixed_7c = MixedE(1280, max_pool=False), MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; FID uses the pool3 features before it

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.fc.weight.dtype) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def weights_path(given: str | Path | None = None) -> Path:
    """The weights file: `given`, else the torch hub cache, else downloaded there (one-line error when offline)."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise ArragError(f"--inception-weights {path}: no such file; download {WEIGHTS_URL}")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if cached.is_file():
        return cached
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=False)
    except Exception as e:  # offline, proxy, ...
        cached.unlink(missing_ok=True)
        raise ArragError(f"the FID Inception weights are not cached and cannot be downloaded ({one_line(e, 120)}); "
                         f"download {WEIGHTS_URL} and pass --inception-weights PATH (or put it in "
                         f"{cached.parent})") from None
    return cached


def load_fid_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInception:
    """The FID network with pytorch-fid's weights, in eval mode."""
    from arrag.vq import load_state_strict
    from arrag.weight_files import load_pickled

    path = weights_path(weights)
    state = load_pickled(path, what="the Inception weights")
    model = FIDInception()
    for key in model.state_dict():  # files saved before batch norms counted their batches lack the counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0)
    load_state_strict(model, state, f"Inception weights {path} (expected pytorch-fid's {WEIGHTS_NAME})")
    digest = _sha256(path)
    model.label = FEATURES
    if not digest.startswith(WEIGHTS_SHA256_PREFIX):  # right keys, other numbers: not the FID people publish
        model.label = f"{FEATURES} with other weights (sha256 {digest[:16]})"
        warnings.warn(f"{path} is not pytorch-fid's {WEIGHTS_NAME} (sha256 {digest[:16]}..., expected "
                      f"{WEIGHTS_SHA256_PREFIX}...): these FID values are not comparable with published ones, and "
                      "the result is labelled so", stacklevel=2)
    return model.eval().to(device)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()
