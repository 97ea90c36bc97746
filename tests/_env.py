"""What the test modules share about where they run: paths, the VM's slowness, the modes.

Imported by name (``from _env import SLOW``): ``[tool:pytest] pythonpath`` in setup.cfg puts
``tests/`` (and ``examples/``, for the example server and client) on ``sys.path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "tests" / "certs"
CAFILE = str(CERTS / "ca.pem")

IN_VM = bool(os.environ.get("AFALG_IN_VM"))

# How big the load, soak and fuzz tests run. "smoke" (the default; what `make test` runs): each
# asserts everything it asserts at full size, on sizes that keep the budget (README, "Tests").
# "full" (`make stress`, `make fuzz`): many connections, long loops, thousands of examples.
SCALE = os.environ.get("AFALG_TEST_SCALE", "smoke")
if SCALE not in ("smoke", "full"):
    raise ValueError(f"AFALG_TEST_SCALE={SCALE!r}: expected smoke or full")
FULL = SCALE == "full"


def scaled(smoke: int, full: int) -> int:
    """A size for the current AFALG_TEST_SCALE: ``smoke`` by default, ``full`` at full size."""
    return full if FULL else smoke


# Python under TCG is ~14x slower, and the host's CPUs are shared: scale every timeout by this.
SLOW = 8.0 if IN_VM else 1.0

# Modes of the example server (examples/tls_echo_server.py): the plain-ssl reference on the host,
# the kernel ones in the VM.
SERVER_MODES = [
    pytest.param("userspace"),
    pytest.param("ktls", marks=pytest.mark.kernel),
    pytest.param("algif", marks=pytest.mark.kernel),
]

# (mode, algif backend) of afalg.tls.wrap: kernel ones run in the VM, the cryptography one on the
# host.
WRAP_MODES = [
    pytest.param(("ktls", "kernel"), id="ktls", marks=pytest.mark.kernel),
    pytest.param(("algif", "kernel"), id="algif", marks=pytest.mark.kernel),
    pytest.param(("algif", "cryptography"), id="algif-host"),
]


def independent_of_the_kernel(params: list, *ids: str) -> list:
    """``params`` (e.g. WRAP_MODES), those of ``ids`` also marked ``kernel_independent``: for a
    test whose outcome in these modes cannot depend on the kernel (it fails before any key
    reaches AF_ALG or kTLS), run under one kernel only (tests/run.py; conftest.py checks it)."""
    return [
        pytest.param(*p.values, id=p.id, marks=(*p.marks, pytest.mark.kernel_independent))
        if p.id in ids else p
        for p in params
    ]  # fmt: skip


# The server modes the kernel-only suites (conformance, interop) run;
# AFALG_CONFORMANCE_MODES=userspace runs them against the reference (plain ssl) server.
CONFORMANCE_MODES = os.environ.get("AFALG_CONFORMANCE_MODES", "ktls,algif").split(",")

# For property tests whose every example costs several kernel operations: fewer examples under
# TCG than the VM profile's (conftest.py).
FEW_EXAMPLES = settings(max_examples=scaled(5, 500), deadline=None) if IN_VM else settings()
