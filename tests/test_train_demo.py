"""The demo recipe (`python -m arrag.demo.train_demo`): its VQ loss, and a tiny end-to-end run that
records what the shipped recipe.json promises (device, round trip, FAiD's candidate gain) and resumes."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from arrag.demo.shapes import ShapesWorld
from arrag.demo.train_demo import DemoRecipe, object_cell_weights, run_recipe, shape_weighted_mse


def test_shape_weight_reaches_past_the_shape_edge():
    x = torch.full((1, 3, 9, 9), 0.2)  # grey background (not saturated)
    x[0, :, 4, 4] = torch.tensor([0.9, -0.8, -0.8])  # one saturated red pixel
    for margin, weighted in ((0, False), (2, True)):
        rec = x.clone()
        rec[0, 0, 4, 6] += 0.5  # an error 2 px right of the shape, on the background
        w = torch.ones(9, 9)
        if margin:
            w[4 - margin:5 + margin, 4 - margin:5 + margin] = 10.0
        else:
            w[4, 4] = 10.0
        expected = (w * ((rec - x) ** 2).sum(1)[0]).sum() / 3 / 81 / w.mean()
        got = shape_weighted_mse(rec, x, weight=10.0, margin=margin)
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)
        assert (got.item() > 0.25 / (3 * 81) * 2) == weighted  # weighted errors count 10x, not 1x


def test_tiny_recipe_runs_end_to_end_records_its_device_and_resumes(tmp_path):
    recipe = DemoRecipe(vq_steps=3, vq_batch=2, train_images=12, hidden=32, layers=2, heads=2, kv_heads=1,
                        intermediate=64, base_steps=3, base_batch=2, base_warmup=1, database_images=6,
                        faid_images=6, faid_steps=2, faid_batch=2, k=4, lora_r=2, lora_alpha=4,
                        shape_weight=4.0)  # shape cells weigh 4x in the base loss
    kw = dict(workdir=tmp_path / "work", assets=tmp_path / "assets", retriever_dir=tmp_path / "retriever",
              recipe=recipe, progress=False, device="cpu")
    report = run_recipe(**kw)
    saved = json.loads((tmp_path / "assets" / "recipe.json").read_text())
    assert saved["recipe"]["base_steps"] == 3 and saved["recipe"]["shape_weight"] == 4.0
    assert "torch_version" in saved["environment"]
    for stage in ("vq", "base", "faid"):
        assert saved[stage]["device"].startswith("cpu")
        assert saved[stage]["seconds"] >= 0
    assert 0.0 <= saved["vq"]["validation_round_trip"]["overall"] <= 1.0
    held = saved["base"]["held_out"]
    assert held["images"] == 12  # capped at the training images: later train items were never seen
    for split in ("train", "unseen", "validation"):  # overall: a mix of the object cells and the background
        lo, hi = sorted((held[split]["object_cells"], held[split]["background"]))
        assert 0 < lo - 1e-3 <= held[split]["all"] <= hi + 1e-3
    gain = saved["faid"]["candidate_gain"]
    assert gain["images"] == 6
    # FAiD's loss keeps the base's shape weighting: the weights file holds 4 on the scenes' object cells
    assert saved["faid"]["token_weights"] == "faid_token_weights_4.npy"
    weights = np.load(tmp_path / "work" / "faid_token_weights_4.npy")
    grid = int(np.sqrt(weights.shape[1]))
    world = ShapesWorld("train", size=64)
    assert weights.shape[0] == 6 and set(np.unique(weights)) <= {1.0, 4.0}
    assert (weights[0] == np.where(world.scene(0).object_cells(grid).reshape(-1), 4.0, 1.0)).all()
    assert saved["base"]["retrieval_gain"]["table"][0]["lambda"] == 0.0
    assert gain["gain"] == pytest.approx(gain["without_candidates"] - gain["with_candidates"])
    for name in ("base", "faid"):
        assert (tmp_path / "assets" / name / "config.json").is_file()
    mtime = (tmp_path / "work" / "vq.safetensors").stat().st_mtime_ns
    again = run_recipe(**kw)  # every stage's output exists: nothing is retrained
    assert (tmp_path / "work" / "vq.safetensors").stat().st_mtime_ns == mtime
    assert again["base"]["losses"] == report["base"]["losses"]
    ckpt = tmp_path / "work" / "base" / "checkpoint.pt"
    first = torch.load(ckpt, weights_only=True)["losses"]
    longer = replace(recipe, base_steps=5)  # a finished run asked for more steps goes on from its checkpoint
    extended = run_recipe(**{**kw, "recipe": longer})
    assert extended["base"]["steps"] == 5
    assert torch.load(ckpt, weights_only=True)["losses"][:3] == first  # the first 3 steps are kept
    assert extended["faid"]["base_steps"] == 5  # FAiD retrained from the longer base ...
    assert (tmp_path / "work" / "faid.base3" / "settings.json").is_file()  # ... the earlier one kept aside
    with pytest.raises(SystemExit, match="past --base-steps 4"):
        run_recipe(**{**kw, "recipe": replace(recipe, base_steps=4)})
    # a FAiD fine-tuned before the recipe weighted its loss (no record) is set aside and retrained
    path = tmp_path / "work" / "report.json"
    old = json.loads(path.read_text())
    del old["faid"]["token_weights"]
    path.write_text(json.dumps(old))
    again = run_recipe(**{**kw, "recipe": longer})
    assert again["faid"]["token_weights"] == "faid_token_weights_4.npy"
    assert (tmp_path / "work" / "faid.base5" / "settings.json").is_file()


def test_object_cell_weights_follow_the_scenes_and_refuse_another_store():
    world = ShapesWorld("train", size=64)
    captions = [world.scene(i).caption for i in range(5)]
    w = object_cell_weights(captions, DemoRecipe(shape_weight=4.0), 16)
    assert w.shape == (5, 256)
    for i in range(5):
        expected = np.where(world.scene(i).object_cells(16).reshape(-1), 4.0, 1.0)
        np.testing.assert_array_equal(w[i].numpy(), expected)
    with pytest.raises(SystemExit, match="row 1 has caption 'a mystery'.*--shape-weight"):
        object_cell_weights([captions[0], "a mystery"], DemoRecipe(shape_weight=4.0), 16)


def test_every_recipe_setting_is_a_documented_flag(capsys):
    from arrag.demo.train_demo import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines (also at hyphens)
    for name, field in DemoRecipe.__dataclass_fields__.items():
        assert f"--{name.replace('_', '-')}" in out and f"(default{field.default})" in out
