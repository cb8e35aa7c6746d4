"""A real full disk for tests: a small tmpfs mounted in a private mount namespace (`unshare -m`), so nothing
outside the test's own subprocess sees it. Needs root or unprivileged user namespaces; skipped otherwise."""

import shlex
import shutil
import subprocess

import pytest


def run_on_small_disk(script: str, disk, size: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run bash `script` with a tmpfs of `size` (e.g. '64k') mounted on the folder `disk` ($DISK in the script);
    `remount SIZE` in the script gives it more room. The mount lives only as long as the script."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a private tmpfs")
    disk.mkdir(parents=True, exist_ok=True)
    mount = f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(disk))}"
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):  # root, else a user namespace
        probe = subprocess.run([*prefix, "bash", "-c", mount], capture_output=True, timeout=30)
        if probe.returncode == 0:
            break
    else:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()}")
    setup = (f"set -u; DISK={shlex.quote(str(disk))}; {mount}; "
             "remount() { mount -o remount,size=$1 \"$DISK\"; }; ")
    return subprocess.run([*prefix, "bash", "-c", setup + script], capture_output=True, text=True, timeout=timeout)
