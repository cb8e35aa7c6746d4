import json
import re
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
    assert rc == 2 and err == "arrag: error: VQ checkpoint missing.pt: no such file or folder"
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
    """`arrag demo` with the shipped weights on a 12-image database: files, table == scores.json, reuse."""
    args = ["demo", "--world", "shapes", "--out", str(tmp_path / "demo"), "--per-category", "1", "--samples", "1",
            "--seeds", "0",
            "--device", "cpu", "--database-images", "12", "--retriever-dir", str(tmp_path / "demo_L")]
    assert main(args) == 0
    scores = json.loads((tmp_path / "demo" / "scores.json").read_text())
    printed = capsys.readouterr().out
    assert set(scores["methods"]) == {"base", "daid", "faid"}
    assert scores["retriever"]["occurrences"] == 12 * 15 * 14  # 16x16 grids, L neighbourhood: 15 x 14 targets each
    assert scores["retriever"]["entries"] < scores["retriever"]["occurrences"]  # de-duplicated
    for name, m in scores["methods"].items():  # the printed table carries exactly the measured numbers
        line = next(row for row in printed.splitlines() if row.startswith(f"{name:14}"))
        assert f"{m['overall']['mean']:.2f}" in line and f"{m['realism_fid']['mean']:.2f}" in line
    assert (tmp_path / "demo" / "grid.png").is_file() and (tmp_path / "demo" / "grid.png.json").is_file()
    # a verdict line per method against base, for accuracy and realism; the grid's frames say what the scorer decided
    assert re.search(r"DAiD vs base: accuracy [+-]\d\.\d\d±0\.00 \(.*\); realism FID [+-]\d", printed), printed
    assert "frames" in json.loads((tmp_path / "demo" / "grid.png.json").read_text())["settings"]
    assert sorted(p.name for p in (tmp_path / "demo" / "faid" / "seed0").iterdir() if p.is_dir()) == \
        [f"{i:05d}" for i in range(6)]
    assert scores["sampling"] == {"cfg_weight": 5.0, "temperature": 1.0}
    first = (tmp_path / "demo" / "base" / "seed0" / "00000" / "samples" / "0000.png").read_bytes()
    assert "note: one seed of 6 images a method" in printed  # a one-seed look says how noisy it is
    # A rerun with the same settings reuses every image; one with other settings is refused unless --overwrite.
    stamp = (tmp_path / "demo" / "base" / "seed0" / "00000" / "samples" / "0000.png").stat().st_mtime_ns
    assert main(args) == 0 and "(base, seed 0)" in capsys.readouterr().err
    assert (tmp_path / "demo" / "base" / "seed0" / "00000" / "samples" / "0000.png").stat().st_mtime_ns == stamp
    assert main([*args, "--samples", "2"]) == 2
    assert "holds a demo run with other settings (samples differ)" in capsys.readouterr().err
    # --overwrite: the retriever is reused; the sampling flags reach every method and are recorded.
    assert main([*args, "--methods", "base,faid-noret", "--cfg-weight", "3", "--temperature", "0.5",
                 "--overwrite"]) == 0
    assert "reusing the demo retriever" in capsys.readouterr().err
    scores = json.loads((tmp_path / "demo" / "scores.json").read_text())
    assert scores["sampling"] == {"cfg_weight": 3.0, "temperature": 0.5}
    assert set(scores["methods"]) == {"base", "faid-noret"}
    assert (tmp_path / "demo" / "base" / "seed0" / "00000" / "samples" / "0000.png").read_bytes() != first
    # The control is the FAiD model decoding without retrieval: the same images as a plain base decode of it.
    from arrag.decoding.loop import SamplingConfig
    from arrag.decoding.methods import Generator
    from arrag.demo.pipeline import ASSETS
    from arrag.eval.prompts import read_prompt_source
    from arrag.image_io import load_rgb
    from arrag.janus import JanusPro

    items = read_prompt_source(tmp_path / "demo" / "prompts_test.jsonl")
    faid = Generator(JanusPro.from_pretrained(ASSETS / "faid", device="cpu", quiet=True))
    direct = faid.generate([it.text for it in items], SamplingConfig(parallel_size=1, seed=0, image_size=64,
                                                                     cfg_weight=3.0, temperature=0.5),
                           image_indices=[it.index for it in items], progress=False)
    folder = tmp_path / "demo" / "faid-noret" / "seed0"
    control = np.stack([np.asarray(load_rgb(folder / f"{it.index:05d}" / "samples" / "0000.png")) for it in items])
    assert np.array_equal(control, direct)


def test_warnings_are_one_line_and_small_indexes_say_their_choice(tmp_path, tiny_janus_dir, capsys):
    # In a process of its own: pytest's warnings plugin records warnings, where a user's terminal shows them.
    p = subprocess.run([sys.executable, "-m", "arrag", "generate", "--model", str(tiny_janus_dir), "--prompt",
                        "a red bicycle", "--image-size", "64", "--out", str(tmp_path / "g"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    err = p.stderr
    line = next(x for x in err.splitlines() if "does not know" in x)
    assert line.startswith("arrag: warning: the tokenizer does not know 'bicycle'") and "UserWarning" not in err
    from arrag.retrieval import codestore

    codestore.write_store(tmp_path / "s", np.zeros((3, 4, 4), np.uint16), np.eye(8, dtype=np.float32))
    assert main(["build-index", str(tmp_path / "s"), "--out", str(tmp_path / "i")]) == 0
    assert re.search(r"\[build-index\] 18 entries .*: Flat \(", capsys.readouterr().out)


def test_upscale_enlarges_plain_output_only(tmp_path, tiny_janus_dir, capsys):
    args = ["generate", "--model", str(tiny_janus_dir), "--prompt", "a red circle", "--image-size", "64",
            "--device", "cpu", "--parallel-size", "2"]
    assert main([*args, "--out", str(tmp_path / "one"), "--grid", str(tmp_path / "one.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "big"), "--grid", str(tmp_path / "big.png"), "--upscale", "3"]) == 0
    from arrag.image_io import load_rgb

    small, big = (np.asarray(load_rgb(tmp_path / d / "0000_01.png")) for d in ("one", "big"))
    assert small.shape == (64, 64, 3) and big.shape == (192, 192, 3)
    np.testing.assert_array_equal(big[::3, ::3], small)  # nearest: every pixel repeated 3 x 3
    widths = [np.asarray(load_rgb(tmp_path / f"{d}.png")).shape[1] for d in ("one", "big")]
    assert widths[1] == 3 * widths[0]
    assert main([*args, "--out", str(tmp_path / "l"), "--layout", "flat", "--upscale", "2"]) == 2
    assert "--upscale enlarges plain output only" in capsys.readouterr().err
