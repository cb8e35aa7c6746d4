import numpy as np
import pytest
import torch

from arrag.demo.shapes import ShapesWorld
from arrag.errors import ArragError
from arrag.image_io import to_tensor
from arrag.vq import VQModel, load_vq


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vq16_matches_released_layout():
    m = VQModel("VQ-16")
    sd = m.state_dict()
    assert len(sd) == 344
    assert sum(p.numel() for p in m.parameters()) == 71_883_403
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.conv_blocks.4.res.0.nin_shortcut.weight": (512, 256, 1, 1),
        "encoder.conv_blocks.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.conv_blocks.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (8, 256, 1, 1),
        "post_quant_conv.weight": (256, 8, 1, 1),
        "quantize.embedding.weight": (16384, 8),
        "quantize.codebook_used": (65536,),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.conv_blocks.0.attn.2.q.weight": (512, 512, 1, 1),
        "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_blocks.3.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.mid.1.norm.weight": (512,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith("decoder.conv_blocks.4.upsample") for k in sd)
    assert not any(k.startswith("decoder.conv_blocks.1.attn") for k in sd)
    assert m.downsample == 16


def test_llamagen_pt_round_trip(llamagen_pt, tiny_vq):
    loaded = load_vq(llamagen_pt, preset="VQ-tiny-16")
    assert _same_state(loaded, tiny_vq)
    assert loaded.fingerprint() == tiny_vq.fingerprint()


def test_loader_prefers_ema_and_accepts_state_dict(tmp_path, tiny_vq):
    other = VQModel("VQ-tiny-16")
    torch.save({"model": other.state_dict(), "ema": tiny_vq.state_dict()}, tmp_path / "both.pt")
    assert _same_state(load_vq(tmp_path / "both.pt", preset="VQ-tiny-16"), tiny_vq)
    torch.save({"state_dict": other.state_dict()}, tmp_path / "sd.pt")
    assert _same_state(load_vq(tmp_path / "sd.pt", preset="VQ-tiny-16"), other)
    janus = {"gen_vision_model." + k: v for k, v in tiny_vq.state_dict().items()}
    janus["gen_embed.weight"] = torch.zeros(3, 8)
    torch.save(janus, tmp_path / "janus.bin")
    assert _same_state(load_vq(tmp_path / "janus.bin", preset="VQ-tiny-16"), tiny_vq)


def test_safetensors_round_trip_carries_config(tmp_path, tiny_vq):
    tiny_vq.save(tmp_path / "vq.safetensors")
    loaded = load_vq(tmp_path / "vq.safetensors")  # no preset: the config comes from the file's metadata
    assert loaded.config == tiny_vq.config
    assert _same_state(loaded, tiny_vq)


def test_encode_picks_nearest_normalised_code(tiny_vq):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    codes, lat = tiny_vq.encode_to_codes(x, return_latents=True)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    # Independent brute force in float64: latents straight from encoder + quant_conv, normalised by hand.
    with torch.no_grad():
        z = tiny_vq.quant_conv(tiny_vq.encoder(x)).permute(0, 2, 3, 1).double().numpy().reshape(-1, 8)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    book = tiny_vq.quantize.embedding.weight.detach().double().numpy()
    book /= np.linalg.norm(book, axis=1, keepdims=True)
    d = ((z[:, None, :] - book[None]) ** 2).sum(-1)
    chosen = d[np.arange(len(z)), codes.reshape(-1).numpy()]
    np.testing.assert_allclose(chosen, d.min(1), atol=1e-6)
    np.testing.assert_allclose(lat.reshape(-1, 8).double().numpy(), z, atol=1e-5)
    np.testing.assert_allclose(tiny_vq.code_embeddings(codes).detach().reshape(-1, 8).double().numpy(),
                               book[codes.reshape(-1).numpy()], atol=1e-6)


@pytest.mark.parametrize("size", [256, 384])
def test_decode_shapes(tiny_vq, size):
    grid = size // 16
    codes = torch.randint(0, tiny_vq.codebook_size, (1, grid, grid))
    with torch.no_grad():
        out = tiny_vq.decode_codes(codes)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
    assert tiny_vq.grid_size(size) == grid


def test_bad_image_size_and_codes_are_clear(tiny_vq):
    with pytest.raises(ArragError, match="multiple of the VQ downsample factor 16"):
        tiny_vq.encode_to_codes(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ArragError, match=r"codes must lie in \[0, 1024\)"):
        tiny_vq.decode_codes(torch.full((1, 2, 2), 5000))


def test_load_errors_are_one_clear_line(tmp_path, tiny_vq):
    cases = []
    with pytest.raises(ArragError, match="VQ checkpoint .*nope.pt: no such file or folder") as e:
        load_vq(tmp_path / "nope.pt")
    cases.append(e)
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ArragError, match="cannot read VQ checkpoint .*junk.pt") as e:
        load_vq(tmp_path / "junk.pt")
    cases.append(e)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ArragError, match="cannot read VQ checkpoint .*junk.safetensors") as e:
        load_vq(tmp_path / "junk.safetensors")
    cases.append(e)
    torch.save({"optimizer": {}}, tmp_path / "noweights.pt")
    with pytest.raises(ArragError, match="no weights under 'ema', 'model' or 'state_dict'") as e:
        load_vq(tmp_path / "noweights.pt")
    cases.append(e)
    sd = dict(tiny_vq.state_dict())
    sd.pop("quantize.codebook_used")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "keys.pt")
    with pytest.raises(ArragError, match=r"missing keys quantize.codebook_used; unexpected keys extra.weight") as e:
        load_vq(tmp_path / "keys.pt", preset="VQ-tiny-16")
    cases.append(e)
    torch.save({"model": tiny_vq.state_dict()}, tmp_path / "tiny.pt")
    with pytest.raises(ArragError, match=r"tiny.pt \(as VQ-16; --vq-preset chooses another\) does not match the model: "
                                         "missing keys") as e:
        load_vq(tmp_path / "tiny.pt")  # default preset VQ-16: other keys and shapes
    cases.append(e)
    with pytest.raises(ArragError, match=r"key quantize.embedding.weight has shape \(1024, 8\).*\(16384, 8\)") as e:
        load_vq(tmp_path / "tiny.pt", preset={**tiny_vq.config.__dict__, "codebook_size": 16384})
    cases.append(e)
    with pytest.raises(ArragError, match="unknown VQ preset 'VQ-99'") as e:
        load_vq(tmp_path / "tiny.pt", preset="VQ-99")
    cases.append(e)
    for c in cases:
        assert "\n" not in str(c.value)


def test_fingerprint_is_stable_and_tracks_the_codebook(tmp_path, tiny_vq):
    fp = tiny_vq.fingerprint()
    assert fp == tiny_vq.fingerprint() and len(fp) == 16
    torch.manual_seed(0)
    assert VQModel("VQ-tiny-16").fingerprint() == fp  # same seed, same weights
    half = load_vq(_save(tmp_path, tiny_vq), preset="VQ-tiny-16", dtype=torch.bfloat16)
    assert half.quantize.embedding.weight.dtype == torch.float32  # the codebook stays fp32
    assert half.dtype == torch.bfloat16
    assert half.fingerprint() == fp
    changed = load_vq(_save(tmp_path, tiny_vq), preset="VQ-tiny-16")
    with torch.no_grad():
        changed.quantize.embedding.weight[3, 0] += 0.01
    assert changed.fingerprint() != fp and not changed.matches(fp)


def test_fingerprint_does_not_depend_on_device_or_dtype(tmp_path, tiny_vq, monkeypatch):
    """On an H200 the old fingerprint (the codebook normalised on the model's device) differed from the CPU one.
    Here the normalisation is given another rounding, as a GPU kernel would, and the weights take the paths
    of a bf16 CUDA model (cast, moved and back): the fingerprint stays, the old definition does not."""
    fp, legacy = tiny_vq.fingerprint(), tiny_vq.legacy_fingerprint()
    moved = load_vq(_save(tmp_path, tiny_vq), preset="VQ-tiny-16").to(torch.bfloat16).to(torch.float64).float()
    assert moved.fingerprint() == fp
    real_normalize = torch.nn.functional.normalize

    def other_rounding(x, dim=-1, **kw):  # float64 division, then fp32: a last-bit difference on some rows
        return (x.double() / x.double().norm(dim=dim, keepdim=True)).to(x.dtype)

    monkeypatch.setattr(torch.nn.functional, "normalize", other_rounding)
    assert tiny_vq.fingerprint() == fp and tiny_vq.legacy_fingerprint() != legacy
    monkeypatch.setattr(torch.nn.functional, "normalize", real_normalize)
    # Stores and indexes recorded with the pre-0.2 definition are still recognised.
    assert tiny_vq.matches(fp) and tiny_vq.matches(legacy) and not tiny_vq.matches("0123456789abcdef")


def _save(tmp_path, model):
    path = tmp_path / "fp.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_training_pass_has_losses_and_learns():
    torch.manual_seed(0)
    m = VQModel("VQ-tiny-8").train()
    x = to_tensor(ShapesWorld("train", size=32).images(0, 4))
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        out = m(x)
        assert out.reconstruction.shape == x.shape and out.codes.shape == (4, 4, 4)
        rec = torch.nn.functional.mse_loss(out.reconstruction, x)
        loss = rec + out.vq_loss + out.commit_loss
        opt.zero_grad()
        loss.backward()
        assert m.quantize.embedding.weight.grad is not None  # the codebook loss reaches the codebook
        assert m.encoder.conv_in.weight.grad.abs().sum() > 0  # straight-through reaches the encoder
        opt.step()
        losses.append(rec.item())
    assert losses[-1] < 0.5 * losses[0]
    assert m.quantize.codebook_used.abs().sum() > 0
    assert 0 < m.quantize.usage() <= 1


def test_round_trip_is_decode_of_encode(tiny_vq):
    from arrag.image_io import to_uint8

    images = ShapesWorld("validation", size=64).images(0, 5)
    with torch.no_grad():
        expected = to_uint8(tiny_vq.decode_codes(tiny_vq.encode_to_codes(to_tensor(images))), "janus")
    got = tiny_vq.round_trip(images, "janus")
    assert got.dtype == np.uint8 and got.shape == images.shape
    np.testing.assert_array_equal(got, expected)
    batched = tiny_vq.round_trip(images, "janus", batch=2)  # float rounding may move a rare pixel
    assert batched.shape == images.shape and (batched != expected).mean() < 1e-3


def test_cached_codebook_follows_the_weights_and_keeps_gradients():
    torch.manual_seed(1)
    vq = VQModel("VQ-tiny-16")
    q = vq.quantize
    fresh = lambda: torch.nn.functional.normalize(q.embedding.weight.detach().float(), dim=-1)  # noqa: E731
    with torch.no_grad():
        first = q.codebook()
        assert q.codebook() is first  # reused while the weights stay
        torch.testing.assert_close(first, fresh(), rtol=0, atol=0)
        q.embedding.weight[3] = torch.randn(q.embedding.weight.shape[1])  # an in-place change (a dead-code restart)
        torch.testing.assert_close(q.codebook(), fresh(), rtol=0, atol=0)
    vq.to(torch.float64)  # a move: new storage (the codebook stays fp32)
    with torch.no_grad():
        torch.testing.assert_close(q.codebook(), fresh(), rtol=0, atol=0)
    q.codebook()[0].sum().backward()  # training the codebook: not the cache, a differentiable graph
    assert q.embedding.weight.grad is not None and q.embedding.weight.grad[0].abs().sum() > 0


def test_llamagen_and_janus_pro_vq16_layouts_load_into_the_same_model(tmp_path):
    """The original indexes with LlamaGen's vq_ds16_t2i.pt and decodes with Janus-Pro's gen_vision_model: both
    real layouts load into the one VQ-16 (same keys and shapes), and equal weights give equal fingerprints, so
    arrag can tell whether an index and a model share a tokenizer."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)
    vq16 = VQModel("VQ-16")
    state = vq16.state_dict()
    torch.save({"model": state, "steps": 1}, tmp_path / "vq_ds16_t2i.pt")  # LlamaGen's training checkpoint
    janus = tmp_path / "Janus-Pro-1B"
    janus.mkdir()
    (janus / "config.json").write_text(json.dumps({"gen_vision_config": {
        "cls": "VQ-16", "model_type": "gen_vision", "params": {"image_token_size": 16384, "n_embed": 8}}}))
    save_file({f"gen_vision_model.{k}": v.contiguous() for k, v in state.items()}, janus / "model.safetensors")
    a, b = load_vq(tmp_path / "vq_ds16_t2i.pt"), load_vq(janus)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert len(a.state_dict()) == 344 and a.fingerprint() == b.fingerprint()
