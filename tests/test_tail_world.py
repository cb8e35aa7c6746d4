"""TailWorld: a seeded renderer, a scorer that reads pixels (1.00 on ground truth, worse on corruptions), the Zipf
frequency split, and a control database that truly holds no tail pattern."""

import numpy as np
import pytest

from arrag.demo.tail import BUCKETS, PATTERNS, Frequencies, TailWorld, bucket_of_caption, pattern_mask, zipf_weights
from arrag.demo.tail_score import accuracy, prompt_records, read_discs, scene_from_dict


@pytest.fixture(scope="module")
def validation():
    w = TailWorld("validation", size=64)
    n = 4 * len(PATTERNS)
    return w.images(0, n), [w.scene(i) for i in range(n)]


def test_rendering_is_a_pure_function_of_seed_split_and_index():
    a, b = TailWorld("train", seed=0), TailWorld("train", seed=0)
    assert np.array_equal(a.image(17), b.image(17)) and a.scene(17) == b.scene(17)
    assert not np.array_equal(a.image(17), TailWorld("train", seed=1).image(17))
    assert not np.array_equal(a.image(17), TailWorld("database", seed=0).image(17))
    assert a.image(17).shape == (64, 64, 3) and a.image(17).dtype == np.uint8


def test_the_scorer_reads_every_ground_truth_image_right(validation):
    images, scenes = validation
    result = accuracy(images, scenes)
    assert result["overall"] == 1.0 and set(result["by_bucket"]) == set(BUCKETS)
    assert set(result["by_pattern"]) == set(PATTERNS)
    d = read_discs(images[0])
    assert len(d) == scenes[0].count and all(x.pattern == scenes[0].pattern and x.color == scenes[0].color
                                             for x in d)


def test_the_scorer_fails_wrong_patterns_colours_and_counts(validation):
    images, scenes = validation
    swapped = accuracy(images[..., ::-1].copy(), scenes)  # RGB -> BGR: red and blue trade places, orange goes
    assert swapped["overall"] < 0.6
    w = TailWorld("validation", size=64)
    wrong = [scene_from_dict({**s.to_dict(), "pattern": PATTERNS[(PATTERNS.index(s.pattern) + 1) % len(PATTERNS)]})
             for s in scenes]
    assert accuracy(images, wrong)["overall"] == 0.0  # the pattern of the next name is never read instead
    blank = images.copy()
    for i, s in enumerate(scenes):  # the discs painted plain ink: no pattern to read
        ink = np.array(w.image(i))
        inside = (np.abs(ink.astype(int) - np.array(s.background)).sum(-1) > 30)
        blank[i][inside] = ink[inside][0] if inside.any() else 0
    assert accuracy(blank, scenes)["overall"] < 0.1


def test_patterns_differ_from_each_other_at_every_shift():
    """No pattern is another one moved: the scorer reads patterns at any shift, so they must stay apart."""
    masks = {p: pattern_mask(p, 64, (32.0, 32.0)) for p in PATTERNS}
    for a in PATTERNS:
        for b in PATTERNS:
            if a < b:
                same = any(np.array_equal(np.roll(masks[a], (dy, dx), (0, 1))[16:48, 16:48], masks[b][16:48, 16:48])
                           for dy in range(16) for dx in range(16))
                assert not same, (a, b)


def test_training_frequencies_follow_the_recipes_zipf_law():
    f = Frequencies(zipf_s=2.0)
    n = 20_000
    w = TailWorld("train", frequencies=f)
    counts = np.bincount([f.ranking.index(w.pattern_of(i)) for i in range(n)], minlength=len(PATTERNS))
    expected = zipf_weights(len(PATTERNS), 2.0) * n
    assert np.all(np.abs(counts - expected) <= 4 * np.sqrt(expected) + 2)
    assert [len(f.patterns(b)) for b in BUCKETS] == [4, 6, 14]
    assert counts[:4].sum() > 0.85 * n and counts[10:].sum() < 0.06 * n  # the head dominates, the tail is rare


def test_the_database_holds_every_pattern_evenly_and_the_control_no_tail_pattern():
    f = Frequencies()
    db = [TailWorld("database", frequencies=f).scene(i).pattern for i in range(240)]
    assert all(db.count(p) == 10 for p in PATTERNS)
    control = {TailWorld("control_database", frequencies=f).scene(i).pattern for i in range(2000)}
    assert control == set(f.patterns("head")) | set(f.patterns("torso"))
    assert not control & set(f.patterns("tail"))


def test_prompt_records_carry_scene_bucket_and_rank():
    records = prompt_records("test", 2, 64)
    assert len(records) == 2 * len(PATTERNS)
    f = Frequencies()
    for r in records:
        scene = scene_from_dict(r["scene"])
        assert r["prompt"] == scene.caption and r["tag"] == f.bucket(scene.pattern) == bucket_of_caption(r["prompt"])
        assert r["rank"] == f.ranking.index(scene.pattern) + 1


def test_tail_demo_smoke(tmp_path, capsys):
    """`arrag demo` (TailWorld, the default) with the shipped weights on small databases: every method row of
    scores.json holds accuracy (mean, se) and FID per bucket and overall; the plot, the grid and the table."""
    import json

    from arrag.cli import main

    args = ["demo", "--out", str(tmp_path / "demo"), "--per-pattern", "1", "--seeds", "0,1", "--device", "cpu",
            "--database-images", "48", "--retriever-dir", str(tmp_path / "tail")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    scores = json.loads((tmp_path / "demo" / "scores.json").read_text())
    assert scores["world"] == "tail" and set(scores["methods"]) == {"base", "daid", "faid", "faid-noret",
                                                                   "daid-control", "faid-control"}
    for name, m in scores["methods"].items():
        assert set(m["by_bucket"]) == {"head", "torso", "tail", "overall"}
        for b in m["by_bucket"].values():
            assert set(b["accuracy"]) == {"mean", "se"} and 0 <= b["accuracy"]["mean"] <= 1 and b["fid"] >= 0
        if name != "base":
            assert m["vs_base"]["tail"]["verdict"]
    assert scores["ground_truth"]["accuracy"]["overall"] == 1.0
    assert (tmp_path / "demo" / "accuracy_by_frequency.png").is_file() and (tmp_path / "demo" / "grid.png").is_file()
    for name in ("FAiD, control db", "DAiD vs base: tail"):
        assert name in printed
    retrievers = scores["retrievers"]
    assert set(retrievers) == {"world", "control"} and retrievers["control"]["folder"].endswith("tail_control/index")
    # The completion table: the tail prompts, their real top 5 rows given (forced in every run, as its record
    # says), the rest drawn.
    completion = scores["completion"]
    assert completion["rows"] == 5 and completion["of_rows"] == 16 and completion["bucket"] == "tail"
    assert completion["prompts"] == len(Frequencies().patterns("tail"))
    assert set(completion["methods"]) == {"base", "daid", "daid-control"}
    for name, m in completion["methods"].items():
        assert set(m["accuracy"]) == {"mean", "se"} and ("vs_base" in m) == (name != "base")
    assert completion["daid_vs_control"]["verdict"]
    for method in completion["methods"]:
        run = tmp_path / "demo" / "completion" / "rows5" / method / "seed1"
        record = json.loads((run / "settings.json").read_text())
        assert record["given_beginning"] == {**record["given_beginning"], "steps": 5 * 16,
                                             "images": completion["prompts"]}
    assert (tmp_path / "demo" / "completion.png").is_file() and "Completion (14 tail prompts x 2 seed(s))" in printed


def test_two_disc_scenes_are_read_and_counted():
    """With two_fraction > 0 some captions say "two": both discs are read, and one disc for "two" fails."""
    w = TailWorld("validation", size=64, two_fraction=1.0)
    images, scenes = w.images(0, 48), [w.scene(i) for i in range(48)]
    assert all(s.count == 2 and s.caption.startswith("two ") for s in scenes)
    assert accuracy(images, scenes)["overall"] == 1.0
    one = TailWorld("validation", size=64)  # the same patterns and inks, one disc each
    assert accuracy(one.images(0, 48), scenes)["overall"] == 0.0


def test_eval_tail_scores_a_layout_folder_generated_from_its_prompt_file(tmp_path, vq_file, capsys):
    """eval tail-prompts -> a geneval layout (here the ground truth stands in for a generator) -> eval tail."""
    import json

    from arrag.cli import main
    from arrag.eval.layouts import make_layout
    from arrag.eval.prompts import read_prompt_source

    prompts = tmp_path / "p.jsonl"
    assert main(["eval", "tail-prompts", "--out", str(prompts), "--per-pattern", "1", "--split", "validation"]) == 0
    items = read_prompt_source(prompts)
    assert len(items) == len(PATTERNS)
    layout = make_layout("geneval", tmp_path / "gen", 1)
    w = TailWorld("validation", size=64)
    for it in items:
        layout.write(it, w.image(it.index)[None])
    assert main(["eval", "tail", str(tmp_path / "gen"), "--vq", str(vq_file), "--reference-images", "48"]) == 0
    result = json.loads((tmp_path / "gen" / "tail_scores.json").read_text())
    assert result["overall"] == 1.0 and set(result["by_bucket"]) == set(BUCKETS) and result["realism_fid"] >= 0
    assert "tail 1.00" in capsys.readouterr().out
