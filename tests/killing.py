"""Kill a subprocess mid-run (SIGKILL, as an out-of-memory killer or a pulled plug would) for resume tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def arrag_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "arrag", *map(str, args)]


def run_and_kill(cmd: Sequence[str], when: Callable[[], bool], timeout: float = 120.0, env=None) -> bool:
    """Start `cmd`; SIGKILL it (and its children) as soon as `when()` is true. Returns True if it was killed,
    False if it finished first (the caller then knows the interruption was not exercised)."""
    p = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                         env={**os.environ, **(env or {})})
    t0 = time.time()
    try:
        while p.poll() is None:
            if when():
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return True
            if time.time() - t0 > timeout:
                raise TimeoutError(f"{cmd} neither finished nor reached the kill point in {timeout} s")
            time.sleep(0.005)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    assert p.returncode == 0, f"{cmd} failed before the kill point: {err[-2000:]}"
    return False
