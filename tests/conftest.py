"""Shared test configuration.

Tests marked ``kernel`` need AF_ALG (and, for TLS, the ``tls`` ULP). The test command
(``make test``) runs them natively where the kernel has both, else inside a Debian kernel booted
with ``afalg vm``; unmarked tests need no kernel and run on the host.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

# Python inside the TCG VM runs ~14x slower than on the host: fewer examples there, no deadline.
settings.register_profile(
    "default", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "vm", deadline=None, max_examples=12, suppress_health_check=list(HealthCheck)
)
settings.load_profile("vm" if os.environ.get("AFALG_IN_VM") else "default")


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
