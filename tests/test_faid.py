"""FAiD: the blender's linear split, windows, names, teacher forcing vs decoding, loading, sampling."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from readbacks import ReadBacks, WatchFrom

from arrag.build_retriever.build_index import build_index
from arrag.cli import main
from arrag.decoding import MethodConfig, SamplingConfig, build_hooks, generate, sample_codes
from arrag.errors import ArragError
from arrag.janus import JanusPro, Prompter
from arrag.janus.blender import SmoothPatchBlender, gather_windows
from arrag.janus.faid_layers import FaidContext, full_sequence_logits
from arrag.retrieval import codestore
from arrag.retrieval.neighborhood import causal_window_index, get_neighborhood
from arrag.retrieval.retriever import PatchRetriever


def test_causal_window_index_by_hand():
    idx = causal_window_index(4, 5, 1)
    # Target (2, 2) = cell 12: the row above (6, 7, 8) and the left neighbour (11); the rest masked.
    np.testing.assert_array_equal(idx[12], [[6, 7, 8], [11, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(idx[0], -np.ones((3, 3)))  # first cell: nothing before it
    np.testing.assert_array_equal(idx[5], [[-1, 0, 1], [-1, -1, -1], [-1, -1, -1]])  # column 0: left edge
    big = causal_window_index(6, 6, 2)
    assert big.shape == (36, 5, 5) and (big[14] < 14).all()


@pytest.mark.parametrize("hops", [(1,), (2,), (1, 2), (1, 2, 3)])
def test_linear_split_equals_direct(hops):
    torch.manual_seed(0)
    d, k = 16, 4
    blender = SmoothPatchBlender(d, hops).double()
    with torch.no_grad():
        for p in blender.parameters():  # non-trivial biases and hop weights, so every term is exercised
            if p.ndim == 1:
                p.uniform_(-0.5, 0.5)
    grid = torch.randn(2, 6 * 6, d, dtype=torch.float64)
    idx = torch.from_numpy(causal_window_index(6, 6, max(hops)))
    windows = gather_windows(grid, idx[[7, 14, 21, 35]])
    feats = torch.randn(8, k, d, dtype=torch.float64)
    feats[0, 1] = 0  # a missing candidate is a zero vector
    fast, fast_mean = blender(windows, feats)  # autograd on: neighbourhood part through the convolutions
    ref, ref_mean = blender(windows, feats, direct=True)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # decoding: neighbourhood part through the precomputed per-cell maps
        torch.testing.assert_close(blender(windows, feats)[0], ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast_mean, ref.mean(1))
    with torch.no_grad():  # the cached centre maps (no autograd) follow weight changes
        first, _ = blender(windows, feats)
        getattr(blender, f"conv{max(hops)}").weight.mul_(1.5)
        again, _ = blender(windows, feats)
        ref_again, _ = blender(windows, feats, direct=True)
    assert not torch.allclose(first, again)
    torch.testing.assert_close(again, ref_again, atol=1e-10, rtol=1e-10)
    noisy = windows.clone()
    noisy[:, :, max(hops), max(hops)] = 5.0  # whatever sits in the centre is replaced by the candidate
    torch.testing.assert_close(blender(noisy, feats)[0], blender(windows, feats)[0])
    blender32 = blender.float()  # and in fp32, the dtype the tests elsewhere run in
    f32, _ = blender32(windows.float(), feats.float())
    r32, _ = blender32(windows.float(), feats.float(), direct=True)
    torch.testing.assert_close(f32, r32, atol=1e-5, rtol=1e-4)


def test_windows_hold_only_past_cells():
    grid = torch.arange(1, 17, dtype=torch.float32).reshape(1, 16, 1)  # cell i holds i + 1
    w = gather_windows(grid, torch.from_numpy(causal_window_index(4, 4, 1)))[5, 0]  # target (1, 1) = cell 5
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_released_parameter_names_and_init():
    b = SmoothPatchBlender(8, (1, 2))
    names = set(b.state_dict())
    assert names == {f"{c}.{p}" for c in ("conv1", "conv12", "conv2", "conv22", "conv3", "conv32") for p in
                     ("weight", "bias")} | {"conv_weights", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                            "mlp.2.bias"}
    assert b.conv1.weight.shape == (8, 8, 2, 2) and b.conv22.weight.shape == (8, 8, 3, 3)
    assert b.conv32.weight.shape == (8, 8, 4, 4) and torch.equal(b.conv_weights, torch.ones(2))
    assert float(b.conv2.bias.detach().abs().sum()) == 0
    # The gate MLP as the original's _init_weights: Kaiming-normal (ReLU gain, fan in) and zero biases.
    wide = SmoothPatchBlender(256, (1,))
    for lin in (wide.mlp[0], wide.mlp[2]):
        assert float(lin.bias.detach().abs().sum()) == 0
    assert abs(float(wide.mlp[0].weight.detach().std()) / (2 / 256) ** 0.5 - 1) < 0.05
    assert "conv_weights" not in SmoothPatchBlender(8, (1,)).state_dict()
    with pytest.raises(ValueError, match="subset of 1,2,3"):
        SmoothPatchBlender(8, (4,))


# -- the blenders inside the decoder ---------------------------------------------------------------------------

GRID = (4, 4)


@pytest.fixture(scope="module")
def faid_dir(tmp_path_factory):
    from arrag.demo.presets import make_tiny_janus

    folder = tmp_path_factory.mktemp("faid")
    # 2 layers, num_SmoothPatchBlender 1: blenders in layers 0 and 1, so the progressive path is exercised.
    make_tiny_janus(folder, seed=1, num_SmoothPatchBlender=1, num_hop="1,2")
    return folder


@pytest.fixture(scope="module")
def faid_model(faid_dir):
    m = JanusPro.from_pretrained(faid_dir, device="cpu", quiet=True)
    with torch.no_grad():  # make the blenders matter: random gates, norms and biases instead of near-identity ones
        g = torch.Generator().manual_seed(5)
        for i in (0, 1):
            m.llm.layers[i].retrieval_layernorm.weight.uniform_(0.5, 1.5, generator=g)
            for name, p in m.llm.layers[i].blender.named_parameters():
                if name.endswith("bias") and not name.startswith("conv3"):  # hop 3 is idle here
                    p.uniform_(-0.2, 0.2, generator=g)
    return m


def _batch(model, faid_dir, n=2, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = Prompter.from_folder(faid_dir).batch(["a red circle", "two blue squares left of a triangle"][:n])
    ids, mask = p.input_ids[0::2], p.attention_mask[0::2]  # conditional rows, left-padded
    t = GRID[0] * GRID[1]
    codes = torch.randint(0, model.config.image_token_size, (n, t), generator=g)
    cands = torch.randint(0, model.config.image_token_size, (n, t, k), generator=g)
    cands[0, :, -1] = -1  # fewer hits than asked for: -1 padding
    return ids, mask, codes, cands


def _incremental_logits(model, ids, mask, codes, cands, row_mask):
    """Prefill + one token per step through the static cache, FAiD in step mode."""
    b, length = ids.shape
    t = GRID[0] * GRID[1]
    valid = set(get_neighborhood("L").positions(*GRID).tolist())
    buffers = {i: torch.zeros(b, t + 2, model.config.hidden_size) for i in model.config.language.blender_layers()}
    cache = model.llm.new_cache(b, length + t)
    outs = []
    with torch.no_grad():
        for step in range(t):
            cand = cands[:, step] if step in valid else torch.full_like(cands[:, step], -1)
            ctx = FaidContext("step", GRID, cand, row_mask, target=torch.tensor([step]), buffers=buffers,
                              has_centre=torch.tensor([step in valid]), cells=model.config.language.faid_cells)
            x = model.text_embeddings(ids) if step == 0 else model.image_embeddings(codes[:, step - 1])[:, None]
            outs.append(model.llm(x, mask if step == 0 else None, cache, context=ctx)[:, -1])
    return model.image_logits(torch.stack(outs, 1))


def _original_blender(blender, hidden, feats, grid):
    """The original SmoothPatchBlender's training branch, re-derived on its own (no arrag FAiD code).

    hidden [B, T, D] the layer's normed image-token states, feats [B, T, K, D] the normed retrieved inputs
    -> per-candidate features [B, T, K, D]. Every cell is a target; row 0, column 0 and the last column
    take a zero centre; cells right of and below the centre are zeroed; two convs per hop; softmax hop
    weights; sigmoid gate from Linear-ReLU-Linear.
    """
    b, t, d = hidden.shape
    h, w = grid
    k = feats.shape[2]
    centre = feats.reshape(b, h, w, k, d).clone()
    centre[:, 0], centre[:, :, 0], centre[:, :, -1] = 0, 0, 0
    fmap = hidden.reshape(b, h, w, d).permute(0, 3, 1, 2)
    outs = []
    for hop in blender.hops:
        s = 2 * hop + 1
        win = torch.nn.functional.pad(fmap, (hop, hop, hop, hop)).unfold(2, s, 1).unfold(3, s, 1)  # [B,D,H,W,s,s]
        win = win.permute(0, 2, 3, 1, 4, 5)[:, :, :, None].expand(b, h, w, k, d, s, s).clone()
        win[..., hop, hop + 1:] = 0
        win[..., hop + 1:, :] = 0
        win[..., hop, hop] = centre
        a_conv, b_conv = {1: ("conv1", "conv12"), 2: ("conv2", "conv22"), 3: ("conv3", "conv32")}[hop]
        a_conv, b_conv = getattr(blender, a_conv), getattr(blender, b_conv)
        y = torch.nn.functional.conv2d(win.reshape(-1, d, s, s), a_conv.weight, a_conv.bias)
        outs.append(torch.nn.functional.conv2d(y, b_conv.weight, b_conv.bias).reshape(b, h, w, k, d))
    mix = torch.softmax(blender.conv_weights, 0) if len(outs) > 1 else torch.ones(1)
    conv_out = sum(m * o for m, o in zip(mix, outs, strict=True))
    gate = torch.sigmoid(blender.mlp[2](torch.relu(blender.mlp[0](conv_out))))
    return (conv_out * gate).reshape(b, t, k, d)


def _original_training_logits(model, ids, mask, codes, cands):
    """The original decoder layers' training forward (llama_conv.py): text + all T image tokens in, the
    blender at every image cell, the mean over K added at positions -T-1 .. -2, per-candidate outputs
    handed to the next blender. Runs in our decoder through its after-attention hook point."""
    t = GRID[0] * GRID[1]
    length = ids.shape[1]
    retrieved = model.image_embeddings(cands.clamp_min(0))
    retrieved[cands < 0] = 0
    state = {"retrieved": retrieved}

    def hook(h, normed, idx, context):
        layer = model.llm.layers[idx]
        out = _original_blender(layer.blender, normed[:, -t:], layer.retrieval_layernorm(state["retrieved"]), GRID)
        state["retrieved"] = out
        h = h.clone()
        h[:, -t - 1:-1] += out.mean(2)
        return h

    layers = model.config.language.blender_layers()
    saved = {i: model.llm.layers[i].after_attention for i in layers}
    for i in layers:
        model.llm.layers[i].after_attention = hook
    try:
        embeds = torch.cat([model.text_embeddings(ids), model.image_embeddings(codes)], 1)
        hidden = model.llm(embeds, torch.cat([mask, torch.ones(len(ids), t, dtype=torch.bool)], 1), context="on")
    finally:
        for i in layers:
            model.llm.layers[i].after_attention = saved[i]
    return model.image_logits(hidden[:, length - 1:length - 1 + t])


def test_teacher_forcing_equals_the_original_decoder_layer(faid_model, faid_dir):
    ids, mask, codes, cands = _batch(faid_model, faid_dir)
    with torch.no_grad():
        ours = full_sequence_logits(faid_model, ids, mask, codes, cands, GRID)
        original = _original_training_logits(faid_model, ids, mask, codes, cands)
        plain = full_sequence_logits(faid_model, ids, mask, codes, None, GRID)
    torch.testing.assert_close(ours, original, atol=2e-5, rtol=2e-5)
    # Every cell is blended, the first one included (zero centre, zero window: the gated bias chain).
    assert (ours[:, 0] - plain[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("cells", ["all", "valid"])
def test_teacher_forcing_equals_incremental_decoding(faid_model, faid_dir, cells):
    lang = faid_model.config.language
    ids, mask, codes, cands = _batch(faid_model, faid_dir)
    lang.faid_cells = cells
    try:
        with torch.no_grad():
            full = full_sequence_logits(faid_model, ids, mask, codes, cands, GRID)
            plain = full_sequence_logits(faid_model, ids, mask, codes, None, GRID)
        step = _incremental_logits(faid_model, ids, mask, codes, cands, torch.ones(2, dtype=torch.bool))
    finally:
        lang.faid_cells = "all"
    assert full.shape == (2, 16, faid_model.config.image_token_size)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full, plain)  # the blenders change the logits
    if cells == "valid":  # arrag's first variant: nothing changes before the first valid target (cell 5 at 4x4)
        torch.testing.assert_close(full[:, :5], plain[:, :5], rtol=0, atol=0)


def test_edges_get_no_retrieval_and_the_past_is_untouched(faid_model, faid_dir):
    ids, mask, codes, cands = _batch(faid_model, faid_dir)
    valid = get_neighborhood("L").positions(*GRID)
    with torch.no_grad():
        ref = full_sequence_logits(faid_model, ids, mask, codes, cands, GRID)
        other = cands.clone()
        invalid = [c for c in range(16) if c not in set(valid.tolist())]  # row 0, column 0, last column
        other[:, invalid] = (other[:, invalid] + 7) % 1024
        torch.testing.assert_close(full_sequence_logits(faid_model, ids, mask, codes, other, GRID), ref,
                                   rtol=0, atol=0)
        t = int(valid[3])  # change one valid target's candidates: logits before it do not move, at it they do
        other = cands.clone()
        other[:, t] = (other[:, t] + 11) % 1024
        moved = full_sequence_logits(faid_model, ids, mask, codes, other, GRID)
    torch.testing.assert_close(moved[:, :t], ref[:, :t], rtol=0, atol=0)
    assert not torch.allclose(moved[:, t], ref[:, t])


def test_unconditional_rows_are_untouched(faid_model, faid_dir):
    ids, mask, codes, cands = _batch(faid_model, faid_dir)
    row_mask = torch.tensor([True, False])
    got = _incremental_logits(faid_model, ids, mask, codes, cands, row_mask)
    none = _incremental_logits(faid_model, ids, mask, codes, torch.full_like(cands, -1), torch.zeros(2, dtype=bool))
    torch.testing.assert_close(got[1], none[1], rtol=0, atol=0)
    assert not torch.allclose(got[0], none[0])


def test_faid_checkpoint_round_trip_and_released_names(tmp_path, faid_dir, faid_model):
    cfg = json.loads((faid_dir / "config.json").read_text())["language_config"]
    assert cfg["num_SmoothPatchBlender"] == 1 and cfg["num_hop"] == [1, 2] and "faid_cells" not in cfg
    from safetensors.torch import load_file, save_file

    state = load_file(str(faid_dir / "model.safetensors"))
    for key in ("layers.0.blender.conv1.weight", "layers.1.blender.conv22.bias", "layers.0.blender.conv_weights",
                "layers.1.blender.mlp.2.weight", "layers.0.retrieval_layernorm.weight"):
        assert "language_model.model." + key in state, key
    faid_model.save_pretrained(tmp_path / "a")
    again = JanusPro.from_pretrained(tmp_path / "a", device="cpu", quiet=True)
    sa, sb = faid_model.state_dict(), again.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # A checkpoint without the idle hop-3 convs (num_hop "1,2") loads too.
    trimmed = {k: v for k, v in state.items() if ".blender.conv3" not in k}
    (tmp_path / "b").mkdir()
    save_file(trimmed, str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "config.json").write_text((faid_dir / "config.json").read_text())
    JanusPro.from_pretrained(tmp_path / "b", device="cpu", quiet=True)


@pytest.fixture(scope="module")
def faid_retriever(tmp_path_factory, faid_model):
    root = tmp_path_factory.mktemp("faid_index")
    codes = np.random.default_rng(2).integers(0, 40, (200, 4, 4)).astype(np.uint16)
    codestore.write_store(root / "store", codes, faid_model.vq)
    build_index(root / "store", root / "index", progress=False)
    return root / "index"


def test_faid_sampling_is_seeded_and_uses_retrieval(faid_model, faid_retriever, tiny_janus):
    r = PatchRetriever.load(faid_retriever)
    kw = dict(image_size=64, seed=3, progress=False, parallel_size=2)
    a = generate(faid_model, ["a red circle", "a square"], method="faid", retriever=r, **kw)
    b = generate(faid_model, ["a red circle", "a square"], method="faid", retriever=r, **kw)
    base = generate(faid_model, ["a red circle", "a square"], **kw)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 64, 64, 3) and not np.array_equal(a, base)
    combo = sample_codes(faid_model, ["a circle"], SamplingConfig(image_size=64, seed=3, parallel_size=2),
                         hooks=build_hooks(faid_model, MethodConfig("faid+daid", daid_lambda=1.0, daid_k=4), r),
                         progress=False)
    database_codes = set(range(40))  # the index holds codes 0..39 only: lambda 1 keeps valid targets there
    valid = get_neighborhood("L").positions(*GRID)
    assert set(combo.reshape(2, -1)[:, valid].flatten().tolist()) <= database_codes
    assert not hasattr(faid_model, "faid_context")  # the candidates travel with each forward call, never stored
    with pytest.raises(ArragError, match="has no FAiD blenders"):
        generate(tiny_janus, ["a"], method="faid", retriever=r, **kw)


def test_cli_faid_and_script(tmp_path, faid_dir, faid_retriever):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(faid_dir), "--prompt", "a red circle", "--method", "faid",
                 "--retriever", str(faid_retriever), "--faid-k", "5", "--image-size", "64", "--out", str(out),
                 "--device", "cpu"]) == 0
    meta = json.loads((out / "settings.json").read_text())["settings"]
    assert meta["faid_k"] == 5 and meta["method"] == "faid" and meta["method_stats"]["steps_augmented"] == 6
    script = os.path.join(os.path.dirname(__file__), "..", "arrag", "t2i_example", "t2i_faid_L.sh")
    env = {"PATH": "/usr/bin:/bin", "MODEL": str(faid_dir), "RETRIEVER": str(faid_retriever),
           "OUTPUT": str(tmp_path / "example_t2i_faid.jpg"), "IMAGE_SIZE": "64", "PARALLEL_SIZE": "2",
           "DEVICE": "cpu", "ARRAG": f"{sys.executable} -m arrag"}
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "example_t2i_faid.jpg").exists()


def test_faid_and_daid_steps_read_nothing_back(faid_model, faid_retriever, tmp_path):
    """Past the first step, FAiD's and FAiD+DAiD's steps (torch search, candidates, the blenders inside the
    fixed-shape step a CUDA graph replays) run no operation that would make a GPU wait (see readbacks.py)."""
    build_index(faid_retriever.parent / "store", tmp_path / "ivf", factory="IVF4,Flat", progress=False)
    for folder in (faid_retriever, tmp_path / "ivf"):  # exact and IVF search
        r = PatchRetriever.load(folder, backend="torch")
        for method in ("faid", "faid+daid"):
            with ReadBacks() as rb:
                hooks = [WatchFrom(rb), *build_hooks(faid_model, MethodConfig(method, daid_k=6), r)]
                sample_codes(faid_model, ["a red circle", "a square"], SamplingConfig(image_size=64, seed=5),
                             hooks=hooks, progress=False, step_mode="static")
            assert rb.seen == [], (folder.name, method)


@pytest.mark.parametrize("mode", ["static", "graph"])
def test_faid_and_daid_in_the_fixed_shape_step_give_the_eager_tokens(faid_model, faid_retriever, mode):
    if mode == "graph" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    r = PatchRetriever.load(faid_retriever)
    model = faid_model if mode == "static" else faid_model.to("cuda")
    try:
        cfg = SamplingConfig(parallel_size=2, image_size=64, seed=5)
        for method in ("faid", "faid+daid"):
            hooks = lambda m=method: build_hooks(model, MethodConfig(m, daid_lambda=0.5, daid_k=6), r)  # noqa: E731
            eager = sample_codes(model, ["a red circle", "a square"], cfg, hooks=hooks(), progress=False,
                                 step_mode="eager")
            other = sample_codes(model, ["a red circle", "a square"], cfg, hooks=hooks(), progress=False,
                                 step_mode=mode)
            torch.testing.assert_close(other, eager, rtol=0, atol=0)
    finally:
        faid_model.to("cpu")


def test_a_faid_k_above_the_models_k_uses_the_nearest_k(faid_model, faid_retriever):
    """The original blender keeps the first retrieved_key_num candidates (10 in the released setup)."""
    r = PatchRetriever.load(faid_retriever)
    kw = dict(image_size=64, seed=5, progress=False, parallel_size=2)
    assert faid_model.config.language.retrieved_key_num == 10
    ten = generate(faid_model, ["a red circle"], method="faid", retriever=r, faid_k=10, **kw)
    with pytest.warns(UserWarning, match="--faid-k 20 is more than the 10 candidates"):
        twenty = generate(faid_model, ["a red circle"], method="faid", retriever=r, faid_k=20, **kw)
    np.testing.assert_array_equal(twenty, ten)
    four = generate(faid_model, ["a red circle"], method="faid", retriever=r, faid_k=4, **kw)
    assert not np.array_equal(four, ten)  # fewer than K still means fewer
    from arrag.janus.config import LlamaConfig

    assert "retrieved_key_num" not in LlamaConfig().to_dict()  # the original's configs round-trip unchanged
    five = LlamaConfig(retrieved_key_num=5).to_dict()
    assert five["retrieved_key_num"] == 5 and LlamaConfig.from_dict(five).retrieved_key_num == 5
    with pytest.raises(ArragError, match="retrieved_key_num=0"):
        LlamaConfig(retrieved_key_num=0)
