"""JSON sidecars: every output gets the settings that made it, written next to it."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import arrag
from arrag.fileops import write_text


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp name, then rename)."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def sidecar_path(output: str | Path) -> Path:
    """`out/img.png` -> `out/img.png.json`; a folder gets `settings.json` inside it."""
    output = Path(output)
    return output / "settings.json" if output.is_dir() else output.with_name(output.name + ".json")


def write_sidecar(output: str | Path, settings: Mapping[str, Any]) -> Path:
    """Record `settings` plus the arrag/torch/python versions and a timestamp next to `output`."""
    import torch

    record = {
        "arrag_version": arrag.__version__,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "settings": dict(settings),
    }
    return write_json(sidecar_path(output), record)


def lock_settings(path: str | Path, settings: Mapping[str, Any], refused: str, advice: str,
                  ignore: tuple[str, ...] = ()) -> None:
    """Resumable jobs: the first run records `settings` at `path`; a rerun with other settings is refused.

    The error reads "{refused} with other settings (a, b differ); {advice}". Keys in `ignore` may change.
    """
    path = Path(path)
    if not path.exists():
        write_json(path, settings)
        return
    old = json.loads(path.read_text())
    norm = lambda v: json.dumps(_jsonable(v), sort_keys=True)  # noqa: E731
    diff = [k for k in settings if k not in ignore and norm(old.get(k)) != norm(settings[k])]
    if diff:
        from arrag.errors import ArragError

        raise ArragError(f"{refused} with other settings ({', '.join(diff)} differ); {advice}")
