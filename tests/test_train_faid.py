"""FAiD trainer: loss goes down, only the recipe's parameters move, the merged checkpoint generates,
--resume reproduces the uninterrupted run, accelerate launch works, bad inputs give clear errors."""

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.errors import ArragError
from arrag.janus import JanusPro
from arrag.retrieval import codestore
from arrag.train.construct import construct_train
from arrag.train.train_faid import FaidObjective, FaidTrainConfig, _open_data, build_model, merge_lora, train_faid

WORDS = ["red", "blue", "green", "circle", "square", "left", "of", "above"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_janus_dir, tiny_janus):
    """16 captioned 6x6 code grids in the tiny Janus's VQ, an index over them and K=4 retrieved codes."""
    root = tmp_path_factory.mktemp("faid_world")
    rng = np.random.default_rng(0)
    # A learnable pattern: each image repeats one of 4 row motifs, so retrieval and the caption both help.
    motif = rng.integers(0, 40, (4, 6))
    kinds = rng.integers(0, 4, 16)
    codes = np.stack([np.tile(motif[k], (6, 1)) for k in kinds]).astype(np.uint16)
    captions = [f"{WORDS[k]} {WORDS[3 + k % 2]}" for k in kinds]
    codestore.write_store(root / "store", codes, tiny_janus.vq, shard_size=7, captions=captions)
    build_index(root / "store", root / "idx", progress=False)
    construct_train(root / "store", root / "idx", retrieved_key_num=4, progress=False)
    return {"root": root, "base": str(tiny_janus_dir), "store": str(root / "store"), "idx": str(root / "idx")}


def _cfg(world, out, **kw):
    base = dict(base=world["base"], store=world["store"], out=str(out), num_blender=1, num_hop="1,2",
                retrieved_key_num=4, lora_r=8, lora_alpha=16, batch_size=4, grad_accum=1, epochs=3, lr=1e-3,
                num_workers=0, save_every=4, cpu=True, progress=False)
    return FaidTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(world):
    cfg = _cfg(world, world["root"] / "run_full")
    train_faid(cfg)
    return cfg


def _fixed_batch(cfg, janus):
    store, data, collate = _open_data(dataclasses.replace(cfg, cfg_drop=0.0), janus)
    return store, collate([data[i] for i in range(4)])


def _initial_model(cfg):
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the trainer's own initialisation
    model = build_model(cfg)
    merge_lora(model)  # B = 0 at init: merging changes nothing but the key names
    return model


def test_training_lowers_the_loss_on_a_fixed_batch(trained):
    before = _initial_model(trained).eval()
    after = JanusPro.from_pretrained(trained.out, device="cpu", quiet=True)
    store, batch = _fixed_batch(trained, after)
    with torch.no_grad():
        objective = {name: FaidObjective(m, store.grid) for name, m in [("before", before), ("after", after)]}
        loss = {name: f(**batch).item() for name, f in objective.items()}
    assert loss["after"] < loss["before"] - 0.1, loss
    history = json.loads((trained.output_dir() / "settings.json").read_text())["loss_history"]
    assert len(history) == 12 and history[-1][1] < history[0][1]


def test_only_the_recipe_parameters_change(trained):
    before = {k: v for k, v in _initial_model(trained).state_dict().items()}
    after = load_file(str(trained.output_dir() / "model.safetensors"))
    idle = {k for k in before if ".conv3." in k or ".conv32." in k}  # hop 3 is not used: left out of the file
    assert set(after) == set(before) - idle  # the released layout: no lora_A/lora_B, no base_layer
    assert not any("lora" in k for k in after)
    changed = {k for k in after if not torch.equal(after[k], before[k])}

    def intended(k):
        if k.startswith("gen_head.") or "retrieval_layernorm" in k:
            return True
        if ".self_attn.q_proj." in k or ".self_attn.v_proj." in k:  # LoRA, merged
            return True
        return ".blender." in k

    assert changed == {k for k in after if intended(k)}


def test_merged_checkpoint_reloads_and_generates(trained, world, tmp_path):
    config = json.loads((trained.output_dir() / "config.json").read_text())["language_config"]
    assert config["num_SmoothPatchBlender"] == 2 and config["num_hop"] == [1, 2]  # the original layout: a list
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(trained.output_dir()), "--method", "faid", "--retriever", world["idx"],
                 "--faid-k", "4", "--prompt", "red circle", "--image-size", "96", "--parallel-size", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    from PIL import Image

    images = sorted(out.glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (96, 96)


def test_resume_continues_and_matches_the_uninterrupted_run(trained, world):
    cfg = dataclasses.replace(trained, out=str(world["root"] / "run_resumed"))
    train_faid(dataclasses.replace(cfg, max_steps=6))  # "interrupted" after step 6 (checkpoint written)
    state = json.loads((cfg.output_dir() / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6
    train_faid(dataclasses.replace(cfg, resume=True))
    history = json.loads((cfg.output_dir() / "settings.json").read_text())["loss_history"]
    assert [s for s, _ in history] == list(range(1, 13))
    full, resumed = (load_file(str(c.output_dir() / "model.safetensors")) for c in (trained, cfg))
    for k in full:  # the same data order, dropout masks and optimizer state: the same weights
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)


def test_a_rerun_with_other_settings_is_refused(trained):
    with pytest.raises(ArragError, match="lr differ"):
        train_faid(dataclasses.replace(trained, lr=5e-4, resume=True))


def test_accelerate_launch_one_process_smoke(world, tmp_path):
    out = tmp_path / "launched"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "arrag", "train-faid", "--base", world["base"],
           "--store", world["store"], "--out", str(out), "--num-blender", "1", "--k", "4", "--lora-r", "4",
           "--batch-size", "2", "--grad-accum", "2", "--max-steps", "2", "--num-workers", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "settings.json").read_text())["steps"] == 2


def test_caption_drop_and_candidate_shuffle_are_seeded(world, tiny_janus):
    cfg = _cfg(world, "unused", cfg_drop=0.5)
    _, data, collate = _open_data(cfg, tiny_janus)
    assert data[3]["ids"] == data[3]["ids"] and np.array_equal(data[3]["candidates"], data[3]["candidates"])
    stored = np.asarray(data.retrieved[3], dtype=np.int64)
    got = data[3]["candidates"]
    assert np.array_equal(np.sort(got, 1), np.sort(stored, 1))  # each cell's K codes, reordered
    drops = [data[i]["dropped"] for i in range(len(data) * 8)]  # 8 epochs
    assert 0.35 < np.mean(drops) < 0.65
    item = next(data[i] for i in range(64) if data[i]["dropped"])
    pad = data.prompter.cfg_pad_id
    assert all(t == pad for t in item["ids"][1:-1])
    batch = collate([data[i] for i in range(4)])
    assert batch["candidates"].shape == (4, 36, 4) and batch["codes"].shape == (4, 36)
    assert batch["features"].tolist() == [not data[i]["dropped"] for i in range(4)]


def test_caption_dropped_rows_get_no_features(trained, world):
    from arrag.janus.faid_layers import full_sequence_logits

    model = JanusPro.from_pretrained(trained.output_dir(), device="cpu", quiet=True)
    store, batch = _fixed_batch(trained, model)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["codes"], batch["candidates"], store.grid)
    with torch.no_grad():
        mixed = full_sequence_logits(*args, row_mask=torch.tensor([True, False, True, False]))
        none = full_sequence_logits(*args, row_mask=torch.zeros(4, dtype=torch.bool))
        every = full_sequence_logits(*args)
    torch.testing.assert_close(mixed[[1, 3]], none[[1, 3]])
    torch.testing.assert_close(mixed[[0, 2]], every[[0, 2]], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(every[0], none[0])


def test_prompts_longer_than_the_limit_are_cut_at_a_word(tiny_janus):
    from arrag.janus.prompting import Prompter

    p = Prompter.from_folder(tiny_janus.source_folder)
    full = p.ids("red circle left of blue square above green circle")
    cut = p.ids("red circle left of blue square above green circle", max_len=len(full) - 3)
    assert len(cut) <= len(full) - 3 and cut[-1] == full[-1] and cut[0] == full[0]
    assert cut == p.ids("red circle left of blue square")  # whole words kept, template intact
    with pytest.raises(ArragError, match="template alone"):
        p.ids("red", max_len=2)


def test_bad_inputs_give_clear_errors(world, tmp_path, tiny_janus, capsys):
    with pytest.raises(ArragError, match="K=4, asked for 3"):
        train_faid(_cfg(world, tmp_path / "a", retrieved_key_num=3))
    bare = tmp_path / "bare_store"
    codes = np.zeros((3, 6, 6), np.uint16)
    codestore.write_store(bare, codes, tiny_janus.vq, captions=["a", "b", "c"])
    with pytest.raises(ArragError, match="construct-train"):
        train_faid(_cfg(world, tmp_path / "b", store=str(bare)))
    other = tmp_path / "other_store"
    book = np.random.default_rng(1).normal(size=tuple(tiny_janus.vq.quantize.codebook().shape)).astype(np.float32)
    codestore.write_store(other, codes, book / np.linalg.norm(book, axis=1, keepdims=True), captions=["a", "b", "c"])
    with pytest.raises(ArragError, match="another tokenizer"):
        train_faid(_cfg(world, tmp_path / "c", store=str(other)))
    with pytest.raises(ArragError, match="--num-blender 3: a count of blenders that divides"):
        train_faid(_cfg(world, tmp_path / "d", num_blender=3))
    with pytest.raises(ArragError, match="--deepspeed nope.json: no such file"):
        train_faid(_cfg(world, tmp_path / "e", deepspeed="nope.json"))
    capsys.readouterr()
    assert main(["train-faid", "--base", world["base"], "--store", str(bare), "--out", str(tmp_path / "f"),
                 "--num-blender", "1", "--k", "4", "--cpu", "--num-workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("arrag: error: no retrieved codes") and "Traceback" not in "".join(err)


def test_flags_that_cannot_work_are_refused_before_anything_is_written(world, tmp_path):
    cases = {"batch_size": (0, "--batch-size 0"), "grad_accum": (0, "--grad-accum 0"), "num_hop": ("1,4", "num_hop"),
             "max_steps": (0, "--max-steps 0: must be >= 1"), "epochs": (0, "--epochs 0: train at least one epoch"),
             "keep_checkpoints": (0, "--keep-checkpoints 0"), "seed": (-1, "--seed -1"), "lr": (0.0, "--lr 0.0")}
    for field_name, (value, message) in cases.items():
        out = tmp_path / field_name
        with pytest.raises(ArragError, match=re.escape(message)):
            train_faid(_cfg(world, out, **{field_name: value}))
        assert not out.exists()


def test_a_failed_run_does_not_lock_its_folder(world, tmp_path, tiny_janus):
    other = tmp_path / "other_store"
    book = np.random.default_rng(1).normal(size=tuple(tiny_janus.vq.quantize.codebook().shape)).astype(np.float32)
    codestore.write_store(other, np.zeros((3, 6, 6), np.uint16), book / np.linalg.norm(book, axis=1, keepdims=True),
                          captions=["a", "b", "c"])
    out = tmp_path / "run"
    with pytest.raises(ArragError, match="another tokenizer"):
        train_faid(_cfg(world, out, store=str(other)))
    assert not (out / "train.json").exists()
    train_faid(_cfg(world, out, max_steps=1))  # the corrected command is accepted
    assert json.loads((out / "train.json").read_text())["store"] == world["store"]


def test_a_rerun_without_resume_is_refused_where_checkpoints_exist(world, tmp_path):
    out = tmp_path / "run"
    train_faid(_cfg(world, out, max_steps=4))
    first = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ArragError,
                       match="checkpoints exist in .*: pass --resume .*, or pass --overwrite to delete them"):
        train_faid(_cfg(world, out, max_steps=8))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == first  # nothing rotated away
    train_faid(_cfg(world, out, max_steps=2, overwrite=True))  # starts over
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]
    (out / "checkpoints" / "notes.txt").write_text("mine")
    with pytest.raises(ArragError, match="holds files arrag did not write \\(notes.txt\\)"):
        train_faid(_cfg(world, out, max_steps=2, overwrite=True))
    assert (out / "checkpoints" / "notes.txt").exists()


def test_killed_training_resumes_to_the_uninterrupted_weights(trained, world):
    """SIGKILL `arrag train-faid` after its first checkpoint, rerun with --resume: the same final weights."""
    from killing import arrag_command, run_and_kill

    out = world["root"] / "run_killed"
    flags = {"base": trained.base, "store": trained.store, "out": str(out), "num-blender": "1", "num-hop": "1,2",
             "k": "4", "lora-r": "8", "lora-alpha": "16", "batch-size": "4", "grad-accum": "1", "epochs": "3",
             "lr": "1e-3", "num-workers": "0", "save-every": "4"}
    cmd = arrag_command("train-faid", *[x for k, v in flags.items() for x in (f"--{k}", v)], "--cpu")
    killed = run_and_kill(cmd, lambda: (out / "checkpoints" / "step-0000004").is_dir())
    assert killed and not (out / "model.safetensors").exists()
    assert main(["train-faid", *[x for k, v in flags.items() for x in (f"--{k}", v)], "--cpu", "--resume"]) == 0
    full, resumed = (load_file(str(p / "model.safetensors")) for p in (trained.output_dir(), out))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=1e-6)


def test_train_faid_script_passes_every_setting_through(world, tmp_path):
    """train_FAiD.sh: the model folder decides the sizes; MAX_STEPS and friends reach the CLI."""
    import os

    out = tmp_path / "scripted"
    env = {**os.environ, "BASE": world["base"], "TRAIN_STORE": world["store"], "RETRIEVER": world["idx"], "K": "4",
           "NUM_BLENDER": "1", "MAX_STEPS": "1", "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "LORA_R": "4",
           "NUM_WORKERS": "0", "MIXED_PRECISION": "no", "OUT": str(out), "EXTRA": "--cpu",
           "ARRAG": f"{sys.executable} -m arrag", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    script = os.path.join(os.path.dirname(__file__), "..", "arrag", "train", "train_FAiD.sh")
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["steps"] == 1 and settings["max_steps"] == 1 and settings["lora_r"] == 4
    assert "arrag generate --model" in p.stdout and "--prompt" in p.stdout  # the printed hint is runnable


def test_sequences_longer_than_the_model_are_refused(tmp_path, tiny_janus):
    from arrag.demo.presets import make_tiny_janus

    make_tiny_janus(tmp_path / "short", max_positions=60)
    codestore.write_store(tmp_path / "store", np.zeros((4, 8, 8), np.uint16), tiny_janus.vq,
                          captions=["a", "b", "c", "d"])  # 64 image tokens > 60 positions
    cfg = FaidTrainConfig(base=str(tmp_path / "short"), store=str(tmp_path / "store"), out=str(tmp_path / "o"),
                          cpu=True, num_workers=0)
    with pytest.raises(ArragError, match="64 image tokens, but .* has 60 positions; encode .*--image-size 64"):
        train_faid(cfg)
    assert not (tmp_path / "o").exists()


def test_candidate_gain_is_the_loss_without_minus_with_candidates(trained, world):
    from arrag.train.train_faid import candidate_gain

    gain = candidate_gain(trained.output_dir(), world["store"], retrieved_key_num=4, images=6, batch_size=4)
    model = JanusPro.from_pretrained(trained.output_dir(), device="cpu", quiet=True)
    store, data, collate = _open_data(dataclasses.replace(trained, cfg_drop=0.0), model)
    batch = collate([data[i] for i in range(6)])  # one batch here, two (4 + 2) inside candidate_gain
    losses = {}
    for key, rows in (("with_candidates", torch.ones(6, dtype=torch.bool)),
                      ("without_candidates", torch.zeros(6, dtype=torch.bool))):
        with torch.no_grad():
            loss = FaidObjective(model, store.grid)(batch["input_ids"], batch["attention_mask"], batch["codes"],
                                                    batch["candidates"], rows)
        losses[key] = loss.item()
    assert gain["images"] == 6
    for key, value in losses.items():
        assert gain[key] == pytest.approx(value, rel=1e-5)
    assert gain["gain"] == pytest.approx(losses["without_candidates"] - losses["with_candidates"], rel=1e-4, abs=1e-6)
    assert gain["relative_gain"] == pytest.approx(gain["gain"] / gain["without_candidates"])
    # the mean gate: every blender's gate over the candidates it was given, one batch of all six images here
    from arrag.janus.faid_layers import full_sequence_logits

    gates: list = []
    with torch.no_grad():
        full_sequence_logits(model, batch["input_ids"], batch["attention_mask"], batch["codes"], batch["candidates"],
                             store.grid, gates=gates)
    given = batch["candidates"] >= 0
    want = sum(float(g[given].sum()) for g in gates) / (len(gates) * int(given.sum()))
    assert len(gates) == model.config.language.num_hidden_layers // model.config.language.num_SmoothPatchBlender
    assert 0 < gain["mean_gate"] < 1 and gain["mean_gate"] == pytest.approx(want, rel=1e-5)


def test_zero_blender_init_adds_nothing_at_first_but_learns(world):
    """--blender-init zero: at step 0 the loss is the base model's exactly, the gates sit at 0.5, and the
    second conv of every hop in use gets a gradient (the path the original init can close for good)."""
    from arrag.janus.blender import CONV_NAMES

    cfg = _cfg(world, world["root"] / "unused", blender_init="zero")
    model = build_model(cfg)
    store, batch = _fixed_batch(cfg, model)
    objective = FaidObjective(model, store.grid)
    args = (batch["input_ids"], batch["attention_mask"], batch["codes"], batch["candidates"])
    with_features = objective(*args, torch.ones(4, dtype=torch.bool))
    without = objective(*args, torch.zeros(4, dtype=torch.bool))
    assert with_features.item() == pytest.approx(without.item(), abs=1e-6)
    with_features.backward()
    blender = model.llm.layers[0].blender
    assert torch.sigmoid(blender.mlp[2].bias).item() == 0.5
    for hop in model.config.language.hops:
        assert getattr(blender, CONV_NAMES[hop][1]).weight.grad.abs().sum() > 0
    with pytest.raises(ArragError, match="--blender-init"):
        _cfg(world, world["root"] / "unused", blender_init="kaiming").validate()


def _gain_with_candidates(root, tiny_janus_dir, tiny_janus, candidates_of, images=64, epochs=4):
    """Train FAiD on random code grids whose candidates are candidates_of(codes [N, T]) -> [N, T]; its gain."""
    from arrag.train.construct import retrieved_name
    from arrag.train.train_faid import candidate_gain

    rng = np.random.default_rng(1)
    codes = rng.integers(0, 40, (images, 6, 6)).astype(np.uint16)
    store = codestore.write_store(root / "store", codes, tiny_janus.vq, shard_size=24, captions=["red circle"] * images)
    build_index(root / "store", root / "idx", progress=False)
    construct_train(root / "store", root / "idx", retrieved_key_num=4, progress=False)
    wanted = candidates_of(codes.reshape(images, -1).astype(np.int64))
    start = 0
    for s, shard in enumerate(store.manifest["shards"]):  # keep which cells have candidates; replace the codes
        path = root / "store" / retrieved_name(s)
        got = np.load(path)
        np.save(path, np.where(got >= 0, wanted[start:start + shard["count"], :, None], -1).astype(got.dtype))
        start += shard["count"]
    cfg = FaidTrainConfig(base=str(tiny_janus_dir), store=str(root / "store"), out=str(root / "faid"),
                          num_blender=1, num_hop="1,2", retrieved_key_num=4, lora_r=8, lora_alpha=16, batch_size=4,
                          grad_accum=1, epochs=epochs, lr=3e-3, num_workers=0, save_every=10_000, cpu=True,
                          progress=False, blender_init="zero")
    train_faid(cfg)
    return candidate_gain(cfg.output_dir(), root / "store", retrieved_key_num=4, images=images)["gain"]


def test_faid_learns_to_use_candidates_that_hold_the_answer(tmp_path, tiny_janus_dir, tiny_janus):
    """The plumbing check behind the demo's finding that FAiD ignores ShapesWorld's candidates: where every
    candidate is the true code of its cell (and the codes are random, so neither caption nor prefix tells
    them), training must learn to read them; candidates landing on the wrong cell or position would not."""
    own = _gain_with_candidates(tmp_path / "own", tiny_janus_dir, tiny_janus, lambda c: c)
    # The next cell's code: as informative a signal, but about a token not yet predicted, so it must not help.
    shifted = _gain_with_candidates(tmp_path / "next", tiny_janus_dir, tiny_janus, lambda c: np.roll(c, -1, axis=1))
    assert own > 1.0 and shifted < 0.3, (own, shifted)  # nats per token; measured 2.19 and 0.07


def test_token_weights_weigh_the_loss_and_uniform_ones_change_nothing(trained, world, tmp_path):
    from arrag.janus.faid_layers import full_sequence_logits

    # any uniform weight is the plain mean: the same run, step for step
    np.save(tmp_path / "twos.npy", np.full((16, 36), 2.0, np.float32))
    cfg = _cfg(world, tmp_path / "run", token_weights=str(tmp_path / "twos.npy"))
    train_faid(cfg)
    plain = json.loads((trained.output_dir() / "settings.json").read_text())["loss_history"]
    weighted = json.loads((cfg.output_dir() / "settings.json").read_text())
    assert weighted["token_weights"] == str(tmp_path / "twos.npy")
    np.testing.assert_allclose([v for _, v in weighted["loss_history"]], [v for _, v in plain], rtol=1e-5)
    # other weights: sum(w * ce) / sum(w) per token, against log-softmax computed here
    w = np.random.default_rng(3).random((16, 6, 6)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    model = JanusPro.from_pretrained(trained.out, device="cpu", quiet=True)
    store, batch = _fixed_batch(dataclasses.replace(trained, token_weights=str(tmp_path / "w.npy")), model)
    assert batch["weights"].shape == (4, 36)
    with torch.no_grad():
        got = FaidObjective(model, store.grid)(**batch).item()
        logits = full_sequence_logits(model, batch["input_ids"], batch["attention_mask"], batch["codes"],
                                      batch["candidates"], store.grid, row_mask=batch["features"])
        ce = -torch.log_softmax(logits.double(), -1).gather(2, batch["codes"][..., None]).squeeze(2)
    bw = torch.from_numpy(w[:4].reshape(4, 36)).double()
    assert got == pytest.approx(float((ce * bw).sum() / bw.sum()), rel=1e-5)


@pytest.mark.parametrize("weights, message", [
    (np.ones((16, 35), np.float32), r"shape .*\(16, 35\).* needs \[16, 36\]"),
    (np.ones((16, 36), np.int64), r"a float array"),
    (np.full((16, 36), -1.0, np.float32), r"finite and >= 0"),
])
def test_bad_token_weights_are_refused_in_one_line(world, tmp_path, capsys, weights, message):
    np.save(tmp_path / "w.npy", weights)
    args = ["train-faid", "--base", world["base"], "--store", world["store"], "--out", str(tmp_path / "out"),
            "--k", "4", "--cpu", "--token-weights", str(tmp_path / "w.npy")]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert re.search(r"--token-weights .*" + message, err) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_training_batches_are_the_same_as_reading_the_whole_store(world, tiny_janus):
    """The per-shard, per-item reads (codes by binary search, candidates from each shard's map, captions by offset)
    give the batches that the whole store read into memory gives, bit for bit, with and without workers."""
    from torch.utils.data import DataLoader

    from arrag.train.train_faid import Collate, PassSampler

    cfg = _cfg(world, "unused", cfg_drop=0.3)
    store, data, collate = _open_data(cfg, tiny_janus)
    assert len(store.manifest["shards"]) == 3 and (store.folder / "caption-offsets-00002.npy").is_file()
    # The independent reading: every shard concatenated, every caption in a list, as the trainer read them before.
    codes = np.concatenate([c for _, c in store.iter_chunks(100)]).reshape(len(data), -1).astype(np.int64)
    retrieved = np.concatenate([np.load(world["root"] / "store" / f"retrieved-{s:05d}.npy") for s in range(3)])
    captions = store.captions()
    for i in range(3 * len(data)):  # three epochs: item i is (epoch, image)
        epoch, image = divmod(i, len(data))
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, epoch, image]))
        cand = retrieved[image].astype(np.int64)
        cand = np.take_along_axis(cand, rng.permuted(np.tile(np.arange(cand.shape[1]), (len(cand), 1)), axis=1), 1)
        dropped = bool(rng.random() < cfg.cfg_drop)
        ids = data.prompter.ids(captions[image], data.max_text_len)
        ids = data.prompter.unconditional(ids) if dropped else ids
        got = data[i]
        assert got["ids"] == ids and got["dropped"] == dropped
        np.testing.assert_array_equal(got["codes"], codes[image])
        np.testing.assert_array_equal(got["candidates"], cand)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(data, batch_size=4, sampler=PassSampler(len(data), 2, cfg.seed), num_workers=workers,
                            collate_fn=Collate(data.prompter))
        batches[workers] = list(loader)
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Payload:
    """Unpickling this creates the folder named by `marker`: what a hostile checkpoint file would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_resume_refuses_a_checkpoint_file_with_a_pickle_payload_in_one_line(world, tmp_path, name):
    """A payload in any file --resume reads: one line naming the file and the way to start fresh; nothing runs."""
    cfg = _cfg(world, tmp_path / "run", max_steps=4)
    train_faid(cfg)
    ckpt = sorted((tmp_path / "run" / "checkpoints").iterdir())[-1]
    marker = tmp_path / "payload_ran"
    torch.save({"state": _Payload(str(marker))}, ckpt / name)
    with pytest.raises(ArragError) as e:
        train_faid(dataclasses.replace(cfg, max_steps=8, resume=True))
    line = str(e.value)
    assert "\n" not in line and f"cannot resume from {ckpt / name}" in line, line
    assert "could run code" in line and "--overwrite" in line, line
    assert not marker.exists()
