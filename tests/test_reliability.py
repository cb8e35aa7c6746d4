"""Careless and hostile inputs: a store's codebook always matches its codes, arrag writes only where it may, numbers
are finite and in range, and every bad input is one line before any model loads."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from arrag.build_retriever import encode as enc
from arrag.build_retriever.build_index import build_index
from arrag.demo.shapes import ShapesWorld
from arrag.errors import ArragError
from arrag.image_io import save_image
from arrag.retrieval import codestore
from arrag.retrieval.codestore import CodeStore
from arrag.retrieval.neighborhood import key_vectors, keys_for_grid
from arrag.retrieval.retriever import PatchRetriever
from arrag.vq import VQModel


def run_cli(*args, cwd):
    p = subprocess.run([sys.executable, "-m", "arrag", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    return p.returncode, p.stderr.strip()


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("arrag: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    w = ShapesWorld("database", size=64)
    for i in range(6):
        save_image(w.image(i), root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def two_vqs(tmp_path_factory):
    """Two tiny tokenizers with different codebooks (A and B)."""
    folder = tmp_path_factory.mktemp("vqs")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(folder / f"vq{seed}.safetensors")
        VQModel("VQ-tiny-16").save(paths[-1])
    return paths


KW = dict(image_size=64, batch_size=4, shard_size=4, num_workers=0, progress=False, device="cpu")


# -- 2. a store whose codebook does not match its codes -------------------------------------------------------


def test_an_interrupted_encode_then_another_vq_gets_that_vqs_codebook(tmp_path, images, two_vqs, monkeypatch):
    from arrag.vq import load_vq

    a, b = two_vqs
    out = tmp_path / "store"

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(enc, "_flush", interrupted)
        with pytest.raises(KeyboardInterrupt):
            enc.encode(str(images), out, a, **KW)
    assert (out / "codebook.npy").is_file() and not list(out.glob("shard-*.json"))
    enc.encode(str(images), out, b, **KW)
    store = CodeStore.open(out)
    vq_b = load_vq(b)
    with torch.no_grad():
        book_b = vq_b.quantize.codebook().numpy()
    np.testing.assert_array_equal(store.codebook(), book_b)
    assert store.manifest["codebook_sha256"] == codestore.codebook_hash(store.codebook())
    # ... so queries made with B's codebook (as generation makes them) find the stored keys exactly.
    m = build_index(out, tmp_path / "idx", factory="Flat", progress=False, dedup=False)
    assert vq_b.matches(m["vq_fingerprint"])
    pos, nbr = keys_for_grid(store.gather(np.arange(store.num_images)), "L")
    queries = key_vectors(nbr, book_b).reshape(-1, 32)
    dist, _ = PatchRetriever.load(tmp_path / "idx").search(queries, 1)
    assert float(dist.max()) < 1e-5


def test_a_codebook_that_is_not_the_stores_is_refused(tmp_path, images, two_vqs):
    a, b = two_vqs
    enc.encode(str(images), tmp_path / "a", a, **KW)
    enc.encode(str(images), tmp_path / "b", b, **KW)
    (tmp_path / "a" / "codebook.npy").write_bytes((tmp_path / "b" / "codebook.npy").read_bytes())
    with pytest.raises(ArragError, match="not the codebook the store's codes were encoded with") as e:
        CodeStore.open(tmp_path / "a")
    assert "\n" not in str(e.value)
    one_line_error(*run_cli("build-index", tmp_path / "a", "--out", tmp_path / "idx", cwd=tmp_path),
                   "codebook.npy is not the codebook")
    # Encoding into a folder of shards made with another codebook is refused (the settings differ too).
    with pytest.raises(ArragError):
        enc.encode(str(images), tmp_path / "b", a, **KW)


def test_damaged_codebooks_and_foreign_codes_are_one_line(tmp_path):
    rng = np.random.default_rng(0)
    book = rng.normal(size=(16, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, 16, (5, 4, 4)).astype(np.uint16)
    with pytest.raises(ArragError, match="rows 3 hold NaN or inf"):
        bad = book.copy()
        bad[3, 1] = np.nan
        codestore.write_store(tmp_path / "nan", codes, bad)
    codestore.write_store(tmp_path / "s", codes, book, shard_size=2)
    np.save(tmp_path / "s" / "codebook.npy", book.astype(np.float64))
    with pytest.raises(ArragError, match="holds float64 .*not a float32 codebook"):
        CodeStore.open(tmp_path / "s")
    np.save(tmp_path / "s" / "codebook.npy", np.array([object()] * 4, dtype=object), allow_pickle=True)
    one_line_error(*run_cli("build-index", tmp_path / "s", "--out", tmp_path / "idx", cwd=tmp_path),
                   "cannot read", "codebook.npy")
    np.save(tmp_path / "s" / "codebook.npy", book)
    foreign = codes.copy()
    foreign[3, 2, 2] = 40  # a code the store's 16-code codebook does not have
    np.save(tmp_path / "s" / "codes-00001.npy", foreign[2:4])
    one_line_error(*run_cli("build-index", tmp_path / "s", "--out", tmp_path / "idx", cwd=tmp_path),
                   "codes-00001.npy holds code 40", "codebook has 16 codes")
