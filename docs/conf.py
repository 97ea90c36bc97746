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

import ast
import importlib
import importlib.util
import inspect
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
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
# The modules an application rarely imports itself: the pieces the others are built from, public
# for tests, tools and the curious. docs/api.rst lists them apart from the rest of API_MODULES.
BUILDING_BLOCKS = [
    "afalg.netlink",
    "afalg.aead_backend",
    "afalg.cmsg",
    "afalg.wire",
    "afalg.handoff",
    "afalg.session",
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
autodoc_default_options: dict[str, bool | str] = {
    "members": True,
    "undoc-members": True,
    "show-inheritance": True,
}
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


def _public(module: str) -> bool:
    return module in API_MODULES


def _imports_from_public_modules(module: str) -> dict[str, tuple[str, str]]:
    """The names ``module`` imports from other public afalg modules: local name -> (module,
    name there), read from its source (``from afalg.wire import ContentType``)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    found = {}
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level or node.module is None:
            continue
        # (The package is left out: it documents none of its names.)
        if node.module != "afalg" and _public(node.module):
            for alias in node.names:
                found[alias.asname or alias.name] = (node.module, alias.name)
    return found


def _reexports() -> dict[str, dict[str, str]]:
    """For each API module, the names of its ``__all__`` that are another public module's:
    name -> the documented name (``afalg.tls`` -> ``{"KTLSSocket": "afalg.ktls.KTLSSocket"}``).
    Each name is documented once, in its home module; the other pages refer to it."""
    imports = {m: _imports_from_public_modules(m) for m in API_MODULES if m != "afalg"}

    def home(module: str, name: str) -> str:
        while name in imports.get(module, {}):
            module, name = imports[module][name]
        return f"{module}.{name}"

    found: dict[str, dict[str, str]] = {}
    for module, imported in imports.items():
        for name in importlib.import_module(module).__all__:
            if name in imported:
                found.setdefault(module, {})[name] = home(module, name)
    return found


REEXPORTS = _reexports()


def _afalg(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "afalg"


def _classes() -> Iterator[type]:
    """Every class an API module's ``__all__`` names, and the classes nested in them."""
    todo = [
        obj
        for module in API_MODULES
        for name in getattr(importlib.import_module(module), "__all__", [])
        if inspect.isclass(obj := getattr(importlib.import_module(module), name))
    ]
    seen = set()
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            yield cls
            todo += [v for v in vars(cls).values() if inspect.isclass(v) and _afalg(v)]


def _private(cls: type) -> bool:
    """An afalg class users cannot name: in a private module, or named with an underscore."""
    module = cls.__module__
    return _afalg(cls) and (
        cls.__name__.startswith("_") or any(p.startswith("_") for p in module.split("."))
    )


def _inherited_members_stop() -> str:
    """autodoc's ``inherited-members``: the bases whose members a class's entry leaves out.
    A class lists what its private afalg bases give it (``KTLSSocket.sendall``, from
    ``afalg._socket.TLSSocketBase``), and not what a public afalg base (documented on its own
    entry, linked from "Bases") or a base outside afalg (socket, Exception, IntEnum) brings."""
    mros = [cls.__mro__[1:] for cls in _classes()]
    stop = {base.__name__ for mro in mros for base in mro if not _private(base)}
    private = {base.__name__ for mro in mros for base in mro if _private(base)}
    # autodoc matches these by __name__: a private base named like a stopped one would be cut.
    assert not stop & private, stop & private
    return ",".join(sorted(stop))


autodoc_default_options["inherited-members"] = _inherited_members_stop()


def _public_bases(app: Sphinx, name: str, obj: object, options: object, bases: list) -> None:
    """The "Bases:" line names no private class: a private afalg base gives way to its bases."""
    while any(inspect.isclass(b) and _private(b) for b in bases):
        for i, base in enumerate(bases):
            if inspect.isclass(base) and _private(base):
                bases[i : i + 1] = [b for b in base.__bases__ if b not in bases]
                break
    if not bases:
        bases.append(object)


def _bare_data(module: str) -> list[str]:
    """The names of a module's ``__all__`` that autodoc leaves out: data (a constant, a type
    alias) with no doc comment in that module's source, not re-exported from a public module."""
    mod = importlib.import_module(module)
    documented = {name for _, name in ModuleAnalyzer.for_module(module).find_attr_docs()}
    return [
        name
        for name in mod.__all__
        if name not in documented
        and name not in REEXPORTS.get(module, {})
        and not inspect.isclass(getattr(mod, name))
        and not inspect.isroutine(getattr(mod, name))
    ]


def _as_in_ssl(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """An undocumented member of an afalg TLS socket that ssl's sockets also have (``recv``,
    ``getpeercert``, ``settimeout``) says so, rather than nothing."""
    parent, _, member = name.rpartition(".")
    if (
        lines
        or what not in ("method", "property", "attribute")
        or not hasattr(ssl.SSLSocket, member)
    ):
        return
    module, _, cls_name = parent.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError, ValueError):
        return
    if inspect.isclass(cls) and any(_private(base) for base in cls.__mro__[1:]):
        lines.append(f"As :class:`ssl.SSLSocket`'s ``{member}``.")


def _module_page(name: str) -> str:
    title = f"``{name}``"
    # The package's names are re-exports, documented in their home modules (afalg.probe is
    # both a module and, in the package, a function: documenting both would clash).
    if name == "afalg":
        # (inherited-members asks for members too: off as well).
        options = "   :no-members:\n   :no-inherited-members:\n"
        return f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n{options}"
    page = f"{title}\n{'=' * len(title)}\n\n.. automodule:: {name}\n"
    reexports = REEXPORTS.get(name, {})
    if reexports:
        page += f"   :exclude-members: {', '.join(reexports)}\n"
    bare = _bare_data(name)
    if bare:
        page += "\n.. rubric:: Constants and aliases\n\n"
        page += "".join(f".. autodata:: {name}.{data}\n\n" for data in bare)
    if reexports:
        page += "\n.. rubric:: Also importable from here\n\n"
        page += f"``{name}`` re-exports these names; each is documented in its home module:\n\n"
        page += "".join(
            f"- ``{local}``: :py:obj:`{home}`\n" for local, home in sorted(reexports.items())
        )
    return page


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


def _summary(module: str) -> str:
    """The first line of a module's docstring: one sentence that says what it is for."""
    doc = importlib.import_module(module).__doc__ or ""
    lines = doc.strip().splitlines()
    assert lines and lines[0].endswith(".") and (len(lines) == 1 or not lines[1].strip()), (
        f"{module}'s docstring does not open with a one-line summary"
    )
    return lines[0]


def _module_table(modules: list[str]) -> str:
    rows = "".join(f"   * - :mod:`{m}`\n     - {_summary(m)}\n" for m in modules)
    return (
        ".. list-table::\n   :header-rows: 1\n   :widths: 25 75\n\n"
        f"   * - Module\n     - What it is for\n{rows}\n"
    )


def _api_page(app: Sphinx, docname: str, source: list[str]) -> None:
    """docs/api.rst ends with the modules, what each is for, and a table of contents: the
    modules applications import, then the building blocks (BUILDING_BLOCKS)."""
    if docname != "api":
        return
    users = [m for m in API_MODULES if m not in BUILDING_BLOCKS]
    blocks = [m for m in API_MODULES if m in BUILDING_BLOCKS]
    source[0] += "\nFor applications\n----------------\n\n" + _module_table(users)
    source[0] += (
        "\nBuilding blocks\n---------------\n\n"
        "What the modules above are built from: public, and useful to tests, tools and readers "
        "of the code; an application rarely imports them itself.\n\n" + _module_table(blocks)
    )
    source[0] += "\n.. toctree::\n   :hidden:\n\n"
    source[0] += "".join(f"   api/{name}\n" for name in users + blocks)


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
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
        # Data has no source of its own; viewcode would take its type's module (an int's is
        # builtins, a struct.Struct's _struct) and list those as pages that do not exist.
        return modname
    return _source_module(obj)


def _lookup(target: str, context: str | None) -> str | None:
    """``afalg.InvalidTag`` -> ``afalg.errors.InvalidTag``; ``InvalidTag`` seen from a module
    that imports it -> its home; ``SKCipher.encryptor`` seen from afalg.alg ->
    ``afalg.alg.SKCipher.encryptor``; ``afalg.tls.KTLSSocket.sendall`` (a re-export, a method
    of a private base) -> ``afalg.ktls.KTLSSocket.sendall``."""
    candidates = [target] + ([f"{context}.{target}"] if context else [])
    for name in candidates:
        parts = name.split(".")
        for split in range(len(parts) - 1, 0, -1):
            module, attr = ".".join(parts[:split]), parts[split]
            if attr in REEXPORTS.get(module, {}):
                return ".".join([REEXPORTS[module][attr], *parts[split + 1 :]])
        for split in range(len(parts) - 1, 0, -1):
            try:
                obj: object = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            # The home of the outermost afalg object on the path, then the rest of the path.
            try:
                for i, attr in enumerate(parts[split:], start=split + 1):
                    obj = getattr(obj, attr)
                    home = _home(obj)
                    if home is not None:
                        return ".".join([home, *parts[i:]])
            except AttributeError:
                break
            return None
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
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-docstring", _as_in_ssl)
    app.add_autodoc_attrgetter(type, _class_attr)
