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


def _libc():
    """glibc's C library (None elsewhere: musl and other allocators lack malloc_trim and this behaviour)."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc's malloc_trim; a no-op elsewhere), for long CPU jobs whose
    memory must stay flat.

    glibc serves large blocks (model activations) with mmap and unmaps them when freed, but after the first such
    free it raises its mmap threshold to that block's size, so later blocks of the same size come from the heap
    arenas of whichever threads allocate them; freed, they stay in fragmented arenas that are never given back:
    `arrag encode` grew by ~0.4 MB an image in some runs. Trimming after each batch keeps the fast heap
    allocations and returns the freed pages (bench/encode_soak.py: flat after the first shard, ~1.1x the
    untrimmed time; fixing the mmap threshold instead was as flat but up to 3x slower)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def open_file_budget(reserve: int = 512) -> int:
    """How many files this process may keep open for random access: the open-file limit (its soft limit raised to
    the hard one first, once, as jobs over thousands of shards need) less `reserve` for everything else (sockets,
    pipes, the other readers and writers of the process). At least 16."""
    global _OPEN_FILE_BUDGET
    if _OPEN_FILE_BUDGET is None:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = min(hard if hard != resource.RLIM_INFINITY else 1 << 20, 1 << 20)
            if soft < want:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                    soft = want
                except (ValueError, OSError):  # not allowed here: live within the soft limit
                    pass
        except ImportError:  # Windows
            soft = 512
        _OPEN_FILE_BUDGET = max(16, soft - reserve)
    return _OPEN_FILE_BUDGET


_OPEN_FILE_BUDGET: int | None = None
