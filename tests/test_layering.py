"""Imports point down (docs/architecture.md): every module of the project, read with `ast`, lazy
imports (inside functions) included.

    floor 3  the scripts: train.py, evaluate.py, demo.py, ..., benchmarks/, tools/, scripts/
    floor 2  evaluation/, trainers/
    floor 1  models/, dataset/
    floor 0  lib/ (lib/cli.py, the scripts' flag layer, is imported by the scripts only)

A module imports modules of its own package or of lower floors; the packages of one floor do not
import each other (the scripts may import scripts); and no module takes part in an import cycle.
No exception list."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"lib": 0, "models": 1, "dataset": 1, "evaluation": 2, "trainers": 2}
SCRIPTS_FLOOR = 3
SKIPPED = {"tests", ".venv", ".git", "docs", "sample"}
PROJECT = ("lib", "models", "dataset", "trainers", "evaluation", "tools", "benchmarks", "train", "evaluate", "demo",
           "visualize", "main_job", "export", "deploy")
# What the runtime without PyTorch (deploy/) may import of ours: no floor that needs PyTorch.
DEPLOY_MAY_IMPORT = ("lib", "evaluation.results", "deploy")


def module_name(path: Path, root: Path = ROOT) -> str:
    """lib/cli.py -> lib.cli, models/__init__.py -> models, demo.py -> demo."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project outside the tests: {name: path}."""
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))
            if not SKIPPED & set(p.relative_to(root).parts)}


def imports_of(name: str, source: str, modules: set[str], is_package: bool = False) -> set[str]:
    """The project modules that module `name` (its `source`) imports, anywhere in the file:
    `import a.b`, `from a import b` (a.b when it is a module, else a), relative imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a.b.c where a.b is the module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path.read_text(), set(modules), path.name == "__init__.py") - {name}
            for name, path in modules.items()}


def floor(name: str) -> int:
    return FLOORS.get(name.split(".")[0], SCRIPTS_FLOOR)


def wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    """The imports that break the floors' rules, as 'a -> b (why)'."""
    wrong = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            if b == "lib.cli" and floor(a) < SCRIPTS_FLOOR:
                wrong.append(f"{a} -> {b} (the scripts' flag layer, for the scripts only)")
            elif a.split(".")[0] == b.split(".")[0] or floor(a) == SCRIPTS_FLOOR:
                continue
            elif floor(b) >= floor(a):
                wrong.append(f"{a} -> {b} (floor {floor(a)} imports floor {floor(b)})")
    return wrong


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_covers_every_package_and_sees_lazy_imports(graph):
    assert {name.split(".")[0] for name in graph} >= set(PROJECT)
    assert len(graph) > 60
    # evaluation.job imports models only inside functions (lazily): still an edge
    assert {"models", "models.checkpoint"} <= graph["evaluation.job"]
    assert "models.compiled" in graph["models.tracker"]  # the regions' factory, lazily
    assert "lib.errors" in graph["models.tracker"] and "models.regions" in graph["models.tracker"]


def test_imports_point_down(graph):
    assert wrong_imports(graph) == []


def test_no_module_takes_part_in_an_import_cycle(graph):
    assert cycles(graph) == []


def test_lib_imports_nothing_else_of_the_project(graph):
    for name, targets in graph.items():
        if floor(name) == 0:
            assert {t.split(".")[0] for t in targets} <= {"lib"}, name


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The rules and the cycle finder on a made-up project: each breach is reported."""
    files = {
        "lib/__init__.py": "",
        "lib/cli.py": "",
        "lib/base.py": "def f():\n    from models import net\n",  # lazy, upward
        "models/__init__.py": "",
        "models/net.py": "from . import util\nfrom lib import base\n",
        "models/util.py": "import models.net\n",  # cycle with models.net
        "dataset/data.py": "from models.net import X\nfrom lib.cli import run\n",  # same floor; the cli
        "trainers/t.py": "from models.net import X\n",
        "train.py": "from lib.cli import run\nfrom trainers.t import go\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    made_up = import_graph(tmp_path)
    assert made_up["models.net"] == {"models.util", "lib.base"} and made_up["lib.base"] == {"models.net"}
    assert wrong_imports(made_up) == [
        "dataset.data -> lib.cli (the scripts' flag layer, for the scripts only)",
        "dataset.data -> models.net (floor 1 imports floor 1)",
        "lib.base -> models.net (floor 0 imports floor 1)",
    ]
    assert cycles(made_up) == [["lib.base", "models.net", "models.util"]]


def test_the_runtime_without_pytorch_imports_only_the_floors_without_it(graph):
    """deploy/ imports lib/ and the results' statistics (evaluation.results), never models/,
    dataset/, trainers/ or export.py (which import PyTorch); only the scripts import deploy/
    (export.py's int8 calibration, evaluate.py's and demo.py's exported folders, the benchmarks):
    evaluation/ takes the exported tracker as an argument (evaluation.run.evaluate's
    open_exported) and does not depend on it."""
    for name, targets in graph.items():
        if name.split(".")[0] == "deploy":
            wrong = [t for t in targets if not any(t == m or t.startswith(m + ".") for m in DEPLOY_MAY_IMPORT)]
            assert not wrong, f"{name} imports {wrong}"
        elif floor(name) < SCRIPTS_FLOOR:
            assert not {t for t in targets if t.split(".")[0] == "deploy"}, name
    assert {"deploy.runtime", "lib.manifest"} <= graph["deploy.__main__"] | graph["deploy.runtime"]
    assert "deploy" in graph["evaluate"] and "evaluate" in graph["demo"]


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
