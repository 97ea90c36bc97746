"""Shared test configuration.

Tests marked ``kernel`` need AF_ALG (and, for TLS, the ``tls`` ULP). The test command
(``make test``) runs them natively where the kernel has both, else inside a Debian kernel booted
with ``afalg vm``; unmarked tests need no kernel and run on the host.
"""

from __future__ import annotations

import os

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
