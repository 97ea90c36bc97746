"""The documentation builds, with warnings as errors, and the guides' code runs as written.

- The Sphinx build (``docs/``: the API reference from the docstrings, the ``afalg`` command's
  reference from its parser, the guides) runs with ``-W -n``: a docstring docutils rejects, a
  module that does not import, a reference to an afalg name that does not exist fails here.
- Every public module of ``afalg/`` is in ``docs/conf.py``'s ``API_MODULES`` (or ``NOT_API``).
- Each guide in ``docs/guides/`` is a runnable page: its ``python`` blocks run in order in one
  namespace, with the checkout as the current directory, then its ``sh`` blocks (with
  ``set -e``) in a scratch directory with this interpreter's ``bin`` first on PATH. Blocks
  fenced ``console`` are shown and not run (installs as root, booting VMs). Pages that need
  AF_ALG or kTLS run as ``kernel`` tests, in the VM where the host has neither.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDES = DOCS / "guides"

# Where each guide's code runs: "kernel" (AF_ALG or kTLS: the VM) or "host"; "restricted": on
# Linux 7.3 also with crypto.af_alg_restrict at its default (the allowlist), as a kernel test.
WHERE = {
    "scripting.md": "kernel",
    "serving.md": "kernel",
    "modes.md": "restricted",
    "conformance.md": "kernel",
    "vm.md": "host",
    "tls-sockets.md": "kernel",
    "testing.md": "host",
    "frameworks.md": "host",  # afalg's loop on the cryptography backend where AF_ALG is missing
}
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # of the block's first code line in the page
    code: str


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [
        Block(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2))
        for m in FENCE.finditer(text)
    ]


def conf_list(name: str) -> list[str]:
    """A list assigned in docs/conf.py, read without importing it."""
    for node in ast.parse((DOCS / "conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return list(ast.literal_eval(node.value))
    raise AssertionError(f"docs/conf.py has no {name}")


def test_docs_build_with_warnings_as_errors(tmp_path: Path) -> None:
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    for page in ["index", "api", "cli", *(f"guides/{p[:-3]}" for p in WHERE)]:
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text()
    for module in conf_list("API_MODULES"):
        page = (out / "api" / f"{module}.html").read_text()
        assert f'id="module-{module}"' in page, f"{module} is not in the API reference"
        assert f'href="api/{module}.html"' in api, f"api.html does not link {module}"
    cli = (out / "cli.html").read_text()
    for command in ("info", "vm", "list", "hash", "hmac", "enc", "aead-dec", "rng"):
        assert f'id="afalg-{command}"' in cli, command


def test_every_public_module_is_documented() -> None:
    modules = {
        "afalg" if p.stem == "__init__" else f"afalg.{p.stem}"
        for p in (ROOT / "afalg").glob("*.py")
        if p.stem in ("__init__", "__main__") or not p.stem.startswith("_")
    }
    listed = conf_list("API_MODULES") + conf_list("NOT_API")
    assert len(listed) == len(set(listed))
    assert not modules - set(listed), (
        f"add {sorted(modules - set(listed))} to API_MODULES in docs/conf.py (one line each)"
    )
    assert not set(listed) - modules, f"no such modules: {sorted(set(listed) - modules)}"


def test_guides_are_runnable_pages() -> None:
    pages = {p.name for p in GUIDES.glob("*.md")}
    assert pages == set(WHERE), "each guide needs a WHERE entry in tests/test_docs.py"
    index = (DOCS / "index.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for name in pages:
        found = blocks(GUIDES / name)
        assert any(b.lang in ("python", "sh") for b in found), f"{name} runs no code"
        assert not [b for b in found if b.lang not in ("python", "sh", "console", "text")], name
        assert f"guides/{name[:-3]}" in index, f"{name} is not in the index's toctree"
        assert f"docs/guides/{name}" in readme, f"the README does not link {name}"


def run_guide(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    page = GUIDES / name
    found = blocks(page)
    monkeypatch.chdir(ROOT)
    namespace: dict[str, object] = {"__name__": f"guide_{name[:-3]}"}
    for block in (b for b in found if b.lang == "python"):
        code = "\n" * (block.line - 1) + block.code  # tracebacks name the page's own lines
        exec(compile(code, str(page), "exec"), namespace)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    for block in (b for b in found if b.lang == "sh"):
        done = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", block.code],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"{page}:{block.line}: exit {done.returncode}\n{done.stdout[-3000:]}"
            f"\n{done.stderr[-3000:]}"
        )


KERNEL_GUIDES = [
    pytest.param(n, marks=[pytest.mark.restricted] if where == "restricted" else [])
    for n, where in sorted(WHERE.items())
    if where != "host"
]
HOST_GUIDES = sorted(n for n, where in WHERE.items() if where == "host")


@pytest.mark.kernel
@pytest.mark.parametrize("name", KERNEL_GUIDES)
def test_kernel_guide_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_guide(name, tmp_path, monkeypatch)


@pytest.mark.parametrize("name", HOST_GUIDES)
def test_host_guide_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_guide(name, tmp_path, monkeypatch)


def test_a_broken_reference_fails_the_build(tmp_path: Path) -> None:
    """docs/conf.py's resolver: a re-exported name finds its home, a name that exists but is
    not in its module's __all__ is plain text, and a name that does not exist fails -W -n."""

    def build(text: str) -> subprocess.CompletedProcess[str]:
        src = tmp_path / f"src{len(list(tmp_path.iterdir()))}"
        src.mkdir()
        (src / "index.rst").write_text(f"Test\n====\n\n.. automodule:: afalg.errors\n\n{text}\n")
        return subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "-n", "-q", "-b", "html", "-c", str(DOCS),
             str(src), str(src / "_out")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    good = build(":class:`afalg.InvalidTag` :class:`InvalidTag` :class:`afalg.probe.AlgStatus`")
    assert good.returncode == 0, good.stderr
    bad = build(":class:`afalg.NoSuchError`")
    assert bad.returncode != 0 and "afalg.NoSuchError" in bad.stderr, bad.stderr
