"""afalg.record with the cryptography backend (host): known answers, framing, limits, errors.

Known answers: RFC 8448 section 3 (tests/vectors/rfc8448_records.json). Records built by hand
with pyca/cryptography check the TLS 1.2 constructions of RFC 5288 and RFC 7905.
"""

from __future__ import annotations

import socket
import struct

import pytest
from _record_helpers import (
    ALL_SUITES,
    TLS12_SUITES,
    TLS13_SUITES,
    hand_seal12,
    hand_seal13,
    make_keys,
    rfc8448,
)
from _record_interop import open_all
from hypothesis import given
from hypothesis import strategies as st

from afalg import AlertDescription, AlgorithmNotAvailable, TLSProtocolError
from afalg.errors import KeyLimitReached
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import (
    MAX_PLAINTEXT,
    ContentType,
    Record,
    RecordLayer,
    default_records_per_key,
)

CRYPTO = "cryptography"
A = AlertDescription
APP = ContentType.application_data


def pair(suite: CipherSuite, seq: int = 0, **kw: object) -> tuple[RecordLayer, RecordLayer]:
    keys = make_keys(suite, seq)
    return RecordLayer(tx=keys, backend=CRYPTO, **kw), RecordLayer(rx=keys, backend=CRYPTO)


def expect_alert(alert: AlertDescription, rx: RecordLayer, data: bytes) -> None:
    with pytest.raises(TLSProtocolError) as info:
        open_all(rx, data)
    assert info.value.alert == alert
    assert rx.error is info.value
    # poisoned: every later call raises again with the same alert
    for call in (rx.next_record, lambda: rx.feed(b"x")):
        with pytest.raises(TLSProtocolError) as again:
            call()
        assert again.value.alert == alert


# --- known answers --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["client", "server"])
def test_rfc8448_records(side: str) -> None:
    v = rfc8448()
    keys = TrafficKeys.tls13(
        v["cipher_suite"], bytes.fromhex(v[f"{side}_application_traffic_secret_0"])
    )
    records = [r for r in v["records"] if r["sender"] == side]
    keys = keys.with_seq(records[0]["seq"])
    tx = RecordLayer(tx=keys, backend=CRYPTO)
    rx = RecordLayer(rx=keys, backend=CRYPTO)
    for r in records:
        assert tx.tx_keys.seq == r["seq"] == rx.rx_keys.seq
        payload = bytes.fromhex(r["payload"])
        assert tx.seal(r["content_type"], payload).hex() == r["record"]
        assert open_all(rx, bytes.fromhex(r["record"])) == [Record(r["content_type"], payload)]
    assert tx.tx_keys.seq == rx.rx_keys.seq == records[-1]["seq"] + 1


def test_rfc8448_wrong_sequence_is_bad_record_mac() -> None:
    v = rfc8448()
    keys = TrafficKeys.tls13(
        v["cipher_suite"], bytes.fromhex(v["server_application_traffic_secret_0"])
    )
    rx = RecordLayer(rx=keys, backend=CRYPTO)  # seq 0, but the data record is seq 1
    expect_alert(A.bad_record_mac, rx, bytes.fromhex(v["records"][2]["record"]))


@pytest.mark.parametrize("suite", TLS12_SUITES)
@pytest.mark.parametrize("seq", [0, 1, 2**32 + 5, 2**64 - 1])
def test_tls12_records_match_hand_built(suite: CipherSuite, seq: int) -> None:
    keys = make_keys(suite, seq)
    for ctype, payload in [(APP, b"hello world"), (ContentType.alert, b"\x01\x00")]:
        tx = RecordLayer(tx=keys, backend=CRYPTO)
        wire = tx.seal(ctype, payload)
        assert wire == hand_seal12(keys, seq, ctype, payload)
        if not suite.is_chacha20:
            assert wire[5:13] == seq.to_bytes(8, "big")  # explicit nonce = sequence number
            assert len(wire) == 5 + 8 + len(payload) + 16
        else:
            assert len(wire) == 5 + len(payload) + 16


@pytest.mark.parametrize("suite", [s for s in TLS12_SUITES if not s.is_chacha20])
def test_tls12_gcm_uses_the_explicit_nonce_on_the_wire(suite: CipherSuite) -> None:
    keys = make_keys(suite, 7)
    rx = RecordLayer(rx=keys, backend=CRYPTO)
    wire = hand_seal12(keys, 7, 23, b"any explicit nonce", explicit=b"\xa5" * 8)
    assert open_all(rx, wire) == [Record(APP, b"any explicit nonce")]
    assert rx.rx_keys.seq == 8


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_tls13_record_matches_hand_built(suite: CipherSuite) -> None:
    keys = make_keys(suite, 3)
    tx = RecordLayer(tx=keys, backend=CRYPTO)
    assert tx.seal(ContentType.handshake, b"\x04abc") == hand_seal13(keys, 3, b"\x04abc\x16")


# --- round trips, sizes, splitting -----------------------------------------------------------


@pytest.mark.parametrize("suite", ALL_SUITES)
@pytest.mark.parametrize(
    "size", [0, 1, 255, MAX_PLAINTEXT, MAX_PLAINTEXT + 1, 3 * MAX_PLAINTEXT + 7]
)
def test_roundtrip_sizes(suite: CipherSuite, size: int) -> None:
    tx, rx = pair(suite)
    payload = bytes(i % 251 for i in range(size))
    wire = tx.seal(APP, payload)
    nrec = max(1, -(-size // MAX_PLAINTEXT))
    assert tx.tx_keys.seq == nrec
    records = open_all(rx, wire)
    assert len(records) == nrec
    assert all(r.content_type == APP for r in records)
    assert all(len(r.payload) <= MAX_PLAINTEXT for r in records)
    assert b"".join(r.payload for r in records) == payload
    assert rx.rx_keys.seq == nrec and rx.buffered == 0


@given(
    suite=st.sampled_from(ALL_SUITES),
    size=st.integers(0, 100 * 1024),
    cuts=st.lists(st.integers(0, 200_000), max_size=8),
    data=st.data(),
)
def test_property_feed_split_points(
    suite: CipherSuite, size: int, cuts: list[int], data: st.DataObject
) -> None:
    tx, rx = pair(suite)
    payload = data.draw(st.binary(min_size=min(size, 64), max_size=min(size, 64))) * (
        size // 64 + 1
    )
    payload = payload[:size]
    wire = tx.seal(APP, payload) + tx.seal(ContentType.handshake, b"\x18\x00\x00\x01\x00")
    points = sorted({c % (len(wire) + 1) for c in cuts})
    got: list[Record] = []
    prev = 0
    for p in [*points, len(wire)]:
        rx.feed(wire[prev:p])
        prev = p
        while (r := rx.next_record()) is not None:
            got.append(r)
    assert b"".join(r.payload for r in got if r.content_type == APP) == payload
    assert got[-1] == Record(ContentType.handshake, b"\x18\x00\x00\x01\x00")
    assert rx.rx_keys.seq == tx.tx_keys.seq


@given(
    suite=st.sampled_from(ALL_SUITES),
    size=st.integers(0, 2000),
    where=st.integers(0, 10**6),
    bit=st.integers(0, 7),
)
def test_property_any_flipped_byte_is_bad_record_mac(
    suite: CipherSuite, size: int, where: int, bit: int
) -> None:
    tx, rx = pair(suite, seq=5)
    wire = bytearray(tx.seal(APP, b"s" * size))
    # flip a byte of the protected part (header flips change type/length: checked separately)
    i = 5 + where % (len(wire) - 5)
    wire[i] ^= 1 << bit
    rx.feed(bytes(wire))
    with pytest.raises(TLSProtocolError) as info:
        rx.next_record()
    assert info.value.alert == A.bad_record_mac
    with pytest.raises(TLSProtocolError):
        rx.next_record()


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_flipped_header_byte_never_gives_plaintext(suite: CipherSuite) -> None:
    tx, _ = pair(suite)
    keys = tx.tx_keys
    wire = tx.seal(APP, b"secret payload")
    for i in range(5):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            rx = RecordLayer(rx=keys, backend=CRYPTO)
            rx.feed(bytes(bad))
            try:
                r = rx.next_record()
            except TLSProtocolError as exc:
                assert exc.alert in (
                    A.bad_record_mac,
                    A.unexpected_message,
                    A.record_overflow,
                    A.protocol_version,
                )
            else:
                assert r is None  # length grew: waiting for more bytes, nothing released
            # TLS 1.3 ignores legacy_record_version but authenticates it; TLS 1.2 checks it


def test_tls13_version_bytes_authenticated_not_checked() -> None:
    tx, rx = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    wire = bytearray(tx.seal(APP, b"x"))
    wire[2] = 0x01  # legacy_record_version 0x0301: ignored, but it is in the AAD
    expect_alert(A.bad_record_mac, rx, bytes(wire))


# --- sequence numbers, keys -------------------------------------------------------------------


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_sequence_limit(suite: CipherSuite) -> None:
    last = 2**64 - 1
    tx, rx = pair(suite, seq=last - 1)
    with pytest.raises(TLSProtocolError):
        tx.seal(APP, b"z" * (MAX_PLAINTEXT * 2 + 1))  # three records would pass 2**64-1
    assert tx.tx_keys.seq == last - 1
    wire = tx.seal(APP, b"a") + tx.seal(APP, b"b")  # seq 2**64-2 and 2**64-1
    with pytest.raises(TLSProtocolError, match="2\\*\\*64-1"):
        tx.seal(APP, b"c")
    with pytest.raises(ValueError):
        _ = tx.tx_keys  # no TrafficKeys has seq 2**64
    assert [r.payload for r in open_all(rx, wire)] == [b"a", b"b"]
    # a record after 2**64-1 is refused, whatever it holds
    extra = hand_seal13(make_keys(suite), 0, b"c\x17") if suite.is_tls13 else wire[: len(wire) // 2]
    expect_alert(A.internal_error, rx, extra)


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_rekey(suite: CipherSuite) -> None:
    tx, rx = pair(suite, seq=10)
    k0 = tx.tx_keys
    wire = tx.seal(APP, b"before")
    assert tx.rekey_tx() == k0.next_generation()
    wire2 = tx.seal(APP, b"after")
    assert tx.tx_keys.seq == 1
    assert open_all(rx, wire) == [Record(APP, b"before")]
    rx.rekey_rx()
    assert open_all(rx, wire2) == [Record(APP, b"after")]
    assert rx.rx_keys == tx.tx_keys


def test_rekey_tls12_refused() -> None:
    tx, rx = pair(CipherSuite.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
    with pytest.raises(ValueError):
        tx.rekey_tx()
    with pytest.raises(ValueError):
        rx.rekey_rx()
    with pytest.raises(ValueError):
        RecordLayer(backend=CRYPTO).rekey_tx()


def test_records_per_key() -> None:
    """No key seals more records than its limit (AES-GCM's default for the sockets is 2**24,
    RFC 8446 5.5; ChaCha20's the sequence space; a bare layer has none but the sequence space);
    a limit given is kept exactly, and a refused seal uses no sequence number."""
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    limit = default_records_per_key(suite)
    assert (
        limit == 2**24
        and default_records_per_key(CipherSuite.TLS_CHACHA20_POLY1305_SHA256) == 2**64
    )
    gcm = RecordLayer(tx=make_keys(suite, 2**24 - 1), backend=CRYPTO, records_per_key=limit)
    assert gcm.records_per_key == 2**24 and gcm.tx_records_left == 1
    gcm.seal(APP, b"")
    assert gcm.tx_records_left == 0
    with pytest.raises(KeyLimitReached, match="limit of 16777216"):
        gcm.seal(ContentType.alert, b"\x01\x00")
    unlimited = RecordLayer(tx=make_keys(suite, 2**24), backend=CRYPTO)
    assert unlimited.records_per_key is None and unlimited.tx_records_left == 2**64 - 2**24
    layer = RecordLayer(
        tx=make_keys(CipherSuite.TLS_AES_256_GCM_SHA384, 0), backend=CRYPTO, records_per_key=5
    )
    with pytest.raises(KeyLimitReached):
        layer.seal(APP, bytes(6 * 2**14))  # six records: refused whole
    assert layer.tx_keys is not None and layer.tx_keys.seq == 0
    layer.seal(APP, bytes(4 * 2**14))
    assert layer.tx_records_left == 1
    layer.seal(ContentType.handshake, b"\x18\x00\x00\x01\x00")  # the last one: a KeyUpdate
    layer.rekey_tx()
    assert layer.tx_records_left == 5
    for bad, error in ((1, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error):
            RecordLayer(backend=CRYPTO, records_per_key=bad)  # type: ignore[arg-type]


# --- TLS 1.3 inner plaintext, padding, zero-length records ----------------------------------


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_padding_policy(suite: CipherSuite) -> None:
    keys = make_keys(suite)
    tx = RecordLayer(tx=keys, backend=CRYPTO, padding=256)
    rx = RecordLayer(rx=keys, backend=CRYPTO)
    for n in (0, 1, 255, 256, 1000, MAX_PLAINTEXT):
        wire = tx.seal(APP, b"p" * n)
        inner_len = len(wire) - 5 - 16
        assert inner_len == min(-(-(n + 1) // 256) * 256, MAX_PLAINTEXT + 1)
        assert open_all(rx, wire) == [Record(APP, b"p" * n)]
    calls = []
    tx2 = RecordLayer(tx=keys, backend=CRYPTO, padding=lambda t, n: calls.append((t, n)) or 10**6)
    wire = tx2.seal(ContentType.handshake, b"h" * 100)
    assert calls == [(ContentType.handshake, 100)]
    assert len(wire) == 5 + MAX_PLAINTEXT + 1 + 16  # clamped to 2**14 + 1
    rx2 = RecordLayer(rx=keys, backend=CRYPTO)
    assert open_all(rx2, wire) == [Record(ContentType.handshake, b"h" * 100)]


@pytest.mark.parametrize("suite", TLS13_SUITES)
@pytest.mark.parametrize("failure", ["raises", "not-an-int"])
def test_padding_policy_failing_mid_seal_uses_no_sequence_number(
    suite: CipherSuite, failure: str
) -> None:
    """A policy that fails on the second record of a split payload: seal() raises before any
    record is sealed, no sequence number is used, and the layer goes on (issue 15 item 6)."""
    keys = make_keys(suite)
    calls = []

    def policy(ctype: ContentType, n: int) -> int:
        calls.append(n)
        if len(calls) == 2:
            if failure == "raises":
                raise RuntimeError("policy bug")
            return "7"  # type: ignore[return-value]
        return 0

    tx = RecordLayer(tx=keys, backend=CRYPTO, padding=policy)
    rx = RecordLayer(rx=keys, backend=CRYPTO)
    with pytest.raises(RuntimeError if failure == "raises" else TypeError):
        tx.seal(APP, b"x" * (MAX_PLAINTEXT + 10))
    assert tx.tx_keys.seq == 0 and tx.error is None
    calls.append(0)  # the policy works from now on
    wire = tx.seal(APP, b"next")
    assert open_all(rx, wire) == [Record(APP, b"next")]  # the peer opens it: no gap
    assert tx.tx_keys.seq == rx.rx_keys.seq == 1


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_tls13_inner_plaintext_errors(suite: CipherSuite) -> None:
    keys = make_keys(suite)

    def rx() -> RecordLayer:
        return RecordLayer(rx=keys, backend=CRYPTO)

    # padding only, no content type
    expect_alert(A.unexpected_message, rx(), hand_seal13(keys, 0, bytes(30)))
    expect_alert(A.unexpected_message, rx(), hand_seal13(keys, 0, b""))
    # protected change_cipher_spec, unknown inner type
    expect_alert(A.unexpected_message, rx(), hand_seal13(keys, 0, b"\x01\x14"))
    expect_alert(A.unexpected_message, rx(), hand_seal13(keys, 0, b"\x01\x18"))
    # zero-length handshake (even with padding), alert of the wrong size
    expect_alert(A.unexpected_message, rx(), hand_seal13(keys, 0, b"\x16\x00\x00"))
    expect_alert(A.decode_error, rx(), hand_seal13(keys, 0, b"\x01\x00\x00\x15"))
    # inner plaintext over 2**14 + 1
    expect_alert(A.record_overflow, rx(), hand_seal13(keys, 0, b"a" * MAX_PLAINTEXT + b"\x17\x00"))
    # 2**14 + 1 exactly is fine, and zero-length application data with padding too
    r = rx()
    assert open_all(r, hand_seal13(keys, 0, b"a" * MAX_PLAINTEXT + b"\x17")) == [
        Record(APP, b"a" * MAX_PLAINTEXT)
    ]
    assert open_all(r, hand_seal13(keys, 1, b"\x17\x00\x00")) == [Record(APP, b"")]


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_zero_length_records(suite: CipherSuite) -> None:
    tx, rx = pair(suite)
    wire = tx.seal(APP, b"")
    assert open_all(rx, wire) == [Record(APP, b"")]
    for ctype in (ContentType.handshake, ContentType.alert, ContentType.change_cipher_spec):
        with pytest.raises(ValueError):
            tx.seal(ctype, b"")
    if not suite.is_tls13:
        keys = make_keys(suite)
        expect_alert(
            A.unexpected_message,
            RecordLayer(rx=keys, backend=CRYPTO),
            hand_seal12(keys, 0, 22, b""),
        )


# --- header checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("suite", ALL_SUITES)
def test_record_overflow_from_header(suite: CipherSuite) -> None:
    keys = make_keys(suite)
    limit = 2**14 + 256 if suite.is_tls13 else 2**14 + 2048
    ok = RecordLayer(rx=keys, backend=CRYPTO)
    ok.feed(struct.pack(">BHH", 23, 0x0303, limit))
    assert ok.next_record() is None  # waiting for the body
    # detected from the header alone, before the body arrives
    expect_alert(
        A.record_overflow,
        RecordLayer(rx=keys, backend=CRYPTO),
        struct.pack(">BHH", 23, 0x0303, limit + 1),
    )


@pytest.mark.parametrize("suite", TLS12_SUITES)
def test_tls12_plaintext_overflow(suite: CipherSuite) -> None:
    keys = make_keys(suite)
    wire = hand_seal12(keys, 0, 23, b"q" * (MAX_PLAINTEXT + 1))
    expect_alert(A.record_overflow, RecordLayer(rx=keys, backend=CRYPTO), wire)


def test_plaintext_direction() -> None:
    layer = RecordLayer(backend=CRYPTO)
    assert layer.tx_keys is None and layer.rx_keys is None
    wire = layer.seal(ContentType.handshake, b"\x01" * (MAX_PLAINTEXT + 10))
    assert wire[:5] == b"\x16\x03\x03\x40\x00"
    assert [len(r.payload) for r in open_all(layer, wire)] == [MAX_PLAINTEXT, 10]
    expect_alert(A.record_overflow, RecordLayer(), b"\x16\x03\x03\x40\x01")


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_tls13_unprotected_records_after_keys(suite: CipherSuite) -> None:
    keys = make_keys(suite)
    for rec in (
        b"\x16\x03\x03\x00\x04\x01\x00\x00\x00",
        b"\x15\x03\x03\x00\x02\x02\x28",
        b"\x14\x03\x03\x00\x01\x01",
        b"\x18\x03\x03\x00\x01\x01",
    ):
        expect_alert(A.unexpected_message, RecordLayer(rx=keys, backend=CRYPTO), rec)
    # during a handshake, the compatibility change_cipher_spec is dropped
    rx = RecordLayer(rx=keys, backend=CRYPTO, accept_ccs=True)
    data = hand_seal13(keys, 0, b"hi\x17")
    assert open_all(rx, b"\x14\x03\x03\x00\x01\x01" + data) == [Record(APP, b"hi")]
    assert rx.rx_keys.seq == 1
    expect_alert(
        A.unexpected_message,
        RecordLayer(rx=keys, backend=CRYPTO, accept_ccs=True),
        b"\x14\x03\x03\x00\x01\x02",
    )
    expect_alert(
        A.unexpected_message,
        RecordLayer(rx=keys, backend=CRYPTO, accept_ccs=True),
        b"\x14\x03\x03\x00\x02\x01\x01",
    )


@pytest.mark.parametrize("suite", TLS12_SUITES)
def test_tls12_header_errors(suite: CipherSuite) -> None:
    keys = make_keys(suite)
    expect_alert(
        A.unexpected_message, RecordLayer(rx=keys, backend=CRYPTO), b"\x14\x03\x03\x00\x01\x01"
    )
    expect_alert(
        A.unexpected_message, RecordLayer(rx=keys, backend=CRYPTO), b"\x18\x03\x03\x00\x01\x01"
    )
    wire = bytearray(hand_seal12(keys, 0, 23, b"v"))
    wire[2] = 0x02
    expect_alert(A.protocol_version, RecordLayer(rx=keys, backend=CRYPTO), bytes(wire))
    expect_alert(
        A.bad_record_mac, RecordLayer(rx=keys, backend=CRYPTO), b"\x17\x03\x03\x00\x05" + bytes(5)
    )
    wrong_type = bytearray(hand_seal12(keys, 0, 23, b"v"))
    wrong_type[0] = 22  # the type is in the AAD
    expect_alert(A.bad_record_mac, RecordLayer(rx=keys, backend=CRYPTO), bytes(wrong_type))


def test_tls12_alert_and_handshake_records() -> None:
    tx, rx = pair(CipherSuite.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)
    wire = tx.seal(ContentType.alert, b"\x01\x00") + tx.seal(
        ContentType.handshake, b"\x00\x00\x00\x00"
    )
    assert open_all(rx, wire) == [
        Record(ContentType.alert, b"\x01\x00"),
        Record(ContentType.handshake, b"\x00\x00\x00\x00"),
    ]
    expect_alert(
        A.decode_error,
        rx,
        tx.seal(ContentType.application_data, b"")
        and hand_seal12(tx.tx_keys, 2, 21, b"\x01\x00\x00"),
    )


# --- poisoning, inputs, repr ---------------------------------------------------------------------


def test_poisoned_layer_can_still_send_its_alert() -> None:
    keys = make_keys(CipherSuite.TLS_AES_256_GCM_SHA384)
    layer = RecordLayer(tx=keys, rx=keys, backend=CRYPTO)
    wire = bytearray(layer.seal(APP, b"data"))
    wire[-1] ^= 1
    expect_alert(A.bad_record_mac, layer, bytes(wire))
    with pytest.raises(TLSProtocolError):
        layer.seal(APP, b"more")
    with pytest.raises(TLSProtocolError):
        layer.rekey_tx()
    alert = layer.seal(ContentType.alert, bytes([2, A.bad_record_mac]))
    other = RecordLayer(rx=keys.with_seq(1), backend=CRYPTO)
    assert open_all(other, alert) == [Record(ContentType.alert, b"\x02\x14")]
    assert "poisoned" in repr(layer)


def test_inputs_checked() -> None:
    tx, rx = pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    with pytest.raises(TypeError):
        tx.seal(APP, "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        tx.seal(99, b"x")
    with pytest.raises(ValueError):
        tx.seal(ContentType.alert, b"\x01\x00\x00")
    with pytest.raises(TypeError):
        rx.feed("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        RecordLayer(tx=b"keys")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RecordLayer(backend="openssl")  # type: ignore[arg-type]
    # bytes-like in, bytes out
    wire = tx.seal(APP, memoryview(bytearray(b"abc")))
    rx.feed(bytearray(wire[:3]))
    rx.feed(memoryview(wire[3:]))
    rec = rx.next_record()
    assert rec == Record(APP, b"abc") and type(rec.payload) is bytes
    assert isinstance(rec.content_type, ContentType)


def test_repr_never_shows_keys_and_close() -> None:
    keys = make_keys(CipherSuite.TLS_AES_128_GCM_SHA256, seed=b"\xab")
    with RecordLayer(tx=keys, rx=keys, backend=CRYPTO) as layer:
        text = repr(layer)
        assert "ab" * 4 not in text and keys.key.hex() not in text
        assert "TLS_AES_128_GCM_SHA256 seq=0" in text and "backend=cryptography" in text
    layer.close()  # idempotent
    with pytest.raises(ValueError):
        layer.seal(APP, b"x")
    with pytest.raises(ValueError):
        layer.next_record()


def _host_has_af_alg() -> bool:
    try:
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
    except OSError:
        return False
    return True


def test_backend_selection_on_host() -> None:
    keys = make_keys(CipherSuite.TLS_AES_128_GCM_SHA256)
    if _host_has_af_alg():
        pytest.skip("this host has AF_ALG: kernel backend tests cover it")
    assert RecordLayer(tx=keys).backend == "cryptography"  # auto falls back
    with pytest.raises(AlgorithmNotAvailable):
        RecordLayer(tx=keys, backend="kernel")
