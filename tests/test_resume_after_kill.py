"""SIGKILL each long job in a subprocess mid-run, rerun the same command, and compare the bytes with an
uninterrupted run (build-index in test_fileops.py, train-faid in test_train_faid.py)."""

import json

import numpy as np
import pytest
from killing import arrag_command, run_and_kill

from arrag.build_retriever.build_index import build_index
from arrag.build_retriever.encode import encode
from arrag.cli import main
from arrag.image_io import save_image
from arrag.retrieval import codestore
from arrag.train.construct import construct_train
from arrag.vq import VQModel


def _same_files(a, b, pattern):
    names = sorted(p.name for p in a.glob(pattern))
    assert names and names == sorted(p.name for p in b.glob(pattern))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


@pytest.fixture(scope="module")
def folder_and_vq(tmp_path_factory):
    root = tmp_path_factory.mktemp("killed")
    for i in range(480):
        arr = np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)
        save_image(arr, root / "imgs" / f"{i:04d}.png")
        (root / "imgs" / f"{i:04d}.txt").write_text(f"image {i}")
    VQModel("VQ-tiny-16").save(root / "vq.safetensors")
    return root


def test_killed_encode_resumes_to_identical_bytes(tmp_path, folder_and_vq):
    imgs, vq = folder_and_vq / "imgs", folder_and_vq / "vq.safetensors"
    kw = dict(image_size=64, batch_size=8, shard_size=40, num_workers=0, save_latents=True, device="cpu")
    encode(str(imgs), tmp_path / "ref", vq, progress=False, **kw)
    args = ["encode", imgs, "--out", tmp_path / "run", "--vq", vq, "--image-size", "64", "--batch-size", "8",
            "--shard-size", "40", "--workers", "0", "--save-latents", "--device", "cpu"]
    assert run_and_kill(arrag_command(*args), lambda: (tmp_path / "run" / "shard-00002.json").exists())
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert main([str(a) for a in args]) == 0
    for pattern in ("codes-*.npy", "latents-*.npy", "captions-*.jsonl", "shard-*.json", "codebook.npy"):
        _same_files(tmp_path / "ref", tmp_path / "run", pattern)
    ref, run = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("ref", "run"))
    ref.pop("created"), run.pop("created")
    assert ref == run and not list((tmp_path / "run").glob("*.tmp"))


def test_killed_construct_train_resumes_to_identical_bytes(tmp_path):
    rng = np.random.default_rng(0)
    book = rng.normal(size=(256, 8)).astype(np.float32)
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    codes = rng.integers(0, 256, (800, 8, 8)).astype(np.uint16)
    codestore.write_store(tmp_path / "store", codes, book, shard_size=80, captions=[str(i) for i in range(800)])
    build_index(tmp_path / "store", tmp_path / "idx", factory="Flat", progress=False)
    construct_train(tmp_path / "store", tmp_path / "idx", tmp_path / "ref", retrieved_key_num=5, progress=False)
    args = ["construct-train", tmp_path / "store", "--retriever", tmp_path / "idx", "--out", tmp_path / "run",
            "--k", "5", "--chunk-images", "4"]
    assert run_and_kill(arrag_command(*args), lambda: (tmp_path / "run" / "retrieved-00001.npy").exists())
    assert not (tmp_path / "run" / "retrieved-00009.npy").exists()
    assert main([str(a) for a in args]) == 0
    _same_files(tmp_path / "ref", tmp_path / "run", "retrieved-*.npy")


def test_killed_layout_generation_resumes_to_identical_bytes(tmp_path, tiny_janus_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{c} {s}\n" for c in ["red", "blue", "green", "yellow", "purple"]
                               for s in ["circle", "square", "triangle", "diamond", "circles", "squares"]))
    common = ["generate", "--model", tiny_janus_dir, "--prompts", prompts, "--layout", "flat", "--image-size", "64",
              "--parallel-size", "2", "--device", "cpu", "--seed", "4"]
    assert main([str(a) for a in [*common, "--out", tmp_path / "ref"]]) == 0
    run = tmp_path / "run"
    assert run_and_kill(arrag_command(*common, "--out", run), lambda: len(list(run.glob("*.png"))) >= 6)
    assert len(list(run.glob("*.png"))) < 60
    assert main([str(a) for a in [*common, "--out", run]]) == 0
    _same_files(tmp_path / "ref", run, "*.png")
    _same_files(tmp_path / "ref", run, "prompts.json")
