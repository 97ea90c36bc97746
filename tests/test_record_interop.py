"""afalg.record against OpenSSL (Python's ssl over MemoryBIOs), cryptography backend, host.

Records OpenSSL protects are opened by our layer and ours are accepted by OpenSSL, for the
three TLS 1.3 suites (forced through OPENSSL_CONF in a child process where Python cannot choose)
and TLS 1.2 AES-GCM (ECDHE and RSA key exchange) and ChaCha20-Poly1305. The same exchange runs
with the kernel backend in tests/test_record_kernel.py.
"""

from __future__ import annotations

import datetime
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


def make_rsa_cert(directory: Path) -> tuple[str, str]:
    """A throwaway self-signed RSA-2048 certificate for the ECDHE-RSA and RSA suites."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "rsa.pem", directory / "rsa.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(certfile), str(keyfile)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    return {
        "ec": (str(CERTS / "server.pem"), str(CERTS / "server.key")),
        "rsa": make_rsa_cert(tmp_path_factory.mktemp("rsa")),
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
def test_tls12_interop(suite: str, cert: str, certs: dict) -> None:
    summary = run_exchange("1.2", suite, "cryptography", *certs[cert])
    check(summary, "1.2", suite)
    assert summary["backend"] == "cryptography"


def test_tls13_interop_default_suite(certs: dict) -> None:
    # between two Python ssl peers OpenSSL always settles on AES-256-GCM
    check(run_exchange("1.3", TLS13[1], "cryptography", *certs["ec"]), "1.3", TLS13[1])


@pytest.mark.parametrize("suite", TLS13)
def test_tls13_interop_forced_suite(suite: str, certs: dict, tmp_path: Path) -> None:
    summary = run_in_subprocess(suite, "cryptography", *certs["ec"], str(tmp_path))
    check(summary, "1.3", suite)
