"""Adversarial tests of the record layer and the keys (host, cryptography backend).

What a hostile peer or a careless caller can do to afalg.record / afalg.keys / afalg.aead_backend,
and what must happen: replayed, reordered, reflected, forged, truncated records and garbage give
a TLSProtocolError naming the alert and never a byte of their plaintext; the first error poisons
the layer; a sequence number is used once per key and never wraps; a failing AEAD poisons rather
than leaving a gap; no repr, str or exception message shows a key, an IV or a secret.
"""

from __future__ import annotations

import os
import struct

import pytest
from _record_helpers import ALL_SUITES, TLS12_SUITES, TLS13_SUITES, make_keys
from _record_interop import open_all
from hypothesis import given
from hypothesis import strategies as st

from afalg.aead_backend import CryptographyAEAD, new_record_aead
from afalg.errors import AlertDescription as A
from afalg.errors import TLSProtocolError
from afalg.keys import (
    MAX_SEQ,
    CipherSuite,
    TrafficKeys,
    UnsupportedCipherSuite,
    tls12_traffic_keys,
)
from afalg.record import ContentType, Record, RecordLayer

CRYPTO = "cryptography"
APP = ContentType.application_data


def layers(suite: CipherSuite, seq: int = 0) -> tuple[RecordLayer, RecordLayer, TrafficKeys]:
    keys = make_keys(suite, seq)
    return RecordLayer(tx=keys, backend=CRYPTO), RecordLayer(rx=keys, backend=CRYPTO), keys


def expect_poison(layer: RecordLayer, alert: A, wire: bytes = b"") -> TLSProtocolError:
    """Feeding ``wire`` raises ``alert``; the layer then refuses everything but sealing an
    alert."""
    released: list[Record] = []
    with pytest.raises(TLSProtocolError) as info:
        released += open_all(layer, wire)
    assert info.value.alert is alert, info.value
    assert alert.name in str(info.value)
    with pytest.raises(TLSProtocolError):
        layer.next_record()
    with pytest.raises(TLSProtocolError):
        layer.feed(b"\x17\x03\x03\x00\x00")
    assert layer.error is info.value
    return info.value


# --- hostile records ----------------------------------------------------------------------------


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_replayed_record(suite: CipherSuite) -> None:
    tx, rx, _ = layers(suite)
    first = tx.seal(APP, b"pay me 1")
    assert open_all(rx, first) == [Record(APP, b"pay me 1")]
    expect_poison(rx, A.bad_record_mac, first)


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_reordered_records_release_nothing(suite: CipherSuite) -> None:
    tx, rx, _ = layers(suite)
    one, two = tx.seal(APP, b"one"), tx.seal(APP, b"two")
    expect_poison(rx, A.bad_record_mac, two + one)


@pytest.mark.parametrize("suite", TLS12_SUITES + TLS13_SUITES, ids=lambda s: s.name)
def test_reflected_record(suite: CipherSuite) -> None:
    """A peer's own record sent back to it: the two directions have different keys."""
    if suite.is_tls13:
        size = 48 if suite.hash_name == "sha384" else 32
        client = TrafficKeys.tls13(suite, os.urandom(size))
        server = TrafficKeys.tls13(suite, os.urandom(size))
    else:
        client, server = tls12_traffic_keys(suite, os.urandom(48), os.urandom(32), os.urandom(32))
    me = RecordLayer(tx=client, rx=server, backend=CRYPTO)
    expect_poison(me, A.bad_record_mac, me.seal(APP, b"mine"))


@pytest.mark.parametrize("suite", [s for s in TLS12_SUITES if not s.is_chacha20],
                         ids=lambda s: s.name)  # fmt: skip
def test_tls12_forged_explicit_nonce(suite: CipherSuite) -> None:
    tx, rx, _ = layers(suite)
    wire = bytearray(tx.seal(APP, b"data"))
    wire[5 + 7] ^= 0x01  # last byte of the explicit nonce
    expect_poison(rx, A.bad_record_mac, bytes(wire))


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_good_then_forged_in_one_feed(suite: CipherSuite) -> None:
    """The good record comes out, the forged one raises, the good one after it never does."""
    tx, rx, _ = layers(suite)
    good, bad, after = tx.seal(APP, b"good"), bytearray(tx.seal(APP, b"evil")), tx.seal(APP, b"x")
    bad[-3] ^= 0x80
    rx.feed(good + bytes(bad) + after)
    assert rx.next_record() == Record(APP, b"good")
    with pytest.raises(TLSProtocolError, match="bad_record_mac"):
        rx.next_record()
    with pytest.raises(TLSProtocolError):
        rx.next_record()


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_truncated_record_releases_nothing(suite: CipherSuite) -> None:
    tx, rx, _ = layers(suite)
    wire = tx.seal(APP, b"x" * 1000)
    for cut in (0, 4, 5, 6, 20, len(wire) - 1):
        part = RecordLayer(rx=rx.rx_keys, backend=CRYPTO)
        part.feed(wire[:cut])
        assert part.next_record() is None and part.buffered == cut
        assert part.error is None


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_records_too_short_for_a_tag(suite: CipherSuite) -> None:
    """Bodies shorter than the tag (TLS 1.2 GCM: nonce + tag) are bad_record_mac, not a crash."""
    minimum = 24 if not suite.is_tls13 and not suite.is_chacha20 else 16
    for length in sorted({0, 1, 8, 15, minimum - 1}):
        _, rx, _ = layers(suite)
        wire = struct.pack(">BHH", 23, 0x0303, length) + os.urandom(length)
        expect_poison(rx, A.bad_record_mac, wire)


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
@given(garbage=st.binary(min_size=5, max_size=300))
def test_garbage_never_becomes_a_record(suite: CipherSuite, garbage: bytes) -> None:
    _, rx, _ = layers(suite)
    try:
        records = open_all(rx, garbage)
    except TLSProtocolError as exc:
        assert isinstance(exc.alert, A) and exc.alert.name in str(exc)
        assert rx.error is exc
    else:
        assert records == []  # only an incomplete record: waiting for more


@pytest.mark.parametrize("suite", TLS13_SUITES, ids=lambda s: s.name)
def test_tls13_plaintext_records_after_keys(suite: CipherSuite) -> None:
    """A cleartext handshake, alert or application_data record after the keys changed: the
    first two are unexpected_message, the last fails authentication."""
    for ctype, alert in ((22, A.unexpected_message), (21, A.unexpected_message),
                         (23, A.bad_record_mac)):  # fmt: skip
        _, rx, _ = layers(suite)
        payload = b"\x01\x00" if ctype == 21 else b"GET / HTTP/1.0\r\n\r\n"
        expect_poison(rx, alert, struct.pack(">BHH", ctype, 0x0303, len(payload)) + payload)


# --- sequence numbers ----------------------------------------------------------------------------


class RecordingAEAD:
    """Wraps the real AEAD, records every (nonce) used to encrypt; can fail the n-th call."""

    backend = "cryptography"

    def __init__(self, inner: CryptographyAEAD, fail_at: int | None = None) -> None:
        self.inner, self.name, self.fail_at = inner, inner.name, fail_at
        self.nonces: list[bytes] = []

    def encrypt(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        if self.fail_at is not None and len(self.nonces) == self.fail_at:
            raise OSError(12, "simulated AEAD failure (ENOMEM)")
        self.nonces.append(bytes(nonce))
        return self.inner.encrypt(nonce, plaintext, aad)

    def encrypt_record(self, nonce: bytes, plaintext: bytes, header: bytes) -> bytes:
        return header + self.encrypt(nonce, plaintext, header)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        if self.fail_at is not None:
            raise OSError(12, "simulated AEAD failure (ENOMEM)")
        return self.inner.decrypt(nonce, data, aad)

    def close(self) -> None:
        self.inner.close()


def _instrument(layer: RecordLayer, side: str, fail_at: int | None = None) -> RecordingAEAD:
    direction = getattr(layer, f"_{side}")
    rec = RecordingAEAD(direction.aead, fail_at)
    direction.aead = rec
    return rec


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_each_nonce_used_once_across_every_kind_of_seal(suite: CipherSuite) -> None:
    """Empty, split (> 2**14), alert and failed seals: every record gets its own nonce, failed
    seal() calls consume none, and the peer opens everything in order (no gap)."""
    tx, rx, _ = layers(suite)
    rec = _instrument(tx, "tx")
    wire = tx.seal(APP, b"")
    wire += tx.seal(APP, os.urandom(2**14 * 2 + 5))  # three records
    for bad in (lambda: tx.seal(99, b"x"), lambda: tx.seal(APP, "str"),
                lambda: tx.seal(ContentType.alert, b"\x01"),
                lambda: tx.seal(ContentType.handshake, b"")):  # fmt: skip
        with pytest.raises((ValueError, TypeError)):
            bad()
    wire += tx.seal(ContentType.handshake, b"\x04\x00\x00\x00")
    wire += tx.seal(ContentType.alert, b"\x01\x00")
    assert len(rec.nonces) == 6 == len(set(rec.nonces))
    assert tx.tx_keys.seq == 6
    assert [r.content_type for r in open_all(rx, wire)] == [APP, APP, APP, APP,
                                                           ContentType.handshake,
                                                           ContentType.alert]  # fmt: skip


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_aead_failure_mid_seal_poisons(suite: CipherSuite) -> None:
    """The second record of a split payload fails in the AEAD: the first record's sequence
    number is spent and its bytes are lost with the exception, so the layer must not go on
    (the peer would see a gap, or worse, a retry would reuse nothing but look fine)."""
    tx, _, _ = layers(suite)
    _instrument(tx, "tx", fail_at=1)
    with pytest.raises(TLSProtocolError, match="internal_error") as info:
        tx.seal(APP, bytes(2**14 + 1))
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(TLSProtocolError):
        tx.seal(APP, b"more")
    assert tx.error is info.value


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_aead_failure_while_opening_poisons(suite: CipherSuite) -> None:
    """The kernel AEAD failing (e.g. ENOMEM) on a consumed record: internal_error, no
    plaintext, poisoned (the next record would otherwise be opened under a stale sequence)."""
    tx, rx, _ = layers(suite)
    _instrument(rx, "rx", fail_at=0)
    err = expect_poison(rx, A.internal_error, tx.seal(APP, b"a") + tx.seal(APP, b"b"))
    assert isinstance(err.__cause__, OSError)


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_sequence_numbers_never_wrap(suite: CipherSuite) -> None:
    tx, rx, _ = layers(suite, seq=MAX_SEQ - 1)
    wire = tx.seal(APP, b"a") + tx.seal(APP, b"b")  # sequence numbers 2**64-2 and 2**64-1
    with pytest.raises(TLSProtocolError, match="2\\*\\*64"):
        tx.seal(APP, b"c")
    with pytest.raises(TLSProtocolError):  # a split payload is refused whole, nothing sealed
        tx.seal(APP, b"")
    with pytest.raises(ValueError, match="exhausted"):
        tx.tx_keys  # noqa: B018 - a property that must refuse, not show seq 2**64 or 0
    assert "seq=18446744073709551616" in repr(tx)
    assert open_all(rx, wire) == [Record(APP, b"a"), Record(APP, b"b")]
    with pytest.raises(ValueError, match="exhausted"):
        rx.rx_keys  # noqa: B018
    # a record after the last sequence number is refused before any decryption
    expect_poison(rx, A.internal_error, wire[: len(wire) // 2])


def test_split_seal_refused_whole_near_the_limit() -> None:
    tx, _, _ = layers(CipherSuite.TLS_AES_128_GCM_SHA256, seq=MAX_SEQ - 1)
    with pytest.raises(TLSProtocolError):
        tx.seal(APP, bytes(2**14 * 2 + 1))  # three records, two numbers left
    assert tx.tx_keys.seq == MAX_SEQ - 1  # nothing spent
    assert len(tx.seal(APP, bytes(2**14 + 1))) > 2**14  # two records fit exactly


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((0x0304, 0x1301, bytes(32), bytes(12)), {}, ValueError, "16-byte key, got 32"),
        ((0x0304, 0x1301, bytes(16), bytes(8)), {}, ValueError, "12-byte iv, got 8"),
        ((0x0303, 0xC02F, bytes(16), bytes(12)), {}, ValueError, "4-byte iv, got 12"),
        ((0x0303, 0xCCA8, bytes(32), bytes(4)), {}, ValueError, "12-byte iv, got 4"),
        ((0x0303, 0x1301, bytes(16), bytes(12)), {}, ValueError, "cannot be used with"),
        ((0x0304, 0xC02F, bytes(16), bytes(4)), {}, ValueError, "cannot be used with"),
        ((0x0302, 0x1301, bytes(16), bytes(12)), {}, ValueError, "version"),
        ((771.0, 0xC02F, bytes(16), bytes(4)), {}, ValueError, "version"),
        ((True, 0xC02F, bytes(16), bytes(4)), {}, ValueError, "version"),
        ((0x0303, 0x003C, bytes(16), bytes(4)), {}, UnsupportedCipherSuite, "0x003C"),
        ((0x0303, "AES128-SHA256", bytes(16), bytes(4)), {}, UnsupportedCipherSuite,
         "AES128-SHA256"),
        ((0x0304, "TLS_AES_128_CCM_SHA256", bytes(16), bytes(12)), {}, UnsupportedCipherSuite,
         "set_ciphers"),
        ((0x0304, 0x1301, "k" * 16, bytes(12)), {}, TypeError, "key must be bytes-like"),
        ((0x0304, 0x1301, bytes(16), bytes(12)), {"seq": -1}, ValueError, "seq out of range"),
        ((0x0304, 0x1301, bytes(16), bytes(12)), {"seq": 2**64}, ValueError, "seq out of range"),
        ((0x0304, 0x1301, bytes(16), bytes(12)), {"seq": True}, TypeError, "seq must be int"),
        ((0x0304, 0x1301, bytes(16), bytes(12)), {"seq": 1.0}, TypeError, "seq must be int"),
        ((0x0304, 0x1301, bytes(16), bytes(12)), {"secret": bytes(31)}, ValueError,
         "secret must be 32 bytes"),
        ((0x0303, 0xC02F, bytes(16), bytes(4)), {"secret": bytes(32)}, ValueError,
         "only meaningful for TLS 1.3"),
    ],
)  # fmt: skip
def test_traffic_keys_refuse_bad_input(
    args: tuple, kwargs: dict, exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        TrafficKeys(*args, **kwargs)


def test_unknown_backend_and_closed_aead() -> None:
    keys = make_keys(CipherSuite.TLS_AES_128_GCM_SHA256)
    with pytest.raises(ValueError, match="backend"):
        new_record_aead(keys.cipher_suite, keys.key, "openssl")  # type: ignore[arg-type]
    aead = new_record_aead(keys.cipher_suite, keys.key, CRYPTO)
    aead.close()
    aead.close()
    with pytest.raises(ValueError, match="closed"):
        aead.encrypt(bytes(12), b"x", b"")
    assert "closed" in repr(aead)


# --- secrets never shown ------------------------------------------------------------------------


def _secret_forms(*values: bytes | None) -> list[str]:
    forms = []
    for v in values:
        if v:
            forms += [v.hex(), v.hex().upper(), repr(v)[2:-1][:24], str(list(v[:6]))[1:-1]]
    return forms


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_no_key_in_any_repr_str_or_error(suite: CipherSuite) -> None:
    keys = make_keys(suite, seed=b"\xa7")
    secret_forms = _secret_forms(keys.key, keys.iv, keys.secret)
    texts: list[str] = [repr(keys), str(keys), f"{keys}", f"{keys!r}"]
    if keys.secret is not None:
        nxt = keys.next_generation()
        texts += [repr(nxt)]
        secret_forms += _secret_forms(nxt.key, nxt.iv, nxt.secret)
    layer = RecordLayer(tx=keys, rx=keys, backend=CRYPTO)
    texts += [repr(layer), str(layer), repr(layer.tx_keys), repr(layer._tx.aead)]
    wire = bytearray(layer.seal(APP, b"x"))
    wire[-1] ^= 1
    layer.feed(bytes(wire))
    with pytest.raises(TLSProtocolError) as info:
        layer.next_record()
    texts += [str(info.value), repr(info.value), repr(layer)]
    for bad in (lambda: TrafficKeys(keys.version, suite, keys.key + b"\x00", keys.iv),
                lambda: TrafficKeys(keys.version, suite, keys.key, keys.iv + b"\x00"),
                lambda: TrafficKeys(keys.version, suite, keys.key, keys.iv, secret=b"\xa7" * 7)
                if keys.secret else TrafficKeys(keys.version, suite, keys.key, keys.iv,
                                                secret=b"\xa7" * 32)):  # fmt: skip
        with pytest.raises((ValueError, TypeError)) as err:
            bad()
        texts += [str(err.value), repr(err.value)]
    layer.close()
    texts.append(repr(layer))
    for text in texts:
        for form in secret_forms:
            assert form not in text, f"{form!r} shown in {text!r}"


def test_first_error_stays_the_poison() -> None:
    """A failure while sealing the fatal alert of a poisoned layer does not replace the error
    that poisoned it."""
    tx, _, keys = layers(CipherSuite.TLS_AES_128_GCM_SHA256)
    layer = RecordLayer(tx=keys, rx=keys, backend=CRYPTO)
    wire = bytearray(tx.seal(APP, b"x"))
    wire[-1] ^= 1
    first = expect_poison(layer, A.bad_record_mac, bytes(wire))
    _instrument(layer, "tx", fail_at=0)
    with pytest.raises(TLSProtocolError, match="internal_error"):
        layer.seal(ContentType.alert, bytes([2, A.bad_record_mac]))
    assert layer.error is first
