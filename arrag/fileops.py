"""Safe writes and the only code in arrag that deletes anything.

Writes: a file or folder is written under a temporary name unique to this host and process
(`NAME.<host>-<pid>.tmp`), then renamed into place, so readers never see a partial file and two
processes writing the same path never share a temporary. A full disk becomes one clear error, and
the temporary is removed, so it never passes for a result.

Removal: arrag removes only what it made itself: its own temporaries (live ones of this process, stale
ones whose process on this host is gone) and output folders whose every file matches what the tool that
owns the folder writes. A folder holding anything else is refused with a one-line error naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from arrag.errors import ArragError

HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
_TEMP_RE = re.compile(r"^(?P<name>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)\.tmp$")
# Temporaries of any arrag process (also matched when checking that a folder holds only our files).
TEMP_PATTERN = r"(.*/)?[^/]+\.[A-Za-z0-9_]+-\d+\.tmp(/.*)?"


def _default_file_mode() -> int:
    """0o666 less this process's umask: the mode an ordinary new file gets (0o644 under the usual umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _default_file_mode()

# Shell scripts set this to what their user types instead of `--overwrite` (e.g. "rerun with OVERWRITE=1").
OVERWRITE_HINT_ENV = "ARRAG_OVERWRITE_HINT"


def overwrite_hint() -> str:
    """How the user asks to replace an earlier output: "pass --overwrite", or the calling script's own words."""
    return os.environ.get(OVERWRITE_HINT_ENV, "").strip() or "pass --overwrite"


def temp_path(path: str | Path) -> Path:
    """The temporary name of `path` for this process: `NAME.<host>-<pid>.tmp` in the same folder."""
    path = Path(path)
    return path.with_name(f"{path.name}.{HOST}-{os.getpid()}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _free_space(path: str | Path | None) -> str:
    """' (N free on that file system)' for the nearest existing folder of `path`; '' when unknown."""
    if path is None:
        return ""
    where = Path(path)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return ""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f" ({free:,.0f} {unit} free on that file system)" if unit == "bytes" else \
                f" ({free:.1f} {unit} free on that file system)"
        free /= 1024
    return ""


def disk_full_message(path: str | Path | None, after: str = "") -> str:
    """The one line for a full disk: what was being written, how much is free, and `after` (what a rerun does)."""
    return (f"no space left on device while writing {path or 'an output file'}{_free_space(path)}; free some space "
            f"and rerun{after}")


class DiskFull(ArragError):
    """The disk filled up while writing `path` (the message promises what resumable jobs do; others say their own)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(disk_full_message(path, " (finished parts are kept and the rerun resumes)"))


def no_space_error(path: str | Path) -> DiskFull:
    return DiskFull(path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield this process's temporary name for `path`; rename it onto `path` when the block succeeds.

    On any failure the temporary is removed; a full disk becomes an ArragError naming `path`.
    The temporary may be a file or a folder (a folder replaces only a missing or empty `path`). A file gets the
    ordinary mode of a new file (writers such as safetensors create theirs private, 0o600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, FILE_MODE)
        if tmp.is_dir() and path.is_dir():
            path.rmdir()  # only an empty folder; anything else raises (use replace_owned_dir)
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise no_space_error(path) from None
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def sweep_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporaries in `folder` left by processes of this host that no longer run; return them."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP_RE.match(p.name)
        if m and m.group("host") == HOST and int(m.group("pid")) != os.getpid() \
                and not pid_alive(int(m.group("pid"))):
            _remove(p)
            removed.append(p)
    return removed


def foreign_files(folder: str | Path, owned: Sequence[str]) -> list[str]:
    """Paths under `folder` (relative, '/'-separated) that match none of the `owned` regexes."""
    folder = Path(folder)
    patterns = [re.compile(p) for p in (*owned, TEMP_PATTERN)]
    out = []
    for root, dirs, files in os.walk(folder):
        rel_root = Path(root).relative_to(folder).as_posix()
        for name in sorted(files) + sorted(d for d in dirs if Path(root, d).is_symlink()):
            rel = name if rel_root == "." else f"{rel_root}/{name}"
            if not any(p.fullmatch(rel) for p in patterns):
                out.append(rel)
    return sorted(out)


def check_out_dir(out: str | Path, *, what: str, is_ours: bool, flag: str = "--out") -> None:
    """Refuse an output folder arrag may not write into: a file, or a folder that holds anything while no record
    of the command writing it marks it as its own (`is_ours`). Missing and empty folders are fine."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ArragError(f"{flag} {out} is a file; pass a folder for the {what}")
    if is_ours or not foreign_files(out, ()):  # empty, or only temporaries of an arrag process starting there
        return
    shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
    raise ArragError(f"{flag} {out} already exists and is not an arrag {what} (it holds {shown}); "
                     "pass a new or empty folder")


def check_out_file(out: str | Path, *, what: str, is_ours: bool, flag: str = "--out",
                   inputs: Sequence[str | Path] = ()) -> None:
    """Refuse an output file that is one of the `inputs`, a folder, or an existing file no record of ours marks
    (`is_ours`: e.g. its sidecar names the command)."""
    out = Path(out)
    for source in inputs:
        if source is not None and Path(source).exists() and same_or_inside(out, source):
            raise ArragError(f"{flag} {out} is the input {source}; pass another {flag}")
    if out.is_dir():
        raise ArragError(f"{flag} {out} is a folder; pass a file name for the {what}")
    if out.exists() and not is_ours:
        raise ArragError(f"{flag} {out} already exists and arrag did not write it; pass another {flag} (or move the "
                         "file away)")


def check_replaceable(out: str | Path, *, what: str, is_ours: bool, owned: Sequence[str], overwrite: bool,
                      flag: str = "--out") -> None:
    """Refuse to write over `out` unless it is missing, empty, or (with overwrite) a folder of ours.

    `is_ours`: the folder's manifest says the tool made it. `owned`: regexes of every file it writes.
    Checked before any work starts, and again just before the old folder is replaced.
    """
    out = Path(out)
    check_out_dir(out, what=what, is_ours=is_ours, flag=flag)
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ArragError(f"{out} already holds an {what}; {overwrite_hint()} to replace it")
    foreign = foreign_files(out, owned)
    if foreign:
        raise ArragError(f"{out} holds files arrag did not write ({', '.join(foreign[:3])}); move them away or "
                         f"pass another {flag}")


def replace_owned_dir(tmp: str | Path, out: str | Path, *, what: str, is_ours: bool, owned: Sequence[str],
                      overwrite: bool, flag: str = "--out") -> None:
    """Move the finished folder `tmp` to `out`, removing the old `out` only under check_replaceable's rules."""
    tmp, out = Path(tmp), Path(out)
    check_replaceable(out, what=what, is_ours=is_ours, owned=owned, overwrite=overwrite, flag=flag)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = temp_path(out.with_name(out.name + ".old"))
    os.replace(out, old)  # the old folder keeps a temporary name until the new one is in place
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old)


def remove_files(paths: Sequence[str | Path]) -> None:
    """Delete these files (records a job of ours wrote and must not be trusted again); missing ones are fine."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def remove_owned_dir(folder: str | Path, *, what: str, owned: Sequence[str]) -> None:
    """Delete `folder` only when every file in it matches `owned`; otherwise refuse, naming a foreign file."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ArragError(f"{folder} should be a {what} folder but is a file; move it away")
    foreign = foreign_files(folder, owned)
    if foreign:
        raise ArragError(f"{folder} holds files arrag did not write ({', '.join(foreign[:3])}); it is not a "
                         f"{what} of ours: move it away or choose another folder")
    shutil.rmtree(folder)


def file_digest(path: str | Path, chunk: int = 8 << 20, on_bytes=None) -> dict:
    """{'bytes': size, 'blake2b': 32 hex digits} of a file (about 1 GB/s), for manifests to check on load;
    `on_bytes(n)` is told of each block read (a progress bar)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return {"bytes": Path(path).stat().st_size, "blake2b": h.hexdigest()}


def verify_file(path: str | Path, record: dict, hash_contents: bool = True, hint: str = "", on_bytes=None) -> None:
    """Refuse a file whose size (always) or hash (when `hash_contents`) differs from its manifest record."""
    path = Path(path)
    size = path.stat().st_size
    if size != record.get("bytes", size):
        raise ArragError(f"{path} has {size:,} bytes, its manifest recorded {record['bytes']:,}: the file was "
                         f"truncated or replaced{hint}")
    if hash_contents and "blake2b" in record and file_digest(path, on_bytes=on_bytes)["blake2b"] != record["blake2b"]:
        raise ArragError(f"{path} does not match the checksum in its manifest: the file was modified or "
                         f"damaged{hint}")


def same_or_inside(inner: str | Path, outer: str | Path) -> bool:
    """True when `inner` is `outer` or lies somewhere inside it (symlinks resolved)."""
    a, b = Path(inner).resolve(), Path(outer).resolve()
    return a == b or b in a.parents


class _PlainWriter:
    """A file's write() alone. NumPy writes a real file object with fwrite, whose short write on a full disk is an
    OSError without errno ('25600 requested and 10176 written'); through write() the OS's ENOSPC reaches
    atomic_path, which makes it the one-line DiskFull."""

    def __init__(self, f):
        self.write, self.name = f.write, f.name


def save_npy(path: str | Path, array) -> Path:
    """np.save under a temporary name, then rename: a reader never sees a partial .npy."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(_PlainWriter(f), array)  # numpy writes in 16 MiB blocks here
    return Path(path)
