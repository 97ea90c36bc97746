"""Sphinx configuration for afalg's documentation.

Build: ``.venv/bin/python -m sphinx -W -n -b html docs docs/_build/html`` (tests/test_docs.py
runs that build, warnings as errors, in the test command).

Sphinx rather than MkDocs: afalg's docstrings are reStructuredText with Sphinx's roles
(``:class:``, ``:func:``, ``:mod:``, literal blocks), which autodoc reads as written, and
``-n`` turns a reference to an afalg name that does not exist into a failed build; the
``afalg`` command's page is generated from its argparse parser (sphinx-argparse); MyST lets the
guides be Markdown, which reads the same on GitHub and is what the tests extract code from.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.util.inspect import safe_getattr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import afalg  # noqa: E402

# The public modules the API reference documents, in its order: adding a module is one line here
# (tests/test_docs.py fails while a public module of afalg/ is in neither list).
API_MODULES = [
    "afalg",
    "afalg.errors",
    "afalg.alg",
    "afalg.netlink",
    "afalg.probe",
    "afalg.keys",
    "afalg.record",
    "afalg.aead_backend",
    "afalg.cmsg",
    "afalg.wire",
    "afalg.handoff",
    "afalg.session",
    "afalg.tls",
    "afalg.ktls",
    "afalg.algif",
    "afalg.aio",
    "afalg.serving",
    "afalg.cli",
]
# Modules without an underscore that are not API: the CLI's own pieces (docs/cli.rst documents
# the command itself, from its argparse parser).
NOT_API = ["afalg.__main__"]

project = "afalg"
author = "the afalg authors"
copyright = "the afalg authors"
release = afalg.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinxarg.ext",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3

# Every name of a module's __all__, with a docstring or not.
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autoclass_content = "both"

# Every reference to an afalg name must resolve (-n with -W: a broken one fails the build).
# Without a network there is no intersphinx: other projects' names (the standard library's,
# cryptography's, pyroute2's) and afalg's private ones render as plain text.
nitpicky = True
# A builtin in a signature (``type[ctypes.Structure]``) also matches attributes named ``type``:
# Sphinx warns that the reference is ambiguous and links the first; not a broken reference.
suppress_warnings = ["ref.python"]
nitpick_ignore_regex = [("py:.*", r"(?!afalg\.).*|.*\._.*")]

html_theme = "alabaster"
html_title = f"afalg {release}"
html_theme_options = {"description": "The Linux kernel crypto API and kernel TLS from Python"}


API_DIR = Path(__file__).resolve().parent / "api"


def _module_page(name: str) -> str:
    title = f"``{name}``"
    # The package's names are re-exports, documented in their home modules (afalg.probe is
    # both a module and, in the package, a function: documenting both would clash).
    options = "   :no-members:\n" if name == "afalg" else ""
    return f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n{options}"


def _write_api_pages(app: Sphinx, config: object) -> None:
    """docs/api/MODULE.rst for each of API_MODULES: generated at each build, not tracked
    (docs/.gitignore), rewritten only when they change; pages of modules no longer listed go."""
    API_DIR.mkdir(exist_ok=True)
    wanted = {f"{name}.rst": _module_page(name) for name in API_MODULES}
    for path in API_DIR.glob("*.rst"):
        if path.name not in wanted:
            path.unlink()
    for filename, text in wanted.items():
        path = API_DIR / filename
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def _api_page(app: Sphinx, docname: str, source: list[str]) -> None:
    """docs/api.rst ends with a table of contents of API_MODULES' pages, in that order."""
    if docname == "api":
        source[0] += "\n.. toctree::\n   :maxdepth: 1\n\n"
        source[0] += "".join(f"   api/{name}\n" for name in API_MODULES)


def _home(obj: object) -> str | None:
    """The documented name of an afalg object: where it is defined, not where it is re-exported."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and module.startswith("afalg") and isinstance(qualname, str):
        return f"{module}.{qualname}"
    return None


def _source_module(obj: object) -> str | None:
    """The module whose source defines ``obj``: a public face (afalg.alg) sets its ``__module__``
    to itself, and its functions' globals still say where they were written (afalg._alg.*)."""
    if inspect.isclass(obj):
        for value in vars(obj).values():
            value = getattr(value, "fget", None) or getattr(value, "__func__", value)
            if inspect.isfunction(value) and value.__qualname__.startswith(obj.__qualname__):
                module = value.__globals__["__name__"]
                if module.startswith("afalg"):  # not a namedtuple's generated methods
                    return module
        return None
    return obj.__globals__["__name__"] if inspect.isfunction(obj) else None


def _class_attr(obj: type, name: str, *default: object) -> object:
    """autodoc's getattr for classes: a class's ``__module__`` is the module that defines it, so
    that its members are listed in source order (autodoc reads that module)."""
    if name == "__module__":
        return _source_module(obj) or getattr(obj, name, *default)
    return safe_getattr(obj, name, *default)


def _follow_imported(app: Sphinx, modname: str, attribute: str) -> str | None:
    """viewcode's [source] link: the module that defines the object, not its public face."""
    try:
        obj: object = importlib.import_module(modname)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return _source_module(obj)


def _lookup(target: str, context: str | None) -> str | None:
    """``afalg.InvalidTag`` -> ``afalg.errors.InvalidTag``; ``InvalidTag`` seen from a module
    that imports it -> its home; ``SKCipher.encryptor`` seen from afalg.alg ->
    ``afalg.alg.SKCipher.encryptor``."""
    candidates = [target] + ([f"{context}.{target}"] if context else [])
    for name in candidates:
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for attr in parts[split:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return _home(obj)
    return None


def _resolve_reexport(app: Sphinx, env: object, node: object, contnode: object) -> object:
    """Resolve a reference to a re-exported or imported afalg name to the object's home."""
    if node.get("refdomain") != "py":  # type: ignore[attr-defined]
        return None
    home = _lookup(node["reftarget"], node.get("py:module"))  # type: ignore[index,attr-defined]
    if home is None:
        return None  # no such afalg name: the build fails
    if home == node["reftarget"]:  # type: ignore[index]
        # It exists but its module's __all__ does not name it (so it has no entry): plain text.
        return contnode
    domain = env.get_domain("py")  # type: ignore[attr-defined]
    builder = app.builder
    for role in ("class", "func", "meth", "data", "attr", "exc", "obj"):
        found = domain.resolve_xref(env, node["refdoc"], builder, role, home, node, contnode)  # type: ignore[index]
        if found is not None:
            return found
    return None


def setup(app: Sphinx) -> None:
    app.connect("config-inited", _write_api_pages)
    app.connect("source-read", _api_page)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("viewcode-follow-imported", _follow_imported)
    app.add_autodoc_attrgetter(type, _class_attr)
