"""The README's and the guides' Python snippets type-check under ``mypy --strict``.

A user's type checker sees what these snippets do: ``with tls.wrap(...) as conn`` must keep
the socket's class (``__enter__`` returns ``Self``), ``mode``/``algif_backend`` are ``Literal``
types (``mode="ktsl"`` is an error before it runs), ``AEAD.encrypt(nonce, data, None)`` is
accepted as ``AESGCM``'s is. Blocks are taken as the runners take them: each README block on
its own (tests/test_readme.py runs each in a fresh namespace), each guide's blocks in order as
one module (tests/test_docs.py runs them in one namespace). Each snippet file keeps the page's
line numbers, so a failure names the page and line. One mypy run checks them all; afalg's own
modules are checked by the project's mypy run (``follow_imports = silent`` here), and untyped
third-party packages (scapy) are skipped, as a strict project's configuration would skip them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs import GUIDES, ROOT, blocks

README = ROOT / "README.md"


def snippets() -> dict[str, tuple[Path, str]]:
    """Module name -> (page, source padded so its lines are the page's)."""
    found: dict[str, tuple[Path, str]] = {}
    for i, block in enumerate(b for b in blocks(README) if b.lang == "python"):
        found[f"readme_block{i}"] = (README, "\n" * (block.line - 1) + block.code)
    for page in sorted(GUIDES.glob("*.md")):
        source = ""
        for block in (b for b in blocks(page) if b.lang == "python"):
            source += "\n" * (block.line - 1 - source.count("\n")) + block.code
        if source:
            found["guide_" + page.stem.replace("-", "_")] = (page, source)
    return found


SNIPPETS = snippets()
CONFIG = """\
[mypy]
strict = True
follow_imports = silent
show_error_codes = True
cache_dir = {cache}

[mypy-scapy.*,pyroute2.*]
follow_imports = skip
ignore_missing_imports = True
"""


def mypy(where: Path, *files: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``files`` in ``where``, finding this checkout's afalg."""
    config = where / "mypy.ini"
    config.write_text(CONFIG.format(cache=ROOT / ".mypy_cache" / "snippets"))
    command = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(config), *files]
    env = {"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=where, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """mypy --strict's error lines per snippet module, from one run over all of them."""
    pytest.importorskip("mypy")
    where = tmp_path_factory.mktemp("snippets")
    for name, (_, source) in SNIPPETS.items():
        (where / f"{name}.py").write_text(source)
    done = mypy(where, *sorted(f"{name}.py" for name in SNIPPETS))
    assert done.returncode in (0, 1), done.stdout + done.stderr  # 2: mypy itself failed
    errors: dict[str, list[str]] = {name: [] for name in SNIPPETS}
    for line in done.stdout.splitlines():
        m = re.match(r"(\w+)\.py:(\d+): error: (.*)", line)
        if m:
            page = SNIPPETS[m.group(1)][0].relative_to(ROOT)
            errors[m.group(1)].append(f"{page}:{m.group(2)}: {m.group(3)}")
    return errors


def test_there_are_snippets() -> None:
    assert sum(name.startswith("readme_") for name in SNIPPETS) >= 2
    assert sum(name.startswith("guide_") for name in SNIPPETS) >= 5


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_snippet_type_checks(name: str, mypy_errors: dict[str, list[str]]) -> None:
    assert mypy_errors[name] == []


GOOD = """\
import socket, ssl
from typing import Literal
from afalg import tls
from afalg.alg import AEAD

def f(s: socket.socket, c: ssl.SSLContext, mode: tls.Mode, backend: tls.Backend) -> None:
    with tls.wrap(s, c, server_hostname="x", mode=mode, algif_backend=backend) as conn:
        chosen: tls.ChosenMode = conn.mode
        where: tls.ChosenBackend = conn.backend
        exact: Literal["ktls", "algif"] = chosen
        print(where, exact, conn.sendfile)  # sendfile: KTLSSocket's and AlgTLSSocket's

def g(aead: AEAD) -> bytes:
    return aead.decrypt(b"n" * 12, aead.encrypt(b"n" * 12, b"data", None), None)
"""


def test_the_types_a_user_meets(tmp_path: Path) -> None:
    """``with`` keeps the socket's class, ``mode``/``backend`` are ``Literal`` types and
    ``None`` is no associated data: all fine under --strict."""
    pytest.importorskip("mypy")
    (tmp_path / "good.py").write_text(GOOD)
    done = mypy(tmp_path, "good.py")
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_type_error_fails(tmp_path: Path) -> None:
    """The check can fail: a misspelt mode is a mypy error under --strict."""
    pytest.importorskip("mypy")
    (tmp_path / "bad.py").write_text(
        "import socket, ssl\nfrom afalg import tls\n"
        "def f(s: socket.socket, c: ssl.SSLContext) -> None:\n"
        "    tls.wrap(s, c, server_hostname='x', mode='ktsl')\n"
    )
    done = mypy(tmp_path, "bad.py")
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'bad.py:4: error: Argument "mode"' in done.stdout, done.stdout
