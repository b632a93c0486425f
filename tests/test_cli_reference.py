"""docs/CLI.md is generated from the scripts' parsers (scripts/cli_reference.py): it must be up to
date, and every flag must have a help text to put there."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
cli_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_reference)


def test_cli_reference_is_up_to_date():
    written = (ROOT / "docs" / "CLI.md").read_text()
    assert written == cli_reference.reference(), "docs/CLI.md is out of date: run python scripts/cli_reference.py"


def test_every_flag_has_help_text():
    for command in cli_reference.SCRIPTS:
        for action in cli_reference.documented_actions(cli_reference.parser_of(command)):
            name = (action.option_strings or [action.dest])[-1]
            assert action.help and action.help.strip(), f"{command} {name} has no help text"


def test_reference_lists_every_flag_with_its_default():
    """Spot checks against the parsers' values, so a generator that drops rows or defaults fails."""
    text = cli_reference.reference()
    train = text[text.index("## train.py"):text.index("## evaluate.py")]
    assert "| `--epochs` | EPOCHS | `260` |" in train
    assert "| `--size` | " in train and "`480x854`" in train
    evaluate = text[text.index("## evaluate.py"):text.index("## demo.py")]
    assert "`--TH`, `--tau`" in evaluate and "`--fast`, `--no-fast`" in evaluate
    flags = sum(len(cli_reference.documented_actions(cli_reference.parser_of(c))) for c in cli_reference.SCRIPTS)
    assert text.count("\n| `") == flags


def test_reference_is_the_same_in_every_clone():
    """Defaults built from the checkout's location appear relative to it, never as this machine's path."""
    text = cli_reference.reference()
    assert str(ROOT.parent) not in text
    assert "| `../shared/data/davis-sample` |" in text
