"""`arrag app`: the local page."""

from __future__ import annotations

import argparse

from arrag.cli.common import (
    _add_device,
    _int,
)
from arrag.errors import ArragError
from arrag.image_io import MAX_IMAGE_SIZE


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
        session = AppSession.demo(device=args.device, world=args.world)
        defaults = page_defaults(args.world)
    launch(session, host=args.host, port=args.port, defaults=defaults)
    return 0


def page_defaults(world: str) -> dict:
    """The page's starting values for a demo world: its tuned DAiD, sampling and FAiD K, a prompt and, for
    TailWorld, a real image of the prompt whose top rows every method is given (0 rows on the page: text to image)."""
    from arrag.demo import DEMO_DAID, DEMO_FAID_K, DEMO_SAMPLING, TAIL_DAID, TAIL_FAID_K, TAIL_SAMPLING

    if world == "tail":
        from arrag.demo import TAIL_COMPLETION_ROWS
        from arrag.demo.tail import TailWorld

        # twill, a tail pattern the base saw 88 times: it begins it wrong, so DAiD alone cannot complete it; given
        # the top rows of a real one (the completion table's TAIL_COMPLETION_ROWS), the database's diagonal
        # strokes continue it (one of the patterns the completion table shows DAiD completing, docs/demo.md)
        prompt = "a red twill"
        validation = TailWorld("validation")
        example = next(i for i in range(20_000) if validation.scene(i).caption == prompt)
        return {**TAIL_DAID, **TAIL_SAMPLING, "faid_k": TAIL_FAID_K, "prompt": prompt,
                "begin_image": validation.image(example), "begin_rows": TAIL_COMPLETION_ROWS}
    return {**DEMO_DAID, **DEMO_SAMPLING, "faid_k": DEMO_FAID_K, "prompt": "a red circle and a blue square"}


def add_parsers(sub) -> None:
    """Add this group's subcommands to the CLI's subparsers."""

    app = sub.add_parser(
        "app", help="a local web page: base, DAiD and FAiD side by side, and the database patches each step used",
        description="Serve a page (Gradio; the extra arrag[app]) that generates with base, DAiD and FAiD from one "
                    "seed and shows, for a clicked cell, the database patches its retrieval step found (decoded from "
                    "the index's code store) and each image's top contributing database images. Without --model it "
                    "serves the demo models and the demo retriever (built on first use, as `make demo` does).")
    app.add_argument("--world", default="tail", choices=["tail", "shapes"],
                     help="without --model: the demo world whose models and retriever to serve (default tail: "
                          "TailWorld, where the database completes patterns the base saw rarely; shapes: ShapesWorld)")
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
