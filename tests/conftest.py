"""Shared test configuration.

Tests marked ``kernel`` need AF_ALG (and, for TLS, the ``tls`` ULP). The test command
(``make test``) runs them natively where the kernel has both, else inside a Debian kernel booted
with ``afalg vm``; unmarked tests need no kernel and run on the host. Kernel tests whose outcome
cannot depend on the kernel (nothing of theirs reaches AF_ALG or kTLS) are also marked
``kernel_independent``: ``tests/run.py`` runs them under one kernel only, and here they fail if
they reach AF_ALG or kTLS after all (:class:`KernelUse`).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from _env import FULL, IN_VM
from hypothesis import HealthCheck, is_hypothesis_test, settings

# Python inside the TCG VM runs ~14x slower than on the host: fewer examples there, no deadline.
# AFALG_TEST_SCALE=full (`make fuzz`) runs thousands (AFALG_FUZZ_EXAMPLES overrides the count).
_FUZZ_EXAMPLES = int(os.environ.get("AFALG_FUZZ_EXAMPLES", "2000"))
settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "vm", deadline=None, max_examples=12, suppress_health_check=list(HealthCheck)
)
settings.register_profile(
    "full", deadline=None, max_examples=_FUZZ_EXAMPLES, suppress_health_check=list(HealthCheck)
)
settings.load_profile("full" if FULL else "vm" if IN_VM else "default")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every hypothesis test is a fuzz test: ``-m fuzz`` selects them (``make fuzz``)."""
    for item in items:
        if is_hypothesis_test(getattr(item, "obj", None)):
            item.add_marker(pytest.mark.fuzz)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and os.environ.get("AFALG_REQUIRE_KERNEL")
        and item.get_closest_marker("kernel")
    ):
        report.outcome = "failed"
        report.longrepr = f"kernel test skipped under AFALG_REQUIRE_KERNEL: {report.longrepr}"
    return outcome


# --- kernel_independent: checked, not just claimed ----------------------------------------------
# While a test marked kernel_independent runs, this process notes what would make its outcome
# depend on the kernel: an AF_ALG socket (the audit event "socket.__new__" carries the family, and
# fires before the kernel is asked, so a refused socket counts too), the tls ULP or a kTLS key
# (socket.socket.setsockopt, a Python-level method every socket object inherits, ssl's and
# asyncio's included), or a read of the kernel's crypto and kTLS state (/proc/crypto,
# /proc/net/tls_stat, /proc/sys/crypto). What escapes: children (the `afalg` command, example
# servers, uvicorn, openssl run as subprocesses open their sockets in another process), and a
# syscall made through ctypes. A test that starts such a child is marked only after reading what
# the child does.

KERNEL_STATE = ("/proc/crypto", "/proc/net/tls_stat", "/proc/sys/crypto")


class KernelUse:
    """What the running test did that reaches AF_ALG or kTLS; noted only while ``watching``."""

    def __init__(self) -> None:
        self.watching = False
        self.seen: list[str] = []

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        """A ``sys.addaudithook`` hook: note an AF_ALG socket or an open of the kernel's state."""
        if not self.watching:
            return
        if event == "socket.__new__" and args[1] == socket.AF_ALG:
            self.seen.append("socket(AF_ALG)")
        elif event == "open" and str(args[0]).startswith(KERNEL_STATE):
            self.seen.append(f"open({args[0]})")

    def setsockopt(self, level: int, name: int) -> None:
        """Note ``setsockopt(SOL_TCP, TCP_ULP)`` and ``setsockopt(SOL_TLS, ...)``."""
        if self.watching and ((level, name) == (socket.SOL_TCP, TCP_ULP) or level == SOL_TLS):
            self.seen.append(f"setsockopt({level}, {name})")


TCP_ULP, SOL_TLS = 31, 282  # linux/tcp.h, linux/socket.h (afalg._uapi: not imported here)
KERNEL_USE = KernelUse()
sys.addaudithook(KERNEL_USE.audit)
_setsockopt = socket.socket.setsockopt


def _noted_setsockopt(self: socket.socket, level: int, name: int, *value: Any) -> None:
    KERNEL_USE.setsockopt(level, name)
    _setsockopt(self, level, name, *value)  # type: ignore[call-overload]


socket.socket.setsockopt = _noted_setsockopt  # type: ignore[method-assign]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """Watch a ``kernel_independent`` test from its setup on: its module fixtures too.

    Hooks rather than an autouse fixture: a module-scoped fixture (a server several tests share)
    is set up before any function-scoped fixture, so a fixture would not see it."""
    KERNEL_USE.seen.clear()
    KERNEL_USE.watching = item.get_closest_marker("kernel_independent") is not None
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Fail a ``kernel_independent`` test that reached AF_ALG or kTLS (after its teardown)."""
    try:
        result = yield
    finally:
        KERNEL_USE.watching = False
    if KERNEL_USE.seen:
        seen, KERNEL_USE.seen = sorted(set(KERNEL_USE.seen)), []
        pytest.fail(
            f"marked kernel_independent, but it reached the kernel ({', '.join(seen)}): its "
            "outcome can differ between kernels, so it must run under each (remove the marker)",
            pytrace=False,
        )
    return result
