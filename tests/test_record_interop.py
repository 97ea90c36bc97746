"""afalg.record against OpenSSL (Python's ssl over MemoryBIOs), cryptography backend, host.

Records OpenSSL protects are opened by our layer and ours are accepted by OpenSSL, for the
three TLS 1.3 suites (forced through OPENSSL_CONF in a child process where Python cannot choose)
and TLS 1.2 AES-GCM (ECDHE and RSA key exchange) and ChaCha20-Poly1305. The same exchange runs
with the kernel backend in tests/test_record_kernel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._record_interop import run_exchange, run_in_subprocess

CERTS = Path(__file__).parent / "certs"

TLS12 = [
    ("ECDHE-RSA-AES128-GCM-SHA256", "rsa"),
    ("AES256-GCM-SHA384", "rsa"),
    ("ECDHE-RSA-CHACHA20-POLY1305", "rsa"),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", "ec"),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", "ec"),
]
TLS13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


CERT_FILES = {
    "ec": (str(CERTS / "server.pem"), str(CERTS / "server.key")),
    "rsa": (str(CERTS / "rsa.pem"), str(CERTS / "rsa.key")),
}


def check(summary: dict, version: str, suite: str) -> None:
    assert summary["version"] == f"TLSv{version}"
    assert summary["suite"] == suite
    assert summary["close_notify"] is True
    assert summary["opened"] >= 10 and summary["sealed"] >= 10
    if version == "1.3":
        assert summary["key_updates"] == 2
        assert summary["tickets"] >= 1  # OpenSSL's NewSessionTickets, opened by us


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
