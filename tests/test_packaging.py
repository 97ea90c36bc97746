"""The package as a user gets it: ``python -m build`` makes an sdist and a wheel (the wheel built
from the sdist, so the sdist is complete enough to build), the wheel installs into a fresh
virtualenv (not editable, no checkout on ``sys.path``), and there ``afalg info``, ``afalg
--version`` and an import of every public module work. The sdist carries the tests, their
vectors, certificates and data, the examples, the docs and the CHANGELOG; the version has one
source (``afalg.__version__``, which setup.cfg reads).

One build and one install for the whole module (about 15 s on a quiet machine, most of it pip
installing cryptography and pyroute2 from its cache or the registry).
"""

from __future__ import annotations

import ast
import configparser
import email
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import afalg

ROOT = Path(__file__).resolve().parent.parent
# Every module of the package and its private subpackages, by its file in the checkout
# (afalg/__main__.py runs the CLI).
SOURCE_MODULES = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "afalg").rglob("*.py")
    if p.name != "__main__.py"
)


def api_modules() -> list[str]:
    """docs/conf.py's API_MODULES, read without importing Sphinx."""
    tree = ast.parse((ROOT / "docs" / "conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "API_MODULES":
            return list(ast.literal_eval(node.value))
    raise AssertionError("docs/conf.py has no API_MODULES")


@dataclass
class Built:
    sdist: Path
    wheel: Path
    python: Path  # the fresh virtualenv's interpreter
    bindir: Path


def run(cmd: list[str | Path], cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300, **kw
    )  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    tmp = tmp_path_factory.mktemp("packaging")
    dist = tmp / "dist"
    done = run([sys.executable, "-m", "build", "--outdir", dist, ROOT], cwd=tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sdist,) = dist.glob("afalg-*.tar.gz")
    (wheel,) = dist.glob("afalg-*.whl")

    venv = tmp / "venv"
    done = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    # This interpreter's pip installs into the new environment (--python): no ensurepip.
    done = run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q",
         "--disable-pip-version-check", wheel],
        cwd=tmp,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    yield Built(sdist, wheel, python, venv / "bin")


def test_one_version_source() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: afalg.__version__"
    found = [
        line
        for path in [*(ROOT / "afalg").glob("*.py"), ROOT / "setup.cfg", ROOT / "pyproject.toml"]
        for line in path.read_text().splitlines()
        if afalg.__version__ in line and "version" in line.lower()
    ]
    assert len(found) == 1, found  # afalg/__init__.py's __version__ only


def test_the_version_says_whether_changes_are_unreleased() -> None:
    """A release has its dated CHANGELOG entry; while CHANGELOG.md has an Unreleased section the
    version is a development release past every released one (0.2.0.dev0 after 0.1.0), so that
    a build of unreleased code never carries a released version."""
    version = Version(afalg.__version__)
    assert str(version) == afalg.__version__, "not in its normalized form"
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    released = [Version(h.split(" - ")[0]) for h in headings if h != "Unreleased"]
    assert released, headings
    if headings[0] == "Unreleased":
        assert version.is_devrelease and version > max(released), (version, headings[:3])
    else:
        assert not version.is_prerelease and headings[0].startswith(f"{version} - "), headings[0]


def test_metadata_says_what_it_is(built: Built) -> None:
    """The wheel's METADATA: typed, the extras (``dev``: everything to work on afalg, a superset
    of ``test``, ``vm`` and ``bench``), and project URLs only where they exist: SECURITY.md
    says where to report, and says there is no URL when the metadata has none."""
    with zipfile.ZipFile(built.wheel) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(whl.read(name))
    assert meta["Version"] == afalg.__version__
    assert "Typing :: Typed" in meta.get_all("Classifier", [])
    extras = set(meta.get_all("Provides-Extra", []))
    assert {"test", "dev", "vm", "bench"} <= extras, extras
    by_extra: dict[str, set[str]] = {extra: set() for extra in extras}
    for line in meta.get_all("Requires-Dist", []):
        req = Requirement(line)
        for extra in extras:
            if req.marker is not None and req.marker.evaluate({"extra": extra}):
                by_extra[extra].add(req.name)
    assert by_extra["test"] and by_extra["dev"] > by_extra["test"]
    assert by_extra["test"] | by_extra["vm"] | by_extra["bench"] <= by_extra["dev"]
    urls = meta.get_all("Project-URL", [])
    security = (ROOT / "SECURITY.md").read_text().split("## Reporting a problem", 1)[1]
    if urls:
        assert all(url.split(", ", 1)[1].startswith("https://") for url in urls), urls
    else:  # none published: SECURITY.md must not send reporters to the metadata
        assert "no project URL" in " ".join(security.split())


def test_artifacts_carry_the_version(built: Built) -> None:
    assert built.sdist.name == f"afalg-{afalg.__version__}.tar.gz"
    assert built.wheel.name == f"afalg-{afalg.__version__}-py3-none-any.whl"


def test_sdist_has_tests_vectors_examples_docs(built: Built) -> None:
    with tarfile.open(built.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {
        "CHANGELOG.md", "SECURITY.md", "README.md", "LICENSE", "Makefile", "setup.cfg",
        "pyproject.toml",
        "tests/run.py", "tests/conftest.py", "tests/test_packaging.py", "tests/test_docs.py",
        "tests/vectors/rfc8448_records.json", "tests/certs/server.pem", "tests/certs/ca.pem",
        "tests/data/debian12-fresh-packages.txt", "examples/tls_echo_server.py",
        "docs/conf.py", "docs/index.md", "docs/api.rst",
    }  # fmt: skip
    assert not expected - names, sorted(expected - names)
    assert any(n.startswith("tests/vectors/wycheproof/") and n.endswith(".json") for n in names)
    # Every file git tracks under tests/, examples/ and docs/ is in it.
    tracked = run(["git", "ls-files", "tests", "examples", "docs"], cwd=ROOT)
    if tracked.returncode == 0:
        missing = set(tracked.stdout.split()) - names
        assert not missing, sorted(missing)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_has_every_module_and_no_tests(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as whl:
        names = set(whl.namelist())
    modules = {
        n[:-3].replace("/", ".").removesuffix(".__init__")
        for n in names
        if n.startswith("afalg/") and n.endswith(".py") and n != "afalg/__main__.py"
    }
    assert modules == set(SOURCE_MODULES)
    assert "afalg/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "examples/", "docs/"))]


def test_installed_wheel_imports_every_public_module(built: Built, tmp_path: Path) -> None:
    public = [m for m in SOURCE_MODULES if not any(p.startswith("_") for p in m.split(".")[1:])]
    assert set(api_modules()) <= set(public)
    script = (
        "import importlib, json, sys\n"
        "mods = {m: importlib.import_module(m).__file__ for m in sys.argv[1:]}\n"
        "import afalg\n"
        "print(json.dumps({'version': afalg.__version__, 'files': mods}))\n"
    )
    done = run([built.python, "-I", "-c", script, *public], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["version"] == afalg.__version__
    site = built.python.parent.parent / "lib"
    for module, file in report["files"].items():
        assert Path(file).is_relative_to(site), f"{module} imported from {file}, not the wheel"


def test_installed_command_runs(built: Built, tmp_path: Path) -> None:
    done = run([built.bindir / "afalg", "--version"], cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, f"afalg {afalg.__version__}")
    done = run([built.bindir / "afalg", "info"], cwd=tmp_path)
    assert done.stdout.startswith("kernel: "), done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    if done.returncode:  # no AF_ALG here (the host stage): one line saying why
        assert done.returncode == 1
        assert done.stderr.startswith("afalg: AF_ALG is not usable here: "), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    done = run([built.python, "-I", "-m", "afalg", "--version"], cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, f"afalg {afalg.__version__}")
