"""Flag types and helpers every command group shares: ranged numbers, device and index flags, result files."""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from arrag.errors import ArragError


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


def _result_file(path: str | Path, kind: str, legacy, flag: str = "--out") -> Path:
    """A JSON result file this command may write: new, or one an earlier run of the same command wrote."""
    from arrag.fileops import check_out_file
    from arrag.provenance import made_by

    check_out_file(path, what=f"{kind} result", flag=flag, is_ours=made_by(path, kind, legacy))
    return Path(path)


def _write_result(path: Path, kind: str, result: dict) -> None:
    from arrag.provenance import OUTPUT_FIELD, write_json

    write_json(path, {OUTPUT_FIELD: kind, **result})


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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """The CLI's warnings as one line each, like its errors (Python's default adds the file and a source line).
    A formatter, not a `showwarning`: whoever records warnings (pytest.warns, catch_warnings) still gets them."""
    return f"arrag: warning: {' '.join(str(message).split())}\n"
