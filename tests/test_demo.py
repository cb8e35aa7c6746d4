"""ShapesWorld scorer (ground truth vs corruptions), prompt files through the geneval layout, the shipped
demo weights. (The smoke run of `arrag demo` on a very small database is tests/test_cli.py::test_demo_smoke.)"""

import json

import numpy as np
import pytest
import torch

from arrag.demo.score import (
    VQEncoderFeatures,
    accuracy,
    detect,
    prompt_records,
    read_generated,
    realism_fid,
    reference_images,
    write_prompt_file,
)
from arrag.demo.shapes import CATEGORIES, ShapesWorld

ASSETS = __import__("arrag.demo.pipeline", fromlist=["ASSETS"]).ASSETS
SIZE = 64


@pytest.fixture(scope="module")
def validation():
    w = ShapesWorld("validation", size=SIZE)
    return w.images(0, 180), [w.scene(i) for i in range(180)]


def _shuffle_blocks(images, block=8, seed=0):
    """Cut each image into block x block tiles and shuffle them: the patch artefacts of a bad generator."""
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    tiles = images.reshape(n, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    tiles = tiles.reshape(n, -1, block, block, c)
    tiles = np.stack([t[rng.permutation(len(t))] for t in tiles])
    return tiles.reshape(n, h // block, w // block, block, block, c).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)


def test_scorer_is_near_perfect_on_ground_truth(validation):
    images, scenes = validation
    result = accuracy(images, scenes)
    assert set(result["per_category"]) == set(CATEGORIES)
    assert result["overall"] >= 0.97 and min(result["per_category"].values()) >= 0.9


def test_detections_match_the_scene(validation):
    images, scenes = validation
    for image, scene in zip(images[:30], scenes[:30], strict=True):
        found = detect(image)
        for obj in scene.objects:
            d = min(found, key=lambda d: (d.cx - obj.cx) ** 2 + (d.cy - obj.cy) ** 2)
            assert abs(d.cx - obj.cx) < 0.04 and abs(d.cy - obj.cy) < 0.06 and d.color == obj.color  # triangles sit low


def test_corruptions_score_worse(validation):
    images, scenes = validation
    clean = accuracy(images, scenes)["overall"]
    swapped = accuracy(images[..., ::-1].copy(), scenes)  # RGB -> BGR: red and blue trade places
    assert swapped["per_category"]["colors"] < 0.6 and swapped["overall"] < clean - 0.1
    shuffled = accuracy(_shuffle_blocks(images), scenes)
    assert shuffled["overall"] < clean - 0.3


def test_realism_prefers_clean_images():
    from arrag.vq import VQModel

    torch.manual_seed(0)
    features = VQEncoderFeatures(VQModel("VQ-tiny-4"), SIZE)  # any fixed encoder orders these; the demo ships one
    reference = reference_images("validation", 200, SIZE, start=1000)
    clean = reference_images("validation", 100, SIZE, start=3000)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
    fid = {name: realism_fid(x, reference, features) for name, x in
           [("clean", clean), ("shuffled", _shuffle_blocks(clean)), ("noisy", noisy)]}
    assert fid["clean"] < fid["shuffled"] and fid["clean"] < fid["noisy"], fid


def test_prompt_records_round_trip_through_the_geneval_layout(tmp_path):
    from arrag.eval.layouts import make_layout
    from arrag.eval.prompts import read_prompt_source

    records = prompt_records("test", 6, SIZE)
    items = read_prompt_source(write_prompt_file(tmp_path / "p.jsonl", records))
    assert [it.text for it in items] == [r["prompt"] for r in records]
    layout = make_layout("geneval", tmp_path / "gen", 1)
    w = ShapesWorld("test", size=SIZE)
    for it in items:  # the ground truth stands in for a generator here
        layout.write(it, w.image(it.index)[None])
    images, scenes, _ = read_generated(tmp_path / "gen")
    assert [s.caption for s in scenes] == [r["prompt"] for r in records]
    assert accuracy(images, scenes)["overall"] == 1.0


def test_shipped_assets_load_and_generate_a_valid_image():
    from arrag.decoding import generate
    from arrag.janus import JanusPro

    files = [f for f in ASSETS.rglob("*") if f.is_file()]
    shapes = sum(f.stat().st_size for f in files if f.relative_to(ASSETS).parts[0] != "tail")
    tail = sum(f.stat().st_size for f in (ASSETS / "tail").rglob("*") if f.is_file())
    assert shapes <= 20 * 2**20 and tail <= 30 * 2**20  # what the repository allows each world
    recipe = json.loads((ASSETS / "recipe.json").read_text())
    for name in ("base", "faid"):
        model = JanusPro.from_pretrained(ASSETS / name, device="cpu", quiet=True)
        assert model.has_faid == (name == "faid")
    image = generate(model if not model.has_faid else JanusPro.from_pretrained(ASSETS / "base", device="cpu",
                                                                              quiet=True),
                     ["a red circle"], image_size=recipe["recipe"]["image_size"], seed=0, progress=False)
    assert image.shape == (1, SIZE, SIZE, 3) and image.dtype == np.uint8 and image.std() > 5


def test_tune_keeps_the_current_setting_unless_another_is_clearly_better():
    from arrag.demo.tune import choose

    point = lambda k, acc, fid=2.0: {"faid_k": k, "overall": acc, "realism_fid": fid, "images": 48}  # noqa: E731
    # One image in 48 better: noise (one standard error of the difference is ~0.1 here), keep K 10; so is 0.15.
    assert choose([point(4, 0.40), point(10, 0.40 - 1 / 48), point(20, 0.35)], {"faid_k": 10})["faid_k"] == 10
    assert choose([point(4, 0.55), point(10, 0.40)], {"faid_k": 10})["faid_k"] == 10
    # 0.25 better: more than the noise, take it.
    assert choose([point(4, 0.65), point(10, 0.40)], {"faid_k": 10})["faid_k"] == 4
    # Equal accuracy: the current one stays even with a worse FID; without a current point, the best wins.
    assert choose([point(4, 0.40, 1.0), point(10, 0.40, 3.0)], {"faid_k": 10})["faid_k"] == 10
    assert choose([point(4, 0.40, 1.0), point(20, 0.40, 3.0)], {"faid_k": 10})["faid_k"] == 4
    # More images shrink the band: the same 0.06 lead wins at 4,800 images a point.
    many = [{**point(4, 0.46), "images": 4800}, {**point(10, 0.40), "images": 4800}]
    assert choose(many, {"faid_k": 10})["faid_k"] == 4


def test_the_time_left_counts_only_runs_that_generated():
    """After a resume the reused runs took no time: the estimate is the generating runs' pace times the runs left."""
    from arrag.demo.runs import eta

    assert eta(0.0, 0, 4) == ""  # nothing generated yet (all reused so far): no estimate, not '0.0 min'
    assert eta(120.0, 1, 4) == ", about 8.0 min left"  # one generated run of 2 min, four to go
    assert eta(120.0, 1, 0) == ""


def test_verdicts_on_paired_differences_over_seeds():
    """Two SE decide; no spread is said as what it is: one seed, or the same difference at every seed."""
    from arrag.demo.runs import paired, verdict

    assert paired([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])["verdict"] == "better at every seed by the same amount"
    assert paired([0.1, 0.2], [0.1, 0.2])["verdict"] == "no difference at any seed"
    assert verdict({"mean": 0.1, "se": 0.0}, 1) == "one seed: no standard error"
    d = paired([0.30, 0.25, 0.20], [0.10, 0.12, 0.08])  # differences 0.20, 0.13, 0.12: mean 0.15, se 0.025
    assert d["mean"] == pytest.approx(0.15) and d["verdict"] == "better by 6.0 SE"
    assert paired([0.1, 0.3, 0.2], [0.2, 0.1, 0.2])["verdict"] == "within noise"


def test_frames_mark_the_scorers_verdict():
    from arrag.demo.plot import framed

    image = np.full((8, 8, 3), 128, np.uint8)
    passed, failed = framed(image, True), framed(image, False)
    assert passed[0, 0].tolist() == [40, 170, 60] and failed[-1, -1].tolist() == [220, 40, 40]
    assert (passed[3:5, 3:5] == 128).all() and framed(image, None) is image  # inside untouched; truth unframed
