"""Code store, index building, search, the original prebuilt layout, encode resumption and errors."""

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import warnings

import faiss
import numpy as np
import pytest
import torch

from arrag.build_retriever import encode as enc
from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.demo.shapes import ShapesWorld
from arrag.distributed import parse_shard
from arrag.errors import ArragError
from arrag.image_io import save_image
from arrag.retrieval import codestore
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.keys import sample_entry_keys
from arrag.retrieval.neighborhood import key_vectors, keys_for_grid
from arrag.retrieval.recall import recall_at_k
from arrag.retrieval.retriever import PatchRetriever
from arrag.vq import VQModel, codebook_fingerprint


def make_store(folder, n=30, grid=6, k=64, seed=0, shard_size=8):
    """A code store from random codes (skipping the encoder), with a random normalised codebook."""
    rng = np.random.default_rng(seed)
    book = rng.normal(size=(k, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, k, (n, grid, grid)).astype(np.uint16)
    store = codestore.write_store(folder, codes, book, shard_size=shard_size)
    assert len(store.manifest["shards"]) == -(-n // shard_size) and store.fingerprint == codebook_fingerprint(book)
    return codes, book


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of ShapesWorld images in two sub-folders, one caption file, one corrupt and one tiny image."""
    root = tmp_path_factory.mktemp("images")
    w = ShapesWorld("database", size=64)
    for i in range(12):
        save_image(w.image(i), root / f"{i % 2}" / f"{i:03d}.png")
    (root / "0" / "000.txt").write_text("a caption")
    (root / "1" / "corrupt.jpg").write_bytes(b"not a jpeg at all")
    save_image(np.zeros((20, 20, 3), np.uint8), root / "1" / "tiny.png")
    return root


def test_index_entries_values_and_exact_search(tmp_path):
    codes, book = make_store(tmp_path / "store")
    m = build_index(tmp_path / "store", tmp_path / "idx", factory="Flat", chunk_images=7, progress=False,
                    dedup=False)  # the full layout: entry e is image e // P at position e % P
    p = m["entries_per_image"]
    assert p == 5 * 4 and m["entries"] == 30 * p  # every entry, the last partial chunk included
    r = PatchRetriever.load(tmp_path / "idx")
    pos, nbr = keys_for_grid(codes, "L")
    all_keys = key_vectors(nbr, book).reshape(-1, 32)
    all_vals = codes.reshape(30, -1)[:, pos].reshape(-1)
    np.testing.assert_array_equal(np.load(tmp_path / "idx" / "values.npy"), all_vals)
    q = np.random.default_rng(5).normal(size=(9, 32)).astype(np.float32)
    dist, got = r.search(q, 7)
    brute = ((q[:, None, :] - all_keys[None]) ** 2).sum(-1)
    order = np.argsort(brute, axis=1, kind="stable")[:, :7]
    np.testing.assert_allclose(dist, np.take_along_axis(brute, order, 1), rtol=1e-4, atol=1e-4)
    for i in range(9):  # each returned code belongs to an entry at exactly the returned distance (ties aside)
        for j in range(7):
            assert ((np.abs(brute[i] - dist[i, j]) < 1e-4) & (all_vals == got[i, j])).any()
    # An exact index has recall 1.
    assert recall_at_k(r, CodeStore.open(tmp_path / "store"), all_keys[::37], k=5) == 1.0


def test_fewer_entries_than_k_pads_with_minus_one(tmp_path):
    make_store(tmp_path / "store", n=1, grid=3)  # 2 valid positions at 3x3
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    r = PatchRetriever.load(tmp_path / "idx")
    dist, codes = r.search(np.zeros((2, 32), np.float32), 5)
    assert (codes[:, 2:] == -1).all() and (codes[:, :2] >= 0).all()
    tdist, tcodes = r.search(torch.zeros(2, 32), 5)  # torch in, torch out
    assert isinstance(tcodes, torch.Tensor) and tcodes.dtype == torch.int64
    np.testing.assert_array_equal(tcodes.numpy(), codes)


def test_ivf_and_pq_builds_are_reproducible(tmp_path):
    make_store(tmp_path / "store", n=120, grid=8)
    m1 = build_index(tmp_path / "store", tmp_path / "a", factory="IVF16,Flat", seed=3, progress=False)
    build_index(tmp_path / "store", tmp_path / "b", factory="IVF16,Flat", seed=3, progress=False)
    assert m1["nlist"] == 16 and m1["entries"] == 120 * 42
    # nprobe tuned: the smallest power of two reaching recall 0.95 against all 16 lists.
    tuning = m1["nprobe_tuning"]
    assert m1["nprobe"] == tuning["nprobe"] and tuning["recall"] >= 0.95 and tuning["table"][-1][0] == m1["nprobe"]
    assert all(r < 0.95 for _, r in tuning["table"][:-1])
    r = PatchRetriever.load(tmp_path / "a")
    queries = sample_entry_keys(CodeStore.open(tmp_path / "store"), 200, 4)
    assert recall_at_k(r, CodeStore.open(tmp_path / "store"), queries, 10) >= 0.9  # an independent measurement
    assert (tmp_path / "a" / "index.faiss").read_bytes() == (tmp_path / "b" / "index.faiss").read_bytes()
    m3 = build_index(tmp_path / "store", tmp_path / "c", factory="IVF16,PQ8x4", progress=False)
    r = PatchRetriever.load(tmp_path / "c", nprobe=4)
    assert r.nprobe == 4 and r.entries == m3["entries"] and "IndexIVFPQ" in m3["index_type"]
    _, codes = r.search(np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32), 4)
    assert codes.shape == (3, 4) and (codes >= 0).all()


def test_auto_factory_choice_and_budget():
    from arrag.retrieval.index import choose_factory, parse_bytes

    assert choose_factory(50_000, 32, parse_bytes("1G"))[0] == "Flat"
    assert choose_factory(2_000_000, 32, parse_bytes("4G"))[0] == "IVF4096,Flat"
    assert choose_factory(2_000_000, 32, parse_bytes("100M"))[0] == "OPQ8,IVF4096,PQ8"  # over budget for Flat
    assert choose_factory(500_000_000, 32, parse_bytes("32G"))[0] == "OPQ8,IVF131072_HNSW32,PQ8"  # 2^17 lists
    assert choose_factory(20_000_000, 32, parse_bytes("16G"))[0].endswith(",Flat")  # the budget decides
    # Code keys (Janus-Pro's 16,384 x 8 codebook): over the IVF-Flat budget, exact CodePQ at 7 + 8 bytes an entry.
    assert choose_factory(2_000_000, 32, parse_bytes("100M"), (16384, 8))[0] == "IVF4096,CodePQ"
    assert choose_factory(2_000_000, 32, parse_bytes("4G"), (16384, 8))[0] == "IVF4096,Flat"
    with pytest.raises(ArragError, match="--memory-budget .* is too small"):
        choose_factory(500_000_000, 32, parse_bytes("1G"))
    with pytest.raises(ArragError, match="expected a size such as"):
        parse_bytes("lots")
    from arrag.retrieval.index import machine_memory  # the default, auto: what this machine has

    assert machine_memory() > 2**30 and parse_bytes("auto") == int(0.75 * machine_memory())


def test_original_prebuilt_layout_loads(tmp_path):
    rng = np.random.default_rng(0)
    xb = rng.normal(size=(3000, 32)).astype(np.float32)
    opq = faiss.OPQMatrix(32, 8)
    opq.niter = 4  # fewer OPQ iterations than the default 50: the layout matters here, not the quality
    index = faiss.IndexPreTransform(opq, faiss.IndexIVFPQ(faiss.IndexFlatL2(32), 32, 16, 8, 8))
    index.train(xb)
    index.add(xb)
    faiss.write_index(index, str(tmp_path / "faiss_ivf_pq_opq.index"))
    np.save(tmp_path / "next_codes.npy", rng.integers(0, 16384, 3000))
    with pytest.warns(UserWarning, match="original AR-RAG prebuilt database"):
        r = PatchRetriever.load(tmp_path)
    assert r.entries == 3000 and r.fingerprint is None and r.neighborhood.name == "L"
    assert r.nprobe == 1  # the nprobe stored in the file (FAISS's default), which the original really searched with
    with pytest.warns(UserWarning):
        assert PatchRetriever.load(tmp_path, nprobe=4).nprobe == 4
    _, codes = r.search(xb[:4], 3)
    assert (codes >= 0).all()
    vq = VQModel("VQ-tiny-16")
    with pytest.raises(ArragError, match="has no VQ fingerprint"):
        r.check_compatible(vq)
    r.check_compatible(vq, allow_unknown=True)
    # search-stats on it: no code store, so recall is measured against probing every list.
    with pytest.warns(UserWarning):
        assert main(["search-stats", str(tmp_path), "--queries", "40", "--json", str(tmp_path / "s.json")]) == 0
    sweep = json.loads((tmp_path / "s.json").read_text())["nprobe_sweep"]
    assert [row["nprobe"] for row in sweep] == [1, 4, 16] and sweep[-1]["recall_vs_all_lists"] == 1.0
    assert sweep[0]["recall_vs_all_lists"] < 1.0


def test_encode_folder_skips_bad_images_and_keeps_captions(tmp_path, images, vq_file):
    res = enc.encode(str(images), tmp_path / "store", vq_file, image_size=64, batch_size=5, shard_size=4, device="cpu",
                     num_workers=0, save_latents=True, progress=False)
    assert res.complete and res.encoded == 12 and res.skipped == 2
    st = CodeStore.open(tmp_path / "store")
    man = st.manifest
    assert st.num_images == 12 and st.grid == (4, 4) and man["num_skipped"] == 2
    reasons = {s["id"]: s["reason"] for s in man["skipped"]}
    assert reasons["1/corrupt.jpg"].startswith("unreadable") and reasons["1/tiny.png"].startswith("too small")
    codes = np.concatenate([c for _, c in st.iter_chunks(5)])
    assert codes.dtype == np.uint16 and codes.shape == (12, 4, 4)
    assert os.path.getsize(tmp_path / "store" / "codes-00000.npy") - 128 == 4 * 16 * 2  # 2 bytes per token
    from arrag.vq import load_vq

    vq = load_vq(vq_file)
    assert st.fingerprint == vq.fingerprint() and st.manifest["resize"] == "original"
    np.testing.assert_array_equal(st.codebook(), vq.quantize.codebook().detach().numpy())
    # Same codes as encoding the first image directly.
    from arrag.image_io import center_crop_arr, load_rgb, to_tensor

    first = to_tensor(center_crop_arr(load_rgb(images / "0" / "000.png"), 64))
    np.testing.assert_array_equal(codes[0], vq.encode_to_codes(first)[0].numpy())
    # Captions are kept per image: the one image with a .txt has it, the others are null (and counted).
    caps = st.captions()
    assert caps[0] == "a caption" and caps[1:] == [None] * 11 and st.manifest["num_without_caption"] == 11
    assert st.manifest["formats"] == {"png": 12} and st.manifest["skipped_by_reason"] == {"unreadable": 1,
                                                                                          "too small": 1}
    assert st.has_latents and st.gather(np.array([3, 0]), "latents").shape == (2, 4, 4, 8)


def test_interrupted_encode_resumes_to_identical_output(tmp_path, images, vq_file, monkeypatch):
    kw = dict(image_size=64, batch_size=3, shard_size=4, num_workers=0, progress=False, device="cpu")
    enc.encode(str(images), tmp_path / "clean", vq_file, **kw)
    real = codestore.write_shard
    calls = {"n": 0}

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process dies while writing shard 1
        return real(*a, **k)

    monkeypatch.setattr(codestore, "write_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        enc.encode(str(images), tmp_path / "resumed", vq_file, **kw)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    monkeypatch.setattr(codestore, "write_shard", real)
    res = enc.encode(str(images), tmp_path / "resumed", vq_file, **kw)
    assert res.complete and res.shards_written == [1, 2, 3]  # shard 0 was kept, not redone
    for name in sorted(os.listdir(tmp_path / "clean")):
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "clean" / name), np.load(tmp_path / "resumed" / name))
    a = json.loads((tmp_path / "clean" / "manifest.json").read_text())
    b = json.loads((tmp_path / "resumed" / "manifest.json").read_text())
    a.pop("created"), b.pop("created")
    assert a == b


def test_split_processes_build_the_same_store(tmp_path, images, vq_file):
    kw = dict(image_size=64, batch_size=4, shard_size=4, num_workers=0, progress=False, device="cpu")
    r0 = enc.encode(str(images), tmp_path / "split", vq_file, shard="0/2", **kw)
    assert not r0.complete and r0.shards_written == [0, 2]
    r1 = enc.encode(str(images), tmp_path / "split", vq_file, shard="1/2", **kw)
    assert r1.complete and r1.shards_written == [1, 3]
    enc.encode(str(images), tmp_path / "one", vq_file, **kw)
    for k in range(4):
        np.testing.assert_array_equal(np.load(tmp_path / "split" / f"codes-{k:05d}.npy"),
                                      np.load(tmp_path / "one" / f"codes-{k:05d}.npy"))
    with pytest.raises(ArragError, match="made with other settings \\(image_size"):
        enc.encode(str(images), tmp_path / "one", vq_file, **{**kw, "image_size": 32})


def test_webdataset_tar_source_with_captions(tmp_path, vq_file):
    tar_path = tmp_path / "shard-000.tar"
    w = ShapesWorld("train", size=64)
    with tarfile.open(tar_path, "w") as tf:
        for i in range(3):
            buf = io.BytesIO()
            from PIL import Image

            Image.fromarray(w.image(i)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("txt", w.scene(i).caption.encode())):
                info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    res = enc.encode(str(tmp_path / "shard-{000..000}.tar"), tmp_path / "store", vq_file, image_size=64,
                     num_workers=0, progress=False, device="cpu")
    st = CodeStore.open(res.folder)
    assert st.num_images == 3 and st.captions() == [w.scene(i).caption for i in range(3)]


def test_fingerprint_mismatch_is_refused(tmp_path, images, vq_file):
    enc.encode(str(images), tmp_path / "store", vq_file, image_size=64, num_workers=0, progress=False, device="cpu")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    r = PatchRetriever.load(tmp_path / "idx")
    from arrag.vq import load_vq

    r.check_compatible(load_vq(vq_file))
    torch.manual_seed(99)
    with pytest.raises(ArragError, match="built with another tokenizer"):
        r.check_compatible(VQModel("VQ-tiny-16"))


def test_bad_inputs_give_clear_errors(tmp_path, vq_file):
    with pytest.raises(ArragError, match="image source not found: nowhere"):
        enc.encode("nowhere", tmp_path / "s", vq_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArragError, match="no images \\(jpg, png, webp\\) under"):
        enc.encode(str(tmp_path / "empty"), tmp_path / "s", vq_file, num_workers=0)
    with pytest.raises(ArragError, match="--shard '3/2': expected i/n"):
        parse_shard("3/2")
    with pytest.raises(ArragError, match="no code store at .*manifest.json is missing"):
        build_index(tmp_path / "empty", tmp_path / "idx")
    make_store(tmp_path / "store")
    with pytest.raises(ArragError, match="--factory 'IVFzz' is not a valid FAISS factory string"):
        build_index(tmp_path / "store", tmp_path / "idx", factory="IVFzz", progress=False)
    with pytest.raises(ArragError, match="--key-source latent needs latents"):
        build_index(tmp_path / "store", tmp_path / "idx", key_source="latent", progress=False)
    for bad, message in ((dict(seed=-1), "--seed must be >= 0"), (dict(nprobe=0), "--nprobe must be >= 1"),
                         (dict(chunk_images=0), "--chunk-images must be >= 1")):
        with pytest.raises(ArragError, match=message):
            build_index(tmp_path / "store", tmp_path / "idx", progress=False, **bad)
    assert main(["search-stats", str(tmp_path / "nowhere"), "--seed", "-1"]) == 2
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    with pytest.raises(ArragError, match="already holds an index; pass --overwrite"):
        build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    r = PatchRetriever.load(tmp_path / "idx")
    with pytest.raises(ArragError, match="queries have dimension 16, the index expects 32"):
        r.search(np.zeros((1, 16), np.float32), 3)
    with pytest.raises(ArragError, match="retriever not found"):
        PatchRetriever.load(tmp_path / "nope")
    with pytest.raises(ArragError, match="holds no index"):
        PatchRetriever.load(tmp_path / "empty")
    from arrag.retrieval.index import has_gpu_faiss
    from arrag.retrieval.torch_search import TorchIndex

    if not torch.cuda.is_available():  # asking for a GPU that is not there is a one-line error
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ArragError, match="no GPU support|sees no GPU|cannot put the index .* on the GPU"):
                PatchRetriever.load(tmp_path / "idx", device="cuda:0")
    elif not has_gpu_faiss():  # CUDA without faiss-gpu: the torch backend serves the index there
        assert isinstance(PatchRetriever.load(tmp_path / "idx", device="cuda:0").index, TorchIndex)


def test_search_stats_cli(tmp_path, capsys):
    make_store(tmp_path / "store", n=40, grid=8)
    assert main(["build-index", str(tmp_path / "store"), "--out", str(tmp_path / "idx"), "--factory",
                 "IVF8,Flat"]) == 0
    assert main(["search-stats", str(tmp_path / "idx"), "--queries", "50", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    stats = json.loads((tmp_path / "s.json").read_text())
    assert "recall@10" in out and 0 < stats["recall@10"] <= 1 and stats["nprobe"] == 8
    assert set(stats["queries_per_s"]) == {"1", "16", "64"}
    sweep = stats["nprobe_sweep"]  # recall and speed at several nprobe values, exact at every list
    assert [row["nprobe"] for row in sweep] == [1, 4, 8] and sweep[-1]["recall"] == 1.0
    # List balance (FAISS's own imbalance factor) and the spread of codes in a top-10.
    index = faiss.read_index(str(tmp_path / "idx" / "index.faiss"))
    assert stats["imbalance_factor"] == pytest.approx(faiss.extract_index_ivf(index).invlists.imbalance_factor(),
                                                      rel=1e-3)
    assert 1 <= stats["distinct_codes@10"] <= 10 and stats["dedup_ratio"] >= 1
    assert stats["occurrences"] == 40 * 7 * 6 and "imbalance_factor" in out


def test_build_retriever_script(tmp_path, images, vq_file):
    env = {**os.environ, "VQ_CKPT": str(vq_file), "VQ_PRESET": "VQ-tiny-16", "STORE": str(tmp_path / "codes"),
           "INDEX": str(tmp_path / "index_L"), "IMAGE_SIZE": "64", "WORKERS": "0",
           "ARRAG": f"{sys.executable} -m arrag"}
    script = os.path.join(os.path.dirname(__file__), "..", "arrag", "build_retriever", "build_retriever.sh")
    p = subprocess.run(["bash", script, str(images)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "index_L" / "manifest.json").exists() and "recall@10" in p.stdout
    env["VQ_CKPT"] = str(tmp_path / "missing.pt")
    p = subprocess.run(["bash", script, str(images)], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and re.search("VQ checkpoint .*missing.pt: no such file or folder", p.stderr)
    # A model folder as VQ_CKPT, no preset and no size: the model decides (its VQ, its 64-px images).
    from arrag.demo.presets import make_tiny_janus

    make_tiny_janus(tmp_path / "model")
    env = {**env, "VQ_CKPT": str(tmp_path / "model"), "STORE": str(tmp_path / "codes2"),
           "INDEX": str(tmp_path / "index2")}
    del env["VQ_PRESET"], env["IMAGE_SIZE"]
    p = subprocess.run(["bash", script, str(images)], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "index2" / "manifest.json").read_text())["grid"] == [4, 4]


def test_build_retriever_script_on_two_machines_with_two_processes_each(tmp_path, images, vq_file):
    """Two copies of the script side by side (MACHINE_RANK 0 and 1 on one filesystem), each stage under torchrun
    with 2 processes a machine: encode split 4 ways, rank 0 trains the quantizer, 4 ranks exchange rows and add
    their parts, rank 0 merges into the index one process builds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VQ_CKPT": str(vq_file), "VQ_PRESET": "VQ-tiny-16", "STORE": str(tmp_path / "codes"),
           "INDEX": str(tmp_path / "index"), "IMAGE_SIZE": "64", "WORKERS": "0", "SHARD_SIZE": "3",
           "FACTORY": "Flat", "NUM_PROCS": "2", "NUM_MACHINES": "2", "MASTER_PORT": str(port), "DIST_TIMEOUT": "120",
           "PYTHONWARNINGS": "ignore", "ARRAG": f"{sys.executable} -m arrag",
           "TORCHRUN": f"{sys.executable} -m torch.distributed.run"}
    script = os.path.join(os.path.dirname(__file__), "..", "arrag", "build_retriever", "build_retriever.sh")
    procs = [subprocess.Popen(["bash", script, str(images)], env={**env, "MACHINE_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-4000:] for o in outs]
    assert "machine 0 merges" in outs[0][0] and "recall@10" in outs[1][0]
    assert not any(tmp_path.glob("*.sync"))  # no marker files: the processes meet in torch.distributed
    m = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert m["layout"] == "shards" and m["build"]["processes"] == 4 and m["dedup"]
    one = build_index(tmp_path / "codes", tmp_path / "one", factory="Flat", progress=False)
    assert (m["entries"], m["occurrences"]) == (one["entries"], one["occurrences"])
    q = np.random.default_rng(0).normal(size=(8, m["dim"])).astype(np.float32)
    np.testing.assert_array_equal(PatchRetriever.load(tmp_path / "index").search(q, 5)[0],
                                  PatchRetriever.load(tmp_path / "one").search(q, 5)[0])
    p = subprocess.run(["bash", script, str(images)], env={**env, "MACHINE_RANK": "2"}, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "MACHINE_RANK 2 must be below NUM_MACHINES 2" in p.stderr


def test_sample_queries_are_seeded(tmp_path):
    make_store(tmp_path / "store", n=10)
    st = CodeStore.open(tmp_path / "store")
    np.testing.assert_array_equal(sample_entry_keys(st, 20, 1), sample_entry_keys(st, 20, 1))
    assert not np.array_equal(sample_entry_keys(st, 20, 1), sample_entry_keys(st, 20, 2))


def test_saved_hf_dataset_source(tmp_path, vq_file):
    datasets = pytest.importorskip("datasets")  # the 'data' extra; CI installs only 'dev'
    from PIL import Image

    w = ShapesWorld("train", size=64)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(w.image(i)) for i in range(4)],
                                     "caption": [w.scene(i).caption for i in range(4)]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    res = enc.encode(str(tmp_path / "hf"), tmp_path / "store", vq_file, image_size=64, num_workers=0,
                     progress=False)
    st = CodeStore.open(res.folder)
    assert st.num_images == 4 and st.captions() == [w.scene(i).caption for i in range(4)]
    assert st.manifest["source"]["type"] == "hf_disk" and st.manifest["source"]["caption_column"] == "caption"


def test_every_side_file_is_checked_against_the_codes(tmp_path):
    codes, book = make_store(tmp_path / "store", n=10, shard_size=4)
    codestore.write_store(tmp_path / "cap", codes, book, shard_size=4, captions=[f"c{i}" for i in range(10)])
    cap = tmp_path / "cap" / "captions-00001.jsonl"
    cap.write_text("".join(cap.read_text().splitlines(keepends=True)[:-1]))  # one caption short
    with pytest.raises(ArragError, match="captions-00001.jsonl holds 3 captions, its shard has 4 images"):
        CodeStore.open(tmp_path / "cap").captions()
    st = CodeStore.open(tmp_path / "store")
    np.save(tmp_path / "store" / "codes-00001.npy", codes[4:7])  # a shard file shorter than its metadata
    with pytest.raises(ArragError, match="codes-00001.npy holds 3 images, its shard has 4"):
        st.gather(np.arange(10))
    np.save(tmp_path / "store" / "codes-00001.npy", codes[4:8])
    raw = (tmp_path / "store" / "codes-00002.npy").read_bytes()
    (tmp_path / "store" / "codes-00002.npy").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ArragError, match="codes-00002.npy .*truncated or damaged"):
        list(st.iter_chunks(4))
    (tmp_path / "store" / "codes-00000.npy").unlink()
    with pytest.raises(ArragError, match="codes-00000.npy is missing; rerun `arrag encode`"):
        list(st.iter_chunks(4))
    (tmp_path / "store" / "manifest.json").write_text("{oops")
    with pytest.raises(ArragError, match="manifest.json is not valid JSON"):
        CodeStore.open(tmp_path / "store")


def test_rerunning_encode_repairs_a_damaged_store(tmp_path, images, vq_file):
    kw = dict(image_size=64, batch_size=4, shard_size=4, num_workers=0, progress=False, device="cpu")
    enc.encode(str(images), tmp_path / "store", vq_file, **kw)
    before = (tmp_path / "store" / "codes-00001.npy").read_bytes()
    (tmp_path / "store" / "codes-00001.npy").unlink()  # shard-00001.json still says the shard is done
    (tmp_path / "store" / "codes-00002.npy").write_bytes(b"\x93NUMPY")  # truncated
    res = enc.encode(str(images), tmp_path / "store", vq_file, **kw)
    assert res.complete and res.shards_written == [1, 2]
    assert (tmp_path / "store" / "codes-00001.npy").read_bytes() == before
    assert sum(len(c) for _, c in CodeStore.open(tmp_path / "store").iter_chunks(100)) == 12


def test_encode_reads_16_bit_images_and_refuses_absurd_ones(tmp_path, vq_file):
    from PIL import Image

    w = ShapesWorld("database", size=64)
    folder = tmp_path / "imgs"
    folder.mkdir()
    eight = w.image(0)
    save_image(eight, folder / "a_8bit.png")
    grey16 = (eight.mean(2).round().astype(np.uint16) * 257)  # the same picture in 16-bit greyscale
    Image.fromarray(grey16).save(folder / "b_16bit.png")
    save_image(np.repeat(eight.mean(2, keepdims=True).round().astype(np.uint8), 3, 2), folder / "c_grey.png")
    Image.fromarray(np.zeros((20, 2000), np.uint8)).save(folder / "d_strip.png")  # a 100:1 strip
    res = enc.encode(str(folder), tmp_path / "store", vq_file, image_size=64, num_workers=0, progress=False,
                     device="cpu", min_size=8)
    st = CodeStore.open(tmp_path / "store")
    assert res.encoded == 3 and res.skipped == 1
    assert st.manifest["skipped"][0]["reason"].startswith("refused: aspect ratio 100:1")
    codes = st.gather(np.arange(3))
    np.testing.assert_array_equal(codes[1], codes[2])  # 16-bit grey == 8-bit grey, not an all-white image


def test_a_full_disk_during_encode_is_one_line_and_leaves_no_temporary(tmp_path, images, vq_file, monkeypatch):
    import errno

    real_save = np.save

    def full(f, arr, *a, **k):  # the disk fills up when the first shard is written
        if "codes-" in str(getattr(f, "name", f)):
            f.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(ArragError, match="no space left on device while writing .*codes-00000.npy"):
        enc.encode(str(images), tmp_path / "store", vq_file, image_size=64, num_workers=0, progress=False,
                   device="cpu")
    assert not [p for p in (tmp_path / "store").iterdir() if ".tmp" in p.name]
    assert not list((tmp_path / "store").glob("codes-*")) and not list((tmp_path / "store").glob("shard-*"))


def test_a_failed_encode_does_not_lock_its_folder(tmp_path, images, vq_file):
    with pytest.raises(ArragError, match="--batch-size must be >= 1"):
        enc.encode(str(images), tmp_path / "store", vq_file, image_size=64, batch_size=0)
    assert not (tmp_path / "store").exists()
    enc.encode(str(images), tmp_path / "store", vq_file, image_size=64, num_workers=0, progress=False, device="cpu")


def test_encode_takes_the_tokenizers_size_and_warns_about_another(tmp_path, images, vq_file):
    kw = dict(num_workers=0, progress=False, device="cpu")
    assert enc.encode(str(images), tmp_path / "a", vq_file, **kw).complete  # the tiny VQ-16's 64 px
    assert CodeStore.open(tmp_path / "a").grid == (4, 4)
    with pytest.warns(UserWarning, match="--image-size 96 differs from the 64 px"):
        enc.encode(str(images), tmp_path / "b", vq_file, image_size=96, **kw)


def _original_layout(folder, nlist=32, n=4000, seed=0):
    """An index as the original build_index_L.py writes one: OPQ8 + IVF + PQ8, nprobe left at FAISS's default."""
    rng = np.random.default_rng(seed)
    xb = rng.normal(size=(n, 32)).astype(np.float32)
    opq = faiss.OPQMatrix(32, 8)
    opq.niter = 4
    index = faiss.IndexPreTransform(opq, faiss.IndexIVFPQ(faiss.IndexFlatL2(32), 32, nlist, 8, 8))
    index.train(xb)
    index.add(xb)
    folder.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(folder / "faiss_ivf_pq_opq.index"))
    np.save(folder / "next_codes.npy", rng.integers(0, 16384, n))
    return xb, index


def test_the_original_database_is_searched_at_the_nprobe_stored_in_its_file(tmp_path, capsys):
    xb, index = _original_layout(tmp_path)
    assert faiss.extract_index_ivf(index).nprobe == 1
    queries = xb[:50] + 0.3 * np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    want_d, want_i = index.search(queries, 5)  # what the original's search returned
    next_codes = np.load(tmp_path / "next_codes.npy")
    with pytest.warns(UserWarning):
        r = PatchRetriever.load(tmp_path)
    assert "searching 1 of its 32 lists, the nprobe stored in its index file" in capsys.readouterr().err
    d, codes = r.search(queries, 5)
    assert (want_i >= 0).all()
    np.testing.assert_array_equal(codes, next_codes[want_i])
    np.testing.assert_allclose(d, want_d, rtol=1e-6)
    # construct-train on it defaults the same way: it loads through PatchRetriever with no --nprobe.
    assert r.manifest["nprobe"] == 1


def test_nprobe_on_a_wrapped_index_reaches_the_ivf_inside(tmp_path):
    """The original set nprobe on the OPQ wrapper, a no-op; arrag's setting must change what is searched."""
    from arrag.retrieval.index import set_nprobe

    xb, index = _original_layout(tmp_path)
    queries = xb[:50] + 0.3 * np.random.default_rng(1).normal(size=(50, 32)).astype(np.float32)
    narrow = index.search(queries, 10)[1]
    try:  # the original's line: under faiss 1.8 (arrag.yml) a Python attribute on the wrapper that FAISS never reads
        index.nprobe = 32
    except AttributeError:  # newer FAISS refuses the assignment outright
        pass
    assert faiss.extract_index_ivf(index).nprobe == 1 and np.array_equal(index.search(queries, 10)[1], narrow)
    assert set_nprobe(index, 32) == 32 and faiss.extract_index_ivf(index).nprobe == 32
    wide = index.search(queries, 10)[1]
    assert not np.array_equal(wide, narrow)
    with pytest.warns(UserWarning):
        r = PatchRetriever.load(tmp_path, nprobe=32)
    np.testing.assert_array_equal(r.search(queries, 10)[1], np.load(tmp_path / "next_codes.npy")[wide])


def test_entry_keys_build_only_the_picked_entries_and_equal_the_full_build(tmp_path, monkeypatch, images, vq_file):
    """The quantizer's sample reads its images' grids and builds only the picked entries (chunk by chunk), with
    the same keys as building every entry of every image."""
    from arrag.retrieval import keys as keys_mod
    from arrag.retrieval.keys import entry_keys, grid_entries, sample_distinct_rows

    enc.encode(str(images), tmp_path / "store", vq_file, image_size=64, num_workers=0, progress=False,
               device="cpu", save_latents=True, shard_size=5)
    st = CodeStore.open(tmp_path / "store")
    monkeypatch.setattr(keys_mod, "ENTRY_CHUNK", 7)  # several chunks on tiny data
    ids = np.array([5, 0, 23, 23, 11, 3, 30, 29, 1])  # any order, with a repeat
    for source in ("code", "latent"):
        lat = st.gather(np.arange(st.num_images), "latents") if source == "latent" else None
        full = grid_entries(st.gather(np.arange(st.num_images)), lat, "L", st.codebook(), source)[0]
        np.testing.assert_array_equal(entry_keys(st, ids, "L", source), full[ids])
    rows, share = sample_distinct_rows(st, 10, 0)
    assert rows.shape[1] == 5 and 0 < share <= 1 and len(np.unique(rows, axis=0)) == len(rows)


def test_verify_index_finds_a_flipped_byte_that_a_large_index_load_checks_only_by_size(tmp_path, capsys):
    make_store(tmp_path / "store", n=40)
    build_index(tmp_path / "store", tmp_path / "idx", factory="IVF4,Flat", progress=False)
    assert main(["verify-index", str(tmp_path / "idx")]) == 0
    assert "intact" in capsys.readouterr().out
    path = tmp_path / "idx" / "index.faiss"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit in the inverted lists: same size
    path.write_bytes(bytes(raw))
    with pytest.raises(ArragError, match="does not match the checksum"):
        PatchRetriever.load(tmp_path / "idx")  # small: hashed on load
    PatchRetriever.load(tmp_path / "idx", verify=100)  # over the hash limit: sizes only, as a 100 GB index
    assert main(["verify-index", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "index.faiss does not match the checksum" in err
    path.write_bytes(bytes(raw[:-10]))  # truncated: caught by its size on every load
    with pytest.raises(ArragError, match="truncated or replaced"):
        PatchRetriever.load(tmp_path / "idx", verify=100)
