"""`arrag demo`: the main job on a demo world."""

from __future__ import annotations

import argparse

from arrag.cli.common import (
    _add_device,
    _float,
    _int,
    _ints,
)
from arrag.demo import (
    DEMO_DAID,
    DEMO_FAID_K,
    DEMO_SAMPLES,
    DEMO_SAMPLING,
    DEMO_SEEDS,
    TAIL_COMPLETION_ROWS,
    TAIL_DAID,
    TAIL_FAID_K,
    TAIL_SAMPLING,
)
from arrag.errors import ArragError


def _demo(args: argparse.Namespace) -> int:
    from arrag.demo.pipeline import ASSETS, run_demo
    from arrag.demo.tail_demo import run_tail_demo
    from arrag.runtime import resolve_device

    seeds = tuple(_ints(args.seeds, "--seeds"))
    if any(s < 0 for s in seeds):
        raise ArragError(f"--seeds must be >= 0, got {args.seeds!r}")
    daid = {k: v for k, v in (("daid_lambda", args.daid_lambda), ("daid_tau", args.daid_tau),
                              ("daid_k", args.daid_k),
                              ("daid_aggregate", args.daid_aggregate)) if v is not None}
    sampling = {k: v for k, v in (("cfg_weight", args.cfg_weight), ("temperature", args.temperature))
                if v is not None}
    common = dict(seeds=seeds, split=args.split, daid=daid, sampling=sampling,
                  device=resolve_device(args.device), overwrite=args.overwrite)
    if args.faid_k is not None:
        common["faid_k"] = args.faid_k
    if args.methods is not None:
        common["methods"] = tuple(args.methods.split(","))
    if args.database_images is not None:
        common["database_images"] = args.database_images
    if args.world == "tail":
        if args.retriever_dir:  # the control database lives beside the world's: <retriever-dir>_control
            common["retriever_dir"] = args.retriever_dir
        run_tail_demo(args.out or "result/demo", per_pattern=args.per_pattern, samples=args.samples or 1,
                      assets=args.assets, completion_rows=args.completion_rows, **common)
    else:
        run_demo(args.out or "result/demo_shapes", per_category=args.per_category,
                 samples=args.samples or DEMO_SAMPLES, retriever_dir=args.retriever_dir or "data/retriever/demo_L",
                 assets=args.assets or ASSETS, **common)
    return 0


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""

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
    demo.add_argument("--completion-rows", type=_int(0), default=TAIL_COMPLETION_ROWS,
                      help="TailWorld: after the table, give each tail prompt its real image's top N rows of codes "
                           "(of 16) and let base, DAiD and DAiD with the control database draw the rest (the "
                           "completion table and completion.png; 0 skips it) (default %(default)s)")

    def tuned(key: str, tail: dict, shapes: dict) -> str:
        """The world's tuned value of a setting, for its --help."""
        t, sh = tail.get(key, "nearest"), shapes.get(key, "nearest")
        return f"{t} TailWorld, {sh} ShapesWorld" if t != sh else f"{t} for both"

    for flag, key, kind in (("--daid-lambda", "daid_lambda", _float(0, 1)),
                            ("--daid-tau", "daid_tau", _float(0, open_low=True)),
                            ("--daid-k", "daid_k", _int(1))):
        demo.add_argument(flag, type=kind, default=None,
                          help=f"DAiD {key[5:]} (default: the world's tuned value: {tuned(key, TAIL_DAID, DEMO_DAID)})")
    demo.add_argument("--daid-aggregate", default=None, choices=["nearest", "sum"],
                      help="how p_ret weighs a code proposed by several hits (default: the world's tuned value: "
                           f"{tuned('daid_aggregate', TAIL_DAID, DEMO_DAID)})")
    demo.add_argument("--faid-k", type=_int(1), default=None,
                      help="FAiD candidates per step (default: the world's tuned value: "
                           f"{tuned('k', {'k': TAIL_FAID_K}, {'k': DEMO_FAID_K})})")
    demo.add_argument("--cfg-weight", type=_float(0), default=None,
                      help="CFG weight for every method (default: the world's tuned value, "
                           f"{tuned('cfg_weight', TAIL_SAMPLING, DEMO_SAMPLING)})")
    demo.add_argument("--temperature", type=_float(0), default=None,
                      help="sampling temperature for every method (default: the world's tuned value, "
                           f"{tuned('temperature', TAIL_SAMPLING, DEMO_SAMPLING)})")
    demo.add_argument("--database-images", type=_int(1), default=None,
                      help="database images in each demo retriever (default 3000 for TailWorld = 504,000 entries; "
                           "4800 for ShapesWorld = 1,008,000 entries)")
    demo.add_argument("--retriever-dir", default=None,
                      help="where the demo retriever is built and reused (default data/retriever/tail; "
                           "data/retriever/demo_L for ShapesWorld); TailWorld's control database goes beside it")
    demo.add_argument("--assets", default=None,
                      help="folder with base/ and faid/ demo models, e.g. the --assets of your own "
                           "`python -m arrag.demo.train_demo` run (default: the shipped ones of the world)")
    _add_device(demo)
    demo.set_defaults(func=_demo)
