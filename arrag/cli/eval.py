"""`arrag eval`: FID, retrieval gain, ShapesWorld scores and prompt files."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.cli.common import (
    _add_device,
    _add_index_checks,
    _add_trust,
    _float,
    _floats,
    _index_check,
    _int,
    _result_file,
    _write_result,
)
from arrag.errors import ArragError
from arrag.image_io import MAX_IMAGE_SIZE


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


# Each world's image scorer: the module with score_folder, its result file and the key its summary line reads.
_WORLD_SCORERS = {"shapes": ("arrag.demo.score", "shapes_scores.json", "per_category"),
                  "tail": ("arrag.demo.tail_score", "tail_scores.json", "by_bucket")}


def _eval_world_images(args: argparse.Namespace) -> int:
    """`eval shapes` / `eval tail`: score a generated folder from its pixels and write the result JSON."""
    import importlib

    module, file_name, parts = _WORLD_SCORERS[args.eval_command]
    command = f"eval {args.eval_command}"
    out = _result_file(args.out or Path(args.folder) / file_name, command,
                       lambda r: parts in r and "realism_fid" in r)
    result = importlib.import_module(module).score_folder(args.folder, args.vq,
                                                          reference_count=args.reference_images,
                                                          trust_checkpoint=args.trust_checkpoint)
    _write_result(out, command, {**result, "settings": {k: v for k, v in vars(args).items() if k != "func"}})
    per = "  ".join(f"{c} {v:.2f}" for c, v in result[parts].items())
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


def _eval_tail_prompts(args: argparse.Namespace) -> int:
    from arrag.demo.score import write_prompt_file
    from arrag.demo.tail import PATTERNS
    from arrag.demo.tail_score import is_prompt_file, prompt_records
    from arrag.fileops import check_out_file

    check_out_file(args.out, what="prompt file", is_ours=is_prompt_file(args.out))
    records = prompt_records(args.split, args.per_pattern, args.size, seed=args.seed)
    path = write_prompt_file(args.out, records)
    print(f"wrote {len(records)} TailWorld {args.split} prompts ({args.per_pattern} for each of the {len(PATTERNS)} "
          f"patterns) to {path}; generate with `arrag generate --prompts {path} --layout geneval ...`, score with "
          "`arrag eval tail`")
    return 0


def _add_world_scorer_flags(parser, world: str, title: str, vq_name: str, vq_parts: tuple[str, ...],
                            references: int) -> None:
    """The flags `eval shapes` and `eval tail` share."""
    parser.add_argument("folder", help=f"generated folder (arrag generate --layout geneval --prompts <{world} jsonl>)")
    parser.add_argument("--vq", default=str(Path(__file__).resolve().parents[1].joinpath("demo", "assets", *vq_parts)),
                        help=f"model folder whose VQ encoder gives the realism features (default: {vq_name})")
    parser.add_argument("--reference-images", type=_int(2), default=references,
                        help=f"rendered reference images (default {references})")
    parser.add_argument("--out", default=None, help=f"result JSON (default <folder>/{_WORLD_SCORERS[world][1]})")
    _add_trust(parser)
    parser.set_defaults(func=_eval_world_images)


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""

    ev = sub.add_parser("eval", help="evaluate generated images (FID, TailWorld and ShapesWorld scores) and databases "
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
    _add_world_scorer_flags(sh, "shapes", "ShapesWorld", "the shipped demo base", ("base",), 512)

    tl = ev_sub.add_parser(
        "tail", help="accuracy per frequency bucket and realism of TailWorld images generated with --layout geneval",
        description="Read <folder>/<index>/metadata.jsonl (a TailWorld prompt file's records) and samples/*.png; read "
                    "each disc's ink and pattern from the pixels and score accuracy per bucket (head, torso, tail: "
                    "how often the base saw the pattern) and overall, and a realism FID against rendered ground "
                    "truth.")
    _add_world_scorer_flags(tl, "tail", "TailWorld", "the shipped TailWorld base", ("tail", "base"), 480)

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

    tp = ev_sub.add_parser(
        "tail-prompts", help="write a TailWorld prompt file (GenEval-style jsonl with each scene and its bucket)",
        description="Write GenEval-style records of TailWorld scenes (prompt, bucket, pattern and the full scene), the "
                    "prompt file that `arrag generate --layout geneval` reads and `arrag eval tail` scores.")
    tp.add_argument("--out", required=True, help="the .jsonl file to write")
    tp.add_argument("--split", default="test", choices=["validation", "test"],
                    help="which evaluation split's scenes (default test)")
    tp.add_argument("--per-pattern", type=_int(1), default=4,
                    help="prompts per pattern, 24 patterns (default 4)")
    tp.add_argument("--size", type=_int(16, MAX_IMAGE_SIZE), default=64,
                    help="image size the scenes are laid out for (default 64)")
    tp.add_argument("--seed", type=_int(0), default=0, help="TailWorld seed (default 0)")
    tp.set_defaults(func=_eval_tail_prompts)
