"""The weight files of a checkpoint folder in transformers' layouts, read tensor by tensor.

One safetensors or .bin file, or shards named by model.safetensors.index.json / pytorch_model.bin.index.json.
Used by JanusPro.from_pretrained and by load_vq (a Janus-Pro folder carries its VQ as gen_vision_model.*).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from arrag.errors import ArragError, one_line

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weight_files(path: Path) -> list[Path]:
    """The weight files of a checkpoint folder (or the given file), shards resolved through their index."""
    if path.is_file():
        candidates = [path]
    else:
        candidates = [path / n for n in WEIGHT_FILES if (path / n).exists()]
        if not candidates:
            raise ArragError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")
    first = candidates[0]
    if first.name.endswith(".index.json"):
        try:
            weight_map = json.loads(first.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ArragError(f"{first} is not a valid shard index ({e})") from None
        files = [first.parent / n for n in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ArragError(f"{first} names shard {missing[0]}, which is missing; download all shards")
        return files
    return [first]


def iter_tensors(files: list[Path], prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor in `files` whose key starts with `prefix` (only those are read)."""
    for f in files:
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        if k.startswith(prefix):
                            yield k, sf.get_tensor(k)
            except Exception as e:  # OSError, safetensors' own SafetensorError for corrupt headers, ...
                raise ArragError(f"cannot read {f}: {one_line(e)}") from None
        else:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ArragError(f"cannot read {f}: {one_line(e)}") from None
            if not isinstance(state, dict):
                raise ArragError(f"{f} does not hold a state dict")
            yield from ((k, v) for k, v in state.items() if k.startswith(prefix))
