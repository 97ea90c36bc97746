"""afalg.record against OpenSSL (Python's ssl over MemoryBIOs), cryptography backend, host.

Records OpenSSL protects are opened by our layer and ours are accepted by OpenSSL, for the
three TLS 1.3 suites (forced through OPENSSL_CONF in a child process where Python cannot choose)
and TLS 1.2 AES-GCM (ECDHE and RSA key exchange) and ChaCha20-Poly1305. The same exchange runs
with the kernel backend in tests/test_record_kernel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _record_helpers import CERT_FILES, TLS12, TLS13, check
from _record_interop import run_exchange, run_in_subprocess


@pytest.mark.parametrize(("suite", "cert"), TLS12)
def test_tls12_interop(suite: str, cert: str) -> None:
    summary = run_exchange("1.2", suite, "cryptography", *CERT_FILES[cert])
    check(summary, "1.2", suite)
    assert summary["backend"] == "cryptography"


def test_tls13_interop_default_suite() -> None:
    # between two Python ssl peers OpenSSL always settles on AES-256-GCM
    check(run_exchange("1.3", TLS13[1], "cryptography", *CERT_FILES["ec"]), "1.3", TLS13[1])


@pytest.mark.parametrize("suite", TLS13)
def test_tls13_interop_forced_suite(suite: str, tmp_path: Path) -> None:
    summary = run_in_subprocess(suite, "cryptography", *CERT_FILES["ec"], str(tmp_path))
    check(summary, "1.3", suite)
