"""What the sampling loop shows its plug-ins, and everything a plug-in (DAiD, FAiD) may do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DecodeState:
    """What a hook can see: the model, the grid, and the codes sampled so far ([N, h*w], -1 = not yet)."""

    model: Any
    grid: tuple[int, int]
    codes: torch.Tensor
    cond_rows: torch.Tensor  # Long [N]: the conditional row of each image in the 2N-row batch
    uniforms: torch.Tensor | None = None  # float64 [N, h*w]: each image's draw per step (what sampling uses)
    sampling: Any = None  # the SamplingConfig (its top-k / top-p filter the distribution after the hooks)
    image_indices: torch.Tensor | None = None  # Long [N]: each image's index in the whole run (its seed's key)

    @property
    def n_images(self) -> int:
        return self.codes.shape[0]


class DecodingHook:
    """Plug-in points of the loop. Every method is optional; the defaults do nothing.

    begin(state)                    once, before the prompt prefill
    before_forward(state, target)   before the forward pass whose last position predicts token `target`;
                                    may return a context for the decoder layers' hooks (FAiD's candidates),
                                    which the loop passes to that forward pass and no other
    adjust_probs(state, target, p)  p: fp32 [N, V] after CFG and temperature; return the distribution to sample
    end(state)                      once, after the last token (also when decoding fails)
    settings()                      the hook's settings, for the JSON sidecar
    stats                           counters of what it did during the run, for the JSON sidecar
    """

    stats: dict

    def __init__(self) -> None:
        self.stats = {}

    def begin(self, state: DecodeState) -> None:
        pass

    def before_forward(self, state: DecodeState, target: int) -> object | None:
        return None

    def adjust_probs(self, state: DecodeState, target: int, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def end(self, state: DecodeState) -> None:
        pass

    def settings(self) -> dict:
        return {}
