"""TailWorld's completion table: each tail prompt's top rows of codes are given (its real image's), and the base,
DAiD and DAiD with the control database draw the rest.

DAiD completes what the model has begun; in text-to-image the shipped base begins tail patterns wrong, so DAiD
has nothing right to complete (bench/daid_queries.py). Given a right beginning, the database's continuations of
it are the pattern's, and the table shows what that is worth, beside the control database that lacks the tail
patterns. The given rows are forced through decoding.beginning.GivenBeginning, so every method sees the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from arrag.decoding.beginning import GivenBeginning, beginning_codes
from arrag.demo.plot import framed
from arrag.demo.runs import generate_runs, mean_se, paired
from arrag.demo.score import write_prompt_file
from arrag.eval.prompts import read_prompt_source
from arrag.image_io import labeled_grid, save_image
from arrag.provenance import write_sidecar

COMPLETION_METHODS = ("base", "daid", "daid-control")
LABELS = {"base": "base", "daid": "DAiD", "daid-control": "DAiD, control db"}


def run_completion(out: Path, *, rows: int, methods, seeds, prompt_file: Path, records: list[dict],
                   truth: np.ndarray, vq, samples: int, size: int, sampling: dict, generator_for, score, read_run,
                   progress: bool, kind: str, bucket: str = "tail") -> dict:
    """The demo's prompts of one frequency bucket (`bucket`, the tail: where the base lacks what the database
    holds), every completion method and seed a resumable layout run under out/completion/rows<R>/<method>/seed<n>;
    returns {rows, of_rows, bucket, prompts, methods: {m: {accuracy: {mean, se}, by_pattern, vs_base}},
    daid_vs_control}.

    records and truth: the demo's prompt records and their real images uint8 [N, H, W, 3] (prompt_file holds the
    records; the bucket's go to a file beside it). generator_for(method, extra_hooks) makes a method's generator;
    score(images, scenes) gives {"accuracy": {bucket: x}, "by_pattern": {...}, "correct": [...]};
    read_run(folder) gives (images, scenes)."""
    keep = [i for i, r in enumerate(records) if r["tag"] == bucket]
    records, truth = [records[i] for i in keep], truth[keep]
    prompt_file = write_prompt_file(prompt_file.with_name(f"{prompt_file.stem}_{bucket}.jsonl"), records)
    items = read_prompt_source(prompt_file)
    grid_rows = vq.grid_size(size)
    print(f"[demo] completion: the real top {rows} of {grid_rows} rows of codes given; {len(items)} {bucket} prompts "
          f"x seeds {list(seeds)} x {', '.join(methods)}", file=sys.stderr)
    # sample s of prompt j is image j * samples + s, as the layout runs number them
    hook = GivenBeginning(beginning_codes(vq, truth, rows, size).repeat_interleave(samples, 0))
    per_seed: dict = {m: [] for m in methods}
    first: dict = {}

    def score_run(method: str, folder: Path, seconds: float) -> None:
        images, scenes = read_run(folder)
        result = score(images, scenes)
        per_seed[method].append({"accuracy": result["accuracy"], "by_pattern": result["by_pattern"],
                                 "seconds": round(seconds, 1)})
        first.setdefault(method, (images, result["correct"]))

    generate_runs(out / "completion" / f"rows{rows}", methods, seeds, items, prompt_file, samples, size, sampling,
                  lambda m: generator_for(m, [hook]), score_run, progress, LABELS)
    summary = {"rows": rows, "of_rows": grid_rows, "bucket": bucket, "prompts": len(items), "methods": {}}
    for m in methods:
        entry = {"accuracy": mean_se([r["accuracy"][bucket] for r in per_seed[m]]),
                 "by_pattern": {p: float(np.mean([r["by_pattern"][p] for r in per_seed[m]]))
                                for p in per_seed[m][0]["by_pattern"]},
                 "seconds": [r["seconds"] for r in per_seed[m]]}
        if m != "base" and "base" in methods:
            entry["vs_base"] = _paired(per_seed[m], per_seed["base"], bucket)
        summary["methods"][m] = entry
    if {"daid", "daid-control"} <= set(methods):
        summary["daid_vs_control"] = _paired(per_seed["daid"], per_seed["daid-control"], bucket)
    summary["grid"] = str(_completion_grid(out, records, truth, rows, grid_rows, first, methods, samples, kind))
    return summary


def _paired(runs: list[dict], others: list[dict], bucket: str) -> dict:
    """The bucket's accuracy of runs minus others, paired by seed (the same prompts and seeds), with its verdict."""
    return paired([r["accuracy"][bucket] for r in runs], [q["accuracy"][bucket] for q in others])


def _completion_grid(out: Path, records: list[dict], truth: np.ndarray, rows: int, grid_rows: int, first: dict,
                     methods, samples: int, kind: str) -> Path:
    """completion.png: the first prompt of every pattern, most frequent first; the given beginning (the real top
    rows, the rest grey), each method's first sample of the first seed (framed green where the scorer passed it,
    red where it failed) and the ground truth."""
    firsts: dict = {}
    for i, r in enumerate(records):
        firsts.setdefault(r["scene"]["pattern"], i)
    order = sorted(firsts.values(), key=lambda i: records[i]["rank"])
    given = truth[order].copy()
    given[:, truth.shape[1] * rows // grid_rows:] = 128
    columns = [given] + [first[m][0][[i * samples for i in order]] for m in methods] + [truth[order]]
    marks = [None] + [[bool(first[m][1][i * samples]) for i in order] for m in methods] + [None]
    cells = [[framed(col[j], None if marks[c] is None else marks[c][j]) for c, col in enumerate(columns)]
             for j in range(len(order))]
    labels = [f"{records[i]['prompt']} ({records[i]['tag']})" for i in order]
    path = save_image(labeled_grid(cells, labels, [f"given: top {rows} of {grid_rows} rows",
                                                   *(LABELS[m] for m in methods), "ground truth"]),
                      out / "completion.png")
    write_sidecar(path, {"rows": rows, "columns": ["given", *methods, "ground truth"], "rows_shown": labels,
                         "frames": "green: the scorer passed the image; red: it failed"}, kind=kind)
    return path


def print_completion(summary: dict, seeds: int) -> None:
    """The completion table: accuracy, mean ± SE over seeds, and DAiD's paired differences."""
    cell = lambda d: f"{d['mean']:.2f}" + (f"±{d['se']:.2f}" if seeds > 1 else "")  # noqa: E731
    print(f"\nCompletion ({summary['prompts']} {summary['bucket']} prompts x {seeds} seed(s)): the real image's top "
          f"{summary['rows']} of {summary['of_rows']} rows of codes given, the rest drawn; accuracy")
    for m, entry in summary["methods"].items():
        print(f"{LABELS[m]:20}{cell(entry['accuracy']):>12}")
    lines = [(f"{LABELS[m]} vs base", e["vs_base"]) for m, e in summary["methods"].items() if "vs_base" in e]
    if "daid_vs_control" in summary:
        lines.append(("DAiD vs DAiD, control db", summary["daid_vs_control"]))
    for label, d in lines:
        print(f"{label}: {summary['bucket']} {d['mean']:+.2f}±{d['se']:.2f} ({d['verdict']})")
