"""Where work runs: device and dtype choice, seeded generators, CPUs available, worker processes."""

from __future__ import annotations

import os
import sys

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


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> a torch dtype ('auto' = default_dtype(device))."""
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "auto":
        return default_dtype(device)
    if name not in table:
        raise ArragError(f"--dtype {name}: choose auto, fp32, bf16 or fp16")
    return table[name]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def kill_with_parent(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: on Linux, ask the kernel to SIGKILL this worker when its parent dies.

    Without it, workers of a SIGKILLed job (which cannot clean up) can live on, blocked on a full queue.
    """
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
HEAP_MMAP_THRESHOLD = 128 * 1024


def bound_heap_growth() -> bool:
    """Keep a long CPU job's memory flat (glibc only; True when applied).

    glibc serves large blocks (model activations) with mmap and unmaps them when freed, but after the first such
    free it raises its mmap threshold to that block's size, so later blocks of the same size come from the heap
    arenas of whichever threads allocate them. Those arenas fragment and are never given back: `arrag encode`
    grew by ~0.4 MB an image in some runs (0.35 to 1.7 GB peak over six identical runs). A fixed threshold keeps
    every large block on mmap, given back when freed (bench/encode_soak.py: flat after the first shard)."""
    if sys.platform != "linux":
        return False
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # musl and others: no mallopt, and no such behaviour to fix
        return False
