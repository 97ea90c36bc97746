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
import html as html_text
import importlib
import inspect
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

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


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The documentation built once for this module's tests, warnings as errors."""
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    return out


def test_docs_build_with_warnings_as_errors(html: Path) -> None:
    for page in ["index", "api", "cli", *(f"guides/{p[:-3]}" for p in WHERE)]:
        assert (html / f"{page}.html").is_file(), page
    api = (html / "api.html").read_text()
    for module in conf_list("API_MODULES"):
        page = (html / "api" / f"{module}.html").read_text()
        assert f'id="module-{module}"' in page, f"{module} is not in the API reference"
        assert f'href="api/{module}.html' in api, f"api.html does not link {module}"
    cli = (html / "cli.html").read_text()
    for command in ("info", "vm", "list", "hash", "hmac", "enc", "aead-dec", "rng"):
        assert f'id="afalg-{command}"' in cli, command


class _Page(HTMLParser):
    """A built page's anchors (``id``, ``<a name>``) and the links it makes."""

    def __init__(self) -> None:
        super().__init__()
        self.anchors: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        for anchor in (found.get("id"), found.get("name") if tag == "a" else None):
            if anchor:
                self.anchors.add(anchor)
        link = found.get("src") if tag in ("img", "script") else found.get("href")
        if link is not None and tag in ("a", "link", "img", "script"):
            self.links.append(link)


def read_pages(html: Path) -> dict[Path, _Page]:
    pages = {}
    for path in html.rglob("*.html"):
        page = _Page()
        page.feed(path.read_text())
        pages[path] = page
    return pages


def broken_links(html: Path) -> list[str]:
    """Every link between the built pages whose file, or ``#fragment`` in it, does not exist
    (links to other sites are not followed: no network)."""
    pages = read_pages(html)
    broken = []
    for path, page in sorted(pages.items()):
        for link in page.links:
            url = urlsplit(link)
            if url.scheme or url.netloc:
                continue
            target = (path.parent / unquote(url.path)).resolve() if url.path else path
            if target.is_dir():
                target = target / "index.html"
            where = f"{path.relative_to(html)}: {link}"
            if not target.is_file() or not target.is_relative_to(html.resolve()):
                broken.append(f"{where} (no such file)")
            elif (
                url.fragment
                and target in pages
                and unquote(url.fragment) not in pages[target].anchors
            ):
                broken.append(f"{where} (no such anchor)")
    return broken


def test_no_broken_link(html: Path) -> None:
    """The guides, the reference and viewcode's source pages link only to pages and anchors
    that exist: Sphinx's -n checks references to names, not where a link lands."""
    assert broken_links(html) == []


def test_the_link_check_sees_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text(
        '<p id="here"><a href="#here">ok</a> <a href="#gone">no anchor</a>'
        ' <a href="other.html#there">ok</a> <a href="other.html#elsewhere">no anchor</a>'
        ' <a href="missing.html">no file</a> <a href="https://example.org/x">not followed</a>'
    )
    (tmp_path / "other.html").write_text('<a name="there">there</a>')
    assert broken_links(tmp_path) == [
        "index.html: #gone (no such anchor)",
        "index.html: other.html#elsewhere (no such anchor)",
        "index.html: missing.html (no such file)",
    ]


def entries(html: Path) -> set[str]:
    """The documented afalg names: the ids of the reference's entries."""
    found = set()
    for path in (html / "api").glob("*.html"):
        found |= set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', path.read_text()))
    return found


def test_each_public_name_is_documented_once(html: Path) -> None:
    """A name two modules offer (afalg.tls re-exports afalg.ktls.KTLSSocket) has one entry, in
    its home module; the other module's page links it under "Also importable from here"."""
    documented = entries(html)
    places: dict[object, list[str]] = {}
    for module in conf_list("API_MODULES"):
        if module == "afalg":  # the package re-exports; its page documents none of its names
            continue
        mod = importlib.import_module(module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            key = id(obj) if inspect.isclass(obj) or inspect.isroutine(obj) else (id(obj), name)
            places.setdefault(key, []).append(f"{module}.{name}")
    for names in places.values():
        assert len([n for n in names if n in documented]) == 1, names
    for alias in (
        "afalg.tls.KTLSSocket",
        "afalg.record.ContentType",
        "afalg.errors.AlertDescription",
    ):
        module, _, name = alias.rpartition(".")
        obj = getattr(importlib.import_module(module), name)
        home = f"{obj.__module__}.{obj.__qualname__}"
        page = (html / "api" / f"{module}.html").read_text()
        assert "Also importable from here" in page, alias
        assert f'href="{obj.__module__}.html#{home}"' in page, alias


def test_inherited_methods_have_entries(html: Path) -> None:
    """The TLS sockets and the AF_ALG objects list what their private bases give them, and
    no class lists what a base outside afalg brings (socket, Exception, IntEnum)."""
    documented = entries(html)
    for cls in ("afalg.ktls.KTLSSocket", "afalg.algif.AlgTLSSocket"):
        for method in ("sendall", "recv", "pending", "version", "cipher", "getpeercert",
                       "settimeout", "shutdown", "close", "makefile"):  # fmt: skip
            assert f"{cls}.{method}" in documented, f"{cls}.{method}"
    # An undocumented one that ssl's sockets also have says so.
    page = (html / "api" / "afalg.ktls.html").read_text()
    recv = page[page.index('id="afalg.ktls.KTLSSocket.recv"') :].split("</dd>")[0]
    assert "ssl.SSLSocket" in recv, recv
    for cls in ("AEAD", "HMAC", "Hash", "RNG", "SKCipher"):
        assert f"afalg.alg.{cls}.close" in documented, cls
    assert "afalg.errors.TLSAlertReceived.with_traceback" not in documented
    assert "afalg.errors.KTLSError.errno" not in documented
    assert "afalg.wire.ContentType.bit_length" not in documented
    assert not [e for e in documented if "._" in e or "TLSSocketBase" in e]


def test_api_page_says_what_each_module_is_for(html: Path) -> None:
    """docs/api.rst: a row per module with its docstring's one-line summary, the building
    blocks (BUILDING_BLOCKS) in a table of their own after the modules applications use."""
    modules, blocks = conf_list("API_MODULES"), conf_list("BUILDING_BLOCKS")
    assert set(blocks) < set(modules)
    api = (html / "api.html").read_text()
    split = api.index('id="building-blocks"')
    for module in modules:
        summary = (importlib.import_module(module).__doc__ or "").strip().splitlines()[0]
        assert summary.endswith("."), module
        row = api.find(f'href="api/{module}.html#module-{module}"', api.index("<table"))
        assert row != -1, module
        assert (row > split) == (module in blocks), module
        words = re.sub(r"``|:\w+:`([^`]*)`", r"\1", summary).split()[:3]
        text = html_text.unescape(re.sub(r"<[^>]+>", "", api[row : row + 2000]))
        assert " ".join(words) in text.replace("\u2019", "'"), module


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
