"""The `arrag` command line: one argparse parser, each subcommand a thin call into a module.

Errors the user can fix (a bad file or flag) print as one line `arrag: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import sys

from arrag.cli import app, data, demo, eval, generate, train, vq
from arrag.cli.common import _one_line_warning, _Parser
from arrag.errors import ArragError
from arrag.fileops import disk_full_message

GROUPS = (vq, generate, data, train, eval, demo, app)  # in the order `arrag --help` lists them


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI: the top parser, then each command group's subcommands (arrag/cli/<group>.py)."""
    import arrag

    parser = _Parser(
        prog="arrag",
        description="Patch-level autoregressive retrieval augmentation (AR-RAG) for Janus-Pro + LlamaGen VQ-16.",
    )
    parser.add_argument("--version", action="version", version=f"arrag {arrag.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


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

