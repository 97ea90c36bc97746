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
LAZY_IMPORTS = {("cli", "probe"), ("cli", "_uapi"), ("cli", "ktls"), ("cli", "vm"),
                ("cli", "cli_crypto"), ("ktls", "netlink")}  # fmt: skip


def afalg_imports() -> dict[str, tuple[set[str], set[str]]]:
    """Per module of afalg/: (modules imported at the top, modules imported inside code)."""
    found: dict[str, tuple[set[str], set[str]]] = {}
    for path in sorted((ROOT / "afalg").glob("*.py")):
        top: set[str] = set()
        inner: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "afalg":
                    names = {
                        a.name for a in node.names if (ROOT / "afalg" / f"{a.name}.py").exists()
                    }
                elif node.module.startswith("afalg."):
                    names = {node.module.split(".")[1]}
                else:
                    continue
                (top if node.col_offset == 0 else inner).update(names)
        found[path.stem] = (top - {path.stem}, inner)
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
