"""Nothing is lost: arrag removes only what it wrote, temporaries are per process, interrupted builds resume."""

import errno
import json
import os

import numpy as np
import pytest
from killing import arrag_command, run_and_kill
from test_retrieval import make_store

from arrag import fileops
from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.errors import ArragError
from arrag.retrieval.retriever import PatchRetriever


def test_build_index_never_deletes_a_folder_it_did_not_make(tmp_path):
    make_store(tmp_path / "proj" / "codes")
    data = tmp_path / "proj" / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    with pytest.raises(ArragError, match="already exists and is not an arrag index \\(it holds notes.txt\\)"):
        build_index(tmp_path / "proj" / "codes", data, progress=False)
    with pytest.raises(ArragError, match="is not an arrag index"):
        build_index(tmp_path / "proj" / "codes", data, overwrite=True, progress=False)
    assert (data / "notes.txt").read_text() == "mine"
    # An index folder where the user also keeps a file: --overwrite still refuses to delete that file.
    build_index(tmp_path / "proj" / "codes", tmp_path / "idx", progress=False)
    (tmp_path / "idx" / "notes.txt").write_text("mine too")
    with pytest.raises(ArragError, match="holds files arrag did not write \\(notes.txt\\)"):
        build_index(tmp_path / "proj" / "codes", tmp_path / "idx", overwrite=True, progress=False)
    assert (tmp_path / "idx" / "notes.txt").exists() and (tmp_path / "idx" / "index.faiss").exists()
    # An empty folder is fine, and a folder of ours is replaced with --overwrite.
    (tmp_path / "empty").mkdir()
    build_index(tmp_path / "proj" / "codes", tmp_path / "empty", progress=False)
    m = build_index(tmp_path / "proj" / "codes", tmp_path / "empty", overwrite=True, factory="Flat", progress=False)
    assert json.loads((tmp_path / "empty" / "manifest.json").read_text())["factory"] == m["factory"] == "Flat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "idx", "proj"]  # no temporaries left


def test_build_index_refuses_an_out_that_is_or_holds_the_store(tmp_path):
    make_store(tmp_path / "proj" / "codes")
    before = sorted(p.name for p in (tmp_path / "proj" / "codes").iterdir())
    for out in (tmp_path / "proj" / "codes", tmp_path / "proj"):
        with pytest.raises(ArragError, match="is or contains the code store"):
            build_index(tmp_path / "proj" / "codes", out, overwrite=True, progress=False)
    assert main(["build-index", str(tmp_path / "proj" / "codes"), "--out", str(tmp_path / "proj"),
                 "--overwrite"]) == 2
    assert sorted(p.name for p in (tmp_path / "proj" / "codes").iterdir()) == before


def test_remove_owned_dir_and_stale_temporaries(tmp_path):
    folder = tmp_path / "f"
    (folder / "00001" / "samples").mkdir(parents=True)
    (folder / "00001" / "samples" / "0000.png").write_bytes(b"x")
    (folder / "settings.json").write_text("{}")
    owned = (r"settings\.json", r"\d{5}/samples/\d{4}\.png")
    (folder / "00001" / "keep.txt").write_text("user file")
    with pytest.raises(ArragError, match="holds files arrag did not write \\(00001/keep.txt\\)"):
        fileops.remove_owned_dir(folder, what="layout", owned=owned)
    assert (folder / "00001" / "keep.txt").exists()
    (folder / "00001" / "keep.txt").unlink()
    fileops.remove_owned_dir(folder, what="layout", owned=owned)
    assert not folder.exists()
    # A temporary of a process that is gone is swept; ours and other hosts' are not.
    dead = tmp_path / f"x.npy.{fileops.HOST}-999999999.tmp"
    mine = fileops.temp_path(tmp_path / "y.npy")
    other = tmp_path / "z.npy.otherhost-1.tmp"
    for p in (dead, mine, other):
        p.write_bytes(b"")
    assert fileops.sweep_stale_temps(tmp_path) == [dead]
    assert mine.exists() and other.exists()


def test_temporary_names_are_per_process_and_full_disk_is_one_line(tmp_path):
    assert str(os.getpid()) in fileops.temp_path(tmp_path / "a.png").name
    target = tmp_path / "a.bin"

    def fill(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ArragError, match="no space left on device while writing .*a.bin"):
        with fileops.atomic_path(target) as tmp:
            fill(tmp)
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary


def test_index_files_are_checked_on_load(tmp_path):
    make_store(tmp_path / "store")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    values = tmp_path / "idx" / "values.npy"
    raw = bytearray(values.read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte changed
    values.write_bytes(bytes(raw))
    with pytest.raises(ArragError, match="values.npy does not match the checksum"):
        PatchRetriever.load(tmp_path / "idx")
    PatchRetriever.load(tmp_path / "idx", verify=False)  # the size still agrees: the flag skips the hash
    values.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ArragError, match="was truncated or replaced"):
        PatchRetriever.load(tmp_path / "idx", verify=False)
    (tmp_path / "idx" / "manifest.json").write_text("{not json")
    with pytest.raises(ArragError, match="manifest.json is not valid JSON"):
        PatchRetriever.load(tmp_path / "idx")


def test_killed_build_index_resumes_to_identical_bytes(tmp_path):
    make_store(tmp_path / "store", n=3000, grid=8, shard_size=1000)
    build_index(tmp_path / "store", tmp_path / "ref", factory="IVF8,Flat", chunk_images=1, progress=False)
    out = tmp_path / "idx"
    cmd = arrag_command("build-index", tmp_path / "store", "--out", out, "--factory", "IVF8,Flat",
                        "--chunk-images", "1")
    killed = run_and_kill(cmd, lambda: any(p.name.startswith("idx.") for p in tmp_path.iterdir()))
    assert killed and not out.exists()
    assert main(["build-index", str(tmp_path / "store"), "--out", str(out), "--factory", "IVF8,Flat",
                 "--chunk-images", "1"]) == 0
    for name in ("index.faiss", "values.npy"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "ref", "store"]  # the killed run's temp swept
    assert np.array_equal(np.load(out / "values.npy"), np.load(tmp_path / "ref" / "values.npy"))


def _hammer(path, n):
    from arrag.image_io import save_image

    img = np.full((8, 8, 3), 7, np.uint8)
    for _ in range(n):
        save_image(img, path)


def test_two_processes_writing_one_path_do_not_race(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(tmp_path / "same.png", 150)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_dataloader_workers_die_with_a_killed_encode(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from arrag.image_io import save_image
    from arrag.vq import VQModel

    folder = tmp_path / "imgs"
    for i in range(400):
        save_image(np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8), folder / f"{i:04d}.png")
    VQModel("VQ-tiny-16").save(tmp_path / "vq.safetensors")
    p = subprocess.Popen([sys.executable, "-m", "arrag", "encode", str(folder), "--out", str(tmp_path / "store"),
                          "--vq", str(tmp_path / "vq.safetensors"), "--image-size", "64", "--workers", "2",
                          "--batch-size", "2", "--device", "cpu"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    parent = psutil.Process(p.pid)
    deadline = time.time() + 120
    while len(parent.children()) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    workers = parent.children()
    assert len(workers) >= 2, "the DataLoader workers never started"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers outlived their parent: {[w.pid for w in alive]}"
