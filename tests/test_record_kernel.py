"""afalg.record with the kernel's AEAD (AF_ALG): byte-for-byte against the cryptography backend
for every suite and version, RFC 8448 known answers, integrity failures, and the OpenSSL
exchange of tests/_record_interop.py with the kernel doing the record crypto.

Runs in the VM (``afalg vm -- python -m pytest -m kernel tests/test_record_kernel.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _record_helpers import ALL_SUITES, CERT_FILES, TLS12, TLS13, check, make_keys, rfc8448
from _record_interop import open_all, run_exchange, run_in_subprocess
from hypothesis import given
from hypothesis import strategies as st

from afalg import AlertDescription, TLSProtocolError
from afalg.aead_backend import CryptographyAEAD, KernelAEAD
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import MAX_PLAINTEXT, ContentType, Record, RecordLayer

pytestmark = pytest.mark.kernel

APP = ContentType.application_data
EC = CERT_FILES["ec"]


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_kernel_matches_cryptography(suite: CipherSuite) -> None:
    keys = make_keys(suite, seq=2**40 + 3)
    pad = {"padding": 100} if suite.is_tls13 else {}
    k_tx = RecordLayer(tx=keys, backend="kernel", **pad)
    c_tx = RecordLayer(tx=keys, backend="cryptography", **pad)
    k_rx = RecordLayer(rx=keys, backend="kernel")
    c_rx = RecordLayer(rx=keys, backend="cryptography")
    assert k_tx.backend == "kernel" and c_tx.backend == "cryptography"
    sent = []
    for ctype, size in [
        (APP, 0),
        (APP, 1),
        (ContentType.handshake, 300),
        (APP, MAX_PLAINTEXT),
        (ContentType.alert, 2),
        (APP, 40000),
    ]:
        payload = os.urandom(size)
        k_wire = k_tx.seal(ctype, payload)
        assert k_wire == c_tx.seal(ctype, payload), (ctype, size)
        sent.append((ctype, payload, k_wire))
    wire = b"".join(w for _, _, w in sent)
    for rx in (k_rx, c_rx):
        got = open_all(rx, wire)
        assert b"".join(r.payload for r in got) == b"".join(p for _, p, _ in sent)
    assert k_rx.rx_keys == c_rx.rx_keys == k_tx.tx_keys == c_tx.tx_keys
    for layer in (k_tx, c_tx, k_rx, c_rx):
        layer.close()


@pytest.mark.parametrize("suite", [s for s in ALL_SUITES if s.is_tls13], ids=lambda s: s.name)
def test_encrypt_record_is_the_header_then_the_sealed_bytes(suite: CipherSuite) -> None:
    """Both backends' ``encrypt_record`` give ``header || encrypt(..., aad=header)``, whatever
    the size up to a padded record's room; the kernel's bytes are a copy out of its reused
    buffer (an earlier record is not overwritten by the next)."""
    keys = make_keys(suite)
    kernel, userspace = KernelAEAD(suite, keys.key), CryptographyAEAD(suite, keys.key)
    records = []
    for size in (1, 1025, 2**14 + 256):
        nonce, inner = os.urandom(12), os.urandom(size)
        header = b"\x17\x03\x03" + (size + 16).to_bytes(2, "big")
        expected = header + userspace.encrypt(nonce, inner, header)
        assert kernel.encrypt_record(nonce, inner, header) == expected
        assert userspace.encrypt_record(nonce, inner, header) == expected
        records.append((kernel.encrypt_record(nonce, inner, header), expected))
    assert all(got == expected for got, expected in records)
    kernel.close()
    userspace.close()


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_kernel_flipped_byte_is_bad_record_mac(suite: CipherSuite) -> None:
    keys = make_keys(suite)
    wire = RecordLayer(tx=keys, backend="cryptography").seal(APP, b"attack at dawn" * 10)
    for i in (5, len(wire) // 2, len(wire) - 1):
        bad = bytearray(wire)
        bad[i] ^= 0x80
        rx = RecordLayer(rx=keys, backend="kernel")
        rx.feed(bytes(bad))
        with pytest.raises(TLSProtocolError) as info:
            rx.next_record()
        assert info.value.alert == AlertDescription.bad_record_mac
        with pytest.raises(TLSProtocolError):
            rx.next_record()
        rx.close()


@given(suite=st.sampled_from(ALL_SUITES), size=st.integers(0, 20000), cut=st.integers(0, 10**6))
def test_kernel_property_roundtrip(suite: CipherSuite, size: int, cut: int) -> None:
    keys = make_keys(suite)
    with RecordLayer(tx=keys, backend="kernel") as tx, RecordLayer(rx=keys, backend="kernel") as rx:
        payload = os.urandom(size)
        wire = tx.seal(APP, payload)
        cut %= len(wire) + 1
        got = open_all(rx, wire[:cut]) + open_all(rx, wire[cut:])
        assert b"".join(r.payload for r in got) == payload


@pytest.mark.parametrize("side", ["client", "server"])
def test_kernel_rfc8448(side: str) -> None:
    v = rfc8448()
    records = [r for r in v["records"] if r["sender"] == side]
    secret = bytes.fromhex(v[f"{side}_application_traffic_secret_0"])
    keys = TrafficKeys.tls13(v["cipher_suite"], secret, seq=records[0]["seq"])
    with RecordLayer(tx=keys, rx=keys, backend="kernel") as layer:
        for r in records:
            payload = bytes.fromhex(r["payload"])
            assert layer.seal(r["content_type"], payload).hex() == r["record"]
            assert open_all(layer, bytes.fromhex(r["record"])) == [
                Record(r["content_type"], payload)
            ]


@pytest.mark.parametrize(
    "suite",
    [CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256],
)
def test_kernel_sequence_limit_and_rekey(suite: CipherSuite) -> None:
    keys = make_keys(suite, seq=2**64 - 1)
    with RecordLayer(tx=keys, rx=keys, backend="kernel") as layer:
        wire = layer.seal(APP, b"last")
        with pytest.raises(TLSProtocolError):
            layer.seal(APP, b"one too many")
        assert open_all(layer, wire) == [Record(APP, b"last")]
        if suite.is_tls13:
            layer.rekey_tx()
            layer.rekey_rx()
            assert open_all(layer, layer.seal(APP, b"next generation")) == [
                Record(APP, b"next generation")
            ]


# --- OpenSSL interop with the kernel doing the record crypto --------------------------------


@pytest.mark.parametrize(("suite", "cert"), TLS12[:3])
def test_kernel_tls12_interop(suite: str, cert: str) -> None:
    summary = run_exchange("1.2", suite, "kernel", *CERT_FILES[cert])
    check(summary, "1.2", suite)
    assert summary["backend"] == "kernel"


def test_kernel_tls13_interop_default_suite() -> None:
    summary = run_exchange("1.3", TLS13[1], "kernel", *EC)
    check(summary, "1.3", TLS13[1])
    assert summary["backend"] == "kernel"


@pytest.mark.parametrize("suite", [TLS13[0], TLS13[2]])
def test_kernel_tls13_interop_forced_suite(suite: str, tmp_path: Path) -> None:
    summary = run_in_subprocess(suite, "kernel", *EC, str(tmp_path))
    check(summary, "1.3", suite)
    assert summary["backend"] == "kernel"
