"""The documentation agrees with the tool: every `arrag ...` command line in README.md and docs/ names real
subcommands and flags; the source kinds, the download hint and the defaults are stated as the CLI states them."""

import argparse
import re
from pathlib import Path

import pytest

from arrag.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command_lines(text: str) -> list[str]:
    """Every `arrag ...` command in the text: lines of fenced code blocks (continuations joined) and inline code
    spans."""
    found, in_code = [], False
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        spans = [re.sub(r"(^|\s)#.*", "", line)] if in_code else re.findall(r"`([^`]*)`", line)  # no comments
        for span in spans:
            found += [m.group(0) for m in re.finditer(r"(?<![\w/.-])arrag (?:[a-z][\w-]*)[^|;#`]*", span)]
    return found


def _check(command: str, top: argparse.ArgumentParser) -> list[str]:
    words = command.split()[1:]
    parser, problems = top, []
    while words and not words[0].startswith("-"):
        subs = _subparsers(parser)
        if not subs:
            break
        if words[0] not in subs:
            if re.fullmatch(r"[a-z][a-z-]*", words[0]) and words[0] != "app":
                problems.append(f"{command!r}: no subcommand {words[0]!r}")
            return problems
        parser, words = subs[words[0]], words[1:]
    known = {s for a in parser._actions for s in a.option_strings}
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", " ".join(words)):
        if flag not in known:
            problems.append(f"{command!r}: {parser.prog} has no {flag}")
    return problems


def test_every_documented_command_line_names_real_subcommands_and_flags():
    top = build_parser()
    problems, seen = [], 0
    for path in DOCS:
        for command in _command_lines(path.read_text()):
            seen += 1
            problems += [f"{path.name}: {p}" for p in _check(command, top)]
    assert seen > 30  # the docs do show commands
    assert not problems, "\n".join(problems)


def test_the_checker_catches_what_it_should():
    top = build_parser()
    assert _check("arrag generate --model m --no-such-flag", top)
    assert _check("arrag no-such-command --x", top)
    assert not _check("arrag eval retrieval-gain --model m --by-bucket", top)


def test_source_kinds_are_listed_in_encode_help_and_the_script_headers():
    enc = _subparsers(build_parser())["encode"].format_help()
    for kind in ("folder of images", ".tar", "parquet", "HF dataset", "hub dataset", "http", "pipe:"):
        assert kind in " ".join(enc.split()), kind
    for script in ("arrag/build_retriever/build_retriever.sh", "arrag/train/train_FAiD.sh"):
        header = "".join(line for line in (ROOT / script).read_text().splitlines(keepends=True)
                         if line.startswith("#"))
        assert "parquet" in header and ".tar" in header, script


def test_the_download_hint_is_the_one_the_cli_prints():
    hub = (ROOT / "arrag" / "hub.py").read_text()
    assert '"hf download"' in hub
    text = " ".join(p.read_text() for p in DOCS)
    assert "hf download" in text


@pytest.mark.parametrize("command", [["demo"], ["generate"], ["train-faid"], ["build-index"]])
def test_defaults_are_given_as_values(command):
    """A help line that names a default gives its value, not 'the demo's tuned value' alone."""
    parser = build_parser()
    for name in command:
        parser = _subparsers(parser)[name]
    for action in parser._actions:
        text = action.help or ""
        if "tuned value" in text:
            # each world's value is printed: "<value> TailWorld, <value> ShapesWorld" or "<value> for both"
            assert re.search(r"tuned value[,:] [\w.]+ (TailWorld, [\w.]+ ShapesWorld|for both)", text), text
