"""The test harness itself: the VM runner and the guarantee that kernel tests saw a kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The VM runner's boot, output, exit status and install list: tests/test_vm_install.py.


@pytest.mark.kernel
def test_running_under_a_kernel_with_af_alg_and_ktls() -> None:
    """Under AFALG_REQUIRE_KERNEL (the test command's VM runs) this must pass, never skip."""
    from afalg.probe import probe

    caps = probe()
    if not os.environ.get("AFALG_REQUIRE_KERNEL") and not caps.af_alg:
        pytest.skip(f"this kernel lacks AF_ALG: {caps.af_alg_reason}")
    assert caps.af_alg, caps.af_alg_reason
    assert all(caps.alg_types.values()), caps.alg_types
    assert caps.tls_ulp, caps.tls_ulp_reason
    for version in ("TLSv1.2", "TLSv1.3"):
        assert {"AES_GCM_128", "AES_GCM_256", "CHACHA20_POLY1305"} <= set(
            caps.ktls_ciphers[version]
        ), caps.ktls_ciphers


@pytest.mark.kernel
def test_afalg_info_cli_reports_the_kernel() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "afalg", "info"], capture_output=True, text=True, check=False
    )
    if not os.environ.get("AFALG_REQUIRE_KERNEL") and result.returncode:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    assert f"kernel: {os.uname().release}" in result.stdout
    assert "AF_ALG: yes" in result.stdout
    assert "tls ULP: yes" in result.stdout
    from afalg.ktls import supports_rekey

    expected = "yes" if supports_rekey() else "no"
    assert f"kTLS rekey (KeyUpdate): {expected}" in result.stdout


def test_afalg_info_without_af_alg_says_why_and_fails() -> None:
    from afalg.probe import probe

    if probe().af_alg:
        pytest.skip("this kernel has AF_ALG: the failure path cannot be shown here")
    result = subprocess.run(
        [sys.executable, "-m", "afalg", "info"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "AF_ALG is not usable here" in result.stderr


def test_probe_is_the_package_api() -> None:
    import afalg

    caps = afalg.probe()
    assert isinstance(caps, afalg.Capabilities)
    assert caps.kernel_release == os.uname().release
    assert caps.af_alg == bool(caps.alg_types)
    assert caps.ktls == (caps.tls_ulp and any(caps.ktls_ciphers.values()))


def test_missing_tls_ulp_reason_names_the_capability() -> None:
    """The kernel loads the tls module on demand only for CAP_NET_ADMIN: an unprivileged
    process is told to modprobe it; a privileged one gets the plain reason."""
    code = "from afalg.ktls import missing_ulp_reason; print(missing_ulp_reason())"
    if os.path.exists("/sys/module/tls"):
        pytest.skip("the tls module is loaded here: the reason is about something else")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    dropped = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    assert dropped.returncode == 0, dropped.stderr
    assert "CAP_NET_ADMIN" in dropped.stdout and "modprobe tls" in dropped.stdout
    if os.geteuid() == 0:
        assert "modprobe" not in plain.stdout and "CONFIG_TLS" in plain.stdout
