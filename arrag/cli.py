"""The `arrag` command line: one argparse parser, each subcommand a thin call into a module.

Errors the user can fix (a bad file or flag) print as one line `arrag: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import math
import re
import sys
from pathlib import Path

from arrag.demo import DEMO_SAMPLES, DEMO_SEEDS
from arrag.errors import ArragError
from arrag.fileops import disk_full_message
from arrag.image_io import MAX_IMAGE_SIZE, check_image_size


def _vq_reconstruct(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from arrag.fileops import check_out_file
    from arrag.image_io import image_format, load_rgb, make_grid, resize_crop, save_image, to_tensor, to_uint8
    from arrag.image_io import psnr as image_psnr
    from arrag.provenance import made_by, sidecar_path, write_sidecar
    from arrag.runtime import resolve_device
    from arrag.vq import load_vq

    image_format(args.out, "--out")
    check_out_file(args.out, what="reconstruction", inputs=[args.image],
                   is_ours=made_by(sidecar_path(args.out), "vq reconstruct", legacy=lambda r: "psnr_db" in r.get(
                       "settings", {})))
    if args.size is not None:
        check_image_size(args.size, "--size")
    device = resolve_device(args.device)
    vq = load_vq(args.vq, preset=args.vq_preset, device=device, trust_checkpoint=args.trust_checkpoint)
    args.size = args.size or vq.config.image_size
    vq.grid_size(args.size)
    image = resize_crop(load_rgb(args.image), args.size, args.resize)
    with torch.no_grad():
        codes = vq.encode_to_codes(to_tensor(image).to(device))
        rec = to_uint8(vq.decode_codes(codes))[0]
    original = np.asarray(image)
    out = save_image(make_grid(np.stack([original, rec]), ncol=2) if args.side_by_side else rec, args.out)
    psnr = float(image_psnr(rec, original)[0])
    write_sidecar(out, {"image": args.image, "vq": args.vq, "vq_preset": args.vq_preset, "size": args.size,
                        "resize": args.resize,
                        "grid": list(codes.shape[1:]), "psnr_db": psnr, "fingerprint": vq.fingerprint()},
                  kind="vq reconstruct")
    print(f"{out}: {codes.shape[1]}x{codes.shape[2]} tokens, PSNR {psnr:.2f} dB, VQ fingerprint {vq.fingerprint()}")
    return 0


def _read_prompts(args: argparse.Namespace) -> list:
    """--prompt texts, then every prompt of --prompts (text, GenEval jsonl, DPG folder, CSV), as PromptItems."""
    from arrag.eval.prompts import PromptItem, read_prompt_source

    items = [PromptItem(i, t, f"{i:05d}") for i, t in enumerate(args.prompt or [])]
    if args.prompts:
        if items:
            raise ArragError("pass either --prompt or --prompts, not both")
        items = read_prompt_source(args.prompts, args.caption_column)
    if not items:
        raise ArragError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return items


def _default(cls, name: str):
    """The default of dataclass field `name`: the one place each default is written."""
    return cls.__dataclass_fields__[name].default


def _configs_from(args: argparse.Namespace, *classes) -> list:
    """Instances of the config dataclasses filled from the parsed flags of the same names."""
    out = []
    for cls in classes:
        names = set(cls.__dataclass_fields__)
        out.append(cls(**{k: v for k, v in vars(args).items() if k in names}))
    return out


def _generate(args: argparse.Namespace) -> int:
    from arrag.decoding import MethodConfig, SamplingConfig
    from arrag.eval.batch_generate import ProcessSlot, run_layout
    from arrag.eval.layouts import make_layout

    items = _read_prompts(args)
    if args.parallel_size is None:
        args.parallel_size = 4 if args.layout in ("geneval", "dpg") else 1
    method, sampling = _configs_from(args, MethodConfig, SamplingConfig)
    method.validate()
    sampling.validate()
    if args.prompts_per_batch < 1:
        raise ArragError(f"--prompts-per-batch must be >= 1, got {args.prompts_per_batch}")
    if args.attribution and args.layout:
        raise ArragError("--attribution writes beside plain generate's images: leave out --layout")
    if not args.layout:
        return _generate_plain(args, items, method, sampling)
    slot = ProcessSlot.from_env()
    layout = make_layout(args.layout, args.out, args.parallel_size, args.format, grid=args.prompt_grids)
    layout.check_out()
    generator = _load_generator(args, method, slot.local_rank if slot.world > 1 else None)
    stats = run_layout(generator, items, layout, sampling, prompts_source=args.prompts, slot=slot,
                       prompts_per_batch=args.prompts_per_batch)
    print(f"{args.layout}: {stats['generated']} prompts generated, {stats['skipped']} already done"
          + (f", {stats['done_elsewhere']} taken by another run" if stats["done_elsewhere"] else "")
          + f" (process {slot.rank + 1}/{slot.world}, {stats['seconds']:.1f} s) -> {layout.out}")
    return 0


def _attribution_settings(args: argparse.Namespace):
    """The --attribution-* flags as AttributionSettings (None without --attribution)."""
    from arrag.decoding.attribution import AttributionSettings

    if not getattr(args, "attribution", False):
        return None
    return AttributionSettings(hits=args.attribution_hits, top=args.attribution_top,
                               images_per_hit=args.attribution_images_per_hit,
                               diffuse_above=args.attribution_diffuse_above)


def _load_generator(args: argparse.Namespace, method, local_rank: int | None):
    from arrag.decoding import Generator

    return Generator.load(args.model, method, retriever=args.retriever, device=args.device, dtype=args.dtype,
                          retriever_device=args.retriever_device, nprobe=args.nprobe,
                          verify_index=_index_check(args), local_rank=local_rank, step_mode=args.decode_step,
                          trust_checkpoint=args.trust_checkpoint, attribution=_attribution_settings(args))


def _generate_plain(args: argparse.Namespace, items: list, method, sampling) -> int:
    """Plain generate: every image in one batch into --out, which this run claims while it works."""
    from arrag.decoding.attribution import attribution_paths
    from arrag.eval.batch_generate import Claims
    from arrag.eval.layouts import PLAIN_KIND, check_plain_out, plain_names, write_plain
    from arrag.fileops import DiskFull, check_out_file
    from arrag.image_io import image_format
    from arrag.provenance import made_by, sidecar_path, write_sidecar

    image_format(f"x.{args.format}", "--format")
    names = plain_names(len(items), args.parallel_size, args.format)
    if args.attribution:
        names += [p.name for n in list(names) for p in attribution_paths(n)]
    earlier = check_plain_out(args.out, names, args.overwrite)
    if args.grid:
        image_format(args.grid, "--grid")
        check_out_file(args.grid, what="grid image", flag="--grid",
                       is_ours=made_by(sidecar_path(args.grid), PLAIN_KIND))
    claims = Claims(Path(args.out))
    if not claims.take("folder"):  # two runs into one folder would replace each other's images
        raise ArragError(f"another arrag generate is writing into {args.out}; wait for it to finish or pass another "
                         "--out")
    try:
        generator = _load_generator(args, method, None)
        prompts = [it.text for it in items]
        sampling = sampling.for_model(generator.model)
        images = generator.generate(prompts, sampling)
        try:
            files = write_plain(images, args.out, args.parallel_size, args.format, grid=args.grid, replace=earlier)
        except DiskFull as e:
            raise ArragError(disk_full_message(e.path, " (plain generate writes its images at the end and starts over; "
                                                       "--layout flat resumes)")) from None
        if args.attribution:
            for i, record in enumerate(generator.take_attribution()):
                files += record.save(Path(args.out) / files[i], prompt=prompts[i // args.parallel_size],
                                     sample=i % args.parallel_size, method=method.method)
        settings = {**generator.settings(), **sampling.settings(), "prompts": prompts, "prompts_file": args.prompts,
                    "files": files, "method_stats": generator.stats(), "grid": args.grid}
        write_sidecar(args.out, settings, kind=PLAIN_KIND)
        if args.grid:
            write_sidecar(args.grid, settings, kind=PLAIN_KIND)
    finally:
        claims.release("folder")
        claims.tidy()
    print(f"wrote {len(images)} images to {args.out} (seed {sampling.seed})"
          + (f" and the grid {args.grid}" if args.grid else ""))
    return 0


def _encode(args: argparse.Namespace) -> int:
    from arrag.build_retriever.encode import encode

    r = encode(args.source, args.out, args.vq, vq_preset=args.vq_preset, image_size=args.image_size,
               batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.workers,
               save_latents=args.save_latents, shard=args.shard, device=args.device, min_size=args.min_size,
               max_images=args.max_images, resize=args.resize, trust_checkpoint=args.trust_checkpoint,
               dist_timeout=args.dist_timeout)
    state = "complete: manifest.json written" if r.complete else "other shards still pending (rerun to finish)"
    print(f"{r.summary()}; store {r.folder} {state}")
    return 0


def _build_index(args: argparse.Namespace) -> int:
    from arrag.build_retriever.build_index import build_index

    build_index(args.store, args.out, shape=args.shape, key_source=args.key_source, factory=args.factory,
                memory_budget=args.memory_budget, nprobe=args.nprobe, train_size=args.train_size, seed=args.seed,
                chunk_images=args.chunk_images, gpus=args.gpus, overwrite=args.overwrite, dedup=not args.no_dedup,
                shard=args.shard, train_only=args.train_only, target_recall=args.target_recall,
                dist_timeout=args.dist_timeout, hnsw_above=args.hnsw_above)
    return 0


def _merge_index(args: argparse.Namespace) -> int:
    from arrag.build_retriever.build_index import merge_index

    merge_index(args.index)
    return 0


def _result_file(path: str | Path, kind: str, legacy, flag: str = "--out") -> Path:
    """A JSON result file this command may write: new, or one an earlier run of the same command wrote."""
    from arrag.fileops import check_out_file
    from arrag.provenance import made_by

    check_out_file(path, what=f"{kind} result", flag=flag, is_ours=made_by(path, kind, legacy))
    return Path(path)


def _write_result(path: Path, kind: str, result: dict) -> None:
    from arrag.provenance import OUTPUT_FIELD, write_json

    write_json(path, {OUTPUT_FIELD: kind, **result})


def _verify_index(args: argparse.Namespace) -> int:
    from arrag.retrieval import index as faiss_index
    from arrag.retrieval.retriever import ORIGINAL_INDEX, _read_manifest, check_index_files, check_manifest_figures

    folder = Path(args.index)
    if not (folder / "manifest.json").is_file():
        hint = " (the original prebuilt database records no checksums)" if (folder / ORIGINAL_INDEX).exists() else ""
        raise ArragError(f"{folder} has no manifest.json: nothing records what its files should hold{hint}")
    manifest = _read_manifest(folder / "manifest.json")
    got = check_index_files(folder, manifest, hash_below=1 << 62, progress=True)
    layout = manifest.get("layout", "single")
    index = faiss_index.read_shard_files(folder, manifest["shard_files"]) if layout == "shards" else \
        faiss_index.read_index(folder / "index.faiss", mmap=layout == "single", ondisk=layout == "ondisk")
    checked = check_manifest_figures(folder, manifest, index)
    digest = {"matches": "the manifest's own digest matches its content",
              "absent": f"the manifest ({manifest.get('format')}) predates digests: only the figures below could be "
                        "checked"}[got["digest"]]
    print(f"{folder}: all {got['files']} files intact ({got['bytes'] / 2**30:.2f} GiB hashed, every checksum matches "
          f"the manifest); {digest}; its {', '.join(checked)} agree with the files")
    return 0


def _search_stats(args: argparse.Namespace) -> int:
    from arrag.retrieval import index as faiss_index
    from arrag.retrieval.codestore import CodeStore
    from arrag.retrieval.index import sample_stored_vectors
    from arrag.retrieval.keys import sample_entry_keys
    from arrag.retrieval.recall import (
        distinct_codes_per_topk,
        list_balance,
        nprobe_sweep,
        queries_per_second,
        recall_at_k,
    )
    from arrag.retrieval.retriever import PatchRetriever

    if args.seed < 0 or args.queries < 0 or args.recall_k < 1:
        raise ArragError("--seed and --queries must be >= 0 and --k >= 1")
    if args.json:
        _result_file(args.json, "search-stats", lambda r: "entries" in r and "index" in r, "--json")
    r = PatchRetriever.load(args.index, device=args.device, nprobe=args.nprobe, verify=_index_check(args))
    m = r.manifest
    stats = {"index": str(args.index), "entries": r.entries, "occurrences": m.get("occurrences", r.entries),
             "dedup_ratio": m.get("dedup_ratio", 1.0), "type": m.get("index_type"),
             "factory": m.get("factory"), "nlist": m.get("nlist"), "nprobe": r.nprobe,
             "memory_bytes": faiss_index.index_memory_bytes(r.index) if r.backend == "faiss-cpu" else None,
             "backend": r.backend,
             "key_source": m.get("key_source"), "neighborhood": m["neighborhood"]["shape"],
             "vq_fingerprint": m.get("vq_fingerprint")}
    balance = list_balance(r)
    if balance:
        stats.update(balance)
    store_dir = args.store or m.get("store")
    if args.queries > 0 and store_dir:
        store = CodeStore.open(store_dir)
        r.check_store(store)
        queries = sample_entry_keys(store, args.queries, args.seed, r.neighborhood, m["key_source"])
        stats[f"recall@{args.recall_k}"] = recall_at_k(r, store, queries, args.recall_k)
        stats[f"distinct_codes@{args.recall_k}"] = round(distinct_codes_per_topk(r, queries, args.recall_k), 2)
        stats["queries_per_s"] = {b: queries_per_second(r, queries, args.recall_k, b) for b in (1, 16, 64)}
        if m.get("nlist") and not args.no_sweep:
            stats["nprobe_sweep"] = nprobe_sweep(r, store, queries, args.recall_k)
    elif args.queries > 0 and m.get("nlist") and not args.no_sweep:  # no store (the original database)
        queries = sample_stored_vectors(r.index, args.queries, args.seed)
        stats["nprobe_sweep"] = nprobe_sweep(r, None, queries, args.recall_k)
    sweep = stats.pop("nprobe_sweep", None)
    for key, value in stats.items():
        print(f"{key:16} {value}")
    if sweep:
        label = "recall@" + str(args.recall_k) if "recall" in sweep[0] else "share of all-list hits"
        print(f"{'nprobe':>8} {label:>24} {'queries/s (batch 16)':>22}")
        for row in sweep:
            print(f"{row['nprobe']:8d} {row.get('recall', row.get('recall_vs_all_lists')):24.4f} "
                  f"{row['queries_per_s']:22,.0f}")
        stats["nprobe_sweep"] = sweep
    if args.json:
        _write_result(Path(args.json), "search-stats", stats)
    return 0


def _construct_train(args: argparse.Namespace) -> int:
    from arrag.train.construct import construct_train

    s = construct_train(args.store, args.retriever, args.out, retrieved_key_num=args.retrieved_key_num,
                        exclude_self=args.exclude_self, verify_index=_index_check(args),
                        chunk_images=args.chunk_images, nprobe=args.nprobe, shard=args.shard, device=args.device,
                        dist_timeout=args.dist_timeout)
    print(f"retrieved top-{s['k']} codes for every valid position of {args.store} -> {args.out or args.store}")
    return 0


def _train_faid(args: argparse.Namespace) -> int:
    from arrag.train.train_faid import FaidTrainConfig, train_faid

    train_faid(*_configs_from(args, FaidTrainConfig))
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    from arrag.eval.fid import compute_fid, is_stats_file
    from arrag.fileops import check_out_file
    from arrag.runtime import resolve_device

    out = _result_file(args.out or str(Path(args.fake).resolve()) + "_fid.json", "eval fid",
                       lambda r: "fid" in r and "num_fake" in r)
    if args.save_stats:
        check_out_file(args.save_stats, what="FID statistics", flag="--save-stats", inputs=[args.real],
                       is_ours=is_stats_file(args.save_stats))
    result = compute_fid(args.real, args.fake, inception_weights=args.inception_weights,
                         save_stats_to=args.save_stats, resize=args.resize, batch_size=args.batch_size,
                         device=resolve_device(args.device))
    _write_result(out, "eval fid", {**result, "settings": {k: v for k, v in vars(args).items() if k != "func"}})
    print(f"FID {result['fid']:.4f} ({result['num_fake']} generated vs {result['num_real']} reference images) -> {out}")
    return 0


def _eval_retrieval_gain(args: argparse.Namespace) -> int:
    from arrag.eval.retrieval_gain import check_settings, measure_folders
    from arrag.retrieval.codestore import CodeStore

    lambdas = _floats(args.lambdas, "--lambdas")
    taus = _floats(args.taus, "--taus")
    check_settings(args.images, args.k, args.batch_size, lambdas, taus)
    out = _result_file(args.out or str(Path(args.store).resolve()) + "_retrieval_gain.json", "eval retrieval-gain",
                       lambda r: "model_nats" in r)
    store = CodeStore.open(args.store)
    groups = None
    if args.by_bucket:
        from arrag.demo.tail import bucket_of_caption

        groups = [bucket_of_caption(store.caption(i)) for i in range(min(args.images, store.num_images))]
    result, retriever_settings = measure_folders(
        args.model, args.retriever, store, device=args.device, nprobe=args.nprobe,
        verify_index=_index_check(args), allow_unknown_vq=args.allow_unknown_vq,
        trust_checkpoint=args.trust_checkpoint, images=args.images, k=args.k,
        lambdas=lambdas, taus=taus, aggregate=args.aggregate, cfg_weight=args.cfg_weight, batch_size=args.batch_size,
        groups=groups)
    _write_result(out, "eval retrieval-gain", {**result, "settings": {
        **{k: v for k, v in vars(args).items() if k != "func"}, "retriever_settings": retriever_settings}})
    print(f"model alone: {result['model_nats']:.4f} nats per retrieval target ({result['targets']:,} targets, "
          f"{result['images']} images); true code among the {args.k} hits {result['true_code_in_hits']:.3f}, "
          f"p_ret's top code right {result['retrieval_top1']:.3f}, the model's {result['model_top1']:.3f}")
    for row in result["table"]:
        if row["lambda"] > 0:
            print(f"  tau {row['tau']:<5g} lambda {row['lambda']:<5g} {row['nats']:.4f} nats  gain {row['gain']:+.4f}")
    for name, g in result.get("by_group", {}).items():
        b = g["best"]
        print(f"  {name:6} ({g['images']} images): model {g['model_nats']:.4f} nats, best gain {b['gain']:+.4f} at "
              f"tau {b['tau']:g}, lambda {b['lambda']:g}")
    best = result["best"]
    verdict = (f"best gain {best['gain']:+.4f} nats at tau {best['tau']:g}, lambda {best['lambda']:g}"
               if best["lambda"] > 0 else "no lambda > 0 lowers the loss: the database adds nothing the model lacks")
    print(f"{verdict} -> {out}")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArragError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ArragError(f"{flag} takes comma-separated finite numbers, got {text!r}")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ArragError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ArragError(f"{flag} takes comma-separated integers, got {text!r}")
    return values


def _app(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ArragError("arrag app needs Gradio: pip install -e \".[app]\" (or `make install`, which includes it)") \
            from None
    from arrag.app.page import launch
    from arrag.app.session import AppSession

    if not args.model and (args.faid_model or args.retriever or args.store):
        raise ArragError("--faid-model, --retriever and --store go with --model (leave all out for the demo models)")
    if args.model:
        session = AppSession.load(args.model, args.faid_model, args.retriever, device=args.device, store=args.store,
                                  image_size=args.image_size)
        defaults = None
    else:
        from arrag.demo.pipeline import DEMO_DAID, DEMO_FAID_K, DEMO_SAMPLING

        session = AppSession.demo(device=args.device)
        defaults = {**DEMO_DAID, **DEMO_SAMPLING, "faid_k": DEMO_FAID_K}
    launch(session, host=args.host, port=args.port, defaults=defaults)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from arrag.demo.pipeline import ASSETS, run_demo, run_tail_demo
    from arrag.runtime import resolve_device

    seeds = tuple(_ints(args.seeds, "--seeds"))
    if any(s < 0 for s in seeds):
        raise ArragError(f"--seeds must be >= 0, got {args.seeds!r}")
    daid = {k: v for k, v in (("daid_lambda", args.daid_lambda), ("daid_tau", args.daid_tau),
                              ("daid_k", args.daid_k)) if v is not None}
    sampling = {k: v for k, v in (("cfg_weight", args.cfg_weight), ("temperature", args.temperature))
                if v is not None}
    common = dict(seeds=seeds, split=args.split, daid=daid, faid_k=args.faid_k, sampling=sampling,
                  device=resolve_device(args.device), overwrite=args.overwrite)
    if args.methods is not None:
        common["methods"] = tuple(args.methods.split(","))
    if args.database_images is not None:
        common["database_images"] = args.database_images
    if args.world == "tail":
        if args.retriever_dir:  # the control database lives beside the world's
            common.update(retriever_dir=args.retriever_dir,
                          control_dir=str(Path(args.retriever_dir).with_name(Path(args.retriever_dir).name
                                                                             + "_control")))
        run_tail_demo(args.out or "result/demo", per_pattern=args.per_pattern, samples=args.samples or 1,
                      assets=args.assets, **common)
    else:
        run_demo(args.out or "result/demo_shapes", per_category=args.per_category,
                 samples=args.samples or DEMO_SAMPLES, retriever_dir=args.retriever_dir or "data/retriever/demo_L",
                 assets=args.assets or ASSETS, **common)
    return 0


def _eval_shapes(args: argparse.Namespace) -> int:
    from arrag.demo.score import score_folder

    out = _result_file(args.out or Path(args.folder) / "shapes_scores.json", "eval shapes",
                       lambda r: "overall" in r and "realism_fid" in r)
    result = score_folder(args.folder, args.vq, reference_count=args.reference_images,
                          trust_checkpoint=args.trust_checkpoint)
    _write_result(out, "eval shapes", {**result, "settings": {k: v for k, v in vars(args).items() if k != "func"}})
    per = "  ".join(f"{c} {v:.2f}" for c, v in result["per_category"].items())
    print(f"{per}  overall {result['overall']:.3f}  realism FID {result['realism_fid']:.2f} "
          f"({result['images']} images) -> {out}")
    return 0


def _eval_shapes_prompts(args: argparse.Namespace) -> int:
    from arrag.demo.score import is_prompt_file, prompt_records, write_prompt_file
    from arrag.demo.shapes import CATEGORIES
    from arrag.fileops import check_out_file

    if args.per_category < 1:
        raise ArragError(f"--per-category must be >= 1, got {args.per_category}")
    check_out_file(args.out, what="prompt file", is_ours=is_prompt_file(args.out))
    records = prompt_records(args.split, args.per_category * len(CATEGORIES), args.size, seed=args.seed)
    path = write_prompt_file(args.out, records)
    print(f"wrote {len(records)} ShapesWorld {args.split} prompts ({args.per_category} per category) to {path}; "
          f"generate with `arrag generate --prompts {path} --layout geneval ...`, score with `arrag eval shapes`")
    return 0


def _int(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], else one line naming the flag, the value and the range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected an integer") from None
        if value < low or (high is not None and value > high):
            where = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value}: must be {where}")
        return value
    return parse


def _float(low: float | None = None, high: float | None = None, open_low: bool = False, open_high: bool = False):
    """An argparse type: a finite number in the given range (NaN and inf never pass), else one line."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text}: expected a number") from None
        below = low is not None and (value <= low if open_low else value < low)
        above = high is not None and (value >= high if open_high else value > high)
        if not math.isfinite(value) or below or above:
            left = "any" if low is None else f"{'(' if open_low else '['}{low:g}"
            right = "" if high is None else f"{high:g}{')' if open_high else ']'}"
            where = f"in {left}, {right}" if high is not None else (f"{'>' if open_low else '>='} {low:g}"
                                                                     if low is not None else "finite")
            raise argparse.ArgumentTypeError(f"{text}: must be a finite number {where}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other arrag error."""

    def error(self, message: str):
        flag = re.match(r"argument ([^:]+): (.*)", message, re.S)
        if flag:  # "argument --seed: abc: expected an integer" -> "--seed abc: expected an integer"
            name, detail = flag.group(1).split("/")[-1], flag.group(2)
            message = f"{name} {detail}" if re.match(r"[^\s:]+: ", detail) else f"{name}: {detail}"
        self.exit(2, f"arrag: error: {message} (see `{self.prog} --help`)\n")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")


def _add_dist_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dist-timeout", type=_float(0, open_low=True), default=30 * 60,
                        help="seconds a rank waits for the others under torchrun / accelerate launch before it stops "
                             "with a line naming the ranks that did not arrive (default 1800)")


def _add_index_checks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify-index", action="store_true",
                        help="check only the index files' sizes, never their hashes")
    parser.add_argument("--hash-below", default="2G",
                        help="hash the index files when they total at most this size (default 2G; larger ones are "
                             "checked by size on every load, and fully by `arrag verify-index`)")


def _index_check(args: argparse.Namespace) -> bool | int:
    """PatchRetriever.load's `verify`: False (sizes only) or the size below which the files are hashed."""
    from arrag.retrieval.index import parse_bytes

    return False if args.no_verify_index else parse_bytes(args.hash_below, "--hash-below")


def _add_trust(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle a .pt/.bin checkpoint that holds Python objects besides weights (refused "
                             "by default: unpickling such a file can run any code). Only for files you trust")


def build_parser() -> argparse.ArgumentParser:
    import arrag
    from arrag.decoding.attribution import AttributionSettings
    from arrag.decoding.loop import SamplingConfig
    from arrag.decoding.methods import METHODS, MethodConfig
    from arrag.train.train_faid import FaidTrainConfig

    parser = _Parser(
        prog="arrag",
        description="Patch-level autoregressive retrieval augmentation (AR-RAG) for Janus-Pro + LlamaGen VQ-16.",
    )
    parser.add_argument("--version", action="version", version=f"arrag {arrag.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    vq = sub.add_parser("vq", help="tokenizer tools (LlamaGen VQ-VAE)", description="Tokenizer tools.")
    vq_sub = vq.add_subparsers(dest="vq_command", metavar="ACTION", required=True)
    rec = vq_sub.add_parser(
        "reconstruct", help="encode an image to codes and decode it back",
        description="Encode IMAGE to VQ codes and decode them back: a quick check that a tokenizer works. "
                    "Writes the reconstruction and a JSON sidecar (OUT.json) with the PSNR and VQ fingerprint.")
    rec.add_argument("image", help="input image file (jpg, png, webp)")
    rec.add_argument("--vq", required=True, help="tokenizer weights: LlamaGen vq_ds16_t2i.pt or a .safetensors")
    rec.add_argument("--out", required=True, help="output image (.png, .jpg or .webp)")
    rec.add_argument("--vq-preset", default=None,
                     help="architecture preset (VQ-16, VQ-8, VQ-tiny-16, VQ-tiny-8, VQ-tiny-4); default: from "
                          "the file, else VQ-16")
    rec.add_argument("--size", type=_int(1, MAX_IMAGE_SIZE), default=None,
                     help="crop size in pixels (default: the tokenizer's, 384 = 24x24 tokens for VQ-16)")
    rec.add_argument("--side-by-side", action="store_true", help="write original and reconstruction side by side")
    rec.add_argument("--resize", default="original", choices=["original", "adm"],
                     help="original: Resize + CenterCrop as AR-RAG (default); adm: LlamaGen's crop")
    _add_trust(rec)
    _add_device(rec)
    rec.set_defaults(func=_vq_reconstruct)

    gen = sub.add_parser(
        "generate", help="text-to-image generation with Janus-Pro (base, DAiD, FAiD)",
        description="Generate images for every prompt x --parallel-size samples in one batch, with CFG. Writes "
                    "OUT/<prompt>_<sample>.png (0000_00.png, 0000_01.png, ...) and OUT/settings.json with every "
                    "setting and the seed; with --layout, a benchmark's files instead.")
    gen.add_argument("--model", required=True,
                     help="Janus-Pro checkpoint folder (config.json, weights, tokenizer) or a hub id such as "
                          "deepseek-ai/Janus-Pro-1B (the cache, or a download when there is a network)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts", help="prompt source: a text file (one per line), GenEval's evaluation_metadata"
                                       ".jsonl, a DPG-Bench prompts folder (<id>.txt) or a CSV with a caption column")
    gen.add_argument("--caption-column", default=None, help="CSV column holding the prompts (default: caption, "
                                                            "text or prompt)")
    gen.add_argument("--layout", default=None, choices=["geneval", "dpg", "flat"],
                     help="write a benchmark layout (resumable; processes of `accelerate launch` split the prompts): "
                          "geneval = <out>/<00000>/metadata.jsonl + samples/<0000>.png; dpg = <out>/<id>.png, "
                          "a 2x2 grid of 4 samples; flat = <out>/<00000 or the id>.png")
    gen.add_argument("--prompts-per-batch", type=_int(1), default=1,
                     help="with --layout: prompts decoded together (each with --parallel-size samples; default 1)")
    gen.add_argument("--prompt-grids", action="store_true", help="with --layout geneval: also write grid.png")
    m = MethodConfig
    gen.add_argument("--method", default=_default(m, "method"), choices=list(METHODS),
                     help="base (no retrieval), daid (retrieval-augmented distribution), faid (a FAiD checkpoint's "
                          "blenders fed retrieved patches) or faid+daid (default base)")
    gen.add_argument("--faid-k", type=_int(1), default=_default(m, "faid_k"),
                     help=f"codes retrieved per step for FAiD (default {_default(m, 'faid_k')})")
    gen.add_argument("--retriever", default=None, help="patch index folder for daid/faid (e.g. data/retriever/index_L)")
    gen.add_argument("--daid-lambda", type=_float(0, 1), default=_default(m, "daid_lambda"),
                     help=f"DAiD mixing weight lambda in [0, 1] (default {_default(m, 'daid_lambda')}; see README)")
    gen.add_argument("--daid-tau", type=_float(0, open_low=True), default=_default(m, "daid_tau"),
                     help=f"DAiD temperature tau of softmax(-d/tau) (default {_default(m, 'daid_tau')})")
    gen.add_argument("--daid-k", type=_int(1), default=_default(m, "daid_k"),
                     help=f"neighbours fetched per DAiD step (default {_default(m, 'daid_k')})")
    gen.add_argument("--daid-aggregate", default=_default(m, "daid_aggregate"), choices=["nearest", "sum"],
                     help="duplicate codes: weight of the nearest hit (original, default) or the sum (kNN-LM)")
    gen.add_argument("--nprobe", type=_int(1), default=None, help="IVF lists probed per search (default: the index's)")
    gen.add_argument("--retriever-device", default=None,
                     help="where the index lives: cpu, cuda (all GPUs, sharded) or ids such as 0,1 (default: the "
                          "model's GPU on a CUDA run, through faiss-gpu or, for Flat and IVF-Flat indexes, the "
                          "torch search backend; the CPU when neither applies)")
    gen.add_argument("--allow-unknown-vq", action="store_true",
                     help="accept an index without a VQ fingerprint (the original prebuilt database)")
    _add_index_checks(gen)
    s_ = SamplingConfig
    gen.add_argument("--parallel-size", type=_int(1), default=None,
                     help="samples per prompt (default 1; 4 with --layout geneval or dpg)")
    gen.add_argument("--cfg-weight", type=_float(0), default=_default(s_, "cfg_weight"),
                     help=f"classifier-free guidance weight (default {_default(s_, 'cfg_weight'):g})")
    gen.add_argument("--temperature", type=_float(0), default=_default(s_, "temperature"),
                     help=f"sampling temperature; 0 = greedy (default {_default(s_, 'temperature'):g})")
    gen.add_argument("--top-k", type=_int(1), default=_default(s_, "top_k"),
                     help="keep only the k most likely codes (default off)")
    gen.add_argument("--top-p", type=_float(0, 1, open_low=True), default=_default(s_, "top_p"),
                     help="nucleus sampling mass (default off)")
    gen.add_argument("--seed", type=_int(0, 2**63 - 1), default=_default(s_, "seed"),
                     help=f"seed; image i uses a generator seeded with (seed, i) (default {_default(s_, 'seed')})")
    gen.add_argument("--image-size", type=_int(1, MAX_IMAGE_SIZE), default=_default(s_, "image_size"),
                     help="pixels per side (default: the model's, 384 = 24x24 tokens for Janus-Pro)")
    gen.add_argument("--batch-size", type=_int(1), default=_default(s_, "batch_size"),
                     help="images per forward pass (default all)")
    gen.add_argument("--out", default="result/generated_imgs", help="output folder (default result/generated_imgs)")
    gen.add_argument("--format", default="png", choices=["png", "jpg", "webp"], help="image format (default png)")
    gen.add_argument("--grid", default=None, help="also write all images as one grid to this file")
    gen.add_argument("--overwrite", action="store_true",
                     help="without --layout: replace the images an earlier run left in --out (else refused)")
    _add_device(gen)
    gen.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                     help="weights dtype (default auto: bf16 on CUDA, fp32 on CPU)")
    gen.add_argument("--decode-step", default="auto", choices=["auto", "eager", "static", "graph"],
                     help="how a decode step runs: auto (a CUDA graph on CUDA, uncaptured with a warning if "
                          "CUDA refuses the capture; eager elsewhere), eager (the reference), static (fixed shapes, "
                          "no graph), graph (CUDA graph replay; a refused capture is an error)")
    _add_trust(gen)
    A_ = AttributionSettings
    gen.add_argument("--attribution", action="store_true",
                     help="record what every retrieval step found (hits, distances, codes, p_ret weight or FAiD gates, "
                          "the database images behind them) as <image>.attribution.npz + .json beside each image, "
                          "with the database images that contributed most (daid, faid, faid+daid; plain output)")
    gen.add_argument("--attribution-hits", type=_int(1), default=_default(A_, "hits"),
                     help=f"with --attribution: hits recorded per step, nearest first (default {_default(A_, 'hits')})")
    gen.add_argument("--attribution-top", type=_int(1), default=_default(A_, "top"),
                     help="with --attribution: contributing database images listed per image "
                          f"(default {_default(A_, 'top')})")
    gen.add_argument("--attribution-images-per-hit", type=_int(1), default=_default(A_, "images_per_hit"),
                     help="with --attribution: database images recorded per hit "
                          f"(default {_default(A_, 'images_per_hit')})")
    gen.add_argument("--attribution-diffuse-above", type=_int(1), default=_default(A_, "diffuse_above"),
                     help="with --attribution: a patch found in more database images than this is a common pattern, "
                          f"its mass counted as diffuse, not given to images (default {_default(A_, 'diffuse_above')})")
    gen.set_defaults(func=_generate)

    enc = sub.add_parser(
        "encode", help="encode images into a code store (first half of build_retriever.sh)",
        description="Images -> resize + centre crop -> VQ codes, written as a sharded code store (manifest.json, "
                    "codes-*.npy). Resumable: finished shards are skipped on rerun.")
    enc.add_argument("source", help="a folder of images (recursive), webdataset .tar shards (file, folder or "
                                    "shard-{000..009}.tar), a saved HF dataset folder, or a hub dataset name")
    enc.add_argument("--out", required=True, help="code store folder")
    enc.add_argument("--vq", required=True,
                     help="the tokenizer: LlamaGen's vq_ds16_t2i.pt, an arrag .safetensors, a Janus-Pro model folder "
                          "(its own VQ), or a hub id such as peizesun/llamagen_t2i/vq_ds16_t2i.pt or "
                          "deepseek-ai/Janus-Pro-1B")
    enc.add_argument("--vq-preset", default=None, help="VQ architecture preset (default: from the file, else VQ-16)")
    enc.add_argument("--image-size", type=_int(1, MAX_IMAGE_SIZE), default=None,
                     help="crop size in pixels (default: the tokenizer's, 384 = 24x24 tokens for VQ-16)")
    enc.add_argument("--batch-size", type=_int(1), default=32, help="images per encoder batch (default 32)")
    enc.add_argument("--shard-size", type=_int(1), default=4096, help="images per shard file (default 4096)")
    enc.add_argument("--workers", type=_int(0), default=None,
                     help="DataLoader processes decoding images (default: the CPUs available, at most 16)")
    enc.add_argument("--resize", default="original", choices=["original", "adm"],
                     help="original: Resize(short side, bilinear) + CenterCrop, as AR-RAG encoded its database "
                          "(default); adm: LlamaGen's crop (BOX halving, bicubic)")
    enc.add_argument("--save-latents", action="store_true", help="also store float16 latents (for latent keys)")
    enc.add_argument("--shard", default=None,
                     help="process i of n (i/n) of a job array (each encodes its units and exits; the last to finish, "
                          "or a final run without --shard, writes the manifest); under torchrun leave it out")
    _add_dist_timeout(enc)
    enc.add_argument("--min-size", type=_int(0), default=64, help="skip images with a side below this (default 64)")
    enc.add_argument("--max-images", type=_int(1), default=None, help="encode only the first N images")
    _add_trust(enc)
    _add_device(enc)
    enc.set_defaults(func=_encode)

    bi = sub.add_parser(
        "build-index", help="build the FAISS patch index from a code store (second half of build_retriever.sh)",
        description="Code store -> (neighbourhood key, target code) for every valid position -> FAISS index, "
                    "de-duplicated with counts. Writes manifest.json, index.faiss, values.npy and the counts to "
                    "--out; with --shard i/n, one part of a parallel build (then `arrag merge-index`).")
    bi.add_argument("store", help="code store folder written by `arrag encode`")
    bi.add_argument("--out", required=True, help="index folder (e.g. data/retriever/index_L)")
    bi.add_argument("--shape", default="L", help="neighbourhood: L (default), 2hop or ring")
    bi.add_argument("--key-source", default="code", choices=["code", "latent"],
                    help="keys from normalised codebook rows (default) or stored latents (original project)")
    bi.add_argument("--factory", default="auto",
                    help="'auto' (by size and budget), a FAISS factory string, or IVF<nlist>,CodePQ (code keys stored "
                         "as their codes: about 15 bytes an entry, exact distances)")
    bi.add_argument("--memory-budget", default="auto",
                    help="RAM the index may need to search: --factory auto picks an index under it, and a build whose "
                         "estimate exceeds it is refused before training; a size such as 64G, or auto, 3/4 of this "
                         "machine's memory (default auto)")
    bi.add_argument("--hnsw-above", type=_int(1), default=None,
                    help="entries from which --factory auto uses an HNSW32 coarse quantiser over 2^16-2^18 lists "
                         "(default 50,000,000)")
    bi.add_argument("--nprobe", type=_int(1), default=None,
                    help="nprobe stored in the manifest (default: the smallest reaching --target-recall)")
    bi.add_argument("--target-recall", type=_float(0, 1, open_low=True), default=0.95,
                    help="recall@10 against probing every list that the tuned nprobe must reach (default 0.95)")
    bi.add_argument("--train-size", type=_int(1), default=None, help="training sample size (default by index type)")
    bi.add_argument("--seed", type=_int(0), default=0, help="seed of the training sample (default 0)")
    bi.add_argument("--chunk-images", type=_int(1), default=1024, help="images per streaming add (default 1024)")
    bi.add_argument("--gpus", default="auto",
                    help="GPUs for the coarse k-means: auto, cpu, or ids such as 0,1 (FAISS's GPU k-means with "
                         "faiss-gpu, else torch's on the first CUDA device)")
    bi.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    bi.add_argument("--no-dedup", action="store_true",
                    help="store every occurrence of a (key, value) pair; by default each distinct pair is stored "
                         "once with its count and images, and searches expand hits by their counts (same results)")
    bi.add_argument("--shard", default=None,
                    help="rank i of n (i/n) of a job array's build: after --train-only, each rank adds its part and "
                         "exits; then `arrag merge-index OUT`. Under torchrun or accelerate launch leave it out: the "
                         "ranks coordinate through torch.distributed (rank 0 trains, merges and writes the manifest)")
    bi.add_argument("--train-only", action="store_true",
                    help="train the quantizer of a job array's build into OUT/parts and stop: the first step, before "
                         "the ranks (--shard i/n) and merge-index (under torchrun rank 0 trains it)")
    _add_dist_timeout(bi)
    bi.set_defaults(func=_build_index)

    mi = sub.add_parser("merge-index", help="join the parts of a parallel build-index into one index",
                        description="Join OUT/parts/rank-*-of-n (written by `arrag build-index --shard i/n`) into the "
                                    "index in OUT: IVF indexes into one index with on-disk inverted lists (FAISS's "
                                    "merge; searched by memory map), other factories as index shards.")
    mi.add_argument("index", help="the --out folder of the parallel build")
    mi.set_defaults(func=_merge_index)

    vi = sub.add_parser("verify-index", help="hash every file of a patch index against its manifest",
                        description="Read every file an index's manifest records and check its size and blake2b "
                                    "checksum (loading an index over --hash-below only checks sizes).")
    vi.add_argument("index", help="index folder")
    vi.set_defaults(func=_verify_index)

    ss = sub.add_parser("search-stats", help="entries, memory, index type, nprobe and recall of a patch index",
                        description="Describe a patch index and estimate recall@k against exact search on a "
                                    "seeded sample of entries of its code store, plus queries/s at batch 1/16/64.")
    ss.add_argument("index", help="index folder")
    ss.add_argument("--store", default=None, help="code store for recall (default: the one in the manifest)")
    ss.add_argument("--queries", type=_int(0), default=200, help="sampled queries for recall; 0 skips (default 200)")
    ss.add_argument("--k", dest="recall_k", type=_int(1), default=10, help="k for recall@k (default 10)")
    ss.add_argument("--nprobe", type=_int(1), default=None, help="override the manifest's nprobe")
    ss.add_argument("--seed", type=_int(0), default=0, help="seed of the query sample (default 0)")
    _add_index_checks(ss)
    ss.add_argument("--device", default="cpu", help="cpu, cuda or GPU ids (default cpu)")
    ss.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ss.add_argument("--no-sweep", action="store_true",
                    help="skip the table of recall and speed at several nprobe values (IVF indexes)")
    ss.set_defaults(func=_search_stats)

    ct = sub.add_parser(
        "construct-train", help="FAiD training set: top-K retrieved codes for every position of a code store",
        description="For each image of a captioned code store and each valid target, retrieve the top-K codes "
                    "with the ground-truth neighbours (one batched search per chunk). Writes retrieved-*.npy "
                    "(int16 [n, h*w, K], -1 = none) beside the codes, resumable.")
    ct.add_argument("store", help="code store with captions (arrag encode on image-caption data)")
    ct.add_argument("--retriever", required=True, help="index folder built with the same tokenizer")
    ct.add_argument("--out", default=None, help="output folder (default: the store folder)")
    ct.add_argument("--k", "--retrieved-key-num", dest="retrieved_key_num", type=_int(1), default=10,
                    help="retrieved codes per position (default 10, as the original)")
    ct.add_argument("--exclude-self", action="store_true",
                    help="drop hits from the same image (when the index was built from this store)")
    ct.add_argument("--chunk-images", type=_int(1), default=256, help="images per batched search (default 256)")
    ct.add_argument("--nprobe", type=_int(1), default=None,
                    help="IVF lists probed (default: the index's; for the original prebuilt database the nprobe stored "
                         "in its file, with which the original built its training set)")
    _add_index_checks(ct)
    ct.add_argument("--shard", default=None,
                    help="process i of n (i/n): this process takes the store shards s with s %% n == i; default from "
                         "RANK/WORLD_SIZE (torchrun, accelerate launch)")
    _add_dist_timeout(ct)
    ct.add_argument("--device", default="cpu",
                    help="where the index is searched: cpu (memory-mapped, shared by the processes of a machine), "
                         "cuda (each process on its LOCAL_RANK's GPU) or cuda:N (default cpu)")
    ct.set_defaults(func=_construct_train)

    tf = sub.add_parser(
        "train-faid", help="train FAiD: LoRA + SmoothPatchBlenders on a construct-train set (accelerate)",
        description="Train FAiD from a base Janus-Pro: new blenders, peft LoRA on the language model, gen_head; "
                    "cross-entropy on image tokens with retrieved candidates. Run it plainly (one process) or "
                    "through `accelerate launch -m arrag train-faid ...` for several GPUs or machines. Writes "
                    "checkpoints (resumable with --resume) and, at the end, the merged model in the released layout.")
    F = FaidTrainConfig
    tf.add_argument("--base", required=True, help="base Janus-Pro checkpoint folder (config.json, weights, tokenizer)")
    tf.add_argument("--store", required=True, help="captioned code store encoded with the base model's VQ")
    tf.add_argument("--retrieved", default=_default(F, "retrieved"),
                    help="construct-train output folder (default: the store folder)")
    tf.add_argument("--out", default=_default(F, "out"),
                    help="output folder (default result/ckpts/ckpts_FAiD_b{num_blender}_h{hops})")
    tf.add_argument("--num-blender", type=_int(0), default=_default(F, "num_blender"),
                    help="a count of blenders, spread evenly over the layers; the config stores the interval "
                         "num_SmoothPatchBlender = layers // count, as the original (default %(default)s)")
    tf.add_argument("--num-hop", default=_default(F, "num_hop"),
                    help="hop sizes of each blender, from 1,2,3 (default %(default)s)")
    tf.add_argument("--faid-cells", default=_default(F, "faid_cells"), choices=["all", "valid"],
                    help="where blender output is added: every image cell, as the original (default), or only "
                         "at targets with retrieval (arrag's earlier variant)")
    tf.add_argument("--blender-init", default=_default(F, "blender_init"), choices=["original", "zero"],
                    help="new blenders' initialisation: the original's (default), or zero, where they add nothing "
                         "at step 0 and their gates start open at 0.5 (small models: the original's gates can start "
                         "saturated and close for good)")
    tf.add_argument("--retrieved-key-num", "--k", dest="retrieved_key_num", type=_int(1),
                    default=_default(F, "retrieved_key_num"),
                    help="retrieved codes per position; must match construct-train's --k (default %(default)s)")
    tf.add_argument("--lora-r", type=_int(0), default=_default(F, "lora_r"),
                    help="LoRA rank; 0 disables LoRA (default %(default)s)")
    tf.add_argument("--lora-alpha", type=_int(1), default=_default(F, "lora_alpha"),
                    help="LoRA alpha (default %(default)s)")
    tf.add_argument("--lora-dropout", type=_float(0, 1, open_high=True), default=_default(F, "lora_dropout"),
                    help="LoRA dropout (default %(default)s)")
    tf.add_argument("--lora-targets", default=_default(F, "lora_targets"),
                    help="comma-separated module names in the language model's layers (default %(default)s)")
    tf.add_argument("--lr", type=_float(0, open_low=True), default=_default(F, "lr"),
                    help="AdamW learning rate (default %(default)s)")
    tf.add_argument("--weight-decay", type=_float(0), default=_default(F, "weight_decay"),
                    help="AdamW weight decay (default %(default)s)")
    tf.add_argument("--batch-size", type=_int(1), default=_default(F, "batch_size"),
                    help="samples per process per micro-step (default %(default)s)")
    tf.add_argument("--grad-accum", type=_int(1), default=_default(F, "grad_accum"),
                    help="gradient accumulation steps (default %(default)s)")
    tf.add_argument("--epochs", type=_int(1), default=_default(F, "epochs"),
                    help="passes over the training set (default %(default)s)")
    tf.add_argument("--max-steps", type=_int(1), default=_default(F, "max_steps"),
                    help="stop after this many optimizer steps")
    tf.add_argument("--schedule", choices=["constant", "cosine"], default=_default(F, "schedule"),
                    help="learning-rate schedule after warm-up (default %(default)s)")
    tf.add_argument("--warmup-ratio", type=_float(0, 1, open_high=True), default=_default(F, "warmup_ratio"),
                    help="fraction of steps of linear warm-up (default %(default)s)")
    tf.add_argument("--max-grad-norm", type=_float(0), default=_default(F, "max_grad_norm"),
                    help="gradient-norm clip; 0 disables (default %(default)s)")
    tf.add_argument("--cfg-drop", type=_float(0, 1), default=_default(F, "cfg_drop"),
                    help="arrag's option: probability of training a sample on the unconditional prompt, without "
                         "retrieved features (default %(default)s)")
    tf.add_argument("--token-weights", default=None,
                    help="arrag's option: a .npy [images, h*w] of loss weights per image token, in store order "
                         "(e.g. more weight on objects); the loss is sum(w * ce) / sum(w). Default: the plain mean")
    tf.add_argument("--max-text-len", type=_int(8), default=_default(F, "max_text_len"),
                    help="prompt token limit (default %(default)s)")
    tf.add_argument("--seed", type=_int(0, 2**32 - 1), default=_default(F, "seed"),
                    help="seed for initialisation, order, shuffles (default %(default)s)")
    tf.add_argument("--save-every", type=_int(0), default=_default(F, "save_every"),
                    help="checkpoint every N optimizer steps (default %(default)s)")
    tf.add_argument("--keep-checkpoints", type=_int(1), default=_default(F, "keep_checkpoints"),
                    help="checkpoints kept (default %(default)s)")
    tf.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    tf.add_argument("--overwrite", action="store_true",
                    help="delete the checkpoints and train.json in --out and start over")
    tf.add_argument("--deepspeed", default=_default(F, "deepspeed"),
                    help="DeepSpeed config, e.g. arrag/train/zero3.json (ZeRO-3)")
    tf.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=_default(F, "mixed_precision"),
                    help="default bf16 on CUDA, no (fp32) on CPU")
    tf.add_argument("--cpu", action="store_true", help="train on the CPU even when CUDA is present")
    _add_trust(tf)
    tf.add_argument("--num-workers", type=_int(0), default=_default(F, "num_workers"),
                    help="DataLoader workers per process (default %(default)s)")
    tf.set_defaults(func=_train_faid)

    ev = sub.add_parser("eval", help="evaluate generated images (FID, ShapesWorld scores) and databases "
                        "(retrieval gain)", description="Evaluate generated images, or what a database adds.")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    fid = ev_sub.add_parser(
        "fid", help="FID between a folder of generated images and reference images or statistics",
        description="Frechet Inception Distance with arrag's FID Inception (pytorch-fid's network and weights "
                    "file, pool3 2048 features; no torchvision needed). Images are read as RGB and resized to "
                    "299x299 inside the network (bilinear); --resize N first centre-crops and bicubic-resizes both "
                    "sides to N.")
    fid.add_argument("--real", required=True, help="reference images folder, or an .npz from --save-stats")
    fid.add_argument("--fake", required=True, help="generated images folder (searched recursively)")
    fid.add_argument("--save-stats", default=None, help="cache the reference statistics in this .npz")
    fid.add_argument("--inception-weights", default=None,
                     help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the torch hub cache, "
                          "downloaded there when online)")
    fid.add_argument("--resize", type=_int(1, MAX_IMAGE_SIZE), default=None,
                     help="centre-crop and resize both sides to N first")
    fid.add_argument("--batch-size", type=_int(1), default=50, help="images per forward pass (default 50)")
    fid.add_argument("--out", default=None, help="result JSON (default <fake>_fid.json)")
    _add_device(fid)
    fid.set_defaults(func=_eval_fid)

    sh = ev_sub.add_parser(
        "shapes", help="GenEval-style accuracy and realism of ShapesWorld images generated with --layout geneval",
        description="Read <folder>/<index>/metadata.jsonl (a ShapesWorld prompt file's records) and samples/*.png; "
                    "score accuracy per category from the pixels (colour segmentation, components, shapes, "
                    "counts, positions) and a realism FID against rendered ground truth.")
    sh.add_argument("folder", help="generated folder (arrag generate --layout geneval --prompts <shapes jsonl>)")
    sh.add_argument("--vq", default=str(Path(__file__).resolve().parent / "demo" / "assets" / "base"),
                    help="model folder whose VQ encoder gives the realism features (default: the shipped demo base)")
    sh.add_argument("--reference-images", type=_int(2), default=512, help="rendered reference images (default 512)")
    sh.add_argument("--out", default=None, help="result JSON (default <folder>/shapes_scores.json)")
    _add_trust(sh)
    sh.set_defaults(func=_eval_shapes)

    rg = ev_sub.add_parser(
        "retrieval-gain", help="does a database know what the model does not? teacher-forced gain of DAiD's mix",
        description="On held-out images (a code store with captions, encoded with the model's tokenizer and not part "
                    "of the database), the model's teacher-forced loss per retrieval target with its distribution "
                    "mixed with DAiD's retrieval distribution, (1 - lambda) p_model + lambda p_ret, for each tau and "
                    "lambda. A gain at some lambda > 0 means the database holds information the model lacks (what "
                    "DAiD adds and FAiD can learn to use); none means FAiD has nothing to learn from it. FAiD "
                    "models are measured without their blenders.")
    rg.add_argument("--model", required=True, help="Janus-Pro folder (base or FAiD)")
    rg.add_argument("--retriever", required=True, help="index folder built with the model's tokenizer")
    rg.add_argument("--store", required=True, help="code store of held-out images with captions (`arrag encode`)")
    rg.add_argument("--images", type=_int(1), default=256, help="first N images of the store (default 256)")
    rg.add_argument("--k", type=_int(1), default=256, help="neighbours per query (default 256)")
    rg.add_argument("--aggregate", default="nearest", choices=["nearest", "sum"],
                    help="p_ret over duplicate codes: nearest hit (DAiD's default) or sum (kNN-LM)")
    rg.add_argument("--lambdas", default="0,0.01,0.03,0.1,0.3", help="mixing weights, must include 0 "
                    "(default 0,0.01,0.03,0.1,0.3)")
    rg.add_argument("--taus", default="1", help="p_ret temperatures (default 1)")
    rg.add_argument("--cfg-weight", type=_float(0), default=1.0,
                    help="CFG weight for p_model (default 1 = the conditional model alone)")
    rg.add_argument("--batch-size", type=_int(1), default=16, help="images per forward pass (default 16)")
    rg.add_argument("--nprobe", type=_int(1), default=None, help="IVF lists probed per search (default: the index's)")
    rg.add_argument("--allow-unknown-vq", action="store_true", help="accept an index without a VQ fingerprint")
    rg.add_argument("--by-bucket", action="store_true",
                    help="TailWorld: also report each frequency bucket (head, torso, tail) of the images, read from "
                         "the pattern their captions name")
    _add_index_checks(rg)
    rg.add_argument("--out", default=None, help="result JSON (default <store>_retrieval_gain.json)")
    _add_trust(rg)
    _add_device(rg)
    rg.set_defaults(func=_eval_retrieval_gain)

    sp = ev_sub.add_parser(
        "shapes-prompts", help="write a ShapesWorld prompt file (GenEval-style jsonl with each scene)",
        description="Write GenEval-style records of ShapesWorld scenes (prompt, tag, objects and the full scene), "
                    "the prompt file that `arrag generate --layout geneval` reads and `arrag eval shapes` scores.")
    sp.add_argument("--out", required=True, help="the .jsonl file to write")
    sp.add_argument("--split", default="test", choices=["train", "database", "validation", "test"],
                    help="which split's scenes (default test)")
    sp.add_argument("--per-category", type=_int(1), default=4, help="prompts per GenEval category (default 4)")
    sp.add_argument("--size", type=_int(16, MAX_IMAGE_SIZE), default=64,
                    help="image size the scenes are laid out for (default 64)")
    sp.add_argument("--seed", type=_int(0), default=0, help="ShapesWorld seed (default 0)")
    sp.set_defaults(func=_eval_shapes_prompts)

    demo = sub.add_parser(
        "demo", help="run the main job on the embedded default (TailWorld; ShapesWorld with --world shapes)",
        description="With the shipped demo models of a world: build its demo retriever(s) (first run), generate the "
                    "test prompts with base, DAiD, FAiD (and, for TailWorld, their controls) from the same seeds, "
                    "score them from the pixels, write grid.png and scores.json (and TailWorld's "
                    "accuracy_by_frequency.png) under --out and print the table. TailWorld: named patterns seen by "
                    "the base with long-tailed frequencies, a database that holds every pattern evenly (where "
                    "retrieval pays); ShapesWorld: a database drawn from what the base learned (where it does not).")
    demo.add_argument("--world", default="tail", choices=["tail", "shapes"],
                      help="tail (TailWorld, the default) or shapes (ShapesWorld)")
    demo.add_argument("--out", default=None, help="output folder (default result/demo; result/demo_shapes for "
                                                  "--world shapes)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace a demo run with other settings in --out (a rerun with the same settings reuses "
                           "its images)")
    demo.add_argument("--seeds", default=",".join(map(str, DEMO_SEEDS)),
                      help="comma-separated seeds; several give mean ± SE (default %(default)s)")
    demo.add_argument("--split", default="test", choices=["validation", "test"],
                      help="prompt set: tune on validation, report on test (default test)")
    demo.add_argument("--per-pattern", type=_int(1), default=4,
                      help="TailWorld: prompts per pattern, 24 patterns (default 4 = 96 prompts)")
    demo.add_argument("--per-category", type=_int(1), default=4,
                      help="ShapesWorld: prompts per GenEval category (default 4)")
    demo.add_argument("--samples", type=_int(1), default=None,
                      help=f"samples per prompt (default 1 for TailWorld, {DEMO_SAMPLES} for ShapesWorld)")
    demo.add_argument("--methods", default=None,
                      help="comma-separated. TailWorld: base, daid, faid, faid-noret (FAiD's weights without "
                           "retrieval), daid-control and faid-control (a database without the tail patterns); "
                           "default all six. ShapesWorld: base, daid, faid, faid-noret; default base,daid,faid")
    demo.add_argument("--daid-lambda", type=_float(0, 1), default=None,
                      help="DAiD lambda (default: the world's tuned value: 0.3 TailWorld, 0.1 ShapesWorld)")
    demo.add_argument("--daid-tau", type=_float(0, open_low=True), default=None,
                      help="DAiD tau (default: the world's tuned value: 0.3 TailWorld, 1.0 ShapesWorld)")
    demo.add_argument("--daid-k", type=_int(1), default=None,
                      help="DAiD neighbours (default: the world's tuned value: 256 for both)")
    demo.add_argument("--faid-k", type=_int(1), default=10, help="FAiD candidates per step (default 10)")
    demo.add_argument("--cfg-weight", type=_float(0), default=None,
                      help="CFG weight for every method (default: the world's tuned value, 5.0 for both)")
    demo.add_argument("--temperature", type=_float(0), default=None,
                      help="sampling temperature for every method (default: the world's tuned value, 1.0 for both)")
    demo.add_argument("--database-images", type=_int(1), default=None,
                      help="database images in each demo retriever (default 3000 for TailWorld = 630,000 entries; "
                           "4800 for ShapesWorld = 1,008,000 entries)")
    demo.add_argument("--retriever-dir", default=None,
                      help="where the demo retriever is built and reused (default data/retriever/tail_L; "
                           "data/retriever/demo_L for ShapesWorld); TailWorld's control database goes beside it")
    demo.add_argument("--assets", default=None,
                      help="folder with base/ and faid/ demo models, e.g. the --assets of your own "
                           "`python -m arrag.demo.train_demo` run (default: the shipped ones of the world)")
    _add_device(demo)
    demo.set_defaults(func=_demo)

    app = sub.add_parser(
        "app", help="a local web page: base, DAiD and FAiD side by side, and the database patches each step used",
        description="Serve a page (Gradio; the extra arrag[app]) that generates with base, DAiD and FAiD from one "
                    "seed and shows, for a clicked cell, the database patches its retrieval step found (decoded from "
                    "the index's code store) and each image's top contributing database images. Without --model it "
                    "serves the demo models and the demo retriever (built on first use, as `make demo` does).")
    app.add_argument("--model", default=None,
                     help="Janus-Pro checkpoint folder for base and DAiD (default: the demo's)")
    app.add_argument("--faid-model", default=None,
                     help="FAiD checkpoint folder (default: the demo's; none with --model)")
    app.add_argument("--retriever", default=None, help="patch index folder (default: the demo retriever)")
    app.add_argument("--store", default=None,
                     help="the index's code store, when it has moved from where build-index recorded it")
    app.add_argument("--image-size", type=_int(1, MAX_IMAGE_SIZE), default=None,
                     help="pixels per side (default: the model's)")
    app.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 shares it on the "
                          "network, with no password)")
    app.add_argument("--port", type=_int(1, 65535), default=7860, help="port (default 7860)")
    _add_device(app)
    app.set_defaults(func=_app)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """The CLI's warnings as one line each, like its errors (Python's default adds the file and a source line).
    A formatter, not a `showwarning`: whoever records warnings (pytest.warns, catch_warnings) still gets them."""
    return f"arrag: warning: {' '.join(str(message).split())}\n"


def _terminated(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, timeout, a job scheduler) unwinds like Ctrl-C: temporaries are removed


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return int(e.code or 0)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None
    import warnings

    from arrag.distributed import leave

    formatter = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    rc = 1
    try:
        rc = int(args.func(args) or 0)
        return rc
    except ArragError as e:
        print(f"arrag: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arrag: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        # A full disk wherever a write failed outside the writers that say it themselves (DiskFull): still one line.
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"arrag: error: {disk_full_message(e.filename)}", file=sys.stderr)
        return 2
    finally:
        leave(ok=rc == 0)  # the process group of a launched stage (encode, build-index, construct-train)
        warnings.formatwarning = formatter
        if in_main:
            signal.signal(signal.SIGTERM, previous)

