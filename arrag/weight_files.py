"""The weight files of a checkpoint folder in transformers' layouts, read tensor by tensor, and the one safe
reader of pickled torch files (.pt, .bin, .pth).

One safetensors or .bin file, or shards named by model.safetensors.index.json / pytorch_model.bin.index.json.
Used by JanusPro.from_pretrained and by load_vq (a Janus-Pro folder carries its VQ as gen_vision_model.*).

A pickled checkpoint can run any code when it is unpickled. `load_pickled` never lets it: it reads with
torch's weights-only unpickler, which builds tensors, containers and plain values and, besides them, only the
types real checkpoints hold (LlamaGen's training script stores its `argparse.Namespace`). Anything else is
refused with one line naming the file, unless the user passes --trust-checkpoint for a file they trust.
"""

from __future__ import annotations

import argparse
import json
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from arrag.errors import ArragError, one_line

# Types besides tensors, containers and plain values that released checkpoints hold (and nothing else).
SAFE_CHECKPOINT_TYPES = (argparse.Namespace,)
TRUST_FLAG = "--trust-checkpoint"


class UntrustedCheckpoint(ArragError):
    """A pickled checkpoint that holds Python objects the weights-only unpickler refuses."""


def load_pickled(path: str | Path, *, trust: bool = False, mmap: bool = False, map_location="cpu", what: str = ""):
    """torch.load of a .pt/.bin/.pth file without running code from it (see the module docstring).

    trust=True (the user's --trust-checkpoint) unpickles a refused file fully, with a warning. Unreadable files
    and refused ones are one ArragError line naming the file (after `what`, e.g. "VQ checkpoint")."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_CHECKPOINT_TYPES)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _refused_global(str(e))
        if not trust:
            raise UntrustedCheckpoint(
                f"refused to load {name}: it holds Python objects besides weights ({found}), which could run code "
                f"when unpickled; if you trust this file, pass {TRUST_FLAG}") from None
        warnings.warn(f"{path} holds Python objects besides weights ({found}); unpickling it fully because "
                      f"{TRUST_FLAG} was given", stacklevel=3)
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e2:
            raise ArragError(f"cannot read {name}: {one_line(e2)}") from None
    except Exception as e:  # truncated, not a torch file, a folder, ...
        raise ArragError(f"cannot read {name}: {one_line(e)}") from None


def _refused_global(message: str) -> str:
    """The name the weights-only unpickler refused, from its message (e.g. 'posix.system')."""
    for line in message.splitlines():
        if "GLOBAL" in line:
            words = line.split()
            return words[words.index("GLOBAL") + 1] if words.index("GLOBAL") + 1 < len(words) else line.strip()
    return "an unsupported type"

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


def iter_tensors(files: list[Path], prefix: str = "", trust: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of every tensor in `files` whose key starts with `prefix` (only those are read); .bin files
    go through load_pickled (`trust`: the user's --trust-checkpoint)."""
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
            state = load_pickled(f, trust=trust, mmap=True)
            if not isinstance(state, dict):
                raise ArragError(f"{f} does not hold a state dict")
            yield from ((k, v) for k, v in state.items() if k.startswith(prefix))
