"""Janus-Pro's config.json, as deepseek-ai writes it, read into typed configs.

The language model part is a LlamaConfig: fields missing from `language_config` take the Llama
defaults, as the original does. FAiD adds `num_SmoothPatchBlender` (the layer interval between
blenders) and `num_hop` (a JSON list such as [1, 2]) to language_config, as the original training
script writes them. A config read from a file is written back with the same keys, order and values,
plus only what changed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arrag.errors import ArragError
from arrag.vq import VQ_PRESETS, VQConfig, vq_config, vq_config_from_janus

FAID_CELLS = ("all", "valid")


def parse_hops(value: Any) -> list[int]:
    """num_hop as the original writes it (a JSON list such as [1, 2]), an int, or a "1,2" string -> [1, 2]."""
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, int):
        items = [value]
    else:
        items = [h for h in str(value).replace(" ", "").strip("[]").split(",") if h]
    try:
        hops = sorted({int(h) for h in items})
    except (TypeError, ValueError):
        raise ArragError(f"num_hop {value!r}: expected hop sizes from 1, 2, 3 such as [1, 2] or '1,2'") from None
    if any(h not in (1, 2, 3) for h in hops):
        raise ArragError(f"num_hop {value!r}: hop sizes must be 1, 2 or 3")
    return hops


@dataclass
class LlamaConfig:
    """The decoder's shape. Defaults are transformers' LlamaConfig defaults (what Janus inherits)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None             # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    # FAiD (None when the checkpoint has no blenders): a blender sits in every layer whose index is a
    # multiple of num_SmoothPatchBlender, an interval (= num_layers // number of blenders, 12 for two
    # blenders in Janus-Pro-1B); num_hop lists the hop sizes, e.g. [1, 2] (a "1,2" string or an int is read).
    num_SmoothPatchBlender: int | None = None
    num_hop: list[int] | None = None
    # arrag's own FAiD field: where the blender output is added. "all" (absent from the file): at every image
    # cell, as the original trains and decodes; "valid": only at targets with retrieval (arrag's first variant).
    faid_cells: str = "all"
    # K, the candidates a blender takes per cell: the original's SmoothPatchBlender keeps the first
    # retrieved_key_num (10 in the released setup, its default, absent from its config) and drops the rest; arrag
    # writes the trained K here when it is not 10.
    retrieved_key_num: int = 10
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, written back unchanged
    source: dict[str, Any] = field(default_factory=dict, repr=False)  # the dict this was read from

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.num_hop = parse_hops(self.num_hop) or None
        if self.faid_cells not in FAID_CELLS:
            raise ArragError(f"language_config.faid_cells={self.faid_cells!r}: choose {' or '.join(FAID_CELLS)}")
        if type(self.retrieved_key_num) is not int or self.retrieved_key_num < 1:
            raise ArragError(f"language_config.retrieved_key_num={self.retrieved_key_num!r}: the blenders' candidates "
                             "per cell, a whole number >= 1")
        if self.num_SmoothPatchBlender is not None and int(self.num_SmoothPatchBlender) < 1:
            raise ArragError(f"language_config.num_SmoothPatchBlender={self.num_SmoothPatchBlender}: it is the "
                             "layer interval between blenders and must be >= 1")
        if self.hidden_act != "silu":
            raise ArragError(f"language_config.hidden_act={self.hidden_act!r}: only 'silu' (Llama) is supported")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ArragError("language_config: num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        d = dict(d)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ArragError(f"language_config: rope scaling {rope} is not supported")
        known -= {"source"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known}, source=dict(d))

    def to_dict(self) -> dict[str, Any]:
        """language_config: the source's keys in their order with current values, then fields that differ
        from what an absent key would mean (so an original config round-trips unchanged)."""
        implied = {"num_key_value_heads": self.num_attention_heads,
                   "head_dim": self.hidden_size // self.num_attention_heads, "faid_cells": "all"}
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        out = dict(self.source)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "source"):
                continue
            value = getattr(self, f.name)
            if f.name in self.source or value != implied.get(f.name, defaults.get(f.name)):
                out[f.name] = list(value) if f.name == "num_hop" and value is not None else value
        for k in ("num_SmoothPatchBlender", "num_hop"):
            if out.get(k) is None:
                out.pop(k, None)
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    @property
    def hops(self) -> list[int]:
        """FAiD hop sizes, e.g. [1, 2]; [] without FAiD."""
        return list(self.num_hop or [])

    def blender_layers(self) -> list[int]:
        """Indices of the layers that hold a FAiD blender (layer_idx % num_SmoothPatchBlender == 0)."""
        if not self.num_SmoothPatchBlender:
            return []
        return [i for i in range(self.num_hidden_layers) if i % self.num_SmoothPatchBlender == 0]


@dataclass
class JanusConfig:
    """The generation path of Janus-Pro: language model, VQ, gen_aligner, gen_head, gen_embed."""

    language: LlamaConfig
    vq: VQConfig
    vq_name: str = "VQ-16"
    image_token_size: int = 16384
    image_token_embed: int = 0  # gen_head's inner width (Janus: = hidden size)
    aligner_input_dim: int = 8
    raw: dict[str, Any] = field(default_factory=dict)  # the whole original config.json

    @property
    def hidden_size(self) -> int:
        return self.language.hidden_size

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> JanusConfig:
        for key in ("language_config", "gen_vision_config", "gen_aligner_config", "gen_head_config"):
            if key not in d:
                raise ArragError(f"{source} has no {key!r}: is this a Janus-Pro checkpoint (deepseek-ai layout)?")
        language = LlamaConfig.from_dict(d["language_config"])
        vq_name, vq = vq_config_from_janus(d, source)
        head = d["gen_head_config"].get("params", {})
        aligner = d["gen_aligner_config"].get("params", {})
        if aligner.get("projector_type", "mlp_gelu") != "mlp_gelu" or aligner.get("depth", 2) != 2:
            raise ArragError(f"{source}: gen_aligner must be an MlpProjector 'mlp_gelu' of depth 2")
        cfg = cls(language=language, vq=vq, vq_name=vq_name,
                  image_token_size=head.get("image_token_size", vq.codebook_size),
                  image_token_embed=head.get("image_token_embed", language.hidden_size),
                  aligner_input_dim=aligner.get("input_dim", vq.codebook_embed_dim), raw=d)
        if cfg.image_token_size != vq.codebook_size:
            raise ArragError(f"{source}: gen_head image_token_size {cfg.image_token_size} differs from the VQ "
                             f"codebook size {vq.codebook_size}")
        for what, n in (("gen_head n_embed", head.get("n_embed")), ("gen_aligner n_embed", aligner.get("n_embed"))):
            if n is not None and n != language.hidden_size:
                raise ArragError(f"{source}: {what}={n} differs from language_config.hidden_size "
                                 f"{language.hidden_size}")
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> JanusConfig:
        path = Path(path)
        if not path.is_file():
            raise ArragError(f"no config.json at {path}; pass a Janus-Pro checkpoint folder")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArragError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """config.json in the original layout: the source's keys, order and unknown entries kept, current values
        written over them (a config read from a file and not changed is written back identical)."""
        d = dict(self.raw)
        d.setdefault("model_type", "multi_modality")
        d.setdefault("architectures", ["MultiModalityCausalLM"])
        d["language_config"] = self.language.to_dict()
        d["language_config"].setdefault("model_type", "llama")
        params = {"image_token_size": self.vq.codebook_size, "n_embed": self.vq.codebook_embed_dim}
        if self.vq_name not in VQ_PRESETS or vq_config(self.vq_name) != self.vq:
            params["arrag_vq_config"] = dataclasses.asdict(self.vq)
        sections = {
            "gen_vision_config": ({"cls": self.vq_name, "model_type": "gen_vision"}, params),
            "gen_aligner_config": ({"cls": "MlpProjector", "model_type": "gen_aligner"},
                                   {"depth": 2, "input_dim": self.aligner_input_dim, "n_embed": self.hidden_size,
                                    "projector_type": "mlp_gelu"}),
            "gen_head_config": ({"cls": "vision_head", "model_type": "gen_head"},
                                {"image_token_embed": self.image_token_embed, "image_token_size": self.image_token_size,
                                 "n_embed": self.hidden_size}),
        }
        for key, (head, values) in sections.items():
            old = d.get(key) if isinstance(d.get(key), dict) else {}
            d[key] = {**old, **head, "params": {**old.get("params", {}), **values}}
        return d
