"""`arrag generate`: plain output or a benchmark layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from arrag.cli.common import (
    _add_device,
    _add_index_checks,
    _add_trust,
    _configs_from,
    _default,
    _float,
    _index_check,
    _int,
)
from arrag.errors import ArragError
from arrag.fileops import disk_full_message
from arrag.image_io import MAX_IMAGE_SIZE


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
    if args.upscale != 1 and args.layout:
        raise ArragError("--upscale enlarges plain output only: benchmark layouts keep the native size their "
                         "evaluators expect")
    if args.attribution and args.layout:
        raise ArragError("--attribution writes beside plain generate's images: leave out --layout")
    if not args.layout:
        return _generate_plain(args, items, method, sampling)
    slot = ProcessSlot.from_env()
    layout = make_layout(args.layout, args.out, args.parallel_size, args.format, grid=args.prompt_grids)
    layout.check_out()
    generator = _load_generator(args, method, sampling, slot.local_rank if slot.world > 1 else None)
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


def _load_generator(args: argparse.Namespace, method, sampling, local_rank: int | None):
    from arrag.decoding import Generator

    beginning = _read_beginning(args)  # a bad image fails before minutes of loading
    generator = Generator.load(args.model, method, retriever=args.retriever, device=args.device, dtype=args.dtype,
                               retriever_device=args.retriever_device, nprobe=args.nprobe,
                               verify_index=_index_check(args), local_rank=local_rank, step_mode=args.decode_step,
                               trust_checkpoint=args.trust_checkpoint, attribution=_attribution_settings(args))
    if args.begin_rows:
        from arrag.decoding.beginning import GivenBeginning, beginning_codes

        size = sampling.for_model(generator.model).image_size  # the size the images will be drawn at
        codes = beginning_codes(generator.model.vq, beginning, args.begin_rows, size, what="--begin-image")
        generator.hooks.insert(0, GivenBeginning(codes))  # before the attribution recorder, which reads the draw
    return generator


def _read_beginning(args: argparse.Namespace):
    """--begin-image as uint8 [H, W, 3] (None without --begin-rows), or one line naming the file."""
    if not args.begin_rows:
        if args.begin_image:
            raise ArragError("--begin-image is used with --begin-rows N (N > 0): give how many rows of codes to keep")
        return None
    if not args.begin_image:
        raise ArragError(f"--begin-rows {args.begin_rows} needs --begin-image FILE (the image to complete)")
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(args.begin_image) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as e:
        raise ArragError(f"--begin-image {args.begin_image}: not a readable image ({type(e).__name__}); give a "
                         "PNG, JPEG or WebP file") from None


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
        generator = _load_generator(args, method, sampling, None)
        prompts = [it.text for it in items]
        sampling = sampling.for_model(generator.model)
        images = generator.generate(prompts, sampling, progress=True)
        try:
            files = write_plain(images, args.out, args.parallel_size, args.format, grid=args.grid, replace=earlier,
                                scale=args.upscale)
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


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""
    from arrag.decoding.attribution import AttributionSettings
    from arrag.decoding.loop import SamplingConfig
    from arrag.decoding.methods import METHODS, MethodConfig

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
    gen.add_argument("--upscale", type=_int(1, 16), default=1,
                     help="plain output: write every image (and the grid) enlarged N times, nearest, e.g. 4 for the "
                          "64-px demo models (default 1: native size)")
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
    gen.add_argument("--begin-image", default=None,
                     help="image completion: every image begins with this image's top --begin-rows rows of codes "
                          "(its VQ codes, the image resized to --image-size) and the method draws the rest")
    gen.add_argument("--begin-rows", type=_int(0), default=0,
                     help="rows of codes taken from --begin-image (0: text to image) (default 0)")
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
