"""JanusPro loading (original layouts), prompts, and the first-step CFG logits against an independent path."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaModel as HFLlamaModel

from arrag.decoding import DecodingHook, SamplingConfig, sample_codes
from arrag.errors import ArragError
from arrag.janus import JanusPro, Prompter
from arrag.janus.prompting import sft_format, t2i_prompt


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _copy_tokenizer(src, dst):
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            (dst / f.name).write_bytes(f.read_bytes())


def test_prompt_template_is_exact():
    assert t2i_prompt(" A cat. ") == "<|User|>: A cat.\n\n<|Assistant|>:<begin_of_image>"
    assert sft_format([("<|User|>", "hi"), ("<|Assistant|>", "yo")], "sys") == \
        "sys\n\n<|User|>: hi\n\n<|Assistant|>: yo<｜end▁of▁sentence｜>"


def test_cfg_pairs_and_left_padding(tiny_janus_dir):
    p = Prompter.from_folder(tiny_janus_dir)
    assert p.cfg_pad_id == p.tokenizer.get_vocab()["<｜▁pad▁｜>"] and p.cfg_pad_id != p.tokenizer.pad_token_id
    b = p.batch(["a red circle", "two blue squares left of a green triangle"])
    short = p.ids("a red circle")
    assert b.input_ids.shape[0] == 4
    row0 = b.input_ids[0][b.attention_mask[0]].tolist()
    row1 = b.input_ids[1][b.attention_mask[1]].tolist()
    assert row0 == short and short[0] == p.bos_id and short[-1] == p.image_start_id
    assert row1 == [p.bos_id] + [p.cfg_pad_id] * (len(short) - 2) + [p.image_start_id]
    assert not b.attention_mask[0, 0] and b.attention_mask[2].all()  # left padding on the shorter pair


def test_original_bin_layout_loads_and_skips_understanding(tmp_path, tiny_janus_dir, tiny_janus, capsys):
    from safetensors.torch import load_file

    state = load_file(str(tiny_janus_dir / "model.safetensors"))
    d = tiny_janus.config.hidden_size
    state["vision_model.vision_tower.patch_embed.proj.weight"] = torch.zeros(4, 3, 2, 2)
    state["aligner.layers.0.weight"] = torch.zeros(d, 4)
    state["language_model.lm_head.weight"] = torch.zeros(tiny_janus.config.language.vocab_size, d)
    half = len(state) // 2
    keys = list(state)
    torch.save({k: state[k] for k in keys[:half]}, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save({k: state[k] for k in keys[half:]}, tmp_path / "pytorch_model-00002-of-00002.bin")
    index = {"weight_map": {k: f"pytorch_model-0000{1 + (i >= half)}-of-00002.bin" for i, k in enumerate(keys)}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((tiny_janus_dir / "config.json").read_text())
    loaded = JanusPro.from_pretrained(tmp_path, device="cpu")
    err = capsys.readouterr().err
    assert "skipped 3 tensors" in err and len(err.strip().splitlines()) == 1
    assert _equal(loaded, tiny_janus)


def test_save_pretrained_round_trip_sharded(tmp_path, tiny_janus):
    tiny_janus.save_pretrained(tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert _equal(JanusPro.from_pretrained(tmp_path, device="cpu"), tiny_janus)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["gen_head_config"]["params"]["image_token_size"] == 1024
    assert cfg["language_config"]["num_key_value_heads"] == 2


def test_bf16_load_keeps_codebook_and_fingerprint(tiny_janus_dir, tiny_janus):
    m = JanusPro.from_pretrained(tiny_janus_dir, device="cpu", dtype=torch.bfloat16, quiet=True)
    assert m.dtype == torch.bfloat16 and m.vq.quantize.embedding.weight.dtype == torch.float32
    assert m.vq.fingerprint() == tiny_janus.vq.fingerprint()


def test_first_step_cfg_matches_independent_computation(tiny_janus_dir, tiny_janus):
    """Probabilities at the first image step against transformers' LlamaModel + hand-written heads."""
    m, lang = tiny_janus, tiny_janus.config.language
    hf = HFLlamaModel(HFLlamaConfig(vocab_size=lang.vocab_size, hidden_size=lang.hidden_size,
                                    intermediate_size=lang.intermediate_size,
                                    num_hidden_layers=lang.num_hidden_layers,
                                    num_attention_heads=lang.num_attention_heads,
                                    num_key_value_heads=lang.num_key_value_heads, rms_norm_eps=lang.rms_norm_eps,
                                    rope_theta=lang.rope_theta)).eval()
    hf.load_state_dict({k[len("language_model.model."):]: v for k, v in m.state_dict().items()
                        if k.startswith("language_model.model.")})
    sd = m.state_dict()

    def head(h):  # gen_head written out by hand: Linear, exact GELU, Linear
        h = F.gelu(F.linear(h, sd["gen_head.output_mlp_projector.weight"], sd["gen_head.output_mlp_projector.bias"]))
        return F.linear(h, sd["gen_head.vision_head.weight"], sd["gen_head.vision_head.bias"])

    p = Prompter.from_folder(tiny_janus_dir)
    prompts, w, temp = ["a red circle", "three green triangles above a square"], 4.0, 0.7
    expected = []
    with torch.no_grad():
        for text in prompts:  # each prompt alone, no padding: the reference needs no mask
            cond = torch.tensor([p.ids(text)])
            uncond = cond.clone()
            uncond[0, 1:-1] = p.cfg_pad_id
            lc = head(hf(input_ids=cond).last_hidden_state[0, -1])
            lu = head(hf(input_ids=uncond).last_hidden_state[0, -1])
            expected.append(torch.softmax((lu + w * (lc - lu)) / temp, -1))

    class Grab(DecodingHook):
        def adjust_probs(self, state, target, probs):
            if target == 0:
                self.first = probs.clone()
            return probs

    grab = Grab()
    sample_codes(m, prompts, SamplingConfig(cfg_weight=w, temperature=temp, seed=0, image_size=32), hooks=[grab],
                 prompter=p, progress=False)
    torch.testing.assert_close(grab.first, torch.stack(expected), atol=1e-6, rtol=1e-4)


def test_load_errors_are_clear(tmp_path, tiny_janus_dir):
    with pytest.raises(ArragError, match="no such file or folder"):
        JanusPro.from_pretrained(tmp_path / "nope", device="cpu")
    with pytest.raises(ArragError, match="no config.json"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ArragError, match="has no 'language_config'"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text((tiny_janus_dir / "config.json").read_text())
    with pytest.raises(ArragError, match="no weights in"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    cfg = json.loads((tiny_janus_dir / "config.json").read_text())
    cfg["language_config"]["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((tiny_janus_dir / "model.safetensors").read_bytes())
    with pytest.raises(ArragError, match=r"key language_model.model.layers.0.mlp.\w+_proj.weight has shape "
                                         r"\((128, 64|64, 128)\), the model expects \((100, 64|64, 100)\)"):
        JanusPro.from_pretrained(tmp_path, device="cpu")
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArragError, match="cannot read .*model.safetensors"):
        JanusPro.from_pretrained(tmp_path, device="cpu")


def test_missing_tokenizer_is_clear(tmp_path, tiny_janus):
    with pytest.raises(ArragError, match="no tokenizer files in"):
        Prompter.from_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")  # a config without the tokenizer itself
    with pytest.raises(ArragError) as e:
        Prompter.from_folder(tmp_path)
    message = str(e.value)  # transformers' multi-line explanation, whole and on one line
    assert "\n" not in message and message.startswith("cannot load the tokenizer") and "(3)" in message
    folder, tiny_janus.source_folder = tiny_janus.source_folder, None
    try:
        with pytest.raises(ArragError, match="pass prompter="):
            sample_codes(tiny_janus, ["a"], SamplingConfig(image_size=32))
    finally:
        tiny_janus.source_folder = folder


def test_original_layout_config_round_trips_unchanged(tmp_path, tiny_janus_dir):
    """A FAiD config.json as the original training script saves it (num_hop a JSON list, the blender interval,
    the understanding-tower sections, transformers' bookkeeping keys) loads and is written back identical."""
    from arrag.janus.config import JanusConfig

    ours = json.loads((tiny_janus_dir / "config.json").read_text())
    lang = {k: ours["language_config"][k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                     "num_hidden_layers", "num_key_value_heads", "vocab_size")}
    original = {
        "_name_or_path": "deepseek-ai/Janus-Pro-1B",
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"depth": 2, "input_dim": 1024, "n_embed": 64, "projector_type": "mlp_gelu"}},
        "architectures": ["MultiModalityCausalLM"],
        "gen_aligner_config": ours["gen_aligner_config"],
        "gen_head_config": ours["gen_head_config"],
        "gen_vision_config": ours["gen_vision_config"],
        "language_config": {"max_position_embeddings": 2048, "model_type": "llama", "torch_dtype": "float32",
                            **lang, "num_SmoothPatchBlender": 1, "num_hop": [1, 2]},
        "model_type": "multi_modality",
        "torch_dtype": "float32",
        "transformers_version": "4.48.0",
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision",
                          "params": {"image_size": 384, "model_name": "siglip_large_patch16_384", "select_layer": -1}},
    }
    cfg = JanusConfig.from_dict(json.loads(json.dumps(original)))
    assert cfg.language.hops == [1, 2] and cfg.language.blender_layers() == [0, 1]
    assert json.dumps(cfg.to_dict()) == json.dumps(original)  # same keys, order and values
    # Through the model: load the original layout, save it, get the same config.json back.
    folder = tmp_path / "faid"
    JanusPro(cfg).save_pretrained(folder)
    _copy_tokenizer(tiny_janus_dir, folder)
    JanusPro.from_pretrained(folder, device="cpu", quiet=True).save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == (folder / "config.json").read_text()
    assert json.loads((folder / "config.json").read_text()) == original


@pytest.mark.parametrize("value", [[1, 2], "1,2", "[1, 2]", (2, 1)])
def test_num_hop_is_read_in_every_form_and_written_as_a_list(value):
    from arrag.janus.config import LlamaConfig

    cfg = LlamaConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2, "num_SmoothPatchBlender": 12,
                                 "num_hop": value})
    assert cfg.hops == [1, 2] and cfg.to_dict()["num_hop"] == [1, 2]
    assert LlamaConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2, "num_hop": 2}).hops == [2]
    with pytest.raises(ArragError, match="hop sizes must be 1, 2 or 3"):
        LlamaConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2, "num_hop": [1, 4]})
    with pytest.raises(ArragError, match="num_SmoothPatchBlender=0: it is the layer interval"):
        LlamaConfig.from_dict({"hidden_size": 8, "num_attention_heads": 2, "num_SmoothPatchBlender": 0})
