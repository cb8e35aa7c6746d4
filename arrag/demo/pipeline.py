"""`arrag demo`: the main job on the embedded default (ShapesWorld), as far as the pipeline exists today.

Today that is the tokenizer stage: train the tiny VQ on rendered ShapesWorld images, then measure how
well it reconstructs held-out validation images before and after training. Every printed number is
measured on the images of this run. Retrieval, DAiD and FAiD join here as they land.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from arrag.demo.shapes import ShapesWorld
from arrag.demo.train_demo import reconstruction_psnr, train_vq
from arrag.image_io import make_grid, save_image, to_tensor, to_uint8
from arrag.provenance import write_json, write_sidecar
from arrag.vq import VQModel


def run_demo(out_dir: str | Path = "result/demo", steps: int = 120, image_size: int = 64, batch: int = 8,
             n_eval: int = 16, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Train the demo VQ, score reconstructions on validation images, write a grid, scores and weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    val = ShapesWorld("validation", seed=seed, size=image_size).images(0, n_eval)

    torch.manual_seed(seed)
    untrained = VQModel("VQ-tiny-8").to(device).eval()
    psnr_before = reconstruction_psnr(untrained, val)
    print(f"[demo] tokenizer: training VQ-tiny-8 on ShapesWorld for {steps} steps at {image_size}px (seed {seed})")
    result = train_vq("VQ-tiny-8", image_size=image_size, steps=steps, batch=batch, seed=seed, device=device)
    psnr_after = reconstruction_psnr(result.model, val)

    with torch.no_grad():
        rec = to_uint8(result.model.decode_codes(result.model.encode_to_codes(to_tensor(val[:8]).to(device))))
    grid_path = save_image(make_grid(np.concatenate([val[:8], rec]), ncol=8), out / "vq_reconstruction.png")
    weights = out / "vq_tiny.safetensors"
    result.model.save(weights)
    scores = {
        "stage": "tokenizer",
        "vq_preset": "VQ-tiny-8",
        "image_size": image_size,
        "train_steps": steps,
        "train_seconds": round(result.seconds, 1),
        "first_loss": result.losses[0],
        "last_loss": result.losses[-1],
        "val_images": n_eval,
        "val_psnr_untrained_db": psnr_before,
        "val_psnr_trained_db": psnr_after,
        "codebook_usage": result.model.quantize.usage(),
        "fingerprint": result.model.fingerprint(),
    }
    write_json(out / "scores.json", scores)
    settings = dict(steps=steps, image_size=image_size, batch=batch, n_eval=n_eval, seed=seed, device=str(device))
    for path in (grid_path, weights):
        write_sidecar(path, settings)
    print(f"{'':24}{'untrained':>12}{'trained':>12}")
    print(f"{'val PSNR (dB)':24}{psnr_before:12.2f}{psnr_after:12.2f}")
    print(f"{'train loss (first/last)':24}{result.losses[0]:12.4f}{result.losses[-1]:12.4f}")
    print(f"[demo] wrote {grid_path} (top: originals, bottom: reconstructions), {weights}, {out / 'scores.json'}")
    print("[demo] retrieval, DAiD and FAiD are not built yet; see README.md for what exists.")
    return scores
