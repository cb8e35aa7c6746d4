"""`arrag demo --world shapes`: ShapesWorld's demo, with its shipped weights; and what both worlds' demos share
(the models, the settings' checks, the demo folder's record). TailWorld's, the default, is demo/tail_demo.py.

1. The demo retriever: render the database split, `arrag encode` it with the shipped model's VQ and
   `arrag build-index` it (>= 1M patch entries) into data/retriever/demo_L; reused on later runs.
2. The test prompts (GenEval-style, a few per category) generated with base, DAiD and FAiD from the same
   seeds, through the benchmark runner (`--layout geneval` folders under result/demo/<method>/).
3. The scorer reads the pixels back: accuracy per category and a realism FID against rendered ground truth.
Writes result/demo/grid.png (prompts x methods, ground truth first) and result/demo/scores.json, and
prints the table. Every number is measured on the images of this run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from arrag.decoding.loop import SamplingConfig
from arrag.decoding.methods import Generator, MethodConfig
from arrag.demo import (  # the tuned settings live there, free of imports, for the CLI's --help
    DEMO_DAID,
    DEMO_FAID_K,
    DEMO_SAMPLES,
    DEMO_SAMPLING,
    DEMO_SEEDS,
)
from arrag.demo.database import DEMO_RETRIEVER, build_demo_retriever
from arrag.demo.plot import framed
from arrag.demo.runs import generate_runs, mean_se, paired
from arrag.demo.score import (
    VQEncoderFeatures,
    accuracy,
    image_features,
    prompt_records,
    read_generated,
    realism_fid,
    write_prompt_file,
)
from arrag.demo.score import reference_images as render_reference
from arrag.demo.shapes import CATEGORIES, ShapesWorld
from arrag.demo.worlds import assets_report, recipe_settings
from arrag.errors import ArragError
from arrag.eval.prompts import read_prompt_source
from arrag.fileops import check_out_dir
from arrag.image_io import labeled_grid, save_image
from arrag.janus.model import JanusPro
from arrag.provenance import OUTPUT_FIELD, made_by, read_json_dict, write_json, write_sidecar
from arrag.retrieval.retriever import PatchRetriever

ASSETS = Path(__file__).resolve().parent / "assets"
METHODS = ("base", "daid", "faid", "faid-noret")
DEFAULT_METHODS = ("base", "daid", "faid")
# faid-noret is a control: the FAiD model's weights (LoRA merged) decoding without retrieval, so its difference
# from FAiD is what the retrieved candidates add and its difference from base is what the fine-tuning adds.
LABELS = {"base": "base", "daid": "DAiD", "faid": "FAiD", "faid-noret": "FAiD, no retrieval"}


def load_demo_models(assets: Path, device: torch.device):
    """The shipped base and FAiD models; a clear error when the assets are missing."""
    for name in ("base", "faid"):
        if not (assets / name / "config.json").is_file():
            raise ArragError(f"demo weights missing in {assets / name}: train them with `python -m "
                             "arrag.demo.train_demo` (about 85 minutes on 2 CPU cores; see assets/README.md)")
    return {name: JanusPro.from_pretrained(assets / name, dtype=torch.float32, device=device, quiet=True)
            for name in ("base", "faid")}


DEMO_KIND = "demo"  # the arrag_output of the demo folder's records


def is_demo_folder(out: Path) -> bool:
    """True when `arrag demo` made `out` (demo.json, or an earlier version's scores.json)."""
    return made_by(out / "demo.json", DEMO_KIND) or made_by(out / "scores.json", DEMO_KIND,
                                                            legacy=lambda r: "methods" in r and "per_seed" in r)


def check_settings(*, seeds, per_category: int, samples: int, methods, daid: dict, faid_k: int, sampling: dict,
                   database_images: int) -> None:
    """One line naming the demo's own flag for each setting that cannot work, before anything is built."""
    from arrag.decoding.daid import DAiD

    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ArragError(f"--methods: unknown {', '.join(sorted(unknown)) or '(none given)'}; choose from "
                         f"{', '.join(METHODS)}")
    for flag, value in (("--per-category", per_category), ("--samples", samples), ("--faid-k", faid_k),
                        ("--database-images", database_images)):
        if value < 1:
            raise ArragError(f"{flag} must be >= 1, got {value}")
    if not seeds or any(s < 0 for s in seeds):
        raise ArragError(f"--seeds must be integers >= 0, got {list(seeds)}")
    DAiD.check_settings(daid["daid_lambda"], daid["daid_tau"], daid["daid_k"], daid.get("daid_aggregate", "nearest"))
    SamplingConfig(cfg_weight=sampling["cfg_weight"], temperature=sampling["temperature"]).validate()


def claim_demo_folder(out: Path, run: dict, overwrite: bool) -> None:
    """Record this run's settings in out/demo.json, refusing a folder whose demo run had other ones unless
    `overwrite`, so a quick look never replaces the full run's table. A setting the earlier run did not record
    (one added since) is taken as agreeing: its runs stay valid."""
    earlier = read_json_dict(out / "demo.json")
    differ = [k for k in run if earlier is not None and k in earlier and earlier[k] != run[k]]
    if differ and not overwrite:
        raise ArragError(f"{out} holds a demo run with other settings ({', '.join(differ)} differ); pass another "
                         f"--out (e.g. {out}-quick) or --overwrite to replace its table")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", run)


def run_demo(out_dir: str | Path = "result/demo", *, seeds: tuple[int, ...] = DEMO_SEEDS, split: str = "test",
             per_category: int = 4, samples: int = DEMO_SAMPLES, methods: tuple[str, ...] = DEFAULT_METHODS,
             daid: dict | None = None, faid_k: int = DEMO_FAID_K, sampling: dict | None = None,
             database_images: int = 4800,
             retriever_dir: str | Path = DEMO_RETRIEVER, assets: str | Path = ASSETS,
             reference_images: int = 512, device: str | torch.device = "cpu", progress: bool = True,
             overwrite: bool = False) -> dict:
    """Generate the split's prompts with each method and seed, score them, write grid.png and scores.json.

    A rerun with the same settings reuses the images it finds (each method and seed is a resumable layout run);
    a folder holding a demo run with other settings is refused unless `overwrite`, so a quick look never
    replaces the full run's table."""
    t_start = time.time()
    out, assets = Path(out_dir), Path(assets)
    device = torch.device(device)
    daid = {**DEMO_DAID, **(daid or {})}
    sampling = {**DEMO_SAMPLING, **(sampling or {})}
    check_settings(seeds=seeds, per_category=per_category, samples=samples, methods=methods, daid=daid,
                   faid_k=faid_k, sampling=sampling, database_images=database_images)
    check_out_dir(out, what="demo folder", is_ours=is_demo_folder(out))  # all before the retriever is built
    run = {OUTPUT_FIELD: DEMO_KIND, "seeds": list(seeds), "split": split, "per_category": per_category,
           "samples": samples, "methods": list(methods), "daid": daid, "faid_k": faid_k, "sampling": sampling,
           "assets": str(assets.resolve()), "database_images": database_images}
    claim_demo_folder(out, run, overwrite)
    models = load_demo_models(assets, device)
    size = recipe_settings(assets_report(assets))["image_size"]

    print("[demo] 1/3 retriever", file=sys.stderr)
    index_dir = build_demo_retriever(assets / "base", Path(retriever_dir), database_images, size, progress=progress)
    retriever = PatchRetriever.load(index_dir)

    records = prompt_records(split, per_category * len(CATEGORIES), size)  # item i has category i mod 6
    prompt_file = write_prompt_file(out / f"prompts_{split}.jsonl", records)
    items = read_prompt_source(prompt_file)
    features = VQEncoderFeatures(models["base"].vq, size)
    reference = image_features(render_reference(split, reference_images, size, start=10_000), features)
    world = ShapesWorld(split, size=size)
    truth = np.stack([world.image(r["index"]) for r in records])
    truth_scenes = [world.scene(r["index"]) for r in records]

    print(f"[demo] 2/3 generation: {len(items)} {split} prompts x {samples} samples x seeds {list(seeds)} x "
          f"{', '.join(methods)}", file=sys.stderr)
    results: dict = {m: [] for m in methods}
    first_images: dict = {}

    def score_run(method: str, folder: Path, seconds: float) -> None:
        images, scenes, _ = read_generated(folder)
        score = accuracy(images, scenes)
        score["realism_fid"] = realism_fid(images, reference, features)
        score["seconds"] = round(seconds, 1)
        correct = score.pop("correct")
        results[method].append(score)
        # the grid shows each prompt's first sample of the first seed, framed by the scorer's verdict
        first_images.setdefault(method, [framed(im, ok) for im, ok in zip(images[::samples], correct[::samples],
                                                                            strict=True)])

    def generator_for(method: str):
        model = models["faid" if method.startswith("faid") else "base"]
        decode = "base" if method == "faid-noret" else method  # the control decodes as base
        return Generator(model, MethodConfig(method=decode, faid_k=faid_k, **daid), None if decode == "base" else
                         retriever)

    generate_runs(out, methods, seeds, items, prompt_file, samples, size, sampling, generator_for, score_run,
                  progress, LABELS)

    print("[demo] 3/3 scores", file=sys.stderr)
    truth_score = accuracy(truth, truth_scenes)
    truth_score.pop("correct")
    truth_score["realism_fid"] = realism_fid(truth, reference, features)
    # The tokenizer's ceiling: the same ground truth after a VQ round trip (what a perfect AR model could reach).
    recon = models["base"].vq.round_trip(truth, "janus")
    recon_score = accuracy(recon, truth_scenes)
    recon_score.pop("correct")
    recon_score["realism_fid"] = realism_fid(recon, reference, features)
    summary = {"split": split, "prompts": len(items), "samples_per_prompt": samples, "seeds": list(seeds),
               "daid": daid, "faid_k": faid_k, "sampling": sampling,
               "retriever": {"folder": str(index_dir), "entries": retriever.entries,
                             "occurrences": retriever.manifest.get("occurrences", retriever.entries),
                             "factory": retriever.manifest.get("factory")},
               "ground_truth": truth_score, "vq_reconstruction": recon_score,
               "methods": {m: _aggregate(results[m]) for m in methods},
               "vs_base": _shapes_verdicts(results, methods),
               "per_seed": results, "seconds": round(time.time() - t_start, 1)}
    write_json(out / "scores.json", {OUTPUT_FIELD: DEMO_KIND, **summary})
    rows = [truth] + [first_images[m] for m in methods]
    columns = ["ground truth", *(LABELS[m] for m in methods)]
    grid = save_image(labeled_grid([list(col) for col in zip(*rows, strict=True)], [r["prompt"] for r in records],
                                   columns), out / "grid.png")
    write_sidecar(grid, {"columns": ["ground truth", *methods], "rows": [r["prompt"] for r in records],
                         "seed": seeds[0], "split": split,
                         "frames": "green: the scorer passed the image; red: it failed"}, kind=DEMO_KIND)
    _print_table(summary, methods)
    if len(seeds) == 1:  # a quick look: its noise, next to its table
        n = len(items) * samples
        print(f"note: one seed of {n} images a method: each accuracy is uncertain by about +-{(0.25 / n) ** 0.5:.2f} "
              "(binomial standard error), enough to reorder the methods; the default three seeds give the README's "
              "table")
    print(f"[demo] wrote {grid} (rows: prompts; columns: ground truth, {', '.join(methods)}) and "
          f"{out / 'scores.json'} in {summary['seconds']:.0f} s")
    return summary


def _aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard error over seeds of every figure."""
    cats = per_seed[0]["per_category"]
    return {"per_category": {c: mean_se([s["per_category"][c] for s in per_seed]) for c in cats},
            "overall": mean_se([s["overall"] for s in per_seed]),
            "realism_fid": mean_se([s["realism_fid"] for s in per_seed])}


def _shapes_verdicts(results: dict, methods) -> dict:
    """Per method, its paired difference from base over the seeds: accuracy (higher is better) and realism FID
    (lower is better), each with its standard error and verdict."""
    out = {}
    for m in methods:
        if m == "base" or "base" not in results:
            continue
        runs, base = results[m], results["base"]
        out[m] = {"overall": paired([r["overall"] for r in runs], [q["overall"] for q in base]),
                  # lower FID is better: base minus method
                  "realism_fid": paired([q["realism_fid"] for q in base], [r["realism_fid"] for r in runs])}
    return out


def _print_table(summary: dict, methods: tuple[str, ...]) -> None:
    cats = list(summary["ground_truth"]["per_category"])
    short = {"single_object": "single", "two_object": "two", "counting": "count", "colors": "colors",
             "position": "position", "color_attr": "attr"}
    print(f"{'method':14}" + "".join(f"{short[c]:>10}" for c in cats) + f"{'overall':>10}{'realism FID':>13}")
    for label, key in (("ground truth", "ground_truth"), ("VQ round trip", "vq_reconstruction")):
        gt = summary[key]
        print(f"{label:14}" + "".join(f"{gt['per_category'][c]:10.2f}" for c in cats) +
              f"{gt['overall']:10.2f}{gt['realism_fid']:13.2f}")
    se = len(summary["seeds"]) > 1
    cell = lambda d: f"{d['mean']:.2f}" + (f"±{d['se']:.2f}" if se else "")  # noqa: E731
    for m in methods:
        a = summary["methods"][m]
        print(f"{m:14}" + "".join(f"{cell(a['per_category'][c]):>10}" for c in cats) +
              f"{cell(a['overall']):>10}{cell(a['realism_fid']):>13}")
    for m, vs in summary.get("vs_base", {}).items():
        acc, fid = vs["overall"], vs["realism_fid"]
        print(f"{LABELS.get(m, m)} vs base: accuracy {acc['mean']:+.2f}±{acc['se']:.2f} ({acc['verdict']}); "
              f"realism FID {-fid['mean']:+.2f}±{fid['se']:.2f} ({fid['verdict']})")
