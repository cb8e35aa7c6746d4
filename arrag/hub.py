"""Hugging Face Hub ids where a local path is expected: the cache first, a download when there is a network.

`deepseek-ai/Janus-Pro-1B` (a model repository) resolves to its snapshot folder; `peizesun/llamagen_t2i/
vq_ds16_t2i.pt` (a repository and a file in it) to that file. huggingface_hub does the work, so its cache
(HF_HOME, HF_HUB_CACHE) and offline switch (HF_HUB_OFFLINE=1) apply. A path that exists is always taken
as it is; when neither the cache nor the network has the files, one line says which command fetches them.
"""

from __future__ import annotations

import re
from pathlib import Path

from arrag.errors import ArragError, one_line

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
REPO_FILE = re.compile(r"([\w.-]+/[\w.-]+)/(.+)")
# What a model snapshot needs for generation and training (the understanding tower's files are not fetched).
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
               "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json", "processor_config.json",
               "preprocessor_config.json"]


def is_hub_id(spec: str | Path) -> bool:
    """True for 'org/name' or 'org/name/file' strings that are not existing paths."""
    text = str(spec)
    return not Path(text).exists() and not text.startswith((".", "/", "~")) and bool(
        REPO_ID.fullmatch(text) or REPO_FILE.fullmatch(text))


def resolve(spec: str | Path, what: str = "model") -> Path:
    """A local path for `spec`: itself when it exists, else the Hub cache or a download (see the docstring)."""
    if not is_hub_id(spec):
        return Path(spec)
    text = str(spec)
    try:
        if REPO_ID.fullmatch(text):
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=MODEL_FILES))
        repo, filename = REPO_FILE.fullmatch(text).groups()
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # offline and not cached, unknown repository, no access, ...
        if REPO_ID.fullmatch(text):
            fetch = f"huggingface-cli download {text} --local-dir <folder>"
        else:
            repo, filename = REPO_FILE.fullmatch(text).groups()
            fetch = f"huggingface-cli download {repo} {filename} --local-dir <folder>"
        raise ArragError(f"{what} {text!r} is not a local path and is not in the Hugging Face cache, and could not "
                         f"be downloaded ({one_line(e, 120)}); fetch it on a machine with network with `{fetch}` "
                         "and pass that path") from None
