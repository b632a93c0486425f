"""The README and docs/: the README's first block is the two set-up commands (CI runs the first),
every page of docs/ is reachable from the README, every documented script command parses with
that script's own parser."""
from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# docs/CLI.md is generated from the parsers (tests/test_cli_reference.py); the other pages are prose.
PAGES = {path: path.read_text() for path in sorted((ROOT / "docs").glob("*.md")) if path.name != "CLI.md"}
_spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "scripts" / "cli_reference.py")
cli_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_reference)
SCRIPTS = cli_reference.SCRIPTS


def fenced_blocks(text: str) -> list[str]:
    """The shell blocks (```bash, ```shell or plain ```), in order."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
            if lang in ("", "bash", "shell")]


def commands(text: str) -> list[str]:
    """Every `python ...` / `torchrun ...` command, in code blocks or inline code; a command
    continued with a trailing backslash is joined."""
    found = []
    for block in fenced_blocks(text):
        block = block.replace("\\\n", " ")
        found += [line.split("#")[0].strip() for line in block.splitlines()]
    found += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    return [c for c in found if c.startswith(("python ", "torchrun "))]


def test_every_docs_page_is_reachable_from_the_readme():
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]*)?\)", README))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages and pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"
    assert len(README.splitlines()) <= 250


def test_links_between_pages_resolve():
    for path, text in [(ROOT / "README.md", README), *PAGES.items()]:
        for target in re.findall(r"\]\(([\w./-]+\.md)(?:#[\w-]*)?\)", text):
            assert (path.parent / target).resolve().is_file(), f"{path.name} links to missing {target}"


def test_first_block_is_the_two_setup_commands():
    first = [line.split("#")[0].strip() for line in fenced_blocks(README)[0].splitlines() if line.strip()]
    assert first == ["bash scripts/test.sh", "bash scripts/demo.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("scripts/test.sh", "scripts/demo.sh", "scripts/setup_env.sh"):
        assert (ROOT / script).is_file()


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p.name}" for p in PAGES])
def test_documented_commands_parse(page):
    cmds = commands((ROOT / page).read_text())
    if page == "README.md":
        assert len(cmds) >= 4
    checked = 0
    for cmd in cmds:
        argv = shlex.split(cmd.replace("<", "").replace(">", ""))
        if argv[0] == "torchrun":
            argv = ["python"] + [a for a in argv[1:] if not a.startswith("--nproc")]
        rest = argv[1:]
        key = " ".join(rest[:2]) if rest[0] == "-m" else rest[0]
        if f"{key} --video" in SCRIPTS and "--video" in rest:  # demo.py: one parser per job
            key = f"{key} --video"
        assert key == "scripts/cli_reference.py" or key in SCRIPTS, f"{page} documents an unknown script: {cmd}"
        parser = cli_reference.get_parser() if key == "scripts/cli_reference.py" else cli_reference.parser_of(key)
        args = rest[2:] if rest[0] == "-m" else rest[1:]
        if "..." in args:
            args = args[:args.index("...")]
        args = [a.split("|")[0] for a in args]  # `--layout davis|ytvos`: try the first alternative
        parser.parse_args(args)  # exits (SystemExit) on an unknown flag or a bad value
        checked += 1
    assert checked == len(cmds)


def test_documented_files_exist():
    folders = "dataset|models|trainers|evaluation|lib|tools|benchmarks|scripts|sample|tests"
    for text in [README, *PAGES.values()]:
        for path in re.findall(rf"`((?:{folders})/[\w/.-]+\.(?:py|sh|md|txt))`", text):
            assert (ROOT / path).exists(), path


@pytest.mark.parametrize("flag", ["--help"])
def test_scripts_have_help(flag, capsys):
    for key in SCRIPTS:
        with pytest.raises(SystemExit) as exit_info:
            cli_reference.parser_of(key).parse_args([flag])
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out
