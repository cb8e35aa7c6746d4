"""`arrag demo` on TailWorld (the default world): the long tail, where the database knows what the base saw rarely.

1. Two retrievers: the world's database (every pattern, evenly) and the control (no tail pattern), built once.
2. The test prompts (every pattern) with base, DAiD, FAiD, FAiD's weights without retrieval, and DAiD and FAiD
   over the control database, from the same seeds (resumable layout runs under result/demo/<method>/).
3. The pixel scorer: accuracy and realism FID per frequency bucket; accuracy_by_frequency.png, grid.png,
   scores.json and the table; then the completion table (demo.completion), the real top rows given.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from arrag.decoding.methods import Generator, MethodConfig
from arrag.demo import DEMO_SEEDS, TAIL_COMPLETION_ROWS, TAIL_DAID, TAIL_FAID_K, TAIL_SAMPLING
from arrag.demo.database import build_demo_retriever
from arrag.demo.pipeline import DEMO_KIND, check_settings, claim_demo_folder, is_demo_folder, load_demo_models
from arrag.demo.plot import framed
from arrag.demo.runs import generate_runs, mean_se, paired
from arrag.demo.score import (
    VQEncoderFeatures,
    image_features,
    read_generated,
    realism_fid,
    write_prompt_file,
)
from arrag.demo.worlds import assets_report, recipe_settings
from arrag.errors import ArragError
from arrag.eval.prompts import read_prompt_source
from arrag.fileops import check_out_dir
from arrag.image_io import labeled_grid, save_image
from arrag.provenance import OUTPUT_FIELD, write_json, write_sidecar
from arrag.retrieval.retriever import PatchRetriever

TAIL_METHODS = ("base", "daid", "faid", "faid-noret", "daid-control", "faid-control")
TAIL_LABELS = {"base": "base", "daid": "DAiD", "faid": "FAiD", "faid-noret": "FAiD, no retrieval",
               "daid-control": "DAiD, control db", "faid-control": "FAiD, control db"}
TAIL_DATABASE_IMAGES = 3000


def run_tail_demo(out_dir: str | Path = "result/demo", *, seeds: tuple[int, ...] = DEMO_SEEDS, split: str = "test",
                  per_pattern: int = 4, samples: int = 1, methods: tuple[str, ...] = TAIL_METHODS,
                  daid: dict | None = None, faid_k: int = TAIL_FAID_K, sampling: dict | None = None,
                  database_images: int = TAIL_DATABASE_IMAGES, retriever_dir: str | Path | None = None,
                  control_dir: str | Path | None = None, assets: str | Path | None = None,
                  reference_images: int = 480, completion_rows: int = TAIL_COMPLETION_ROWS,
                  device: str | torch.device = "cpu", progress: bool = True, overwrite: bool = False) -> dict:
    """TailWorld's demo: every pattern's prompts with base, DAiD, FAiD and their controls (FAiD's weights without
    retrieval; DAiD and FAiD with a database without the tail patterns), each seed a resumable layout run; accuracy
    and realism FID per frequency bucket, the accuracy-by-frequency plot, grid.png and scores.json. Then, unless
    completion_rows is 0, the completion table (demo.completion): the real top rows given, the rest drawn."""
    from arrag.demo.completion import COMPLETION_METHODS, print_completion, run_completion
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
           "assets": str(assets.resolve()), "database_images": database_images, "completion_rows": completion_rows}
    claim_demo_folder(out, run, overwrite)  # an earlier demo without the completion table: its runs stay valid
    models = load_demo_models(assets, device)
    if completion_rows > (rows := models["base"].vq.grid_size(size)):
        raise ArragError(f"--completion-rows {completion_rows}: an image has {rows} rows of codes; give fewer")

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

    def generator_for(method: str, extra_hooks=()):
        model = models["faid" if method.startswith("faid") else "base"]
        decode = {"faid-noret": "base", "daid-control": "daid", "faid-control": "faid"}.get(method, method)
        retriever = retrievers.get("control" if method.endswith("control") else "world")
        return Generator(model, MethodConfig(method=decode, faid_k=faid_k, **daid),
                         None if decode == "base" else retriever, extra_hooks=extra_hooks)

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
                  progress, TAIL_LABELS)

    print("[demo] 3/3 scores", file=sys.stderr)
    summary_methods = _method_summaries(methods, per_seed, pooled, fids, (*BUCKETS, "overall"))
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
               "per_seed": {m: [{k: v for k, v in r.items() if k != "correct"} for r in per_seed[m]] for m in methods}}
    completing = [m for m in COMPLETION_METHODS if m in methods]
    if completion_rows and completing:
        summary["completion"] = run_completion(
            out, rows=completion_rows, methods=completing, seeds=seeds, prompt_file=prompt_file,
            records=records, truth=truth, vq=models["base"].vq, samples=samples, size=size, sampling=sampling,
            generator_for=generator_for, score=score, read_run=lambda f: read_generated(f, scene_from_dict)[:2],
            progress=progress, kind=DEMO_KIND)
    summary["seconds"] = round(time.time() - t_start, 1)
    write_json(out / "scores.json", {OUTPUT_FIELD: DEMO_KIND, **summary})

    plot_path = _tail_plot(out, per_seed, methods, train_counts, frequencies, split, seeds)
    grid = _tail_grid(out, records, truth, pooled, per_seed, methods, train_counts, samples, split, seeds)
    _print_tail_table(summary, methods)
    if "completion" in summary:
        print_completion(summary["completion"], len(seeds))
    completion_grid = f"{summary['completion']['grid']}, " if "completion" in summary else ""
    print(f"[demo] wrote {grid}, {plot_path}, {completion_grid}{out / 'scores.json'} in {summary['seconds']:.0f} s")
    return summary


def _method_summaries(methods, per_seed: dict, pooled: dict, fids, buckets) -> dict:
    """Per method: accuracy (mean ± SE over seeds) and the pooled images' FID per bucket, accuracy per pattern,
    and its differences from the base paired by seed (the same prompts and seeds)."""
    out = {}
    for m in methods:
        bucket_of = np.concatenate([b for _, b, _ in pooled[m]])
        fid = fids(torch.cat([f for _, _, f in pooled[m]]), bucket_of)
        out[m] = {"by_bucket": {b: {"accuracy": mean_se([r["accuracy"][b] for r in per_seed[m]]), "fid": fid[b]}
                                for b in buckets},
                  "by_pattern": {p: float(np.mean([r["by_pattern"][p] for r in per_seed[m]]))
                                 for p in per_seed[m][0]["by_pattern"]},
                  "realism_fid": mean_se([r["realism_fid"] for r in per_seed[m]]),
                  "seconds": [r["seconds"] for r in per_seed[m]]}
        if m != "base" and "base" in methods:
            runs, base = per_seed[m], per_seed["base"]
            out[m]["vs_base"] = {b: paired([r["accuracy"][b] for r in runs], [q["accuracy"][b] for q in base])
                                 for b in buckets}
            # lower FID is better: base minus method
            out[m]["vs_base"]["realism_fid"] = paired([q["realism_fid"] for q in base],
                                                      [r["realism_fid"] for r in runs])
    return out

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
            ses.append(mean_se(seeds_acc)["se"])
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
    cells = [[framed(col[j], marks[c][j]) for c, col in enumerate(columns)] for j in range(len(order))]
    labels = [f"{records[i]['prompt']} ({records[i]['tag']}, {train_counts[records[i]['scene']['pattern']]:,} in "
              "training)" for i in order]
    grid = save_image(labeled_grid(cells, labels, ["ground truth", *(TAIL_LABELS[m] for m in methods)]),
                      out / "grid.png")
    write_sidecar(grid, {"columns": ["ground truth", *methods], "rows": labels, "seed": seeds[0], "split": split,
                         "frames": "green: the scorer passed the image; red: it failed"}, kind=DEMO_KIND)
    return grid


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
