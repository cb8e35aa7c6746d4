"""Hugging Face Hub ids where a local path is expected: the cache first, a download when there is a network.

`deepseek-ai/Janus-Pro-1B` (a model repository) resolves to its snapshot folder; `peizesun/llamagen_t2i/
vq_ds16_t2i.pt` (a repository and a file in it) to that file. huggingface_hub does the work, so its cache
(HF_HOME, HF_HUB_CACHE) and offline switch (HF_HUB_OFFLINE=1) apply. What is a path and never a hub id: anything
that exists, starts with `.`, `/` or `~`, whose first part is a local folder (`result/ckpts/arrag_faid`), or that
names a file under a local folder; a missing one is "no such file or folder". With no network answering (checked in
a few seconds) or HF_HUB_OFFLINE set, only the cache is looked at: no retries. When neither has the files, one line
says which command fetches them, with the command that is installed (`hf`, or the older `huggingface-cli`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from arrag.errors import ArragError, one_line

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
REPO_FILE = re.compile(r"([\w.-]+/[\w.-]+)/(.+)")
# What a model snapshot needs for generation and training (the understanding tower's files are not fetched).
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json", "processor_config.json",
               "preprocessor_config.json"]


# Files users know by name, and where the hub keeps them.
KNOWN_FILES = {"vq_ds16_t2i.pt": "peizesun/llamagen_t2i"}


def is_local_path(spec: str | Path) -> bool:
    """True when `spec` names a local file or folder (existing or not), never a hub id (see the docstring)."""
    text = str(spec)
    path = Path(text)
    if path.exists() or text.startswith((".", "/", "~")):
        return True
    if Path(path.parts[0]).is_dir():  # result/ckpts/arrag_faid: the first part is a local folder
        return True
    return bool(path.suffix) and path.parent != Path(".") and path.parent.is_dir()


def is_hub_id(spec: str | Path) -> bool:
    """True for 'org/name' or 'org/name/file' strings that are not local paths."""
    text = str(spec)
    return not is_local_path(text) and bool(REPO_ID.fullmatch(text) or REPO_FILE.fullmatch(text))


def download_command(repo: str, filename: str | None = None) -> str:
    """The command that fetches a repository (or one file of it), with the hub CLI that is installed."""
    tool = "hf download" if shutil.which("hf") or not shutil.which("huggingface-cli") else "huggingface-cli download"
    return f"{tool} {repo}{' ' + filename if filename else ''} --local-dir <folder>"


def missing_path_error(spec: str | Path, what: str) -> ArragError:
    """'no such file or folder', naming where the hub keeps a file users know by name."""
    name = Path(str(spec)).name
    hint = f"; it is on the hub: `{download_command(KNOWN_FILES[name], name)}`" if name in KNOWN_FILES else ""
    return ArragError(f"{what} {spec}: no such file or folder{hint}")


def network_answers(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when the hub answers a TCP connection within `timeout` (so a download can be tried at all)."""
    import socket

    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve(spec: str | Path, what: str = "model") -> Path:
    """A local path for `spec`: itself when it is a path, else the Hub cache or a download (see the docstring)."""
    if not is_hub_id(spec):
        return Path(spec)
    text = str(spec)
    forced = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    offline = forced or not network_answers()
    repo, filename = (text, None) if REPO_ID.fullmatch(text) else REPO_FILE.fullmatch(text).groups()
    try:
        if filename is None:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=MODEL_FILES, local_files_only=offline))
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename, local_files_only=offline))
    except Exception as e:  # offline and not cached, unknown repository, no access, ...
        why = "HF_HUB_OFFLINE is set" if forced else "no network answers" if offline else one_line(e, 120)
        raise ArragError(f"{what} {text!r} is not a local path and is not in the Hugging Face cache, and could not "
                         f"be downloaded ({why}); fetch it on a machine with network with "
                         f"`{download_command(repo, filename)}` and pass that path") from None
