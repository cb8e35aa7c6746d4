"""Streaming image sources for encode: webdataset tars, img2dataset parquet, streamed HF datasets; read errors fatal."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from arrag.build_retriever import encode as enc
from arrag.build_retriever.sources import FolderSource, TarSource, Unit
from arrag.demo.shapes import ShapesWorld
from arrag.errors import ArragError
from arrag.image_io import save_image
from arrag.retrieval.codestore import CodeStore

WORLD = ShapesWorld("train", size=64)
KW = dict(image_size=64, num_workers=0, progress=False, device="cpu")


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(WORLD.image(i)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path, first: int, n: int, extra: dict | None = None) -> None:
    """A webdataset shard of images first..first+n-1 (png + txt caption), plus `extra` {member name: bytes}."""
    with tarfile.open(path, "w") as tf:
        members = []
        for i in range(first, first + n):
            members += [(f"s{i:05d}.png", _png(i)), (f"s{i:05d}.txt", WORLD.scene(i).caption.encode())]
        members += list((extra or {}).items())
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_tars_stream_one_shard_each_and_bad_bytes_are_skipped(tmp_path, vq_file):
    write_tar(tmp_path / "a.tar", 0, 3, {"s00090.jpg": b"not a jpeg", "s00091.png": _png(91),
                                         "s00091.txt": b"\xff\xfe caption in latin-1 \xe9"})
    write_tar(tmp_path / "b.tar", 3, 2)
    res = enc.encode(str(tmp_path), tmp_path / "store", vq_file, **KW)
    assert res.complete and res.encoded == 6 and res.skipped == 1 and res.caption_undecodable == 1
    st = CodeStore.open(tmp_path / "store")
    assert [s["count"] for s in st.manifest["shards"]] == [4, 2]  # one code shard per tar
    caps = st.captions()
    assert caps[:3] == [WORLD.scene(i).caption for i in range(3)] and caps[3] is None  # image kept, caption lost
    assert caps[4:] == [WORLD.scene(i).caption for i in (3, 4)]
    assert st.manifest["skipped"][0]["id"] == "a.tar/s00090" and st.manifest["num_caption_undecodable"] == 1
    assert st.manifest["caption_undecodable"][0]["reason"].startswith("caption is not UTF-8")
    # a rerun resumes by tar: nothing is redone
    assert enc.encode(str(tmp_path), tmp_path / "store", vq_file, **KW).shards_written == []
    # two processes taking whole tars build the same store
    for r in range(2):
        enc.encode(str(tmp_path), tmp_path / "split", vq_file, shard=f"{r}/2", **KW)
    for k in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / "split" / f"codes-{k:05d}.npy"),
                                      np.load(tmp_path / "store" / f"codes-{k:05d}.npy"))


def test_a_folder_caption_that_is_not_utf8_keeps_its_image(tmp_path, vq_file):
    folder = tmp_path / "imgs"
    for i in range(3):
        save_image(WORLD.image(i), folder / f"{i}.png")
    (folder / "1.txt").write_bytes(b"caf\xe9 au lait")  # latin-1
    res = enc.encode(str(folder), tmp_path / "store", vq_file, **KW)
    assert res.encoded == 3 and res.skipped == 0 and res.caption_undecodable == 1
    st = CodeStore.open(tmp_path / "store")
    assert st.captions() == [None, None, None] and st.manifest["caption_undecodable"][0]["id"] == "1.png"


def test_listing_units_reads_no_image(tmp_path):
    tars = [tmp_path / f"{i:04d}.tar" for i in range(50)]
    for t in tars:
        t.write_bytes(b"")  # never opened while listing
    units = TarSource(tars).units()
    assert [u.index for u in units] == list(range(50)) and units[7].path == str(tars[7])


def test_an_error_reading_the_source_is_fatal_and_one_line(tmp_path, vq_file, capsys, monkeypatch):
    import errno

    from arrag.cli import main

    write_tar(tmp_path / "a.tar", 0, 2)
    real = tarfile.open

    def no_files_left(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(tarfile, "open", no_files_left)
    rc = main(["encode", str(tmp_path / "a.tar"), "--out", str(tmp_path / "store"), "--vq", str(vq_file),
               "--image-size", "64", "--workers", "0", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("arrag: error: cannot read") and "a.tar" in err and "Too many open files" in err
    assert not (tmp_path / "store" / "manifest.json").exists() and not list((tmp_path / "store").glob("codes-*"))
    monkeypatch.setattr(tarfile, "open", real)
    # A file that vanishes between listing and reading is fatal too, not an "unreadable image".
    imgs = tmp_path / "imgs"
    for i in range(2):
        save_image(WORLD.image(i), imgs / f"{i}.png")
    src = FolderSource(imgs, 4)
    (imgs / "1.png").unlink()
    with pytest.raises(ArragError, match=r"cannot read .*1\.png"):
        list(src.read(Unit(0, "all", 0, 2)))


def test_a_low_open_file_limit_loses_no_image(tmp_path, vq_file):
    """Under `ulimit -n 48`, 60 tars are encoded whole (one open tar at a time); at a limit too low to work the run
    stops with one line, having skipped nothing silently."""
    folder = tmp_path / "tars"
    folder.mkdir()
    for t in range(60):
        write_tar(folder / f"{t:04d}.tar", t, 1)
    script = (  # argv[1]: the limit, or +N for N more files than this process already holds
        "import os, resource, sys\n"
        "from arrag.cli import main\n"
        "import arrag.build_retriever.encode, arrag.vq, torch\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "n = sys.argv[1]\n"
        "n = len(os.listdir('/proc/self/fd')) + int(n[1:]) if n.startswith('+') else int(n)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))\n"
        "sys.exit(main(sys.argv[2:]))\n")
    args = ["encode", str(folder), "--vq", str(vq_file), "--image-size", "64", "--workers", "0", "--device", "cpu"]
    p = subprocess.run([sys.executable, "-c", script, "48", *args, "--out", str(tmp_path / "s48")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-1500:]
    st = CodeStore.open(tmp_path / "s48")
    assert st.num_images == 60 and st.manifest["num_skipped"] == 0
    p = subprocess.run([sys.executable, "-c", script, "+0", *args, "--out", str(tmp_path / "s8")],
                       capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode != 0 and last.startswith("arrag: error:"), p.stderr[-1500:]
    assert not (tmp_path / "s8" / "manifest.json").exists()


def test_parquet_files_as_img2dataset_writes_them(tmp_path, vq_file):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "pq"
    folder.mkdir()
    for f, ids in enumerate([[0, 1, 2], [3, 4]]):
        table = pa.table({"key": [f"{i:09d}" for i in ids], "jpg": [_png(i) for i in ids],
                          "txt": [WORLD.scene(i).caption for i in ids], "width": [64] * len(ids)})
        pq.write_table(table, folder / f"{f:05d}.parquet", row_group_size=2)
    res = enc.encode(str(folder), tmp_path / "store", vq_file, **KW)
    st = CodeStore.open(res.folder)
    assert st.num_images == 5 and [s["count"] for s in st.manifest["shards"]] == [3, 2]
    assert st.captions() == [WORLD.scene(i).caption for i in range(5)]
    assert st.manifest["source"]["type"] == "parquet" and st.manifest["source"]["caption_column"] == "txt"
    meta = json.loads((tmp_path / "store" / "shard-00001.json").read_text())
    assert meta["ids"] == ["000000003", "000000004"]


def test_a_streamed_hf_dataset_gives_each_rank_whole_data_shards(tmp_path, vq_file, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    files = []
    for f, ids in enumerate([[0, 1], [2, 3, 4], [5]]):
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.table({"image": [{"bytes": _png(i), "path": None} for i in ids],
                                 "caption": [WORLD.scene(i).caption for i in ids]}), path)
        files.append(str(path))

    real = datasets.load_dataset

    def local_stream(repo, split="train", streaming=False, **kw):  # the hub, offline: local files streamed
        assert streaming and repo == "someone/shapes"
        return real("parquet", data_files=files, split=split, streaming=True)

    monkeypatch.setattr(datasets, "load_dataset", local_stream)
    one = enc.encode("someone/shapes", tmp_path / "one", vq_file, **KW)
    st = CodeStore.open(one.folder)
    assert st.manifest["source"]["type"] == "hf_stream" and [s["count"] for s in st.manifest["shards"]] == [2, 3, 1]
    assert st.captions() == [WORLD.scene(i).caption for i in range(6)]
    for r in range(2):
        enc.encode("someone/shapes", tmp_path / "two", vq_file, shard=f"{r}/2", **KW)
    for k in range(3):
        np.testing.assert_array_equal(np.load(tmp_path / "two" / f"codes-{k:05d}.npy"),
                                      np.load(tmp_path / "one" / f"codes-{k:05d}.npy"))


def test_encode_measures_how_well_the_tokenizer_represents_the_images(tmp_path):
    """The demo tokenizer knows ShapesWorld, not an orange gradient: encode says so, and the manifest records it."""
    import warnings

    from arrag.demo.pipeline import ASSETS

    shapes, gradient = tmp_path / "shapes", tmp_path / "gradient"
    for i in range(4):
        save_image(WORLD.image(i), shapes / f"{i}.png")
        ramp = np.linspace(0, 1, 64)[None, :, None] * np.array([255, 140, 0])[None, None]
        save_image(np.broadcast_to(ramp, (64, 64, 3)).astype(np.uint8), gradient / f"{i}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        good = enc.encode(str(shapes), tmp_path / "s1", ASSETS / "base", **KW)
        poor = enc.encode(str(gradient), tmp_path / "s2", ASSETS / "base", **KW)
    assert len(good.round_trip_psnr) == 4 and np.mean(good.round_trip_psnr) > 20
    assert np.mean(poor.round_trip_psnr) < 20 and "round trip" in poor.summary()
    said = [str(w.message) for w in caught if "reconstructs these images poorly" in str(w.message)]
    assert len(said) == 1  # only for the gradient
    assert CodeStore.open(tmp_path / "s2").manifest["vq_round_trip"]["psnr_db"] < 20
    assert CodeStore.open(tmp_path / "s1").manifest["vq_round_trip"]["images"] == 4


def _write_parquet(path, ids, image_col="jpg"):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in ids], image_col: [_png(i) for i in ids],
                             "txt": [WORLD.scene(i).caption for i in ids]}), path)


def _one_line(capsys, *args) -> str:
    from arrag.cli import main

    rc = main([str(a) for a in args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("arrag: error")]
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_a_truncated_parquet_file_is_one_line_naming_it(tmp_path, vq_file, capsys):
    folder = tmp_path / "pq"
    folder.mkdir()
    _write_parquet(folder / "00000.parquet", [0, 1])
    _write_parquet(folder / "00001.parquet", [2, 3])
    for victim in ("00000.parquet", "00001.parquet"):  # the first (its schema is read first) and a later one
        data = (folder / victim).read_bytes()
        (folder / victim).write_bytes(data[: len(data) // 2])
        err = _one_line(capsys, "encode", folder, "--out", tmp_path / f"s_{victim}", "--vq", vq_file, "--image-size",
                        64, "--workers", 0, "--device", "cpu")
        assert f"cannot read {folder / victim}" in err and "Traceback" not in err, err
        _write_parquet(folder / victim, [0, 1] if victim.startswith("00000") else [2, 3])


def test_a_parquet_file_without_the_image_column_names_its_columns(tmp_path, vq_file, capsys):
    folder = tmp_path / "pq"
    folder.mkdir()
    _write_parquet(folder / "00000.parquet", [0, 1])
    _write_parquet(folder / "00001.parquet", [2, 3], image_col="png")
    err = _one_line(capsys, "encode", folder, "--out", tmp_path / "s", "--vq", vq_file, "--image-size", 64,
                    "--workers", 0, "--device", "cpu")
    assert f"{folder / '00001.parquet'} has no 'jpg' column (it has key, png, txt)" in err, err


@pytest.mark.parametrize("kind", ["tar", "parquet", "folder"])
def test_a_source_without_images_is_one_line_whatever_its_kind(tmp_path, vq_file, capsys, kind):
    folder = tmp_path / "src"
    folder.mkdir()
    if kind == "tar":
        write_tar(folder / "empty.tar", 0, 0)
    elif kind == "parquet":
        _write_parquet(folder / "empty.parquet", [])
    else:
        (folder / "broken.png").write_bytes(b"not an image")
    err = _one_line(capsys, "encode", folder, "--out", tmp_path / "s", "--vq", vq_file, "--image-size", 64,
                    "--workers", 0, "--device", "cpu")
    assert err.startswith(f"arrag: error: no images in {folder}"), err
    assert not (tmp_path / "s" / "manifest.json").exists() and not list((tmp_path / "s").glob("shard-*.json"))


def test_a_folder_of_several_source_kinds_is_refused_naming_them(tmp_path, vq_file, capsys):
    folder = tmp_path / "mixed"
    (folder / "pngs").mkdir(parents=True)
    for i in range(3):
        save_image(WORLD.image(i), folder / "pngs" / f"{i}.png")
    write_tar(folder / "a.tar", 3, 2)
    _write_parquet(folder / "b.parquet", [5, 6])
    err = _one_line(capsys, "encode", folder, "--out", tmp_path / "s", "--vq", vq_file, "--image-size", 64,
                    "--workers", 0, "--device", "cpu")
    assert f"{folder} holds 3 images and 1 .tar shards and 1 .parquet files" in err, err
    assert not (tmp_path / "s").exists()


def test_shard_under_a_launcher_is_refused(tmp_path, vq_file, monkeypatch, capsys):
    """torchrun's processes with --shard i/n would each take the same slice: refused before anything is written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    folder = tmp_path / "imgs"
    folder.mkdir()
    save_image(WORLD.image(0), folder / "0.png")
    err = _one_line(capsys, "encode", folder, "--out", tmp_path / "s", "--vq", vq_file, "--image-size", 64,
                    "--workers", 0, "--device", "cpu", "--shard", "0/2")
    assert "--shard 0/2 in one of 2 launched processes" in err and "job array" in err, err
    assert not (tmp_path / "s").exists()


def _three_kinds(root):
    """A folder of 3 PNGs (captions beside), a tar of 2 and a parquet file of 2: images 0..6 of WORLD."""
    (root / "pngs").mkdir(parents=True)
    for i in range(3):
        save_image(WORLD.image(i), root / "pngs" / f"{i}.png")
        (root / "pngs" / f"{i}.txt").write_text(WORLD.scene(i).caption)
    write_tar(root / "a.tar", 3, 2)
    _write_parquet(root / "b.parquet", [5, 6])
    return [str(root / "pngs"), str(root / "a.tar"), str(root / "b.parquet")]


def test_several_sources_go_into_one_store_in_order_and_resume_across_them(tmp_path, vq_file, monkeypatch):
    sources = _three_kinds(tmp_path / "src")
    kw = {**KW, "shard_size": 2}
    whole = enc.encode(sources, tmp_path / "whole", vq_file, **kw)
    st = CodeStore.open(whole.folder)
    assert st.num_images == 7 and st.captions() == [WORLD.scene(i).caption for i in range(7)]
    source = st.manifest["source"]
    assert source["type"] == "multi" and [d["type"] for d in source["sources"]] == ["folder", "webdataset", "parquet"]
    assert [d["images"] for d in source["sources"]] == [3, 2, 2]
    assert [d["units"] for d in source["sources"]] == [[0, 2], [2, 3], [3, 4]]  # the folder's 3 images: 2 units
    # interrupted after its second shard, then rerun: the same store, the finished shards kept
    real, calls = enc._flush, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(enc, "_flush", interrupted)
    with pytest.raises(KeyboardInterrupt):
        enc.encode(sources, tmp_path / "resumed", vq_file, **kw)
    monkeypatch.setattr(enc, "_flush", real)
    again = enc.encode(sources, tmp_path / "resumed", vq_file, **kw)
    assert len(again.shards_written) == 2 and again.complete
    for k in range(4):
        np.testing.assert_array_equal(np.load(tmp_path / "resumed" / f"codes-{k:05d}.npy"),
                                      np.load(tmp_path / "whole" / f"codes-{k:05d}.npy"))
    # two processes of a job array split the union of units and build the same store
    for r in range(2):
        enc.encode(sources, tmp_path / "split", vq_file, shard=f"{r}/2", **kw)
    assert CodeStore.open(tmp_path / "split").captions() == st.captions()


@pytest.fixture()
def http_folder(tmp_path):
    """A folder served over HTTP on 127.0.0.1 (a thread of this process) -> (folder, base URL)."""
    import functools
    import http.server
    import threading

    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_tars_over_http_and_pipe(tmp_path, vq_file, http_folder, capsys):
    folder, url = http_folder
    write_tar(folder / "shard-0.tar", 0, 2)
    write_tar(folder / "shard-1.tar", 2, 3)
    res = enc.encode([f"{url}/shard-{{0..1}}.tar", f"pipe:cat {folder / 'shard-0.tar'}"], tmp_path / "store",
                     vq_file, **KW)
    st = CodeStore.open(res.folder)
    assert st.num_images == 7 and [s["count"] for s in st.manifest["shards"]] == [2, 3, 2]
    assert st.captions() == [WORLD.scene(i).caption for i in (0, 1, 2, 3, 4, 0, 1)]
    assert st.manifest["source"]["sources"][0]["shards"] == [f"{url}/shard-0.tar", f"{url}/shard-1.tar"]
    # a URL that is not there, a pipe that fails: one line naming it, nothing half-written
    for bad in (f"{url}/missing.tar", f"pipe:cat {folder / 'missing.tar'}"):
        err = _one_line(capsys, "encode", bad, "--out", tmp_path / "bad", "--vq", vq_file, "--image-size", 64,
                        "--workers", 0, "--device", "cpu")
        assert f"cannot read {bad}" in err, err
        assert not list((tmp_path / "bad").glob("shard-*.json"))


def test_parquet_over_http(tmp_path, vq_file, http_folder):
    pytest.importorskip("aiohttp")  # fsspec's http file system (the data extra)
    folder, url = http_folder
    _write_parquet(folder / "p.parquet", [0, 1, 2])
    st = CodeStore.open(enc.encode(f"{url}/p.parquet", tmp_path / "store", vq_file, **KW).folder)
    assert st.num_images == 3 and st.captions() == [WORLD.scene(i).caption for i in range(3)]
