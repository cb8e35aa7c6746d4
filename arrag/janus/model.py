"""JanusPro: the text-to-image generation path of deepseek-ai's Janus-Pro, in the original key layout.

Image token id -> gen_embed (a learned [16384, 8] table, not the VQ codebook) -> gen_aligner (Linear,
GELU, Linear) -> the Llama decoder -> gen_head (Linear, GELU, Linear) -> logits over 16384 image codes.
The VQ (gen_vision_model) turns a finished code grid into pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arrag import hub
from arrag.fileops import atomic_path, write_text
from arrag.janus.blender import CONV_NAMES
from arrag.janus.config import JanusConfig
from arrag.janus.faid_layers import attach_blenders
from arrag.janus.llama import DecodeLinear, LlamaCausalLM
from arrag.vq import VQModel, check_finite, load_state_strict
from arrag.weight_files import iter_tensors, weight_files

# Keys of the full Janus-Pro checkpoint that the generation path does not use.
SKIPPED_PREFIXES = ("vision_model.", "aligner.", "language_model.lm_head.")
# Every file save_pretrained and the trainers write into a checkpoint folder (what arrag may replace).
CHECKPOINT_FILES = (r"config\.json", r"model\.safetensors", r"model-\d{5}-of-\d{5}\.safetensors",
                    r"model\.safetensors\.index\.json", r"settings\.json", r"tokenizer\.json",
                    r"tokenizer_config\.json", r"special_tokens_map\.json", r"tokenizer\.model",
                    r"processor_config\.json", r"preprocessor_config\.json")


class MlpProjector(nn.Module):
    """Janus's 'mlp_gelu' projector of depth 2: `layers.0` Linear(in, D), exact GELU, `layers.2` Linear(D, D)."""

    def __init__(self, input_dim: int, n_embed: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_dim, n_embed), nn.GELU(), nn.Linear(n_embed, n_embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class VisionHead(nn.Module):
    """Janus's gen_head: output_mlp_projector Linear(D, E), GELU, vision_head Linear(E, image_token_size)."""

    def __init__(self, n_embed: int, image_token_embed: int, image_token_size: int):
        super().__init__()
        self.output_mlp_projector = DecodeLinear(n_embed, image_token_embed)
        self.vision_head = DecodeLinear(image_token_embed, image_token_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(F.gelu(self.output_mlp_projector(x)))


class JanusPro(nn.Module):
    def __init__(self, config: JanusConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.language_model = LlamaCausalLM(config.language)
        self.gen_vision_model = VQModel(config.vq)
        self.gen_aligner = MlpProjector(config.aligner_input_dim, d)
        self.gen_head = VisionHead(d, config.image_token_embed, config.image_token_size)
        self.gen_embed = nn.Embedding(config.image_token_size, config.aligner_input_dim)
        self.source_folder: Path | None = None
        if self.has_faid:
            attach_blenders(self)

    @property
    def has_faid(self) -> bool:
        """True when the config carries FAiD blenders (num_SmoothPatchBlender and num_hop)."""
        return bool(self.config.language.num_SmoothPatchBlender and self.config.language.hops)

    # -- pieces the sampler and FAiD use ------------------------------------------------------------------
    @property
    def llm(self):
        return self.language_model.model

    @property
    def vq(self) -> VQModel:
        return self.gen_vision_model

    @property
    def device(self) -> torch.device:
        return self.gen_head.vision_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gen_head.vision_head.weight.dtype

    def text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Long [B, T] -> [B, T, D] (the language model's own token table)."""
        return self.llm.embed_tokens(input_ids)

    def image_embeddings(self, codes: torch.Tensor) -> torch.Tensor:
        """Image codes Long [...] -> [..., D]: gen_aligner(gen_embed(code))."""
        return self.gen_aligner(self.gen_embed(codes))

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden [..., D] -> fp32 logits [..., image_token_size]."""
        return self.gen_head(hidden).float()

    # -- files --------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, quiet: bool = False,
                        trust_checkpoint: bool = False) -> JanusPro:
        """Load the original deepseek-ai layout (config.json + safetensors or .bin, single or sharded).

        `path` is the checkpoint folder, or a weights file with config.json beside it. The understanding
        tower and lm_head are skipped (one notice); everything else loads strictly. dtype defaults to
        bf16 on CUDA and fp32 on CPU; device defaults to CUDA when available. A .bin never runs code
        (weight_files.load_pickled; `trust_checkpoint` is the user's --trust-checkpoint), and weights holding
        NaN or inf are refused.
        """
        from arrag.runtime import default_dtype, resolve_device

        path = hub.resolve(path, "model")  # a Hub id (deepseek-ai/Janus-Pro-1B) comes from the cache or a download
        if not path.exists():
            raise hub.missing_path_error(path, "model")
        folder = path if path.is_dir() else path.parent
        config = JanusConfig.from_file(folder / "config.json")
        files = weight_files(path)
        device = resolve_device(device or "auto")
        dtype = dtype or default_dtype(device)
        with torch.device("meta"):
            model = cls(config)
        state, skipped = {}, 0
        for key, tensor in iter_tensors(files, trust=trust_checkpoint):
            if key.startswith(SKIPPED_PREFIXES):
                skipped += 1
                continue
            state[key] = tensor
        _fill_unused_hop_convs(model, state)
        load_state_strict(model, state, f"Janus checkpoint {folder}", assign=True)
        check_finite(state, f"Janus checkpoint {folder}")
        if skipped and not quiet:
            print(f"arrag: {folder}: skipped {skipped} tensors not used for text-to-image "
                  f"(understanding tower, aligner, lm_head)", file=sys.stderr)
        model.source_folder = folder  # where the tokenizer lives
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, folder: str | Path, max_shard_bytes: int = 5 * 2**30,
                        dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors (sharded with an index past max_shard_bytes), original keys.

        The convs of FAiD hops the config does not use are left out (loading fills them with zeros). `dtype`
        casts floating weights on the way out (e.g. bf16 to halve a file); the VQ codebook stays fp32.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        idle = _idle_hop_conv_keys(self)
        state = {}
        for k, v in self.state_dict().items():
            if k in idle:
                continue
            v = v.detach().contiguous().cpu()
            if dtype is not None and v.is_floating_point() and "quantize.embedding" not in k:
                v = v.to(dtype)
            state[k] = v
        shards, current, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[k] = v
            size += nbytes
        shards.append(current)
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for name, shard in zip(names, shards, strict=True):
            with atomic_path(folder / name) as tmp:
                save_file(shard, str(tmp), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                     "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
            write_text(folder / "model.safetensors.index.json", json.dumps(index, indent=2))
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = str(dtype or self.dtype).removeprefix("torch.")  # what the weights are stored in
        write_text(folder / "config.json", json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return folder


def _idle_hop_conv_keys(model: JanusPro) -> dict[str, torch.Size]:
    """Keys (and shapes) of the blender convs of hops the config does not use."""
    if not model.has_faid:
        return {}
    hops = set(model.config.language.hops)
    keys = {}
    for i in model.config.language.blender_layers():
        for h, names in CONV_NAMES.items():
            if h in hops:
                continue
            for name in names:
                for p in ("weight", "bias"):
                    keys[f"language_model.model.layers.{i}.blender.{name}.{p}"] = \
                        getattr(model.llm.layers[i].blender, name).get_parameter(p).shape
    return keys


def _fill_unused_hop_convs(model: JanusPro, state: dict) -> None:
    """A FAiD checkpoint may omit the convs of hops it does not use; give those idle convs zeros."""
    for key, shape in _idle_hop_conv_keys(model).items():
        if key not in state:
            state[key] = torch.zeros(shape)
