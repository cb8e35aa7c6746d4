"""A given beginning: each image's first codes come from a real image (image completion), the rest is sampled."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from arrag.decoding.hooks import DecodeState, DecodingHook
from arrag.errors import ArragError
from arrag.image_io import to_tensor


class GivenBeginning(DecodingHook):
    """Draws image i's first P codes as codes[i] (Long [M, P], e.g. the VQ codes of a real image's top rows, in
    raster order), whatever the model or retrieval propose; later codes are sampled as usual and see these in
    their context (DAiD's and FAiD's queries included). i is the image's index in the whole run
    (DecodeState.image_indices), so a resumed or split run completes the same beginnings. One row (M = 1) is
    every image's beginning."""

    def __init__(self, codes: torch.Tensor):
        super().__init__()
        if codes.ndim != 2 or codes.dtype not in (torch.int32, torch.int64) or (codes.numel() and codes.min() < 0):
            raise ArragError(f"a given beginning is a Long tensor [images, steps] of codes >= 0, got "
                             f"{codes.dtype} {tuple(codes.shape)}")
        self.codes = codes.long().cpu()
        self._mine: torch.Tensor | None = None
        self.stats = {"forced_steps": 0}

    def begin(self, state: DecodeState) -> None:
        n = state.n_images
        if len(self.codes) == 1:  # one beginning for every image
            index = torch.zeros(n, dtype=torch.long)
        else:
            index = state.image_indices if state.image_indices is not None else torch.arange(n)
        if len(index) and int(index.max()) >= len(self.codes):
            raise ArragError(f"no given beginning for image {int(index.max())}: {len(self.codes)} were given, one per "
                             "image of the run (prompt j, sample s is image j * samples + s)")
        if self.codes.shape[1] > state.codes.shape[1]:
            raise ArragError(f"a given beginning of {self.codes.shape[1]} codes is longer than the image's "
                             f"{state.codes.shape[1]}")
        self._mine = self.codes[index.cpu()].to(state.codes.device)

    def adjust_probs(self, state: DecodeState, target: int, probs: torch.Tensor) -> torch.Tensor:
        if self._mine is None or target >= self._mine.shape[1]:
            return probs
        if int(self._mine[:, target].max()) >= probs.shape[1]:
            raise ArragError(f"a given beginning holds code {int(self._mine[:, target].max())}, beyond the "
                             f"codebook's {probs.shape[1]}: were its codes made with this model's VQ?")
        self.stats["forced_steps"] += 1
        return torch.zeros_like(probs).scatter_(1, self._mine[:, target:target + 1], 1.0)

    def end(self, state: DecodeState) -> None:
        self._mine = None

    def settings(self) -> dict:
        digest = hashlib.sha256(self.codes.numpy().astype("<i8").tobytes()).hexdigest()
        return {"given_beginning": {"images": len(self.codes), "steps": self.codes.shape[1], "sha256": digest}}


def beginning_codes(vq, images: np.ndarray | None, rows: int, image_size: int, what: str = "a beginning image"
                    ) -> torch.Tensor:
    """The VQ codes of the top `rows` rows of the grid of one image (uint8 [H, W, 3], or RGBA / grey) or of
    several (uint8 [N, H, W, 3]): Long [N, rows * w] (N = 1 for one). Each is taken as RGB and resized (bicubic)
    to the generated size where it differs, then all are encoded in one batch."""
    side = vq.grid_size(image_size)
    if images is None:
        raise ArragError(f"{rows} rows given needs {what}; give one, or give 0 rows")
    if not 0 < rows <= side:
        raise ArragError(f"{rows} rows given: an image of {image_size} px has {side} rows of codes; give 1 to {side}")
    batch = np.asarray(images, dtype=np.uint8)
    if batch.ndim != 4 or batch.shape[1:] != (image_size, image_size, 3):
        pictures = [Image.fromarray(im).convert("RGB") for im in (batch if batch.ndim == 4 else [batch])]
        batch = np.stack([np.array(im if im.size == (image_size, image_size) else
                                   im.resize((image_size, image_size), Image.BICUBIC)) for im in pictures])
    weight = next(vq.parameters())
    with torch.no_grad():
        codes = vq.encode_to_codes(to_tensor(batch).to(weight.device, weight.dtype))
    return codes[:, :rows].reshape(len(batch), rows * side).cpu()
