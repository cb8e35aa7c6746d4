"""Where work runs: device and dtype choice, and seeded generators."""

from __future__ import annotations

import torch

from arrag.errors import ArragError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; an unavailable cuda request is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArragError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as Janus-Pro runs), fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `seed`: every random choice in arrag takes one of these."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
