"""Shared helpers for the record-layer tests: keys for every suite, hand-built records."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from _env import CERTS
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from afalg.keys import CipherSuite, TrafficKeys

VECTORS = Path(__file__).parent / "vectors"

TLS13_SUITES = [
    CipherSuite.TLS_AES_128_GCM_SHA256,
    CipherSuite.TLS_AES_256_GCM_SHA384,
    CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
]
TLS12_SUITES = [
    CipherSuite.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite.TLS_RSA_WITH_AES_256_GCM_SHA384,
    CipherSuite.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
]
ALL_SUITES = TLS13_SUITES + TLS12_SUITES


def rfc8448() -> dict:
    return json.loads((VECTORS / "rfc8448_records.json").read_text())


def make_keys(suite: CipherSuite, seq: int = 0, seed: bytes | None = None) -> TrafficKeys:
    """Deterministic (or random, seed=None) keys for ``suite``."""
    rnd = os.urandom if seed is None else (lambda n: (seed * n)[:n])
    if suite.is_tls13:
        return TrafficKeys.tls13(suite, rnd(48 if suite.hash_name == "sha384" else 32), seq)
    ivlen = 12 if suite.is_chacha20 else 4
    return TrafficKeys(0x0303, suite, rnd(suite.key_length), rnd(ivlen), seq)


def raw_aead(keys: TrafficKeys) -> AESGCM | ChaCha20Poly1305:
    return ChaCha20Poly1305(keys.key) if keys.cipher_suite.is_chacha20 else AESGCM(keys.key)


def hand_seal13(keys: TrafficKeys, seq: int, inner: bytes, outer_type: int = 23) -> bytes:
    """A TLS 1.3 record built by hand from an arbitrary TLSInnerPlaintext."""
    nonce = (int.from_bytes(keys.iv, "big") ^ seq).to_bytes(12, "big")
    header = struct.pack(">BHH", outer_type, 0x0303, len(inner) + 16)
    return header + raw_aead(keys).encrypt(nonce, inner, header)


def hand_seal12(
    keys: TrafficKeys, seq: int, ctype: int, content: bytes, explicit: bytes | None = None
) -> bytes:
    """A TLS 1.2 record built by hand (RFC 5288 / RFC 7905)."""
    aad = struct.pack(">QBHH", seq, ctype, 0x0303, len(content))
    if keys.cipher_suite.is_chacha20:
        nonce = (int.from_bytes(keys.iv, "big") ^ seq).to_bytes(12, "big")
        body = raw_aead(keys).encrypt(nonce, content, aad)
    else:
        explicit = seq.to_bytes(8, "big") if explicit is None else explicit
        body = explicit + raw_aead(keys).encrypt(keys.iv + explicit, content, aad)
    return struct.pack(">BHH", ctype, 0x0303, len(body)) + body


# --- the OpenSSL exchange of tests/_record_interop.py: what runs, what it must show ----------

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
    """What every exchange must have done, whichever backend."""
    assert summary["version"] == f"TLSv{version}"
    assert summary["suite"] == suite
    assert summary["close_notify"] is True
    assert summary["opened"] >= 10 and summary["sealed"] >= 10
    if version == "1.3":
        assert summary["key_updates"] == 2
        assert summary["tickets"] >= 1  # OpenSSL's NewSessionTickets, opened by us
