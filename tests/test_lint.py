"""The code base stays ``ruff`` clean (lint and format) and its types check with ``mypy``:
part of the suite, so CI holds every change to it (``make lint`` runs the same three)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TREES = ["afalg", "tests", "examples", "bench"]


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


@pytest.mark.parametrize(
    "args",
    [["ruff", "check", *TREES], ["ruff", "format", "--check", *TREES], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_clean(args: list[str]) -> None:
    proc = subprocess.run(
        [tool(args[0]), *args[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Imports inside functions that are there for start-up cost, not to dodge a cycle: the CLI loads
# what a subcommand needs, and pyroute2 (seconds to import under TCG) only where it is used.
LAZY_IMPORTS = {
    ("cli", "probe"),
    ("cli", "_uapi"),
    ("cli", "ktls"),
    ("cli", "_vm"),
    ("cli", "_cli_crypto"),
    ("_ktls.state", "netlink"),
}


def module_name(path: Path) -> str:
    """A module's name under afalg/: ``alg``, ``_alg.base``, ``_alg`` (a package's __init__)."""
    parts = path.relative_to(ROOT / "afalg").with_suffix("").parts
    return ".".join(parts[:-1] if len(parts) > 1 and parts[-1] == "__init__" else parts)


def afalg_imports() -> dict[str, tuple[set[str], set[str]]]:
    """Per module of afalg/ and its subpackages: (modules imported at the top, modules imported
    inside code)."""
    paths = sorted((ROOT / "afalg").rglob("*.py"))
    modules = {module_name(path) for path in paths}
    found: dict[str, tuple[set[str], set[str]]] = {}
    for path in paths:
        name = module_name(path)
        top: set[str] = set()
        inner: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module != "afalg" and not node.module.startswith("afalg."):
                    continue
                package = node.module.removeprefix("afalg").lstrip(".")
                names = set()
                for alias in node.names:  # a module imported from a package, or the package
                    sub = f"{package}.{alias.name}".lstrip(".")
                    if sub in modules:
                        names.add(sub)
                    elif package:
                        names.add(package)
                (top if node.col_offset == 0 else inner).update(names)
        found[name] = (top - {name}, inner)
    return found


def test_no_import_cycle_and_no_hidden_import() -> None:
    """The layering of DESIGN.md: no cycle among afalg's modules, and no import inside a
    function to hide one (only the start-up-cost ones of LAZY_IMPORTS)."""
    imports = afalg_imports()
    hidden = {(m, d) for m, (_, inner) in imports.items() for d in inner} - LAZY_IMPORTS
    assert not hidden, f"imports inside functions: {sorted(hidden)}"
    graph = {
        m: top | {d for d in inner if (m, d) in LAZY_IMPORTS} for m, (top, inner) in imports.items()
    }
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for dep in graph.get(module, ()):
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            if dep not in done:
                visit(dep, [*path, dep])
        done.add(module)

    for module in graph:
        visit(module, [module])
    assert "ktls" in graph["probe"] and "probe" not in graph["ktls"]  # probe builds on ktls
