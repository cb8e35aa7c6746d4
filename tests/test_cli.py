import json
import subprocess
import sys

import numpy as np
import torch

from arrag.cli import main
from arrag.image_io import save_image


def test_vq_reconstruct_writes_image_and_sidecar(tmp_path, llamagen_pt, capsys):
    arr = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    src = save_image(arr, tmp_path / "in.png")
    out = tmp_path / "rec.png"
    rc = main(["vq", "reconstruct", str(src), "--vq", llamagen_pt, "--vq-preset", "VQ-tiny-16", "--size", "64",
               "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert "4x4 tokens" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    meta = json.loads((tmp_path / "rec.png.json").read_text())
    assert meta["settings"]["grid"] == [4, 4] and meta["settings"]["size"] == 64
    assert np.isfinite(meta["settings"]["psnr_db"])


def test_cli_errors_are_one_line(tmp_path, llamagen_pt):
    def run(*args):
        p = subprocess.run([sys.executable, "-m", "arrag", *args], capture_output=True, text=True, cwd=tmp_path)
        return p.returncode, p.stderr.strip()

    rc, err = run("vq", "reconstruct", "x.png", "--vq", "missing.pt", "--out", "o.png")
    assert rc == 2 and err == "arrag: error: VQ checkpoint not found: missing.pt; download vq_ds16_t2i.pt " \
                              "from LlamaGen or pass --vq"
    save_image(np.zeros((32, 32, 3), np.uint8), tmp_path / "x.png")
    rc, err = run("vq", "reconstruct", "x.png", "--vq", llamagen_pt, "--vq-preset", "VQ-tiny-16", "--size", "40",
                  "--out", "o.png", "--device", "cpu")
    assert rc == 2 and len(err.splitlines()) == 1 and "--size" not in err and "multiple of" in err
    if not torch.cuda.is_available():
        rc, err = run("vq", "reconstruct", "x.png", "--vq", llamagen_pt, "--out", "o.png", "--device", "cuda")
        assert rc == 2 and err == "arrag: error: --device cuda: CUDA is not available on this machine; use --device cpu"


def test_help_lists_commands():
    p = subprocess.run([sys.executable, "-m", "arrag", "--help"], capture_output=True, text=True)
    assert p.returncode == 0 and "vq" in p.stdout and "demo" in p.stdout


def test_demo_smoke(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--image-size", "32", "--device", "cpu",
            "--database-images", "30", "--retriever-dir", str(tmp_path / "demo_L")]
    assert main(args) == 0
    scores = json.loads((tmp_path / "demo" / "scores.json").read_text())
    printed = capsys.readouterr().out
    # The printed table carries exactly the measured numbers in scores.json.
    tok = scores["tokenizer"]
    assert f"{tok['val_psnr_untrained_db']:.2f}" in printed and f"{tok['val_psnr_trained_db']:.2f}" in printed
    hits = {k: v["database_code_rate"] for k, v in scores["generation"]["methods"].items()}
    for name, rate in hits.items():
        assert f"{name:28}{rate:20.3f}" in printed
    # With lambda 1 every valid target (6 of 16 cells) takes a database code; the untrained model rarely does.
    assert hits["daid (lambda 1.0)"] >= 6 / 16 and hits["daid (lambda 1.0)"] > hits["base"]
    assert scores["retriever"]["entries"] == 30 * 3 * 2  # 4x4 grids: 3 x 2 valid targets each
    for f in ("vq_reconstruction.png", "grid.png", "grid.png.json", "vq_tiny.safetensors.json"):
        assert (tmp_path / "demo" / f).exists()
    from arrag.vq import load_vq

    assert load_vq(tmp_path / "demo" / "vq_tiny.safetensors").fingerprint() == tok["fingerprint"]
    assert main(args) == 0  # a rerun reuses the retriever
    assert "reusing the demo retriever" in capsys.readouterr().out
