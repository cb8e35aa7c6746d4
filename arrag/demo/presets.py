"""Tiny presets of the real classes: a word-level Janus-style tokenizer and small Janus configs.

The tokenizer carries Janus-Pro's special tokens and loads with transformers' AutoTokenizer, so the
same prompting code serves the tiny models and Janus-Pro.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from arrag.demo.shapes import COLORS, NUMBER_WORDS, RELATIONS, SHAPES
from arrag.janus.config import JanusConfig, LlamaConfig
from arrag.janus.model import JanusPro
from arrag.janus.prompting import ASSISTANT, CFG_PAD_TAG, IMAGE_START_TAG, SEP2, USER
from arrag.vq import vq_config

BOS = "<｜begin▁of▁sentence｜>"
SPECIAL_TOKENS = [BOS, SEP2, "<unk>", "<pad>", CFG_PAD_TAG, IMAGE_START_TAG, "<end_of_image>",
                  "<image_placeholder>", USER, ASSISTANT]


def shapes_vocabulary() -> list[str]:
    """Every word a ShapesWorld caption can use, plus punctuation."""
    words = {"a", "an", "and", "of", "photo", ":", ".", ","}
    words |= set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(NUMBER_WORDS.values())
    for rel in RELATIONS:
        words |= set(rel.split())
    return sorted(words)


def build_word_tokenizer(folder: str | Path, words: list[str] | None = None):
    """Write a word-level tokenizer (tokenizer.json + config) with Janus-Pro's special tokens; return it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = words if words is not None else shapes_vocabulary()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=SEP2, unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left",
                                   additional_special_tokens=SPECIAL_TOKENS[4:])
    fast.save_pretrained(str(folder))
    return fast


def tiny_janus_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, vq_preset: str = "VQ-tiny-16", max_positions: int = 2048,
                      **language) -> JanusConfig:
    """A small JanusConfig of the real classes (Llama decoder, VQ preset, aligner, head)."""
    lang = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, **language)
    vq = vq_config(vq_preset)
    return JanusConfig(language=lang, vq=dataclasses.replace(vq), vq_name=vq_preset,
                       image_token_size=vq.codebook_size, image_token_embed=hidden,
                       aligner_input_dim=vq.codebook_embed_dim)


def make_tiny_janus(folder: str | Path, seed: int = 0, **config) -> JanusPro:
    """Randomly initialised tiny Janus written in the original layout (config.json, safetensors, tokenizer)."""
    folder = Path(folder)
    tokenizer = build_word_tokenizer(folder)
    torch.manual_seed(seed)
    model = JanusPro(tiny_janus_config(len(tokenizer), **config)).eval()
    model.save_pretrained(folder)
    return model
