"""Benchmark prompt sources, read into one list of PromptItem.

  a folder            DPG-Bench's prompts folder: one `<id>.txt` per prompt (sorted by id)
  *.jsonl             GenEval's evaluation_metadata.jsonl: the `prompt` field; the whole line is kept
  *.csv / *.tsv       a caption column (COCO-style FID sets): --caption-column, else caption/text/prompt;
                      an `id` column, when present, names each prompt's files (MJHQ-30K's image ids)
  anything else       a text file, one prompt per line (blank lines skipped)
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from arrag.errors import ArragError

CAPTION_COLUMNS = ("caption", "captions", "text", "prompt", "sentence")


@dataclass(frozen=True)
class PromptItem:
    """One benchmark prompt: its position in the source, its text, a file name and the source's record."""

    index: int
    text: str
    name: str                    # DPG-Bench: the prompt file's stem; otherwise the 5-digit index
    metadata: str | None = None  # GenEval: the original JSON line, written back unchanged


def read_prompt_source(path: str | Path, caption_column: str | None = None) -> list[PromptItem]:
    """Every prompt of a benchmark source, in order (see the module docstring for the formats)."""
    try:
        return _read(Path(path), caption_column)
    except UnicodeDecodeError as e:
        raise ArragError(f"--prompts {path}: not UTF-8 text ({e.reason} at byte {e.start}); save the prompts as "
                         "UTF-8") from None


def _read(path: Path, caption_column: str | None) -> list[PromptItem]:
    if path.is_dir():
        return _dpg_folder(path)
    if not path.is_file():
        raise ArragError(f"--prompts {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _geneval(path)
    if suffix in (".csv", ".tsv"):
        return _csv(path, caption_column, "\t" if suffix == ".tsv" else ",")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    items = [PromptItem(i, t, f"{i:05d}") for i, t in enumerate(t for t in lines if t)]
    return _non_empty(items, path)


def _dpg_folder(folder: Path) -> list[PromptItem]:
    files = sorted(folder.glob("*.txt"))
    items = [PromptItem(i, f.read_text(encoding="utf-8").strip(), f.stem) for i, f in enumerate(files)]
    empty = [f.name for f, it in zip(files, items, strict=True) if not it.text]
    if empty:
        raise ArragError(f"--prompts {folder}: empty prompt file {empty[0]}")
    return _non_empty(items, folder, "no <id>.txt prompt files (a DPG-Bench prompts folder)")


def _geneval(path: Path) -> list[PromptItem]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ArragError(f"--prompts {path}: line {n} is not a JSON object with a 'prompt' field "
                             "(GenEval's evaluation_metadata.jsonl)") from None
        items.append(PromptItem(len(items), str(text).strip(), f"{len(items):05d}", line.strip()))
    return _non_empty(items, path)


def _csv(path: Path, column: str | None, delimiter: str) -> list[PromptItem]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        fields = reader.fieldnames or []
        if column is None:
            lower = {c.lower(): c for c in fields}
            column = next((lower[c] for c in CAPTION_COLUMNS if c in lower), None)
            if column is None:
                raise ArragError(f"--prompts {path}: no caption column among {fields}; pass --caption-column NAME")
        elif column not in fields:
            raise ArragError(f"--caption-column {column}: not a column of {path} ({', '.join(fields)})")
        id_column = next((c for c in fields if c.lower() == "id"), None)
        rows = [((row.get(column) or "").strip(), (row.get(id_column) or "").strip() if id_column else "")
                for row in reader]
    items = []
    for text, ident in rows:
        if text:
            i = len(items)
            name = re.sub(r"[^\w.-]", "_", ident) if ident else f"{i:05d}"  # safe as a file name
            items.append(PromptItem(i, text, name))
    if len({it.name for it in items}) != len(items):
        raise ArragError(f"--prompts {path}: the id column repeats an id; ids name the output files")
    return _non_empty(items, path)


def _non_empty(items: list[PromptItem], path: Path, what: str = "no prompts") -> list[PromptItem]:
    if not items:
        raise ArragError(f"--prompts {path}: {what}")
    return items
