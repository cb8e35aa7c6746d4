"""Janus-Pro text-to-image prompts: tokenizer loading, the "deepseek" chat template, CFG prompt pairs.

A prompt becomes `<|User|>: {text}\\n\\n<|Assistant|>:<begin_of_image>` with BOS in front. Its
unconditional twin keeps BOS and `<begin_of_image>` and replaces every token between them by the CFG
pad id, vocab['<｜▁pad▁｜>'] (resolved from the vocabulary, not tokenizer.pad_token_id).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from arrag.errors import ArragError, one_line

SEP, SEP2 = "\n\n", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<|User|>", "<|Assistant|>"
IMAGE_START_TAG = "<begin_of_image>"
CFG_PAD_TAG = "<｜▁pad▁｜>"
# The tokenizer files of a Janus-Pro checkpoint folder (copied along when a checkpoint is written).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "processor_config.json", "preprocessor_config.json")


def sft_format(turns: list[tuple[str, str]], system_prompt: str = "") -> str:
    """The "deepseek" template: role + ': ' + text + sep (user) / sep2 (assistant); an empty turn is role + ':'."""
    out = system_prompt + SEP if system_prompt else ""
    for i, (role, text) in enumerate(turns):
        out += f"{role}: {text.strip()}{SEP if i % 2 == 0 else SEP2}" if text else f"{role}:"
    return out.strip()


def t2i_prompt(text: str) -> str:
    """The full text-to-image prompt string for one caption (no system prompt, then the image start tag)."""
    return sft_format([(USER, text), (ASSISTANT, "")]) + IMAGE_START_TAG


def load_tokenizer(folder: str | Path):
    """transformers AutoTokenizer from a checkpoint folder, local files only; a clear error when missing."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ArragError(f"no tokenizer files in {folder} (tokenizer.json / tokenizer_config.json); "
                         "copy them from the Janus-Pro checkpoint")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that config.json's model_type is not a text model: expected here
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
        raise ArragError(f"cannot load the tokenizer in {folder}: {one_line(e)}") from None
    finally:
        hf_logging.set_verbosity(level)


@dataclass
class PromptBatch:
    """Interleaved CFG rows: row 2i is image i's conditional prompt, row 2i+1 its unconditional twin."""

    input_ids: torch.Tensor       # Long [2N, L], left-padded
    attention_mask: torch.Tensor  # bool [2N, L], False on left padding


class Prompter:
    """Turns captions into Janus-Pro's conditional/unconditional token rows."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        for tag in (CFG_PAD_TAG, IMAGE_START_TAG):
            if tag not in vocab:
                raise ArragError(f"the tokenizer has no {tag!r} token: is it Janus-Pro's tokenizer?")
        self.cfg_pad_id = vocab[CFG_PAD_TAG]
        self.image_start_id = vocab[IMAGE_START_TAG]
        self.bos_id = tokenizer.bos_token_id
        if self.bos_id is None:
            raise ArragError("the tokenizer has no BOS token: is it Janus-Pro's tokenizer?")
        self.fill_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.cfg_pad_id
        self._warned: set[str] = set()

    @classmethod
    def from_folder(cls, folder: str | Path) -> Prompter:
        return cls(load_tokenizer(folder))

    def ids(self, text: str, max_len: int | None = None) -> list[int]:
        """Token ids of the conditional prompt for one caption, BOS first and <begin_of_image> last.

        With `max_len`, a longer caption is cut at a word boundary so that the template stays whole.
        """
        ids = self._ids(text)
        if max_len is None or len(ids) <= max_len:
            return ids
        words = text.split()
        lo, hi = 0, len(words)  # the longest word prefix that fits: binary search over word counts
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self._ids(" ".join(words[:mid]))) <= max_len:
                lo = mid
            else:
                hi = mid - 1
        ids = self._ids(" ".join(words[:lo]))
        if len(ids) > max_len:
            raise ArragError(f"the prompt template alone is {len(ids)} tokens, longer than the text limit {max_len}")
        return ids

    def _ids(self, text: str) -> list[int]:
        ids = list(self.tokenizer.encode(t2i_prompt(text)))
        unk = self.tokenizer.unk_token_id
        if unk is not None and unk in ids and text not in self._warned:
            self._warned.add(text)
            unknown = [w for w in text.split() if unk in self.tokenizer.encode(w, add_special_tokens=False)]
            warnings.warn(f"the tokenizer does not know {', '.join(repr(w) for w in unknown) or 'some words'} in "
                          f"{text!r}: they become its unknown token{self.known_words_hint()}", stacklevel=3)
        if not ids or ids[0] != self.bos_id:
            ids = [self.bos_id, *ids]
        if ids[-1] != self.image_start_id:
            raise ArragError(f"tokenised prompt does not end with {IMAGE_START_TAG}: is it Janus-Pro's tokenizer?")
        return ids

    def known_words_hint(self, limit: int = 200) -> str:
        """'; it knows these N words: ...' for a word-level tokenizer (the demo models'), '' for a large one."""
        vocab = self.tokenizer.get_vocab()
        if len(vocab) > limit:
            return ""
        special = set(self.tokenizer.all_special_tokens)
        words = sorted(w for w in vocab if w not in special and w.isalpha())
        return f"; it knows these {len(words)} words: {' '.join(words)}"

    def unconditional(self, cond: list[int]) -> list[int]:
        """The CFG twin of a conditional row: BOS and <begin_of_image> kept, every token between them padded."""
        return [cond[0], *([self.cfg_pad_id] * (len(cond) - 2)), cond[-1]]

    def left_pad(self, rows: list[list[int]], device: torch.device | str = "cpu") -> PromptBatch:
        """Rows of ids -> one left-padded batch with its attention mask."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.fill_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = True
        return PromptBatch(ids.to(device), mask.to(device))

    def batch(self, captions: list[str], device: torch.device | str = "cpu") -> PromptBatch:
        """One caption per image -> 2N interleaved rows (cond, uncond), left-padded to the longest."""
        rows = []
        for text in captions:
            cond = self.ids(text)
            rows += [cond, self.unconditional(cond)]
        return self.left_pad(rows, device)
