"""A disk that fills up mid-run, for real (a small tmpfs): one line that says so, and a rerun that resumes."""

import json
import re
import shlex
import sys

from small_disk import run_on_small_disk

from arrag.demo.database import render_split
from arrag.demo.pipeline import ASSETS


def _cli(*args) -> str:
    """A shell command line running the CLI ($DISK left for the shell to expand)."""
    quote = lambda a: a if a.startswith("$DISK") else shlex.quote(a)  # noqa: E731
    return " ".join(quote(str(a)) for a in (sys.executable, "-m", "arrag", *args))


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("arrag: error") or "Traceback" in ln]
    assert len(lines) == 1, stderr
    return lines[0]


def test_encode_on_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path):
    images = render_split(tmp_path / "images", "database", 120, 64, 0)
    # 64 KiB: shard 0 (50 images, a 25 KB codes file) fits, the codes of shard 1 are cut off mid-write, which NumPy
    # reports without an errno ('25600 requested and 8128 written') when it writes a real file itself.
    encode = _cli("encode", images, "--out", "$DISK/store", "--vq", ASSETS / "base", "--image-size", 64,
                  "--shard-size", 50, "--workers", 0, "--device", "cpu")
    p = run_on_small_disk(f"{encode}; echo rc=$?; ls $DISK/store; remount 4m; {encode}; echo rc=$?; "
                          "cat $DISK/store/manifest.json", tmp_path / "disk", "64k")
    first, second = p.stdout.split("rc=", 2)[1:]
    assert first.startswith("2"), p.stderr
    err = _last_error(p.stderr)
    assert re.search(r"no space left on device while writing \S+/store/codes-00001\.npy \(.* free on that file "
                     r"system\); free some space and rerun \(finished parts are kept and the rerun resumes\)", err), err
    listing, rerun = first.split("encoded ", 1)
    assert "shard-00000.json" in listing and "shard-00001.json" not in listing and ".tmp" not in listing
    assert rerun.startswith("70 images")  # the rerun encoded only the shards that were missing
    assert second.startswith("0"), p.stderr
    manifest = json.loads(second.split("\n", 1)[1])
    assert manifest["num_images"] == 120 and len(manifest["shards"]) == 3


def test_generate_on_a_full_disk_is_one_line_before_any_image(tmp_path, tiny_janus_dir):
    gen = _cli("generate", "--model", tiny_janus_dir, "--prompt", "a red circle", "--image-size", 64, "--out",
               "$DISK/out", "--device", "cpu")
    p = run_on_small_disk(f"head -c 1M /dev/zero > $DISK/fill 2>/dev/null; {gen}", tmp_path / "disk", "64k")
    assert p.returncode == 2, p.stderr
    err = _last_error(p.stderr)
    assert re.fullmatch(r"arrag: error: no space left on device while writing \S+/out/\S+ \(0 bytes free on that "
                        r"file system\); free some space and rerun", err), err
