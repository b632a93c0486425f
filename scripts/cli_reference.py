"""Write docs/CLI.md, the reference of every script's flags, from the scripts' own parsers.

    python scripts/cli_reference.py            # rewrites docs/CLI.md
    python scripts/cli_reference.py --check    # exit 1 if docs/CLI.md is out of date

Each script builds its parser in `get_parser()`; this imports that function and lists each
flag with its value, default and help text, so the reference cannot drift from the code.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "CLI.md"

# How each script is run -> the module whose get_parser() it uses ("module:function": another
# function of the module that builds the parser; demo.py has one parser per job).
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate", "demo.py": "demo:main_job_parser",
           "demo.py --video": "demo:video_parser", "visualize.py": "visualize",
           "export.py": "export", "-m deploy": "deploy.__main__",
           "-m tools.gate_report": "tools.gate_report", "-m tools.synthetic_data": "tools.synthetic_data",
           "-m benchmarks.tracker_speed": "benchmarks.tracker_speed",
           "-m benchmarks.train_speed": "benchmarks.train_speed",
           "-m benchmarks.precision_ops": "benchmarks.precision_ops",
           "-m benchmarks.precision_fidelity": "benchmarks.precision_fidelity",
           "-m benchmarks.parallel_eval": "benchmarks.parallel_eval",
           "-m benchmarks.throughput": "benchmarks.throughput", "-m benchmarks.main_job": "benchmarks.main_job",
           "-m benchmarks.runtimes": "benchmarks.runtimes",
           "scripts/make_upstream_vectors.py": "scripts.make_upstream_vectors"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit with status 1 if docs/CLI.md differs from the parsers")
    return parser


def parser_of(command: str) -> argparse.ArgumentParser:
    """The argparse parser of one entry of SCRIPTS, built with no environment variables set, so
    that defaults such as $RVOS_CHECKPOINTS show their documented fallback on every machine."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    name, _, function = SCRIPTS[command].partition(":")
    module = importlib.import_module(name)
    with mock.patch.dict(os.environ, clear=True):
        return getattr(module, function or "get_parser")()


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's arguments, without --help."""
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None:
        return "{" + ", ".join(str(c) for c in action.choices) + "}"
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    return f"{metavar} ..." if action.nargs in ("+", "*") else str(metavar)


def _default(action: argparse.Action) -> str:
    default = action.default
    if default is None or default is argparse.SUPPRESS or (action.nargs == 0 and default is False):
        return ""
    if getattr(action.type, "__name__", "") == "HxW size" and isinstance(default, tuple):
        default = "x".join(str(v) for v in default)
    elif isinstance(default, (list, tuple)):
        default = " ".join(str(v) for v in default)
    elif isinstance(default, Path) and default.is_absolute():
        # A default built from the checkout's location is shown relative to the repository
        # root, so that the page is the same in every clone.
        default = os.path.relpath(default, ROOT)
    return f"`{default}`"


def section(command: str) -> str:
    """One script's heading, usage line and table of flags."""
    parser = parser_of(command)
    formatter = parser._get_formatter()
    lines = [f"## {command.removeprefix('-m ')}", "", f"`python {command} [flags]`", ""]
    if parser.description:
        lines += [_cell(parser.description.strip().split("\n\n")[0]), ""]
    lines += ["| flag | value | default | meaning |", "|---|---|---|---|"]
    for action in documented_actions(parser):
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}` (positional)"
        meaning = formatter._expand_help(action) if action.help else ""
        lines.append(f"| {names} | {_cell(_value(action))} | {_cell(_default(action))} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def _anchor(heading: str) -> str:
    """The link target GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def reference() -> str:
    """The whole of docs/CLI.md."""
    index = "\n".join(f"- [{c.removeprefix('-m ')}](#{_anchor(c.removeprefix('-m '))})" for c in SCRIPTS)
    head = ("# Command-line reference\n\n"
            "Generated from the scripts' parsers by `python scripts/cli_reference.py`; do not edit by hand\n"
            "(`tests/test_cli_reference.py` fails when this page is out of date). Scripts run from the\n"
            "repository root; `python -m MODULE --help` prints the same.\n\n" + index + "\n")
    return "\n".join([head] + [section(c) for c in SCRIPTS])


def main(args: argparse.Namespace) -> int:
    text = reference()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_parser().parse_args()))
