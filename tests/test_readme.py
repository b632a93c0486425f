"""README.md's commands: the first block is the two set-up commands (CI runs the first), every
documented script command parses with that script's own parser, and the offline main job runs."""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = {"train.py": "train", "evaluate.py": "evaluate", "demo.py": "demo", "visualize.py": "visualize",
           "-m benchmarks.tracker_speed": "benchmarks.tracker_speed", "-m benchmarks.train_speed": "benchmarks.train_speed",
           "-m dataset.synthetic": "dataset.synthetic"}


def fenced_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|shell)?\n(.*?)```", text, flags=re.S)


def commands() -> list[str]:
    """Every `python ...` / `torchrun ...` command, in code blocks or inline code."""
    found = []
    for block in fenced_blocks(README):
        found += [line.split("#")[0].strip() for line in block.splitlines()]
    found += re.findall(r"`((?:python|torchrun) [^`]+)`", README)
    return [c for c in found if c.startswith(("python ", "torchrun "))]


def test_first_block_is_the_two_setup_commands():
    first = [line.split("#")[0].strip() for line in fenced_blocks(README)[0].splitlines() if line.strip()]
    assert first == ["bash scripts/test.sh", "bash scripts/demo.sh"]
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("scripts/test.sh", "scripts/demo.sh", "scripts/setup_env.sh"):
        assert (ROOT / script).is_file()


def test_documented_commands_parse():
    cmds = commands()
    assert len(cmds) > 15
    checked = 0
    for cmd in cmds:
        argv = shlex.split(cmd.replace("<", "").replace(">", ""))
        if argv[0] == "torchrun":
            argv = ["python"] + [a for a in argv[1:] if not a.startswith("--nproc")]
        rest = argv[1:]
        key = " ".join(rest[:2]) if rest[0] == "-m" else rest[0]
        assert key in SCRIPTS, f"README documents an unknown script: {cmd}"
        module = importlib.import_module(SCRIPTS[key])
        args = rest[2:] if rest[0] == "-m" else rest[1:]
        if "..." in args:
            args = args[:args.index("...")]
        args = [a.split("|")[0] for a in args]  # `--layout davis|ytvos`: try the first alternative
        module.get_parser().parse_args(args)  # exits (SystemExit) on an unknown flag or a bad value
        checked += 1
    assert checked == len(cmds)


def test_documented_files_exist():
    for path in re.findall(r"`((?:dataset|models|trainers|lib|benchmarks|scripts|sample)/[\w/.-]+\.(?:py|sh|md|txt))`",
                           README):
        assert (ROOT / path).exists(), path


def test_every_flag_has_help_and_a_readme_line():
    for name in SCRIPTS.values():
        for action in importlib.import_module(name).get_parser()._actions:
            flags = [o for o in action.option_strings if o.startswith("--")]
            if action.dest == "help" or not flags:
                continue
            assert action.help, f"{name} {flags[0]} has no help text"
            assert any(f in README for f in flags), f"README.md does not mention {name} {flags[0]}"


@pytest.mark.parametrize("flag", ["--help"])
def test_scripts_have_help(flag, capsys):
    for key, name in SCRIPTS.items():
        with pytest.raises(SystemExit) as exit_info:
            importlib.import_module(name).get_parser().parse_args([flag])
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out


def test_main_job_runs_offline(tmp_path, capsys):
    """`bash scripts/demo.sh` is `python demo.py`: here with one epoch."""
    import demo

    out = demo.main(demo.get_parser().parse_args(["--work", str(tmp_path), "--epochs", "1", "--dev", "cpu"]))
    printed = capsys.readouterr().out
    assert re.search(r"J&F [\d.]+ .* FPS [\d.]+ +reuse rate [\d.]+%", printed)
    assert "smoke test" in printed
    results = out["results"]
    assert 0.0 <= results["J&F"] <= 1.0 and results["fps"] > 0
    assert (Path(results["results_dir"]) / "results.json").is_file()
    for seq, paths in out["overlays"].items():
        assert any(p.endswith("overlay.gif") for p in paths) and any(p.endswith("timeline.png") for p in paths)
