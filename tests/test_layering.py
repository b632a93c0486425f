"""The ground floor stays below the application: models/ and dataset/ import nothing from
lib.cli (the scripts' layer), and lib/errors.py and lib/argtypes.py import nothing of the project."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("lib", "models", "dataset", "trainers", "benchmarks", "train", "evaluate", "demo", "visualize", "export",
           "deploy")


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


def _module_level_imports(path: Path) -> set[str]:
    """What a file imports when it is imported: imports outside function bodies."""
    names = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module if node.level == 0 else f"{path.parent.name}.{node.module}"
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            stack.extend(ast.iter_child_nodes(node))
    return names


def test_runtime_without_pytorch_imports_no_torch():
    """deploy/ and every module of ours it imports, transitively, import no torch when imported
    (tests/test_export.py also runs it with torch blocked)."""
    seen, todo = set(), [ROOT / "deploy" / "__main__.py", ROOT / "deploy" / "__init__.py"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _module_level_imports(path):
            assert name.split(".")[0] != "torch", f"{path.relative_to(ROOT)} imports {name}"
            parts = name.split(".")
            for n in (len(parts), len(parts) - 1):
                candidate = ROOT.joinpath(*parts[:n])
                if parts[0] in PROJECT and n and candidate.with_suffix(".py").is_file():
                    todo.append(candidate.with_suffix(".py"))
                elif parts[0] in PROJECT and n and (candidate / "__init__.py").is_file():
                    todo.append(candidate / "__init__.py")
    assert ROOT / "lib" / "video_io.py" in seen and ROOT / "deploy" / "runtime.py" in seen


def test_cli_re_exports_the_same_error():
    from lib import cli, errors

    assert cli.UsageError is errors.UsageError and issubclass(errors.UsageError, ValueError)


# Requirement names whose import name differs (the rest import under their own name).
IMPORT_NAMES = {"opencv-python-headless": "cv2", "pillow": "PIL", "tensorboard": "torch.utils.tensorboard",
                "scikit-image": "skimage"}


def test_every_requirement_is_imported():
    """The requirements files list what the code imports, nothing more (a leftover costs every install)."""
    imported = set()
    for path in ROOT.rglob("*.py"):
        if ".venv" not in path.parts:
            imported |= imported_modules(path)
    for requirements in ("requirements.txt", "requirements-export.txt", "deploy/requirements.txt"):
        for line in (ROOT / requirements).read_text().splitlines():
            name = line.split("#")[0].split("==")[0].split(">=")[0].strip()
            if name:
                module = IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
                assert module in imported, f"{requirements} lists {name}, which nothing imports ({module})"
