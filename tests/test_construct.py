"""FAiD training set: retrieved codes per position, exclude-self, resumption, errors."""

import json
import shutil

import numpy as np
import pytest

from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.errors import ArragError
from arrag.retrieval import codestore
from arrag.retrieval.neighborhood import grid_key_vectors, valid_mask
from arrag.retrieval.retriever import PatchRetriever
from arrag.train.construct import construct_train, load_retrieved


def _book(seed=0, k=400):
    book = np.random.default_rng(seed).normal(size=(k, 8)).astype(np.float32)
    return book / np.linalg.norm(book, axis=1, keepdims=True)


def _store(folder, n=12, seed=0, disjoint=False, shard_size=5):
    """Captioned store of 5x5 grids; with `disjoint`, image i only uses codes 10*i .. 10*i+9."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 10, (n, 5, 5)) + (10 * np.arange(n)[:, None, None] if disjoint else 0)
    codestore.write_store(folder, codes.astype(np.uint16), _book(), shard_size=shard_size,
                          captions=[f"image {i}" for i in range(n)])
    return codes


def test_matches_direct_retrieval_and_marks_invalid_positions(tmp_path):
    codes = _store(tmp_path / "store")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", retrieved_key_num=4, chunk_images=3, progress=False)
    st = codestore.CodeStore.open(tmp_path / "store")
    lazy = load_retrieved(tmp_path / "store", st, retrieved_key_num=4)
    got = np.asarray(lazy)
    assert lazy.shape == got.shape == (12, 25, 4) and got.dtype == np.int16
    np.testing.assert_array_equal(lazy[7], got[7])  # one image, read from its shard
    assert (got[:, ~valid_mask(5, 5).reshape(-1)] == -1).all()
    r = PatchRetriever.load(tmp_path / "idx")
    pos, keys = grid_key_vectors(codes[[7]], _book())
    _, direct = r.search(keys[0], 4)
    np.testing.assert_array_equal(got[7, pos], direct)


def test_exclude_self_drops_hits_from_the_same_image(tmp_path):
    _store(tmp_path / "store", disjoint=True)
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "with_self", retrieved_key_num=3, progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "no_self", retrieved_key_num=3, exclude_self=True,
                    progress=False)
    st = codestore.CodeStore.open(tmp_path / "store")
    own = lambda got: (got // 10 == np.arange(12)[:, None, None]) & (got >= 0)  # noqa: E731
    with_self = np.asarray(load_retrieved(tmp_path / "with_self", st))
    no_self = np.asarray(load_retrieved(tmp_path / "no_self", st))
    valid = valid_mask(5, 5).reshape(-1)
    assert own(with_self)[:, valid, 0].all()  # the exact self match is always the nearest
    assert not own(no_self).any() and (no_self[:, valid] >= 0).all()


def test_resumes_after_an_interruption(tmp_path):
    _store(tmp_path / "store")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", retrieved_key_num=2, progress=False)
    before = np.load(tmp_path / "store" / "retrieved-00001.npy")
    (tmp_path / "store" / "retrieved-00001.npy").unlink()  # as if killed while writing shard 1
    (tmp_path / "store" / "retrieved-00001.npy.tmp").write_bytes(b"partial")
    mtime = (tmp_path / "store" / "retrieved-00000.npy").stat().st_mtime_ns
    construct_train(tmp_path / "store", tmp_path / "idx", retrieved_key_num=2, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "store" / "retrieved-00001.npy"), before)
    assert (tmp_path / "store" / "retrieved-00000.npy").stat().st_mtime_ns == mtime  # finished shards kept
    with pytest.raises(ArragError, match="made with other settings \\(k differ\\)"):
        construct_train(tmp_path / "store", tmp_path / "idx", retrieved_key_num=3, progress=False)


def test_a_copied_store_keeps_its_retrieved_codes(tmp_path):
    # Retrieved codes inside their store travel with it (a copied or moved work folder resumes); codes kept in
    # another folder still name the store they came from.
    _store(tmp_path / "store")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", retrieved_key_num=2, progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", retrieved_key_num=2, out=tmp_path / "apart", progress=False)
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    mtime = (tmp_path / "copy" / "retrieved-00000.npy").stat().st_mtime_ns
    construct_train(tmp_path / "copy", tmp_path / "idx", retrieved_key_num=2, progress=False)
    assert (tmp_path / "copy" / "retrieved-00000.npy").stat().st_mtime_ns == mtime  # reused, not recomputed
    with pytest.raises(ArragError, match="other settings \\(k differ\\)"):
        construct_train(tmp_path / "copy", tmp_path / "idx", retrieved_key_num=3, progress=False)
    with pytest.raises(ArragError, match="other settings \\(store differ\\)"):
        construct_train(tmp_path / "copy", tmp_path / "idx", retrieved_key_num=2, out=tmp_path / "apart",
                        progress=False)


def test_bad_inputs_are_clear(tmp_path):
    codestore.write_store(tmp_path / "nocap", np.zeros((2, 5, 5), np.uint16), _book())
    build_index(tmp_path / "nocap", tmp_path / "idx_nocap", progress=False)
    with pytest.raises(ArragError, match="has no captions"):
        construct_train(tmp_path / "nocap", tmp_path / "idx_nocap")
    _store(tmp_path / "store")
    codestore.write_store(tmp_path / "other", np.zeros((2, 5, 5), np.uint16), _book(seed=5))
    build_index(tmp_path / "other", tmp_path / "idx_other", progress=False)
    with pytest.raises(ArragError, match="built with different tokenizers"):
        construct_train(tmp_path / "store", tmp_path / "idx_other")
    _store(tmp_path / "store2", seed=1)
    build_index(tmp_path / "store2", tmp_path / "idx2", progress=False)
    with pytest.raises(ArragError, match="--exclude-self needs the index built from this code store"):
        construct_train(tmp_path / "store", tmp_path / "idx2", exclude_self=True)
    st = codestore.CodeStore.open(tmp_path / "store")
    with pytest.raises(ArragError, match="run `arrag construct-train` first"):
        load_retrieved(tmp_path / "store", st)
    construct_train(tmp_path / "store", tmp_path / "idx2", retrieved_key_num=2, progress=False)
    with pytest.raises(ArragError, match="have K=2, asked for 10"):
        load_retrieved(tmp_path / "store", st, retrieved_key_num=10)
    meta = json.loads((tmp_path / "store" / "retrieved.json").read_text())
    assert meta["k"] == 2 and meta["exclude_self"] is False


def test_cli(tmp_path, capsys):
    _store(tmp_path / "store")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    assert main(["construct-train", str(tmp_path / "store"), "--retriever", str(tmp_path / "idx"), "--k", "3",
                 "--out", str(tmp_path / "ts")]) == 0
    assert (tmp_path / "ts" / "retrieved-00002.npy").exists() and "top-3" in capsys.readouterr().out


def test_a_failed_run_does_not_lock_and_the_advice_unlocks(tmp_path):
    _store(tmp_path / "store")
    build_index(tmp_path / "store", tmp_path / "idx", progress=False)
    with pytest.raises(ArragError, match="--chunk-images must be >= 1"):
        construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "out", chunk_images=0, progress=False)
    assert not (tmp_path / "out").exists()
    construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "out", retrieved_key_num=2, progress=False)
    with pytest.raises(ArragError, match="delete .*out/retrieved.json and .*out/retrieved-\\*.npy") as e:
        construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "out", retrieved_key_num=3, progress=False)
    assert "\n" not in str(e.value)
    for p in [tmp_path / "out" / "retrieved.json", *(tmp_path / "out").glob("retrieved-*.npy")]:
        p.unlink()  # exactly what the message says
    construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "out", retrieved_key_num=3, progress=False)


def test_relative_folders_work(tmp_path, monkeypatch):
    """Retrieved codes of a store given by a relative path load (they were once looked up at store/store/...)."""
    monkeypatch.chdir(tmp_path)
    _store(tmp_path / "data" / "store")
    build_index("data/store", "data/idx", progress=False)
    construct_train("data/store", "data/idx", retrieved_key_num=4, progress=False)
    got = load_retrieved("data/store", codestore.CodeStore.open("data/store"), retrieved_key_num=4)
    np.testing.assert_array_equal(got, load_retrieved(tmp_path / "data" / "store",
                                                      codestore.CodeStore.open(tmp_path / "data" / "store"), 4))
    assert main(["construct-train", "data/store", "--retriever", "data/idx", "--retrieved-key-num", "4",
                 "--out", "data/other"]) == 0
    assert load_retrieved("data/other", codestore.CodeStore.open("data/store"), 4).shape == got.shape


def test_two_processes_write_the_bytes_of_one(tmp_path):
    """Two processes started together (--shard 0/2 and 1/2, as a job array or torchrun gives them) each take whole
    store shards; the files are byte-identical to one process's."""
    import subprocess
    import sys

    _store(tmp_path / "store", n=23, shard_size=4)  # 6 store shards
    build_index(tmp_path / "store", tmp_path / "idx", factory="IVF4,Flat", progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "one", retrieved_key_num=5, progress=False)
    cmd = [sys.executable, "-m", "arrag", "construct-train", str(tmp_path / "store"), "--retriever",
           str(tmp_path / "idx"), "--out", str(tmp_path / "two"), "--k", "5"]
    runs = [subprocess.Popen([*cmd, "--shard", f"{r}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for r in range(2)]
    for r in runs:
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, err[-1500:]
    for s in range(6):
        name = f"retrieved-{s:05d}.npy"
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    st = codestore.CodeStore.open(tmp_path / "store")
    np.testing.assert_array_equal(np.asarray(load_retrieved(tmp_path / "two", st, 5)),
                                  np.asarray(load_retrieved(tmp_path / "one", st, 5)))
