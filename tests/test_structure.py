"""The package's shape: no module imports one that imports it back (docs/internals.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import celery_deactivate

PACKAGE = Path(celery_deactivate.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The package's modules ``path`` imports, anywhere: at load, in a function, or for
    annotations only (each ties the two modules together)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
    return found


def import_circles() -> list[list[str]]:
    graph = {module_name(path): imported(path) for path in PACKAGE.rglob("*.py")}
    # The package's __init__ only re-exports lazily: not a tie between modules.
    graph = {
        name: {dep for dep in deps if dep in graph and dep not in (name, PACKAGE.name)}
        for name, deps in graph.items()
    }
    circles: list[list[str]] = []
    visiting: list[str] = []
    done: set[str] = set()

    def walk(name: str) -> None:
        visiting.append(name)
        for dep in sorted(graph[name]):
            if dep in visiting:
                circles.append([*visiting[visiting.index(dep) :], dep])
            elif dep not in done:
                walk(dep)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            walk(name)
    return circles


def test_imported_sees_the_package_s_imports() -> None:
    services = imported(PACKAGE / "services.py")
    assert {"celery_deactivate.target", "celery_deactivate._reads"} <= services


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert import_circles() == []


#: The longest a module of the package may be (migrations aside): one read in one sitting.
MODULE_LINES = 400


def modules_over(package: Path, limit: int) -> dict[str, int]:
    """The package's modules longer than ``limit`` lines (migrations aside), with their length."""
    lengths = {
        module_name(path): len(path.read_text(encoding="utf-8").splitlines())
        for path in package.rglob("*.py")
        if "migrations" not in path.relative_to(package).parts
    }
    return {name: length for name, length in lengths.items() if length > limit}


def test_no_module_is_over_400_lines() -> None:
    over = modules_over(PACKAGE, MODULE_LINES)
    assert over == {}


#: Modules Django or Celery load by their names, with no API of their own for a project.
LOADED_BY_NAME = {"apps", "migrations", "management"}


def public_modules() -> list[str]:
    """The package and its modules a project may import: no underscore in their name."""
    return [
        PACKAGE.name,
        *sorted(
            module_name(path)
            for path in PACKAGE.glob("*.py")
            if not path.stem.startswith("_") and path.stem not in LOADED_BY_NAME
        ),
    ]


def test_every_public_module_says_what_it_exports_and_exports_what_exists() -> None:
    import importlib

    missing, unknown = [], []
    for name in public_modules():
        module = importlib.import_module(name)
        exported = getattr(module, "__all__", None)
        if exported is None:
            missing.append(name)
            continue
        unknown += [f"{name}.{item}" for item in exported if not hasattr(module, item)]
    assert (missing, unknown) == ([], [])


def test_the_api_reference_documents_public_modules_only() -> None:
    documented = set()
    for page in (PACKAGE.parent / "docs" / "api").glob("*.rst"):
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith(".. automodule:: "):
                documented.add(line.split()[-1])
    assert documented
    assert documented <= set(public_modules())
