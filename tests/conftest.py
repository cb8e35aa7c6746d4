"""Shared fixtures: tiny, randomly initialised models written in the real file layouts."""

import argparse

import pytest
import torch

from arrag.vq import VQModel


@pytest.fixture(scope="session")
def tiny_vq() -> VQModel:
    torch.manual_seed(0)
    return VQModel("VQ-tiny-16").eval()


@pytest.fixture(scope="session")
def llamagen_pt(tmp_path_factory, tiny_vq) -> str:
    """A LlamaGen-style training checkpoint: weights under 'model' plus optimizer, steps and argparse args."""
    path = tmp_path_factory.mktemp("vq") / "vq_tiny_t2i.pt"
    torch.save({"model": tiny_vq.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "steps": 7,
                "args": argparse.Namespace(vq_model="VQ-16", image_size=256)}, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_janus_dir(tmp_path_factory):
    """A tiny random Janus-Pro checkpoint folder in the original layout, with a word-level tokenizer."""
    from arrag.demo.presets import make_tiny_janus

    folder = tmp_path_factory.mktemp("janus")
    make_tiny_janus(folder, seed=0)
    return folder


@pytest.fixture(scope="session")
def tiny_janus(tiny_janus_dir):
    from arrag.janus import JanusPro

    return JanusPro.from_pretrained(tiny_janus_dir, device="cpu", quiet=True)


@pytest.fixture(scope="session")
def vq_file(tmp_path_factory):
    """A seeded VQ-tiny-16 saved as arrag's safetensors (the encode tests' tokenizer)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vqw") / "vq.safetensors"
    VQModel("VQ-tiny-16").save(path)
    return path
