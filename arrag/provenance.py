"""JSON sidecars: every output gets the settings that made it, written next to it.

Each sidecar and settings lock also names the command that wrote it (the `arrag_output` field): that is how
arrag knows a folder or file is its own. It writes only into folders that are empty or that such a record
marks as made by the same command, and replaces only files a record of its own lists.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import arrag
from arrag.errors import ArragError
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


OUTPUT_FIELD = "arrag_output"  # which arrag command made the output a sidecar describes


def read_json_dict(path: str | Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def made_by(path: str | Path, kind: str, legacy: Callable[[dict], bool] | None = None) -> bool:
    """True when the JSON record at `path` says arrag's `kind` wrote it (its arrag_output field); for records
    written before that field existed, when `legacy` recognises the record's contents."""
    record = read_json_dict(path)
    if record is None:
        return False
    if OUTPUT_FIELD in record:
        return record[OUTPUT_FIELD] == kind
    return bool(legacy and legacy(record))


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp name, then rename)."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def sidecar_path(output: str | Path) -> Path:
    """`out/img.png` -> `out/img.png.json`; a folder gets `settings.json` inside it."""
    output = Path(output)
    return output / "settings.json" if output.is_dir() else output.with_name(output.name + ".json")


def environment() -> dict:
    """The arrag/torch/python versions, the platform, a timestamp and the command line of this process."""
    import torch

    return {
        "arrag_version": arrag.__version__,
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }


def write_sidecar(output: str | Path, settings: Mapping[str, Any], kind: str) -> Path:
    """Record `settings` plus the environment (versions, timestamp, command) next to `output`; `kind` names the
    command that made it (see made_by)."""
    return write_json(sidecar_path(output), {OUTPUT_FIELD: kind, **environment(), "settings": dict(settings)})


class SettingsDiffer(ArragError):
    """A folder holds results made with other settings (SettingsLock.check)."""


class SettingsLock:
    """The record of the settings that made a resumable job's results (settings.json, train.json, ...).

    check() runs before any work: a rerun with other settings is refused with one line that says what to
    delete. record() runs once the folder holds results, so a run that fails on a bad flag leaves nothing
    locked; a lock left by such a run (file present, no results) is replaced. Keys in `ignore` may change.
    """

    def __init__(self, path: str | Path, settings: Mapping[str, Any], *, what: str,
                 has_results: Callable[[], bool], start_over: str, ignore: tuple[str, ...] = (), kind: str = ""):
        self.path, self.settings, self.what = Path(path), dict(settings), what
        self.has_results, self.start_over, self.ignore = has_results, start_over, (*ignore, OUTPUT_FIELD)
        if kind:  # the record also says which command made the folder (made_by); never a difference
            self.settings[OUTPUT_FIELD] = kind

    def differences(self) -> list[str]:
        """Keys whose recorded value differs (empty when nothing is recorded or the record is unreadable)."""
        if not self.path.exists():
            return []
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            return ["(unreadable record)"]
        norm = lambda v: json.dumps(_jsonable(v), sort_keys=True)  # noqa: E731
        return [k for k in self.settings if k not in self.ignore and norm(old.get(k)) != norm(self.settings[k])]

    def check(self) -> None:
        diff = self.differences()
        if diff and self.has_results():
            raise SettingsDiffer(f"{self.path.parent} holds {self.what} made with other settings ({', '.join(diff)} "
                                 f"differ); rerun with the same settings to resume, or {self.start_over}")

    def record(self) -> None:
        if not self.path.exists() or (self.differences() and not self.has_results()):
            write_json(self.path, self.settings)
