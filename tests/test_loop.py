"""The sampling loop (decoding/loop.py) and generate(): determinism, batch independence, filters, errors."""

import json

import numpy as np
import pytest
import torch

from arrag.cli import main
from arrag.decoding import SamplingConfig, generate, sample_codes
from arrag.decoding.loop import filter_probs, image_seeds, sample_from
from arrag.errors import ArragError


def test_same_seed_same_images_different_seed_different(tiny_janus):
    kw = dict(parallel_size=2, image_size=32, progress=False)
    a = generate(tiny_janus, ["a red circle"], seed=5, **kw)
    b = generate(tiny_janus, ["a red circle"], seed=5, **kw)
    c = generate(tiny_janus, ["a red circle"], seed=6, **kw)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the two samples of one prompt differ


def test_batch_composition_does_not_change_an_image(tiny_janus):
    """Left-padded mixed-length batches, chunking and index offsets give each image its own result."""
    prompts = ["a square", "two red circles left of a blue triangle", "an orange diamond"]
    cfg = SamplingConfig(parallel_size=2, image_size=64, seed=11, top_k=50)
    together = sample_codes(tiny_janus, prompts, cfg, progress=False)
    chunked = sample_codes(tiny_janus, prompts, SamplingConfig(**{**cfg.settings(), "batch_size": 3}), progress=False)
    torch.testing.assert_close(chunked, together, rtol=0, atol=0)
    for j, p in enumerate(prompts):
        alone = sample_codes(tiny_janus, [p], cfg, image_indices=[2 * j, 2 * j + 1], progress=False)
        torch.testing.assert_close(alone, together[2 * j:2 * j + 2], rtol=0, atol=0)
    picked = sample_codes(tiny_janus, [prompts[2], prompts[0]], cfg, image_indices=[4, 5, 0, 1], progress=False)
    torch.testing.assert_close(picked, together[[4, 5, 0, 1]], rtol=0, atol=0)


def test_image_seeds_are_distinct_and_offsettable():
    s = image_seeds(0, range(6))
    assert len(set(s)) == 6 and image_seeds(0, range(3, 6)) == s[3:] and image_seeds(0, [5, 1]) == [s[5], s[1]]
    assert image_seeds(1, [0]) != image_seeds(0, [1])  # (seed 1, image 0) is not (seed 0, image 1)


def test_filter_probs_against_hand_computation():
    p = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    torch.testing.assert_close(filter_probs(p, top_k=2), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    # top_p=0.6: sorted 0.4, 0.3 reaches 0.7 >= 0.6, so 0.2 and 0.1 go.
    torch.testing.assert_close(filter_probs(p, top_p=0.6), torch.tensor([[0.0, 4 / 7, 0.0, 3 / 7]]))
    torch.testing.assert_close(filter_probs(p, top_p=0.3), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(filter_probs(p), p)


def test_inverse_cdf_sampling():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.25, 0.25, 0.25, 0.25]])
    u = torch.tensor([1e-9, 0.5], dtype=torch.float64)
    assert sample_from(p, u).tolist() == [1, 1]  # zero-probability codes are never drawn
    assert sample_from(p, torch.tensor([1.0, 1.0], dtype=torch.float64)).tolist() == [3, 3]
    # Frequencies follow the distribution.
    g = torch.Generator().manual_seed(0)
    draws = sample_from(torch.tensor([[0.2, 0.5, 0.3]]).expand(20000, 3),
                        1 - torch.rand(20000, generator=g, dtype=torch.float64))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)


def test_greedy_is_deterministic_without_seed_effect(tiny_janus):
    a = sample_codes(tiny_janus, ["a circle"], SamplingConfig(temperature=0, seed=1, image_size=32), progress=False)
    b = sample_codes(tiny_janus, ["a circle"], SamplingConfig(temperature=0, seed=2, image_size=32), progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sampler_errors(tiny_janus):
    with pytest.raises(ArragError, match="not a positive multiple of the VQ downsample factor 16"):
        generate(tiny_janus, ["a"], image_size=100, progress=False)
    with pytest.raises(ArragError, match="--method 'nope' is not available"):
        generate(tiny_janus, ["a"], method="nope", image_size=32)
    with pytest.raises(ArragError, match="--method daid needs a retriever"):
        generate(tiny_janus, ["a"], method="daid", image_size=32)
    with pytest.raises(ArragError, match="--parallel-size 0: must be >= 1"):
        generate(tiny_janus, ["a"], parallel_size=0, image_size=32)


def test_cli_generate_writes_images_and_settings(tmp_path, tiny_janus_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\ntwo squares\n")
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_janus_dir), "--prompts", str(prompts), "--parallel-size", "2",
               "--image-size", "32", "--seed", "3", "--out", str(out), "--device", "cpu",
               "--grid", str(tmp_path / "grid.jpg")])
    assert rc == 0
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["0000_00.png", "0000_01.png", "0001_00.png", "0001_01.png"]
    meta = json.loads((out / "settings.json").read_text())["settings"]
    assert meta["seed"] == 3 and meta["prompts"] == ["a red circle", "two squares"] and meta["cfg_weight"] == 5.0
    assert meta["files"] == files and len(meta["vq_fingerprint"]) == 16
    assert (tmp_path / "grid.jpg").exists() and (tmp_path / "grid.jpg.json").exists()
    rc = main(["generate", "--model", str(tiny_janus_dir), "--out", str(out)])
    assert rc == 2 and "no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["static", "graph"])
def test_fixed_shape_and_graph_steps_give_the_eager_tokens(tiny_janus, mode):
    """The step a CUDA graph records (fixed shapes, tensor indices) samples what the eager forward samples."""
    if mode == "graph" and not torch.cuda.is_available():
        with pytest.raises(ArragError, match="CUDA graphs need the model on a CUDA device"):
            sample_codes(tiny_janus, ["a"], SamplingConfig(image_size=32), progress=False, step_mode="graph")
        return
    model = tiny_janus if mode == "static" else tiny_janus.to("cuda")
    try:
        cfg = SamplingConfig(parallel_size=2, image_size=64, seed=9, top_k=100)
        prompts = ["a red circle", "two blue squares left of a yellow triangle"]  # left padding in the batch
        eager = sample_codes(model, prompts, cfg, progress=False, step_mode="eager")
        other = sample_codes(model, prompts, cfg, progress=False, step_mode=mode)
        torch.testing.assert_close(other, eager, rtol=0, atol=0)
    finally:
        tiny_janus.to("cpu")


def test_a_failed_capture_in_auto_mode_decodes_on_uncaptured(tiny_janus, monkeypatch):
    """'auto' on CUDA captures a graph; if CUDA refuses the capture, the step warns once and goes on uncaptured
    with the eager tokens (the warm-up's moved position counter is put back). An explicit 'graph' raises."""
    from arrag.decoding import loop, step

    class RefusedCapture(step.StaticStep):  # a CPU stand-in: the warm-up runs, then the capture is refused
        def __init__(self, *args, fallback=True, **kw):
            super().__init__(*args, **kw)
            self.capture, self.fallback, self.records = True, fallback, 0

        def _record(self):
            self.records += 1
            self._run(), self._run()  # the warm-up: writes this step's slot, moves next_pos twice
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    made = []
    monkeypatch.setattr(loop, "make_step", lambda mode, *a, **kw: made.append(RefusedCapture(*a, **kw)) or made[-1])
    cfg = SamplingConfig(parallel_size=2, image_size=64, seed=9)
    prompts = ["a red circle", "two blue squares left of a yellow triangle"]
    with pytest.warns(UserWarning, match=r"capture failed \(CUDA error: operation not permitted when stream is "
                                         r"capturing\); decoding with the uncaptured"):
        recovered = sample_codes(tiny_janus, prompts, cfg, progress=False)
    assert made[0].records == 1 and not made[0].capture
    torch.testing.assert_close(recovered, sample_codes(tiny_janus, prompts, cfg, progress=False, step_mode="eager"),
                               rtol=0, atol=0)
    plain = []
    monkeypatch.setattr(loop, "make_step", lambda *a, **kw: plain.append(step.make_step(*a, **kw)) or plain[-1])
    sample_codes(tiny_janus, prompts, cfg, progress=False, step_mode="static")
    assert torch.equal(made[0].cache.next_pos, plain[0].cache.next_pos)  # rotary positions as if never captured
    monkeypatch.setattr(loop, "make_step", lambda mode, *a, **kw: RefusedCapture(*a, **kw, fallback=False))
    with pytest.raises(RuntimeError, match="operation not permitted"):
        sample_codes(tiny_janus, prompts, cfg, progress=False)


def test_the_python_api_is_quiet_unless_asked(tiny_janus, capfd):
    """No progress bar from the API by default (the CLI keeps its own); progress=True shows the decoding bar."""
    from arrag.decoding import Generator, generate

    generate(tiny_janus, ["a red circle"], image_size=64, seed=0)
    Generator(tiny_janus)(["a red circle"], image_size=64, seed=0)
    assert capfd.readouterr().err == ""
    generate(tiny_janus, ["a red circle"], image_size=64, seed=0, progress=True)
    assert "decoding" in capfd.readouterr().err


def test_a_given_beginning_is_drawn_and_the_rest_follows_from_it(tiny_janus):
    """GivenBeginning forces each image's first codes by its index in the run; forcing the codes the model drew
    anyway changes nothing (the rest of the image is the same draw), other codes change the rest."""
    from arrag.decoding.beginning import GivenBeginning

    prompts = ["a square", "an orange diamond"]
    cfg = SamplingConfig(image_size=64, seed=3)  # 4 x 4 codes
    free = sample_codes(tiny_janus, prompts, cfg, image_indices=[2, 0]).reshape(2, -1)
    p = 6
    own = torch.zeros(3, p, dtype=torch.long)
    own[2], own[0] = free[0, :p], free[1, :p]  # image index 2 is prompt 0 here, index 0 prompt 1
    again = sample_codes(tiny_janus, prompts, cfg, hooks=[GivenBeginning(own)], image_indices=[2, 0])
    assert torch.equal(again.reshape(2, -1), free)

    other = (own + 1) % tiny_janus.vq.config.codebook_size
    hook = GivenBeginning(other)
    forced = sample_codes(tiny_janus, prompts, cfg, hooks=[hook], image_indices=[2, 0]).reshape(2, -1)
    assert torch.equal(forced[0, :p], other[2]) and torch.equal(forced[1, :p], other[0])
    assert not torch.equal(forced[:, p:], free[:, p:])  # the rest is drawn after the given beginning
    assert hook.stats["forced_steps"] == p
    assert hook.settings()["given_beginning"]["steps"] == p
    assert hook.settings() != GivenBeginning(own).settings()  # a layout run's record tells beginnings apart


def test_a_given_beginning_refuses_what_cannot_be_drawn(tiny_janus):
    from arrag.decoding.beginning import GivenBeginning

    cfg = SamplingConfig(image_size=32, seed=3)
    with pytest.raises(ArragError, match="no given beginning for image 5: 2 were given"):
        sample_codes(tiny_janus, ["a"], cfg, hooks=[GivenBeginning(torch.zeros(2, 3, dtype=torch.long))],
                     image_indices=[5])
    with pytest.raises(ArragError, match="beyond the codebook"):
        sample_codes(tiny_janus, ["a"], cfg, hooks=[GivenBeginning(torch.full((1, 3), 10**6))])
    with pytest.raises(ArragError, match="Long tensor"):
        GivenBeginning(torch.zeros(3))


def test_cli_generate_completes_a_beginning_image(tmp_path, tiny_janus_dir, tiny_janus, capsys):
    """`generate --begin-image F --begin-rows N` gives every image F's top N rows of codes: the images equal the
    Python API's with GivenBeginning(beginning_codes(...)), the record says so; bad use is one line."""
    from PIL import Image

    from arrag.decoding.beginning import GivenBeginning, beginning_codes
    from arrag.decoding.methods import Generator, MethodConfig

    picture = (np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)  # resized to 64 px
    Image.fromarray(picture).save(tmp_path / "begin.png")
    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_janus_dir), "--prompt", "a red circle", "--prompt", "two squares",
            "--parallel-size", "2", "--image-size", "64", "--seed", "5", "--device", "cpu"]
    assert main([*args, "--out", str(out), "--begin-image", str(tmp_path / "begin.png"), "--begin-rows", "2"]) == 0
    codes = beginning_codes(tiny_janus.vq, picture, 2, 64)
    assert codes.shape == (1, 2 * 4)
    # several images at once (the demo's completion table), each resized as one alone is
    assert torch.equal(beginning_codes(tiny_janus.vq, np.stack([picture, picture]), 2, 64), codes.repeat(2, 1))
    api = Generator(tiny_janus, MethodConfig("base"), extra_hooks=[GivenBeginning(codes)])
    expected = api.generate(["a red circle", "two squares"], SamplingConfig(parallel_size=2, image_size=64, seed=5))
    written = np.stack([np.asarray(Image.open(out / f"{j:04d}_{s:02d}.png")) for j in range(2) for s in range(2)])
    np.testing.assert_array_equal(written, expected)
    meta = json.loads((out / "settings.json").read_text())["settings"]
    assert meta["given_beginning"]["steps"] == 8 and meta["given_beginning"]["images"] == 1
    (tmp_path / "prompts.txt").write_text("not an image\n")
    for extra, message in ((["--begin-rows", "2"], "--begin-rows 2 needs --begin-image FILE"),
                           (["--begin-image", str(tmp_path / "begin.png")], "--begin-image is used with --begin-rows"),
                           (["--begin-image", str(tmp_path / "prompts.txt"), "--begin-rows", "1"], "not a readable"),
                           (["--begin-image", str(tmp_path / "begin.png"), "--begin-rows", "5"],
                            "5 rows given: an image of 64 px has 4 rows of codes")):
        assert main([*args, "--out", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
