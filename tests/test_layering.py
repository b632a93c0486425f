"""The ground floor stays below the application: models/ and dataset/ import nothing from
lib.cli (the scripts' layer), and lib/errors.py and lib/argtypes.py import nothing of the project."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("lib", "models", "dataset", "trainers", "benchmarks", "train", "evaluate", "demo", "visualize")


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (`from lib.cli import X` -> lib.cli, lib.cli.X)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_models_and_dataset_do_not_import_the_cli():
    files = sorted((ROOT / "models").glob("*.py")) + sorted((ROOT / "dataset").glob("*.py"))
    assert len(files) > 10
    for path in files:
        cli = [m for m in imported_modules(path) if m == "lib.cli" or m.startswith("lib.cli.")]
        assert not cli, f"{path.relative_to(ROOT)} imports {cli}"


def test_errors_and_argument_types_import_nothing_of_the_project():
    for name in ("errors", "argtypes"):
        project = [m for m in imported_modules(ROOT / "lib" / f"{name}.py") if m.split(".")[0] in PROJECT]
        assert not project, f"lib/{name}.py imports {project}"


def test_cli_re_exports_the_same_error():
    from lib import cli, errors

    assert cli.UsageError is errors.UsageError and issubclass(errors.UsageError, ValueError)


# Requirement names whose import name differs (the rest import under their own name).
IMPORT_NAMES = {"opencv-python-headless": "cv2", "pillow": "PIL", "tensorboard": "torch.utils.tensorboard",
                "scikit-image": "skimage"}


def test_every_requirement_is_imported():
    """requirements.txt lists what the code imports, nothing more (a leftover costs every install)."""
    imported = set()
    for path in ROOT.rglob("*.py"):
        if ".venv" not in path.parts:
            imported |= imported_modules(path)
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].split("==")[0].split(">=")[0].strip()
        if name:
            module = IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
            assert module in imported, f"requirements.txt lists {name}, which nothing imports ({module})"
