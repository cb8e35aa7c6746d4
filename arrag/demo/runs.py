"""The demo's runs: every method and seed as a resumable layout run, and the statistics over seeds."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from arrag.decoding.loop import SamplingConfig
from arrag.eval.batch_generate import run_layout
from arrag.eval.layouts import make_layout
from arrag.fileops import remove_owned_dir
from arrag.provenance import SettingsDiffer


def generate_runs(out: Path, methods, seeds, items, prompt_file: Path, samples: int, size: int, sampling: dict,
                  generator_for, score_run, progress: bool, labels: dict[str, str]) -> None:
    """Every method and seed as a resumable geneval-layout run under out/<method>/seed<n>, scored by
    score_run(method, folder, seconds) as each finishes; the time left counts the runs still to generate, at the
    pace of the runs this call generated (reused runs take no time)."""
    runs, done, t_gen, generated = len(seeds) * len(methods), 0, 0.0, 0
    for seed in seeds:
        for method in methods:
            folder = out / method / f"seed{seed}"
            layout = make_layout("geneval", folder, samples)
            config = SamplingConfig(parallel_size=samples, seed=seed, image_size=size, **sampling)
            if folder.exists() and not layout.is_ours():  # images of an earlier arrag, with no record: made again
                remove_owned_dir(folder, what="GenEval image folder", owned=layout.owned)
            label = f"{labels.get(method, method)}, seed {seed}"
            t0 = time.time()
            generator = generator_for(method)
            try:  # the images of an earlier run with these settings are reused (a resumable layout run)
                made = generate_missing(generator, items, layout, config, prompt_file, label, progress)
            except SettingsDiffer:  # other models or index since: generated again
                remove_owned_dir(folder, what="GenEval image folder", owned=layout.owned)
                made = generate_missing(generator, items, layout, config, prompt_file, label, progress)
            seconds = time.time() - t0
            if made:
                t_gen, generated = t_gen + seconds, generated + 1
            score_run(method, folder, seconds)
            done += 1
            print(f"[demo] {done}/{runs} runs done ({label}){eta(t_gen, generated, runs - done)}", file=sys.stderr)


def eta(generating_seconds: float, generated_runs: int, runs_left: int) -> str:
    """', about N min left' at the pace of the runs that generated images ('' before one has, or when none is
    left): runs reused from an earlier demo take no time and would make the estimate far too short."""
    if not generated_runs or not runs_left:
        return ""
    return f", about {generating_seconds / generated_runs * runs_left / 60:.1f} min left"


def generate_missing(generator, items, layout, config: SamplingConfig, prompt_file: Path, desc: str,
                     progress: bool) -> int:
    """Generate what the layout run still lacks; returns how many prompts it generated."""
    record = run_layout(generator, items, layout, config, prompts_source=str(prompt_file),
                        prompts_per_batch=len(items), progress=progress, desc=desc)
    return int(record.get("generated", len(items))) if isinstance(record, dict) else len(items)


def mean_se(values) -> dict:
    """{mean, se} of per-seed values (se 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}


def verdict(diff: dict, seeds: int) -> str:
    """'within noise' or 'better/worse by N SE' for a paired difference {mean, se} over `seeds` seeds."""
    if diff["se"] <= 1e-9 * max(1.0, abs(diff["mean"])):  # no spread (float rounding of equal differences aside)
        if seeds < 2:
            return "one seed: no standard error" if diff["mean"] else "no difference"
        return f"{'better' if diff['mean'] > 0 else 'worse'} at every seed by the same amount" \
            if abs(diff["mean"]) > 1e-12 else "no difference at any seed"
    z = diff["mean"] / diff["se"]
    return "within noise" if abs(z) < 2 else f"{'better' if z > 0 else 'worse'} by {abs(z):.1f} SE"


def paired(values, others) -> dict:
    """{mean, se, verdict} of values minus others, paired by seed (the same prompts and seeds in both)."""
    diff = mean_se([a - b for a, b in zip(values, others, strict=True)])
    return {**diff, "verdict": verdict(diff, len(values))}
