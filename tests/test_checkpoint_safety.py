"""A checkpoint never runs code: pickled files are read weights-only, anything more is refused unless trusted."""

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from arrag.errors import ArragError
from arrag.image_io import save_image
from arrag.vq import load_vq


class _Payload:
    """Unpickling this creates the file named by `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture()
def hostile_pt(tmp_path, tiny_vq):
    """A LlamaGen-layout VQ checkpoint (weights under 'model') that also carries a payload."""
    marker = tmp_path / "payload_ran"
    path = tmp_path / "hostile.pt"
    torch.save({"model": tiny_vq.state_dict(), "args": _Payload(str(marker))}, path)
    return path, marker


def test_a_payload_in_a_vq_checkpoint_never_runs(hostile_pt):
    path, marker = hostile_pt
    with pytest.raises(ArragError, match=r"refused to load VQ checkpoint .*hostile\.pt.*--trust-checkpoint") as e:
        load_vq(path, preset="VQ-tiny-16")
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_the_cli_refuses_it_in_one_line_and_trust_is_explicit(tmp_path, hostile_pt):
    path, marker = hostile_pt
    save_image(np.zeros((64, 64, 3), np.uint8), tmp_path / "x.png")
    base = [sys.executable, "-m", "arrag", "vq", "reconstruct", "x.png", "--vq", str(path), "--vq-preset",
            "VQ-tiny-16", "--out", "o.png", "--device", "cpu"]
    p = subprocess.run(base, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "--trust-checkpoint" in p.stderr and "hostile.pt" in p.stderr
    assert not marker.exists() and not (tmp_path / "o.png").exists()
    for cmd in (["encode", str(tmp_path), "--out", str(tmp_path / "store"), "--vq", str(path), "--vq-preset",
                 "VQ-tiny-16", "--workers", "0", "--device", "cpu"],):
        p = subprocess.run([sys.executable, "-m", "arrag", *cmd], capture_output=True, text=True, cwd=tmp_path)
        assert p.returncode == 2 and "--trust-checkpoint" in p.stderr and not marker.exists()
    # The flag named in the error is the only way past, and it does unpickle the file fully.
    p = subprocess.run([*base, "--trust-checkpoint"], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert marker.exists()


def test_a_llamagen_checkpoint_with_its_argparse_args_still_loads(tmp_path, tiny_vq):
    path = tmp_path / "vq_ds16_like.pt"
    torch.save({"model": tiny_vq.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "steps": 3,
                "args": argparse.Namespace(vq_model="VQ-16", image_size=256, lr=1e-4, mixed_precision="bf16")}, path)
    vq = load_vq(path, preset="VQ-tiny-16")
    assert vq.fingerprint() == tiny_vq.fingerprint()


def test_a_payload_in_a_janus_bin_never_runs(tmp_path, tiny_janus_dir):
    import shutil

    from arrag.janus import JanusPro
    from arrag.weight_files import iter_tensors, weight_files

    folder = tmp_path / "janus"
    shutil.copytree(tiny_janus_dir, folder)
    state = dict(iter_tensors(weight_files(folder)))
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    marker = tmp_path / "payload_ran"
    torch.save({**state, "extra": _Payload(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(ArragError, match=r"refused to load .*pytorch_model\.bin.*--trust-checkpoint"):
        JanusPro.from_pretrained(folder, device="cpu", quiet=True)
    assert not marker.exists()


def test_weights_holding_nan_are_refused(tmp_path, tiny_vq, tiny_janus_dir):
    state = {k: v.clone() for k, v in tiny_vq.state_dict().items()}
    state["decoder.conv_out.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pt")
    with pytest.raises(ArragError, match=r"decoder\.conv_out\.weight holds 1 NaN or infinite"):
        load_vq(tmp_path / "nan.pt", preset="VQ-tiny-16")

    import shutil

    from safetensors.torch import load_file, save_file

    from arrag.janus import JanusPro

    folder = tmp_path / "janus"
    shutil.copytree(tiny_janus_dir, folder)
    weights = load_file(folder / "model.safetensors")
    key = next(k for k in weights if k.startswith("gen_head.") and k.endswith("weight"))
    weights[key][0, 0] = float("inf")
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ArragError, match=rf"Janus checkpoint .*{key} holds 1 NaN or infinite"):
        JanusPro.from_pretrained(folder, device="cpu", quiet=True)
