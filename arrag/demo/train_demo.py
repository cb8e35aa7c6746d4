"""Training of the ShapesWorld tiny models. So far: the VQ tokenizer (stage 1 of the demo recipe)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from arrag.demo.shapes import ShapesWorld
from arrag.image_io import to_tensor
from arrag.vq import VQModel


@dataclass
class VQTrainResult:
    model: VQModel
    losses: list[float]
    seconds: float


def reconstruction_psnr(model: VQModel, images: np.ndarray, batch: int = 16) -> float:
    """Mean PSNR (dB) of decode(encode(x)) against uint8 images [N, H, W, 3], on the [0, 255] scale."""
    from arrag.image_io import to_uint8

    model.eval()
    errs = []
    with torch.no_grad():
        for s in range(0, len(images), batch):
            x = to_tensor(images[s:s + batch]).to(model.device)
            rec = to_uint8(model.decode_codes(model.encode_to_codes(x))).astype(np.float64)
            errs.append(((rec - images[s:s + batch].astype(np.float64)) ** 2).reshape(len(rec), -1).mean(1))
    mse = np.concatenate(errs)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def train_vq(preset: str = "VQ-tiny-8", image_size: int = 64, steps: int = 100, batch: int = 8,
             lr: float = 2e-3, seed: int = 0, device: str | torch.device = "cpu",
             progress: bool = True) -> VQTrainResult:
    """Train a VQ-VAE on ShapesWorld training images: MSE reconstruction + codebook + commitment losses.

    Seeded: the same arguments give the same weights on the same machine and torch build.
    """
    torch.manual_seed(seed)
    model = VQModel(preset).to(device).train()
    world = ShapesWorld("train", seed=seed, size=image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses, t0 = [], time.time()
    bar = tqdm(range(steps), desc="train VQ", unit="step", disable=not progress)
    for step in bar:
        x = to_tensor(world.images(step * batch, batch)).to(device)
        out = model(x)
        loss = torch.nn.functional.mse_loss(out.reconstruction, x) + out.vq_loss + out.commit_loss + out.entropy_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", usage=f"{model.quantize.usage():.2f}")
    return VQTrainResult(model.eval(), losses, time.time() - t0)
