"""Benchmark layouts (what GenEval / DPG-Bench / FID tools read), resumption, process split, FID."""

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from arrag.cli import main
from arrag.decoding import Generator, SamplingConfig
from arrag.errors import ArragError
from arrag.eval.batch_generate import ProcessSlot, generate_into_layout
from arrag.eval.fid import compute_fid
from arrag.eval.layouts import make_layout
from arrag.eval.prompts import read_prompt_source

GENEVAL = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
           {"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats"},
           {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a red car"}]


def _geneval_file(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    return path


def test_prompt_sources(tmp_path):
    assert [it.text for it in read_prompt_source(_geneval_file(tmp_path))] == [r["prompt"] for r in GENEVAL]
    assert json.loads(read_prompt_source(_geneval_file(tmp_path))[1].metadata) == GENEVAL[1]
    dpg = tmp_path / "prompts"
    dpg.mkdir()
    for name, text in [("b_item", "a blue bird"), ("a_item", "an apple on a table\n")]:
        (dpg / f"{name}.txt").write_text(text)
    assert [(it.name, it.text) for it in read_prompt_source(dpg)] == [("a_item", "an apple on a table"),
                                                                       ("b_item", "a blue bird")]
    with (tmp_path / "coco.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["image_id", "Caption"], [7, "a dog"], [9, "two cups"]])
    assert [it.text for it in read_prompt_source(tmp_path / "coco.csv")] == ["a dog", "two cups"]
    with pytest.raises(ArragError, match="--caption-column text: not a column"):
        read_prompt_source(tmp_path / "coco.csv", "text")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ArragError, match="line 2 is not a JSON object with a 'prompt' field"):
        read_prompt_source(tmp_path / "bad.jsonl")


def test_geneval_layout_is_what_the_evaluator_reads(tmp_path, tiny_janus_dir):
    out = tmp_path / "geneval"
    assert main(["generate", "--model", str(tiny_janus_dir), "--prompts", str(_geneval_file(tmp_path)),
                 "--layout", "geneval", "--parallel-size", "2", "--image-size", "64", "--out", str(out),
                 "--device", "cpu"]) == 0
    # GenEval's evaluate_images.py: digit-named folders, json.load(metadata.jsonl), samples matching \d+\.png
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["00000", "00001", "00002"]
    for i, name in enumerate(folders):
        with open(out / name / "metadata.jsonl") as fp:
            assert json.load(fp) == GENEVAL[i]
        samples = sorted(p.name for p in (out / name / "samples").iterdir())
        assert samples == ["0000.png", "0001.png"] and all(re.match(r"\d+\.png", s) for s in samples)
        assert Image.open(out / name / "samples" / "0000.png").size == (64, 64)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["layout"] == "geneval" and settings["parallel_size"] == 2 and settings["seed"] == 0


def test_dpg_layout_is_a_gapless_2x2_grid_per_prompt_id(tmp_path, tiny_janus_dir):
    dpg = tmp_path / "prompts"
    dpg.mkdir()
    for name, text in [("0001", "a red circle"), ("xyz", "a blue square")]:
        (dpg / f"{name}.txt").write_text(text)
    out = tmp_path / "dpg"
    assert main(["generate", "--model", str(tiny_janus_dir), "--prompts", str(dpg), "--layout", "dpg",
                 "--image-size", "64", "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0001.png", "xyz.png"]
    grid = np.asarray(Image.open(out / "xyz.png"))
    assert grid.shape == (128, 128, 3)  # DPG-Bench crops --pic-num 4 tiles of --resolution 64
    # the top-right tile is sample 1 of that prompt, reproduced by a flat run with the same seed
    flat = tmp_path / "flat"
    assert main(["generate", "--model", str(tiny_janus_dir), "--prompts", str(dpg), "--layout", "flat",
                 "--parallel-size", "4", "--image-size", "64", "--out", str(flat), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(grid[:64, 64:], np.asarray(Image.open(flat / "xyz_01.png")))  # named by its id
    with pytest.raises(ArragError, match="--parallel-size must be 1, 4, 9"):
        make_layout("dpg", out, 2)


def test_resume_skips_finished_prompts(tmp_path, tiny_janus):
    items = read_prompt_source(_geneval_file(tmp_path))
    layout = make_layout("geneval", tmp_path / "g", 2)
    gen, cfg = Generator(tiny_janus), SamplingConfig(parallel_size=2, seed=5, image_size=64)
    kw = dict(progress=False)
    assert generate_into_layout(gen, items, layout, cfg, **kw)["generated"] == 3
    kept = (tmp_path / "g/00000/samples/0000.png").stat().st_mtime_ns
    (tmp_path / "g/00002/metadata.jsonl").unlink()  # prompt 2 "interrupted" before its marker was written
    again = generate_into_layout(gen, items, layout, cfg, **kw)
    assert again["generated"] == 1 and again["skipped"] == 2
    assert (tmp_path / "g/00002/metadata.jsonl").is_file()
    assert (tmp_path / "g/00000/samples/0000.png").stat().st_mtime_ns == kept


def test_two_processes_write_the_same_files_as_one(tmp_path, tiny_janus):
    items = read_prompt_source(_geneval_file(tmp_path))
    gen, cfg = Generator(tiny_janus), SamplingConfig(parallel_size=2, seed=3, image_size=64, top_k=40)
    one = make_layout("flat", tmp_path / "one", 2)
    generate_into_layout(gen, items, one, cfg, prompts_per_batch=2, progress=False)
    two = make_layout("flat", tmp_path / "two", 2)
    for rank in (1, 0):
        generate_into_layout(gen, items, two, cfg, slot=ProcessSlot(rank, 2), progress=False)
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(names) == 6 and names == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    for n in names:
        assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes()


class _ColourStats(nn.Module):
    """A tiny fixed feature extractor: per-channel mean and std and a 2x2 pooled grey image (10 features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        grey = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 2).flatten(1)
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), grey], 1).double()


def _folder(path, seed, n=24, bias=0):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(np.clip(rng.integers(0, 200, (20, 20, 3)) + bias, 0, 255).astype(np.uint8)).save(
            path / f"{i:03d}.png")
    return path


def test_fid_is_zero_for_identical_sets_and_positive_for_different_ones(tmp_path):
    a, b = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1, bias=40)
    same = compute_fid(a, a, feature=_ColourStats(), progress=False)
    assert abs(same["fid"]) < 1e-6 and same["num_real"] == same["num_fake"] == 24
    diff = compute_fid(a, b, feature=_ColourStats(), save_stats_to=tmp_path / "a.npz", progress=False)
    assert diff["fid"] > 0.01
    cached = compute_fid(tmp_path / "a.npz", b, feature=_ColourStats(), progress=False)
    assert cached["fid"] == pytest.approx(diff["fid"], rel=1e-9)
    stats = np.load(tmp_path / "a.npz")
    assert int(stats["num_samples"]) == 24 and stats["sigma"].shape == (10, 10)
    with pytest.raises(ArragError, match="resize -1; this run uses"):
        compute_fid(tmp_path / "a.npz", b, feature=_ColourStats(), resize=16, progress=False)


def test_fid_without_inception_weights_says_what_to_do(tmp_path, capsys):
    a = _folder(tmp_path / "a", 0, n=2)
    assert main(["eval", "fid", "--real", str(a), "--fake", str(a), "--inception-weights",
                 str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.pth: no such file; download https://" in err[0]


def _gen(model_dir, prompts, out, *extra):
    return main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--layout", "geneval",
                 "--parallel-size", "1", "--image-size", "32", "--out", str(out), "--device", "cpu", *extra])


@pytest.mark.parametrize("bad", [["--nprobe", "-1"], ["--seed", "-1"], ["--temperature", "-1"], ["--top-k", "0"],
                                 ["--top-p", "0"], ["--top-p", "2"], ["--batch-size", "0"], ["--parallel-size", "0"],
                                 ["--prompts-per-batch", "0"]])
def test_bad_flags_fail_in_one_line_and_leave_the_folder_unlocked(tmp_path, tiny_janus_dir, capsys, bad):
    prompts, out = _geneval_file(tmp_path), tmp_path / "g"
    assert _gen(tiny_janus_dir, prompts, out, *bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"arrag: error: {bad[0]}") and not (out / "settings.json").exists()
    assert _gen(tiny_janus_dir, prompts, out) == 0  # the corrected command is accepted


def test_dpg_with_no_samples_is_refused_before_loading(tmp_path, tiny_janus_dir, capsys):
    args = ["generate", "--model", str(tiny_janus_dir), "--prompts", str(_geneval_file(tmp_path)), "--layout", "dpg",
            "--parallel-size", "0", "--out", str(tmp_path / "d"), "--device", "cpu"]
    assert main(args) == 2 and "--parallel-size 0" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_an_edited_prompt_file_is_refused_on_resume(tmp_path, tiny_janus_dir, capsys):
    prompts, out = _geneval_file(tmp_path), tmp_path / "g"
    assert _gen(tiny_janus_dir, prompts, out) == 0
    records = [dict(r) for r in GENEVAL]
    records[1]["prompt"] = "a photo of three cats"  # same path, same count, other content
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _gen(tiny_janus_dir, prompts, out) == 2
    assert "prompts_sha256 differ" in capsys.readouterr().err


def test_a_prompt_file_that_is_not_utf8_is_one_line(tmp_path, tiny_janus_dir, capsys):
    (tmp_path / "latin1.txt").write_bytes("une pomme rôtie\n".encode("latin-1"))
    assert _gen(tiny_janus_dir, tmp_path / "latin1.txt", tmp_path / "g") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not UTF-8 text" in err[0]


def test_concurrent_runs_split_the_prompts(tmp_path, tiny_janus_dir):
    """Two `generate --layout` runs started together on one folder claim prompts, so no prompt is made twice."""
    import subprocess
    import sys

    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"{c} circle\n" for c in ["red", "blue", "green", "yellow", "purple", "orange"] * 2))
    cmd = [sys.executable, "-m", "arrag", "generate", "--model", str(tiny_janus_dir), "--prompts", str(prompts),
           "--layout", "flat", "--image-size", "64", "--out", str(tmp_path / "f"), "--device", "cpu"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outputs = [r.communicate(timeout=300)[0] for r in runs]
    assert all(r.returncode == 0 for r in runs)
    made = [int(re.search(r"(\d+) prompts generated", o).group(1)) for o in outputs]
    assert sum(made) == 12 and len(list((tmp_path / "f").glob("*.png"))) == 12
    assert not (tmp_path / "f" / ".claims").exists()


def test_our_frechet_distance_equals_torchmetrics_on_the_fid_inception_features(tmp_path):
    """A random-weight FID Inception (the architecture and key layout of pytorch-fid's weights file) as the
    feature extractor: our FID and torchmetrics' FrechetInceptionDistance agree on the same features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from arrag.eval.fid import FeatureStats, frechet_distance
    from arrag.eval.inception import WEIGHTS_NAME, FIDInception, load_fid_inception

    torch.manual_seed(0)
    net = FIDInception().eval()
    names = net.state_dict()
    assert names["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and names["fc.weight"].shape == (1008, 2048)
    assert names["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape == (384,)
    assert sum(k.endswith(".conv.weight") for k in names) == 94  # Inception-v3's 94 convolutions (no aux head)
    with torch.no_grad():  # random BN statistics, so that the features spread
        for k, v in names.items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 2.0)
            elif k.endswith("running_mean"):
                v.normal_(0, 0.1)
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / WEIGHTS_NAME)  # as pytorch-fid's file: no batch counters
    with pytest.warns(UserWarning, match="is not pytorch-fid's .* not comparable with published ones"):
        net = load_fid_inception(tmp_path / WEIGHTS_NAME)  # the right keys, random numbers: relabelled
    from arrag.eval.fid import extractor_name

    assert extractor_name(net).startswith("pytorch-fid-inception-2015-12-05:pool3 with other weights (sha256 ")
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (6, 3, 40, 40), dtype=np.uint8))
    fake = torch.from_numpy(np.clip(rng.integers(0, 256, (6, 3, 40, 40)) + 30, 0, 255).astype(np.uint8))
    with torch.no_grad():
        fr, ff = net(real), net(fake)
    assert fr.shape == (6, 2048)
    ours = [FeatureStats(2048, "x", None) for _ in range(2)]
    ours[0].add(fr)
    ours[1].add(ff)
    metric = FrechetInceptionDistance(feature=_Fixed({real.data_ptr(): fr, fake.data_ptr(): ff}))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert frechet_distance(*ours) == pytest.approx(float(metric.compute()), rel=1e-5)


class _Fixed(nn.Module):
    """A feature 'extractor' that returns precomputed features for known inputs (2048 for anything else)."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, x):
        return self.table.get(x.data_ptr(), torch.zeros(len(x), 2048)).double()


def test_flat_layout_names_files_by_a_csv_id_column(tmp_path, tiny_janus_dir):
    with (tmp_path / "mjhq.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["id", "caption"], ["a1b2", "a red circle"], ["zz/9", "a blue square"]])
    items = read_prompt_source(tmp_path / "mjhq.csv")
    assert [it.name for it in items] == ["a1b2", "zz_9"]  # safe as file names
    assert main(["generate", "--model", str(tiny_janus_dir), "--prompts", str(tmp_path / "mjhq.csv"), "--layout",
                 "flat", "--image-size", "32", "--out", str(tmp_path / "f"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "f").glob("*.png")) == ["a1b2.png", "zz_9.png"]


def test_shapes_prompt_file_from_the_cli(tmp_path):
    assert main(["eval", "shapes-prompts", "--out", str(tmp_path / "p.jsonl"), "--per-category", "2"]) == 0
    items = read_prompt_source(tmp_path / "p.jsonl")
    tags = [json.loads(it.metadata)["tag"] for it in items]
    assert len(items) == 12 and len(set(tags)) == 6 and all("scene" in json.loads(it.metadata) for it in items)


def test_words_the_tokenizer_does_not_know_are_named(tiny_janus_dir):
    from arrag.janus import Prompter

    p = Prompter.from_folder(tiny_janus_dir)
    with pytest.warns(UserWarning, match="does not know 'bicycle'"):
        p.ids("a red bicycle")


def test_fid_skips_unreadable_images_as_encode_does(tmp_path):
    """A corrupt file and a 40:1 panorama are skipped, counted and listed; too few readable images is one line."""
    a, b = _folder(tmp_path / "a", 0), _folder(tmp_path / "b", 1, bias=40)
    (b / "broken.jpg").write_bytes(b"not a jpeg")
    Image.fromarray(np.zeros((10, 400, 3), np.uint8)).save(b / "panorama.png")
    got = compute_fid(a, b, feature=_ColourStats(), progress=False)
    assert got["num_fake"] == 24 and got["num_skipped"] == {"real": 0, "fake": 2}
    assert sorted(s["file"] for s in got["skipped"]["fake"]) == ["broken.jpg", "panorama.png"]
    c = tmp_path / "c"
    c.mkdir()
    (c / "x.jpg").write_bytes(b"junk")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(c / "y.png")
    with pytest.raises(ArragError, match="FID needs at least 2 readable images; 1 of 2 could not be read"):
        compute_fid(a, c, feature=_ColourStats(), progress=False)
