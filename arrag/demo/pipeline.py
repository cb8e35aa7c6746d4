"""`arrag demo`: the main job on the embedded default (ShapesWorld), with the shipped demo weights.

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
    TAIL_DAID,
    TAIL_FAID_K,
    TAIL_SAMPLING,
)
from arrag.demo.database import DEMO_RETRIEVER, build_demo_retriever
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
from arrag.eval.batch_generate import run_layout
from arrag.eval.layouts import make_layout
from arrag.eval.prompts import read_prompt_source
from arrag.fileops import check_out_dir, remove_owned_dir
from arrag.image_io import labeled_grid, save_image
from arrag.janus.model import JanusPro
from arrag.provenance import OUTPUT_FIELD, SettingsDiffer, made_by, read_json_dict, write_json, write_sidecar
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
    earlier = read_json_dict(out / "demo.json")
    differ = [k for k in run if earlier is not None and k in earlier and earlier[k] != run[k]]
    if differ and not overwrite:
        raise ArragError(f"{out} holds a demo run with other settings ({', '.join(differ)} differ); pass another "
                         f"--out (e.g. {out}-quick) or --overwrite to replace its table")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", run)
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
        first_images.setdefault(method, [_framed(im, ok) for im, ok in zip(images[::samples], correct[::samples],
                                                                            strict=True)])

    def generator_for(method: str):
        model = models["faid" if method.startswith("faid") else "base"]
        decode = "base" if method == "faid-noret" else method  # the control decodes as base
        return Generator(model, MethodConfig(method=decode, faid_k=faid_k, **daid), None if decode == "base" else
                         retriever)

    generate_runs(out, methods, seeds, items, prompt_file, samples, size, sampling, generator_for, score_run,
                  progress)

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


def generate_runs(out: Path, methods, seeds, items, prompt_file: Path, samples: int, size: int, sampling: dict,
                  generator_for, score_run, progress: bool) -> None:
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
            label = f"{LABELS.get(method, method)}, seed {seed}"
            t0 = time.time()
            generator = generator_for(method)
            try:  # the images of an earlier run with these settings are reused (a resumable layout run)
                made = _generate(generator, items, layout, config, prompt_file, label, progress)
            except SettingsDiffer:  # other models or index since: generated again
                remove_owned_dir(folder, what="GenEval image folder", owned=layout.owned)
                made = _generate(generator, items, layout, config, prompt_file, label, progress)
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


def _generate(generator, items, layout, config: SamplingConfig, prompt_file: Path, desc: str, progress: bool) -> int:
    """Generate what the layout run still lacks; returns how many prompts it generated."""
    record = run_layout(generator, items, layout, config, prompts_source=str(prompt_file),
                        prompts_per_batch=len(items), progress=progress, desc=desc)
    return int(record.get("generated", len(items))) if isinstance(record, dict) else len(items)


def _mean_se(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "se": float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0}


def _verdict(diff: dict) -> str:
    """'within noise' or 'better/worse by N SE' for a paired difference {mean, se} (over seeds)."""
    if diff["se"] <= 0:
        return "one seed: no standard error" if diff["mean"] else "no difference"
    z = diff["mean"] / diff["se"]
    return "within noise" if abs(z) < 2 else f"{'better' if z > 0 else 'worse'} by {abs(z):.1f} SE"


def _aggregate(per_seed: list[dict]) -> dict:
    """Mean and standard error over seeds of every figure."""
    cats = per_seed[0]["per_category"]
    return {"per_category": {c: _mean_se([s["per_category"][c] for s in per_seed]) for c in cats},
            "overall": _mean_se([s["overall"] for s in per_seed]),
            "realism_fid": _mean_se([s["realism_fid"] for s in per_seed])}


def _shapes_verdicts(results: dict, methods) -> dict:
    """Per method, its paired difference from base over the seeds: accuracy (higher is better) and realism FID
    (lower is better), each with its standard error and verdict."""
    out = {}
    for m in methods:
        if m == "base" or "base" not in results:
            continue
        pairs = list(zip(results[m], results["base"], strict=True))
        acc = _mean_se([r["overall"] - q["overall"] for r, q in pairs])
        fid = _mean_se([q["realism_fid"] - r["realism_fid"] for r, q in pairs])
        out[m] = {"overall": {**acc, "verdict": _verdict(acc)}, "realism_fid": {**fid, "verdict": _verdict(fid)}}
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


# ----------------------------------------------------------------------------------------------------------
# TailWorld: the long tail, where the database knows what the base saw rarely

TAIL_METHODS = ("base", "daid", "faid", "faid-noret", "daid-control", "faid-control")
TAIL_LABELS = {"base": "base", "daid": "DAiD", "faid": "FAiD", "faid-noret": "FAiD, no retrieval",
               "daid-control": "DAiD, control db", "faid-control": "FAiD, control db"}
LABELS.update(TAIL_LABELS)
TAIL_DATABASE_IMAGES = 3000


def run_tail_demo(out_dir: str | Path = "result/demo", *, seeds: tuple[int, ...] = DEMO_SEEDS, split: str = "test",
                  per_pattern: int = 4, samples: int = 1, methods: tuple[str, ...] = TAIL_METHODS,
                  daid: dict | None = None, faid_k: int = TAIL_FAID_K, sampling: dict | None = None,
                  database_images: int = TAIL_DATABASE_IMAGES, retriever_dir: str | Path | None = None,
                  control_dir: str | Path | None = None, assets: str | Path | None = None,
                  reference_images: int = 480, device: str | torch.device = "cpu", progress: bool = True,
                  overwrite: bool = False) -> dict:
    """TailWorld's demo: every pattern's prompts with base, DAiD, FAiD and their controls (FAiD's weights without
    retrieval; DAiD and FAiD with a database without the tail patterns), each seed a resumable layout run; accuracy
    and realism FID per frequency bucket, the accuracy-by-frequency plot, grid.png and scores.json."""
    from arrag.demo.tail import BUCKETS, Frequencies, TailWorld
    from arrag.demo.tail_score import accuracy as tail_accuracy
    from arrag.demo.tail_score import prompt_records as tail_records
    from arrag.demo.tail_score import scene_from_dict
    from arrag.demo.worlds import WORLDS

    t_start = time.time()
    world = WORLDS["tail"]
    out, assets = Path(out_dir), Path(assets or world.assets)
    retriever_dir = Path(retriever_dir or world.retriever)
    control_dir = Path(control_dir or retriever_dir.with_name(retriever_dir.name + "_control"))  # beside the world's
    device = torch.device(device)
    daid = {**TAIL_DAID, **(daid or {})}
    sampling = {**TAIL_SAMPLING, **(sampling or {})}
    unknown = set(methods) - set(TAIL_METHODS)
    if unknown or not methods:
        raise ArragError(f"--methods: unknown {', '.join(sorted(unknown)) or '(none given)'} for TailWorld; choose "
                         f"from {', '.join(TAIL_METHODS)}")
    check_settings(seeds=seeds, per_category=per_pattern, samples=samples, methods=("base",), daid=daid,
                   faid_k=faid_k, sampling=sampling, database_images=database_images)
    check_out_dir(out, what="demo folder", is_ours=is_demo_folder(out))
    recipe = assets_report(assets)
    settings = recipe_settings(recipe)
    size, zipf_s = settings["image_size"], settings["zipf_s"]
    run = {OUTPUT_FIELD: DEMO_KIND, "world": "tail", "seeds": list(seeds), "split": split, "per_pattern": per_pattern,
           "samples": samples, "methods": list(methods), "daid": daid, "faid_k": faid_k, "sampling": sampling,
           "assets": str(assets.resolve()), "database_images": database_images}
    earlier = read_json_dict(out / "demo.json")
    differ = [k for k in run if earlier is not None and earlier.get(k) != run[k]]
    if differ and not overwrite:
        raise ArragError(f"{out} holds a demo run with other settings ({', '.join(differ)} differ); pass another "
                         f"--out (e.g. {out}-quick) or --overwrite to replace its table")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "demo.json", run)
    models = load_demo_models(assets, device)

    print("[demo] 1/3 retrievers: the TailWorld database (every pattern) and the control (no tail pattern)",
          file=sys.stderr)
    retrievers = {}
    wanted = {"control" if m.endswith("control") else "world" for m in methods if m not in ("base", "faid-noret")}
    for name, folder, part in (("world", retriever_dir, "database"), ("control", Path(control_dir),
                                                                       "control_database")):
        if name in wanted:
            index = build_demo_retriever(assets / "base", folder, database_images, size, progress=progress,
                                         world="tail", split=part, shape=settings["shape"], zipf_s=zipf_s)
            retrievers[name] = PatchRetriever.load(index)

    frequencies = Frequencies(zipf_s=zipf_s)
    records = tail_records(split, per_pattern, size, zipf_s=zipf_s)
    prompt_file = write_prompt_file(out / f"prompts_{split}.jsonl", records)
    items = read_prompt_source(prompt_file)
    scenes = [scene_from_dict(r["scene"]) for r in records]
    buckets = np.array([r["tag"] for r in records])
    test_world = TailWorld(split, size=size, frequencies=frequencies)
    truth = np.stack([test_world.image(r["index"]) for r in records])
    features = VQEncoderFeatures(models["base"].vq, size)
    # rendered ground truth beyond the prompts, as features: computed once for every FID below
    reference = image_features(test_world.images(10_000, reference_images), features)
    ref_buckets = np.array([frequencies.bucket(test_world.scene(10_000 + i).pattern) for i in range(reference_images)])

    def fids(feats: torch.Tensor, bucket_of: np.ndarray) -> dict:
        """Realism FID per bucket and overall, from the images' features [N, D]."""
        out_ = {b: realism_fid(feats[torch.from_numpy(bucket_of == b)], reference[torch.from_numpy(ref_buckets == b)],
                               features) for b in BUCKETS}
        out_["overall"] = realism_fid(feats, reference, features)
        return out_

    def score(images: np.ndarray, scns) -> dict:
        acc = tail_accuracy(images, scns, frequencies)
        return {"accuracy": {**acc["by_bucket"], "overall": acc["overall"]}, "by_pattern": acc["by_pattern"],
                "correct": acc["correct"]}

    print(f"[demo] 2/3 generation: {len(items)} {split} prompts ({per_pattern} per pattern) x {samples} sample(s) x "
          f"seeds {list(seeds)} x {', '.join(methods)}", file=sys.stderr)
    per_seed: dict = {m: [] for m in methods}
    pooled: dict = {m: [] for m in methods}

    def generator_for(method: str):
        model = models["faid" if method.startswith("faid") else "base"]
        decode = {"faid-noret": "base", "daid-control": "daid", "faid-control": "faid"}.get(method, method)
        retriever = retrievers.get("control" if method.endswith("control") else "world")
        return Generator(model, MethodConfig(method=decode, faid_k=faid_k, **daid),
                         None if decode == "base" else retriever)

    def score_run(method: str, folder: Path, seconds: float) -> None:
        images, scns, recs = read_generated(folder, scene_from_dict)
        bucket_of = np.array([frequencies.bucket(sc.pattern) for sc in scns])
        result = score(images, scns)
        feats = image_features(images, features)
        result["realism_fid"] = realism_fid(feats, reference, features)  # this seed's images, all buckets
        result["seconds"] = round(seconds, 1)
        per_seed[method].append(result)
        pooled[method].append((images, bucket_of, feats))

    generate_runs(out, methods, seeds, items, prompt_file, samples, size, sampling, generator_for, score_run,
                  progress)

    print("[demo] 3/3 scores", file=sys.stderr)
    summary_methods = {}
    for m in methods:
        bucket_of = np.concatenate([b for _, b, _ in pooled[m]])
        fid = fids(torch.cat([f for _, _, f in pooled[m]]), bucket_of)
        by_bucket = {b: {"accuracy": _mean_se([r["accuracy"][b] for r in per_seed[m]]), "fid": fid[b]}
                     for b in (*BUCKETS, "overall")}
        summary_methods[m] = {"by_bucket": by_bucket,
                              "by_pattern": {p: float(np.mean([r["by_pattern"][p] for r in per_seed[m]]))
                                             for p in per_seed[m][0]["by_pattern"]},
                              "realism_fid": _mean_se([r["realism_fid"] for r in per_seed[m]]),
                              "seconds": [r["seconds"] for r in per_seed[m]]}
        if m != "base" and "base" in methods:  # paired by seed: the same prompts and seeds
            summary_methods[m]["vs_base"] = {}
            for b in (*BUCKETS, "overall"):
                diff = _mean_se([r["accuracy"][b] - q["accuracy"][b]
                                 for r, q in zip(per_seed[m], per_seed["base"], strict=True)])
                summary_methods[m]["vs_base"][b] = {**diff, "verdict": _verdict(diff)}
            diff = _mean_se([q["realism_fid"] - r["realism_fid"]  # lower FID is better: base minus method
                             for r, q in zip(per_seed[m], per_seed["base"], strict=True)])
            summary_methods[m]["vs_base"]["realism_fid"] = {**diff, "verdict": _verdict(diff)}
    gt = score(truth, scenes)
    recon = models["base"].vq.round_trip(truth, "janus")
    rt = score(recon, scenes)
    expected = frequencies.expected_counts(settings.get("train_images", 48000))
    train_counts = recipe.get("train_counts") or {p: round(c) for p, c in expected.items()}
    summary = {"world": "tail", "split": split, "prompts": len(items), "samples_per_prompt": samples,
               "seeds": list(seeds), "daid": daid, "faid_k": faid_k, "sampling": sampling, "zipf_s": zipf_s,
               "buckets": {b: frequencies.patterns(b) for b in BUCKETS}, "train_counts": train_counts,
               "retrievers": {name: {"folder": str(r.folder), "entries": r.entries} for name, r in retrievers.items()},
               "ground_truth": {"accuracy": gt["accuracy"], "fid": fids(image_features(truth, features), buckets)},
               "vq_reconstruction": {"accuracy": rt["accuracy"],
                                     "fid": fids(image_features(recon, features), buckets)},
               "methods": summary_methods,
               "per_seed": {m: [{k: v for k, v in r.items() if k != "correct"} for r in per_seed[m]] for m in methods},
               "seconds": round(time.time() - t_start, 1)}
    write_json(out / "scores.json", {OUTPUT_FIELD: DEMO_KIND, **summary})

    plot_path = _tail_plot(out, per_seed, methods, train_counts, frequencies, split, seeds)
    grid = _tail_grid(out, records, truth, pooled, per_seed, methods, train_counts, samples, split, seeds)
    _print_tail_table(summary, methods)
    print(f"[demo] wrote {grid}, {plot_path} and {out / 'scores.json'} in {summary['seconds']:.0f} s")
    return summary


def _tail_plot(out: Path, per_seed: dict, methods, train_counts: dict, frequencies, split: str, seeds) -> Path:
    """accuracy_by_frequency.png: each method's accuracy against how often the base saw the patterns, the patterns
    binned on a log scale of their training counts (mean over seeds, with its standard error)."""
    from arrag.demo.plot import frequency_plot

    edges = np.geomspace(min(train_counts.values()) * 0.999, max(train_counts.values()) * 1.001, 7)
    lines = {}
    for m in methods:
        xs, ys, ses = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            pats = [p for p, c in train_counts.items() if lo <= c < hi]
            if not pats:
                continue
            seeds_acc = [np.mean([r["by_pattern"][p] for p in pats]) for r in per_seed[m]]
            xs.append(float(np.exp(np.mean(np.log([train_counts[p] for p in pats])))))
            ys.append(float(np.mean(seeds_acc)))
            ses.append(_mean_se(seeds_acc)["se"])
        lines[TAIL_LABELS[m]] = (xs, ys, ses)
    head_min = min(train_counts[p] for p in frequencies.patterns("head"))
    tail_max = max(train_counts[p] for p in frequencies.patterns("tail"))
    plot = frequency_plot(lines, [(tail_max, "tail | torso"), (head_min, "torso | head")],
                          title=f"TailWorld ({split}): accuracy by how often the base saw the pattern, "
                                f"{len(seeds)} seed(s)")
    path = save_image(plot, out / "accuracy_by_frequency.png")
    write_sidecar(path, {"lines": {k: list(map(list, v)) for k, v in lines.items()}, "seeds": list(seeds)},
                  kind=DEMO_KIND)
    return path


def _tail_grid(out: Path, records: list[dict], truth: np.ndarray, pooled: dict, per_seed: dict, methods,
               train_counts: dict, samples: int, split: str, seeds) -> Path:
    """grid.png: the first prompt of every pattern, most frequent first; ground truth, then each method's first
    sample of the first seed, framed green where the scorer passed it and red where it failed."""
    first: dict = {}
    for i, r in enumerate(records):
        first.setdefault(r["scene"]["pattern"], i)
    order = sorted(first.values(), key=lambda i: records[i]["rank"])
    columns = [truth[order]] + [pooled[m][0][0][[i * samples for i in order]] for m in methods]
    marks = [[None] * len(order)] + [[bool(per_seed[m][0]["correct"][i * samples]) for i in order] for m in methods]
    cells = [[_framed(col[j], marks[c][j]) for c, col in enumerate(columns)] for j in range(len(order))]
    labels = [f"{records[i]['prompt']} ({records[i]['tag']}, {train_counts[records[i]['scene']['pattern']]:,} in "
              "training)" for i in order]
    grid = save_image(labeled_grid(cells, labels, ["ground truth", *(TAIL_LABELS[m] for m in methods)]),
                      out / "grid.png")
    write_sidecar(grid, {"columns": ["ground truth", *methods], "rows": labels, "seed": seeds[0], "split": split,
                         "frames": "green: the scorer passed the image; red: it failed"}, kind=DEMO_KIND)
    return grid


def _framed(image: np.ndarray, passed: bool | None, width: int = 2) -> np.ndarray:
    """The image with a thin green (passed) or red (failed) frame; None: unframed (ground truth)."""
    if passed is None:
        return image
    out = image.copy()
    color = np.array((40, 170, 60) if passed else (220, 40, 40), np.uint8)
    out[:width], out[-width:], out[:, :width], out[:, -width:] = color, color, color, color
    return out


def _print_tail_table(summary: dict, methods: tuple[str, ...]) -> None:
    from arrag.demo.tail import BUCKETS

    cols = (*BUCKETS, "overall")
    se = len(summary["seeds"]) > 1
    cell = lambda d: f"{d['mean']:.2f}" + (f"±{d['se']:.2f}" if se else "")  # noqa: E731
    print(f"TailWorld ({summary['split']}, {summary['prompts']} prompts x {summary['samples_per_prompt']} x "
          f"{len(summary['seeds'])} seed(s)): accuracy per bucket, realism FID")
    print(f"{'method':20}" + "".join(f"{c:>12}" for c in cols) + f"{'FID tail':>10}{'FID all':>9}")
    for label, key in (("ground truth", "ground_truth"), ("VQ round trip", "vq_reconstruction")):
        row = summary[key]
        print(f"{label:20}" + "".join(f"{row['accuracy'][c]:12.2f}" for c in cols) +
              f"{row['fid']['tail']:10.2f}{row['fid']['overall']:9.2f}")
    for m in methods:
        a = summary["methods"][m]["by_bucket"]
        print(f"{TAIL_LABELS[m]:20}" + "".join(f"{cell(a[c]['accuracy']):>12}" for c in cols) +
              f"{a['tail']['fid']:10.2f}{a['overall']['fid']:9.2f}")
    for m in methods:
        vs = summary["methods"][m].get("vs_base")
        if vs:
            fid = vs["realism_fid"]
            print(f"{TAIL_LABELS[m]} vs base: tail {vs['tail']['mean']:+.2f}±{vs['tail']['se']:.2f} "
                  f"({vs['tail']['verdict']}), head {vs['head']['mean']:+.2f}±{vs['head']['se']:.2f} "
                  f"({vs['head']['verdict']}), overall {vs['overall']['mean']:+.2f}±{vs['overall']['se']:.2f} "
                  f"({vs['overall']['verdict']}); realism FID {-fid['mean']:+.2f}±{fid['se']:.2f} "
                  f"({fid['verdict']})")
