"""Fuzzing the parsers a peer reaches: mutations of valid inputs (tests/_fuzz.py), checked for
documented exceptions only, no hang, no plaintext from a record whose tag failed, and poisoning.

Targets, each a hypothesis test (marked ``fuzz``: ``make fuzz`` runs 100,000 examples of each,
``make test`` a smoke size; see tests/_fuzz.py):

- the record layer (``RecordLayer.feed``/``next_record``) on streams of records it sealed,
  changed, and fed in any pieces; every record it returns must be, in order, one it sealed;
  once with the kernel's AEAD (``kernel``, in the VM);
- the record layer past the tag: records sealed by hand from a changed TLSInnerPlaintext (TLS
  1.3) or content type and content (TLS 1.2), checked against a model of RFC 8446 5.2/5.4;
- the session core (``Session.receive``) on changed post-handshake streams;
- control-message and kernel-struct parsing (afalg.cmsg);
- the hand-off's record reader (``Handshake.receive``/``bytes_wanted``, ``record_length``) on a
  real handshake between two ``Handshake`` objects with one flight changed.

Each target also replays its corpus (``tests/data/fuzz/<target>.json``): one input per distinct
outcome the fuzzer met, with that outcome pinned. ``AFALG_FUZZ_COLLECT=DIR`` writes such files
(run ``make fuzz`` with it, then review and copy what is new).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from _fuzz import (
    CCS_RECORD,
    FUZZ,
    FUZZ_HANDSHAKE,
    FUZZ_VM,
    PLANS,
    byte_mutations,
    chunks,
    mutate,
    mutations,
    split_records,
)
from _record_helpers import ALL_SUITES, hand_seal12, hand_seal13
from _record_helpers import make_keys as _make_keys
from hypothesis import given
from hypothesis import strategies as st
from test_handshake import contexts

from afalg import cmsg, handoff
from afalg._uapi import (
    ALG_SET_AEAD_ASSOCLEN,
    ALG_SET_IV,
    ALG_SET_OP,
    SOL_ALG,
    SOL_TLS,
    AlgOp,
    TLSCipherType,
)
from afalg.errors import AlertDescription as A
from afalg.errors import TLSAlertReceived, TLSProtocolError, UnsupportedCipherSuite
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import MAX_PLAINTEXT, ContentType, Record, RecordLayer
from afalg.session import (
    MAX_POST_HANDSHAKE_MESSAGE,
    MAX_WARNING_ALERTS,
    AlertReceived,
    ApplicationData,
    CloseNotify,
    Event,
    HelloRequest,
    KeyUpdate,
    NewSessionTicket,
    Session,
)
from afalg.wire import HEADER, HEADER_SIZE, MAX_CIPHERTEXT_TLS12, handshake_message

CORPUS = Path(__file__).parent / "data" / "fuzz"
CRYPTO = "cryptography"
SEED = b"\x5a"  # the fuzz keys: deterministic, so a corpus entry replays


def make_keys(suite: CipherSuite, seq: int) -> TrafficKeys:
    return _make_keys(suite, seq, seed=SEED)


def outcome_of(exc: BaseException | None, ok: str = "ok") -> str:
    """An outcome without its numbers: what the corpus keeps one input of."""
    if exc is None:
        return ok
    text = re.sub(r"[0-9]+", "N", re.sub(r"0x[0-9a-fA-F]+", "0xN", str(exc)))
    return f"{type(exc).__name__}: {text}"


_seen: dict[str, set[str]] = {}


def note(target: str, outcome: str, case: dict[str, Any]) -> None:
    """With AFALG_FUZZ_COLLECT=DIR, keep the first input of each new outcome in DIR."""
    out = os.environ.get("AFALG_FUZZ_COLLECT")
    if not out:
        return
    path = Path(out) / f"{target}.json"
    seen = _seen.setdefault(target, set())
    if not seen and path.exists():
        seen.update(c["outcome"] for c in json.loads(path.read_text()))
    if outcome in seen:
        return
    seen.add(outcome)
    cases = json.loads(path.read_text()) if path.exists() else []
    cases.append({**case, "outcome": outcome})
    path.write_text(json.dumps(cases, indent=1) + "\n")


def corpus(target: str) -> list[Any]:
    path = CORPUS / f"{target}.json"
    cases = json.loads(path.read_text()) if path.exists() else []
    return [pytest.param(c, id=f"{i}") for i, c in enumerate(cases)]


# --- the record layer: sealed, changed, fed in pieces -------------------------------------------

RECORD_ALERTS = {
    A.bad_record_mac,
    A.record_overflow,
    A.decode_error,
    A.unexpected_message,
    A.protocol_version,
}
PAYLOAD_SIZES = [0, 1, 2, 15, 16, 100, 1000, MAX_PLAINTEXT, MAX_PLAINTEXT + 1]


@st.composite
def payloads(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    """What a sender seals: application data (empty too, and over 2**14: two records),
    handshake messages, alerts."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        ctype = draw(st.sampled_from([23, 23, 22, 21]))
        if ctype == ContentType.alert:
            payload = bytes([draw(st.sampled_from([1, 2])), draw(st.sampled_from([0, 10, 90]))])
        else:
            size = draw(st.sampled_from(PAYLOAD_SIZES[: 7 if ctype == 23 else 6]) | st.just(40))
            if ctype == ContentType.handshake:
                size = max(size, 1)
            if draw(st.integers(0, 15)) == 0:
                size = draw(st.sampled_from(PAYLOAD_SIZES[7:]))  # a full record, or two
            payload = bytes((i * 7 + len(out)) & 0xFF for i in range(size))
        out.append((ctype, payload))
    return out


def seal_all(
    keys: TrafficKeys, items: list[tuple[int, bytes]], padding: int | None
) -> tuple[bytes, list[Record]]:
    """The wire bytes afalg seals for ``items``, and the records they hold, in order."""
    with RecordLayer(tx=keys, backend=CRYPTO, padding=padding) as tx:
        wire = b"".join(tx.seal(ctype, payload) for ctype, payload in items)
    expected = [
        Record(ContentType(ctype), payload[i : i + MAX_PLAINTEXT])
        for ctype, payload in items
        for i in range(0, max(len(payload), 1), MAX_PLAINTEXT)
    ]
    return wire, expected


def open_pieces(layer: RecordLayer, pieces: list[bytes], expected: list[Record]) -> str:
    """Feed ``pieces`` and take every record: the records are, in order, the first ones sealed;
    an error is a TLSProtocolError with a record-layer alert and poisons the layer."""
    got: list[Record] = []
    error: TLSProtocolError | None = None
    bound = sum(map(len, pieces)) // HEADER_SIZE + 1  # each record takes 5 bytes at least
    try:
        for piece in pieces:
            layer.feed(piece)
            for _ in range(bound + 1):
                record = layer.next_record()
                if record is None:
                    break
                got.append(record)
            else:
                pytest.fail("next_record() kept returning records")  # a loop, not a stream
    except TLSProtocolError as exc:
        error = exc
    # Never plaintext of a record whose tag failed: all that came out was sealed, in order.
    assert got == expected[: len(got)], (got, expected)
    assert all(type(r.payload) is bytes and type(r.content_type) is ContentType for r in got)
    if error is None:
        assert layer.error is None
        return f"ok {'all' if len(got) == len(expected) else 'prefix'}"
    assert error.alert in RECORD_ALERTS, error
    assert error.alert.name in str(error)
    assert layer.error is error  # poisoned: every later call raises again
    with pytest.raises(TLSProtocolError) as again:
        layer.next_record()
    assert again.value.alert is error.alert
    with pytest.raises(TLSProtocolError):
        layer.feed(b"\x17\x03\x03\x00\x00")
    return outcome_of(error)


@st.composite
def record_cases(draw: st.DrawFn) -> dict[str, Any]:
    suite = draw(st.sampled_from(ALL_SUITES))
    seq = draw(st.sampled_from([0, 1, 2, 2**32, 2**64 - 9]))
    padding = draw(st.sampled_from([None, None, 1, 64, 4096])) if suite.is_tls13 else None
    items = draw(payloads())
    wire, _ = seal_all(make_keys(suite, seq), items, padding)
    changed = mutations(draw, wire, [CCS_RECORD])
    return {
        "suite": suite.name,
        "seq": seq,
        "padding": padding,
        "accept_ccs": draw(st.booleans()),
        "items": [[ctype, payload.hex()] for ctype, payload in items],
        "pieces": [piece.hex() for piece in chunks(draw, changed)],
        "changed": changed != wire,
    }


def run_record_case(case: dict[str, Any], backend: str = CRYPTO) -> str:
    suite = CipherSuite[case["suite"]]
    keys = make_keys(suite, case["seq"])
    items = [(ctype, bytes.fromhex(payload)) for ctype, payload in case["items"]]
    wire, expected = seal_all(keys, items, case["padding"])
    pieces = [bytes.fromhex(piece) for piece in case["pieces"]]
    with RecordLayer(rx=keys, backend=backend, accept_ccs=case["accept_ccs"]) as layer:  # type: ignore[arg-type]
        outcome = open_pieces(layer, pieces, expected)
        if b"".join(pieces) == wire:  # unchanged: everything opens, nothing is left
            assert outcome == "ok all" and layer.buffered == 0, outcome
    return outcome


@FUZZ
@given(case=record_cases())
def test_fuzz_record_layer(case: dict[str, Any]) -> None:
    note("record", run_record_case(case), case)


@pytest.mark.kernel
@FUZZ_VM
@given(case=record_cases())
def test_fuzz_record_layer_kernel_aead(case: dict[str, Any]) -> None:
    """The same, opening with the kernel's AEAD (AF_ALG): its EBADMSG and its errors."""
    run_record_case(case, backend="kernel")


@pytest.mark.parametrize("case", corpus("record"))
def test_record_corpus(case: dict[str, Any]) -> None:
    assert run_record_case(case) == case["outcome"]


# --- the record layer past the tag: authentic records of changed content ------------------------


def model_open(version: int, outer_type: int, inner: bytes) -> Record | A:
    """What RFC 8446 5.2/5.4 (TLS 1.3: ``inner`` is the TLSInnerPlaintext) or RFC 5246 6.2 (TLS
    1.2: ``inner`` is the content of a record of ``outer_type``) make of an authentic record:
    the record, or the alert."""
    if outer_type not in (20, 21, 22, 23):
        return A.unexpected_message
    if version == 0x0304:
        if outer_type != 23:
            return A.unexpected_message  # unprotected records are refused once keys are in
        if len(inner) + 16 > 2**14 + 256:
            return A.record_overflow  # at the header
        if len(inner) > MAX_PLAINTEXT + 1:
            return A.record_overflow
        stripped = inner.rstrip(b"\x00")
        if not stripped or stripped[-1] not in (21, 22, 23):
            return A.unexpected_message
        ctype, content = stripped[-1], stripped[:-1]
    else:
        if outer_type == 20:
            return A.unexpected_message
        if len(inner) > MAX_PLAINTEXT:
            return A.record_overflow
        ctype, content = outer_type, inner
    if ctype != 23 and not content:
        return A.unexpected_message
    if ctype == 21 and len(content) != 2:
        return A.decode_error
    return Record(ContentType(ctype), content)


@st.composite
def inner_cases(draw: st.DrawFn) -> dict[str, Any]:
    suite = draw(st.sampled_from(ALL_SUITES))
    ctype = draw(st.sampled_from([21, 22, 23]))
    content = b"\x01\x00" if ctype == 21 else draw(st.binary(max_size=40))
    if suite.is_tls13:
        inner = content + bytes([ctype]) + bytes(draw(st.sampled_from([0, 0, 1, 30])))
        outer = 23
    else:
        inner, outer = content, ctype
    inner = draw(byte_mutations(inner))
    if draw(st.integers(0, 9)) == 0:  # to and past the size limits
        inner = inner.ljust(draw(st.sampled_from([2**14 - 1, 2**14, 2**14 + 1, 2**14 + 2])), b"\0")
    if draw(st.integers(0, 4)) == 0:
        outer = draw(st.sampled_from([0, 20, 21, 22, 23, 24]))
    return {"suite": suite.name, "outer": outer, "inner": inner.hex()}


def run_inner_case(case: dict[str, Any]) -> str:
    suite = CipherSuite[case["suite"]]
    keys = make_keys(suite, 5)
    inner = bytes.fromhex(case["inner"])
    if suite.is_tls13:
        wire = hand_seal13(keys, 5, inner, case["outer"])
    else:
        wire = hand_seal12(keys, 5, case["outer"], inner)
    expected = model_open(keys.version, case["outer"], inner)
    with RecordLayer(rx=keys, backend=CRYPTO) as layer:
        layer.feed(wire)
        try:
            got: Record | A | None = layer.next_record()
        except TLSProtocolError as exc:
            got = exc.alert
            assert layer.error is exc
        assert got == expected, (got, expected)
    return expected.name if isinstance(expected, A) else "ok"


@FUZZ
@given(case=inner_cases())
def test_fuzz_record_layer_past_the_tag(case: dict[str, Any]) -> None:
    note("inner", run_inner_case(case), case)


@pytest.mark.parametrize("case", corpus("inner"))
def test_inner_corpus(case: dict[str, Any]) -> None:
    assert run_inner_case(case) == case["outcome"]


# --- the session core ---------------------------------------------------------------------------

SESSION_ALERTS = {A.unexpected_message, A.decode_error, A.illegal_parameter}


@st.composite
def session_streams(draw: st.DrawFn) -> tuple[int, list[tuple[int, bytes]]]:
    """A valid post-handshake stream of opened records: application data, handshake messages
    spread over records (TLS 1.3 tickets and KeyUpdates, TLS 1.2 HelloRequests), warning
    alerts, and at the end, maybe, close_notify."""
    version = draw(st.sampled_from([0x0303, 0x0304]))
    records: list[tuple[int, bytes]] = []
    hs = bytearray()

    def flush() -> None:
        while hs:  # the messages, cut anywhere
            n = draw(st.integers(1, len(hs)))
            records.append((22, bytes(hs[:n])))
            del hs[:n]

    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["data", "message", "message", "warning"]))
        if kind == "message":
            if version == 0x0304 and draw(st.booleans()):
                hs += handshake_message(24, bytes([draw(st.integers(0, 1))]))
                flush()  # a KeyUpdate ends its record
                continue
            if version == 0x0304:
                hs += handshake_message(4, draw(st.binary(min_size=0, max_size=60)))
            else:
                hs += handshake_message(0, b"")
            if draw(st.booleans()):
                continue  # the next message shares its record
        flush()
        if kind == "data":
            records.append((23, draw(st.binary(max_size=20))))
        elif kind == "warning":
            if warnings_in_a_row(records) == MAX_WARNING_ALERTS - 1:
                records.append((23, b"x"))  # the MAX_WARNING_ALERTS-th would be refused
            level = 1 if version == 0x0303 else draw(st.sampled_from([1, 2]))
            records.append((21, bytes([level, 90 if version == 0x0304 else 100])))
    flush()
    if draw(st.booleans()):
        records.append((21, b"\x01\x00"))
    return version, records


def warnings_in_a_row(records: list[tuple[int, bytes]]) -> int:
    """Warning alerts since the last non-empty record of another type."""
    count = 0
    for ctype, payload in reversed(records):
        if ctype == 21:
            count += 1
        elif payload:
            break
    return count


def parse_messages(stream: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The complete handshake messages at the start of ``stream``, and the bytes left."""
    out = []
    while len(stream) >= 4:
        length = int.from_bytes(stream[1:4], "big")
        if len(stream) < 4 + length:
            break
        out.append((stream[0], stream[4 : 4 + length]))
        stream = stream[4 + length :]
    return out, len(stream)


def as_message(event: Event) -> tuple[int, bytes]:
    if isinstance(event, NewSessionTicket):
        return 4, event.body
    if isinstance(event, KeyUpdate):
        return 24, bytes([event.update_requested])
    assert isinstance(event, HelloRequest)
    return 0, b""


def run_session_case(version: int, records: list[tuple[int, bytes]], valid: bool) -> str:
    session = Session(version)
    handshake_events: list[tuple[int, bytes]] = []
    stream = bytearray()
    warnings = 0
    error: BaseException | None = None
    for ctype, payload in records:
        if ctype == 22:
            stream += payload
        try:
            events = session.receive(ctype, payload)
        except (TLSProtocolError, TLSAlertReceived) as exc:
            error = exc
            break
        if ctype != 21 and payload:
            warnings = 0
        for event in events:
            if isinstance(event, ApplicationData):
                assert ctype == 23 and event.data is payload and len(payload)
            elif isinstance(event, AlertReceived):
                warnings += 1
                assert ctype == 21 and warnings < MAX_WARNING_ALERTS
            elif isinstance(event, CloseNotify):
                assert (ctype, payload[1:]) == (21, b"\x00") and session.eof
            else:
                assert ctype == 22
                handshake_events.append(as_message(event))
        assert session.buffered_handshake_bytes <= 4 + MAX_POST_HANDSHAKE_MESSAGE
    messages, left = parse_messages(bytes(stream))
    # What the session reported is what the peer sent, in order, and nothing else.
    assert handshake_events == messages[: len(handshake_events)]
    if error is None:
        assert handshake_events == messages and session.buffered_handshake_bytes == left
        return "ok"
    assert not valid, error
    assert session.error is error
    with pytest.raises(type(error)) as again:
        session.receive(23, b"more")
    assert again.value is error
    if isinstance(error, TLSProtocolError):
        assert error.alert in SESSION_ALERTS, error
        assert session.fatal_alert() == bytes([2, error.alert])
    else:
        assert session.fatal_alert() is None  # the peer's fatal alert: none owed
    assert session.fatal_alert() is None and session.sending_closed
    return outcome_of(error)


def session_wire(records: list[tuple[int, bytes]]) -> bytes:
    """Records as a stream (header: type, 0x0303, length), for the record-wise mutations."""
    return b"".join(HEADER.pack(ctype, 0x0303, len(p)) + p for ctype, p in records)


@FUZZ
@given(stream=session_streams(), data=st.data())
def test_fuzz_session(stream: tuple[int, list[tuple[int, bytes]]], data: st.DataObject) -> None:
    version, records = stream
    wire = session_wire(records)
    changed = mutations(data.draw, wire)
    if changed != wire:
        records = [
            (r[0], r[HEADER_SIZE:]) for r in split_records(changed)[0]
        ]  # what a record layer would have opened
    case = {"version": version, "records": [[t, p.hex()] for t, p in records]}
    note("session", run_session_case(version, records, valid=changed == wire), case)


@pytest.mark.parametrize("case", corpus("session"))
def test_session_corpus(case: dict[str, Any]) -> None:
    records = [(t, bytes.fromhex(p)) for t, p in case["records"]]
    assert run_session_case(case["version"], records, valid=False) == case["outcome"]


# --- control messages and kernel structs --------------------------------------------------------


@st.composite
def alg_cmsg_cases(draw: st.DrawFn) -> tuple[list[tuple[int, int, bytes]], bool]:
    op = draw(st.sampled_from([None, AlgOp.ENCRYPT, AlgOp.DECRYPT]))
    iv = draw(st.none() | st.binary(max_size=24))
    assoclen = draw(st.none() | st.sampled_from([0, 13, 20, 2**32 - 1]))
    msgs = cmsg.alg_cmsgs(op, iv, assoclen)
    changed = list(msgs)
    for _ in range(draw(st.integers(0, 3))):
        if not changed:
            break
        i = draw(st.integers(0, len(changed) - 1))
        level, kind, payload = changed[i]
        what = draw(st.sampled_from(["drop", "repeat", "level", "type", "data"]))
        if what == "drop":
            del changed[i]
        elif what == "repeat":
            changed.append(changed[i])
        elif what == "level":
            changed[i] = (draw(st.sampled_from([0, 1, SOL_TLS, SOL_ALG + 1])), kind, payload)
        elif what == "type":
            changed[i] = (level, draw(st.integers(0, 8)), payload)
        else:
            changed[i] = (level, kind, draw(byte_mutations(payload)))
    return changed, changed == msgs and not (op is None and iv is None and assoclen is None)


@FUZZ
@given(case=alg_cmsg_cases(), kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_fuzz_parse_alg_cmsgs(case: tuple[list[tuple[int, int, bytes]], bool], kind: type) -> None:
    msgs, _ = case
    try:
        parsed = cmsg.parse_alg_cmsgs([(lv, k, kind(d)) for lv, k, d in msgs])
    except ValueError as exc:
        note("cmsg", outcome_of(exc), {"cmsgs": [[lv, k, d.hex()] for lv, k, d in msgs]})
        assert all(lv == SOL_ALG for lv, _, _ in msgs[:1]) or "SOL_ALG" in str(exc)
        return
    assert all(lv == SOL_ALG and k in (ALG_SET_OP, ALG_SET_IV, ALG_SET_AEAD_ASSOCLEN)
               for lv, k, _ in msgs)  # fmt: skip
    # Each field is the last message of its type, and building them again gives them back.
    last = {k: d for _, k, d in msgs}
    assert parsed.iv == (last[ALG_SET_IV][4:] if ALG_SET_IV in last else None)
    assert cmsg.parse_alg_cmsgs(cmsg.alg_cmsgs(*parsed)) == parsed
    assert type(parsed.iv) in (bytes, type(None))


@FUZZ
@given(data=st.binary(max_size=3) | st.sampled_from([cmsg.record_type_cmsg(t)[2] for t in
                                                    (20, 21, 22, 23, 0, 255)]))  # fmt: skip
def test_fuzz_parse_record_type(data: bytes) -> None:
    if len(data) == 1:
        assert cmsg.parse_record_type(data) == data[0]
        assert cmsg.parse_record_type(memoryview(data)) == data[0]
    else:
        with pytest.raises(ValueError, match="1 byte"):
            cmsg.parse_record_type(bytearray(data))


@st.composite
def crypto_infos(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A valid ``struct tls12_crypto_info_*`` of any cipher (distinctive key bytes), changed;
    and the key."""
    cipher = draw(st.sampled_from(list(TLSCipherType)))
    layout = cmsg.cipher_layout(cipher)
    key = bytes([0xA5]) * layout.key
    info = cmsg.tls_crypto_info(
        draw(st.sampled_from([0x0303, 0x0304])), cipher, key=key,
        iv=bytes(range(layout.iv)), salt=b"\x5c" * layout.salt,
        rec_seq=draw(st.sampled_from([0, 1, 2**64 - 1])),
    )  # fmt: skip
    buf = bytearray(info)
    if draw(st.booleans()):  # a header field: native u16 version, u16 cipher_type
        field = draw(st.sampled_from([0, 2]))
        value = draw(st.sampled_from([0, 0x0303, 0x0304, 50, 51, 54, 58, 59, 0xFFFF]))
        buf[field : field + 2] = value.to_bytes(2, sys.byteorder)
    if draw(st.booleans()):
        buf = bytearray(buf[: draw(st.sampled_from([0, 3, 4, 5, len(buf) - 1, len(buf)]))])
    return draw(byte_mutations(bytes(buf))), key


@FUZZ
@given(case=crypto_infos(), kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_fuzz_crypto_info(case: tuple[bytes, bytes], kind: type) -> None:
    data, key = case
    try:
        info: cmsg.CryptoInfo | None = cmsg.unpack_tls_crypto_info(kind(data))
    except ValueError as exc:
        info = None
        assert key.hex() not in str(exc) and repr(key) not in str(exc)
    try:
        public: cmsg.CryptoInfoPublic | None = cmsg.peek_tls_crypto_info(kind(data))
    except ValueError as exc:
        public = None
        assert key.hex() not in str(exc)
    note(
        "crypto_info", f"unpack={info is not None} peek={public is not None}", {"data": data.hex()}
    )
    if info is not None:
        size = ctypes_size(info.cipher_type)
        assert len(data) == size
        assert info.iv + info.key + info.salt + info.rec_seq == data[4:]
        assert key.hex() not in repr(info) and key.hex() not in str(info)
        if info.version in (0x0303, 0x0304):  # tls_crypto_info builds the same bytes again
            again = cmsg.tls_crypto_info(
                info.version, info.cipher_type, key=info.key, iv=info.iv,
                salt=info.salt, rec_seq=info.rec_seq,
            )  # fmt: skip
            assert again == data
        assert public == (info.version, info.cipher_type, int.from_bytes(info.rec_seq, "big"))
    elif public is not None:
        assert len(data) == 4 and public.rec_seq is None  # the bare header
    if len(data) >= 4 and public is None:
        cipher = int.from_bytes(data[2:4], sys.byteorder)
        assert cipher not in set(TLSCipherType) or len(data) not in (4, ctypes_size(cipher))


def ctypes_size(cipher: int) -> int:
    return ctypes.sizeof(cmsg.tls_crypto_info_struct(cipher))


@pytest.mark.parametrize("case", corpus("crypto_info"))
def test_crypto_info_corpus(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["data"])
    results = []
    for parse in (cmsg.unpack_tls_crypto_info, cmsg.peek_tls_crypto_info):
        try:
            parse(data)
            results.append(True)
        except ValueError:
            results.append(False)
    assert f"unpack={results[0]} peek={results[1]}" == case["outcome"]


@pytest.mark.parametrize("case", corpus("cmsg"))
def test_cmsg_corpus(case: dict[str, Any]) -> None:
    msgs = [(lv, k, bytes.fromhex(d)) for lv, k, d in case["cmsgs"]]
    with pytest.raises(ValueError) as info:
        cmsg.parse_alg_cmsgs(msgs)
    assert outcome_of(info.value) == case["outcome"]


# --- the hand-off's record reader ---------------------------------------------------------------

HANDSHAKE_VERSIONS = ["TLSv1.2", "TLSv1.3"]
_contexts: dict[str, tuple[ssl.SSLContext, ssl.SSLContext]] = {}
_flights: dict[str, list[bytes]] = {}


def handshake_contexts(version: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    if version not in _contexts:
        _contexts[version] = contexts(version)
    return _contexts[version]


def real_flights(version: str) -> list[bytes]:
    """The flights of one clean handshake (splice material)."""
    if version not in _flights:
        flights: list[bytes] = []
        exchange(version, lambda side, n, data: flights.append(data) or data)
        _flights[version] = flights
    return _flights[version]


def exchange(version: str, change: Any, draw: st.DrawFn | None = None) -> str:
    """Pump a client and a server ``Handshake`` through memory; ``change(client?, flight
    number, bytes)`` may change each flight. Returns the outcome; checks what must hold."""
    sctx, cctx = handshake_contexts(version)
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    try:
        return _pump(client, server, change, draw)
    finally:
        client.close()
        server.close()
        # Whatever happened, no connection's secrets wait in either key log.
        assert not handoff.keylog_for(cctx)._expected
        assert not handoff.keylog_for(sctx)._expected


def _pump(
    client: handoff.Handshake, server: handoff.Handshake, change: Any, draw: st.DrawFn | None
) -> str:
    wires = {id(client): bytearray(), id(server): bytearray()}
    flights = {id(client): 0, id(server): 0}
    sizes = draw(st.lists(st.integers(1, 2048), min_size=1, max_size=6)) if draw else [2**16]
    reads = 0
    for _ in range(64):  # a handshake is a few flights: more is a hang
        moved = False
        for me, peer in ((client, server), (server, client)):
            out = me.data_to_send()
            if out:
                out = change(me is client, flights[id(me)], out)
                flights[id(me)] += 1
                wires[id(peer)] += out
                moved = True
            wire = wires[id(me)]
            while wire and me.bytes_wanted():
                wanted = me.bytes_wanted()
                assert 0 < wanted <= HEADER_SIZE + MAX_CIPHERTEXT_TLS12
                n = min(wanted, len(wire), sizes[reads % len(sizes)])  # any chunking
                reads += 1
                try:
                    me.receive(bytes(wire[:n]))
                except (ssl.SSLError, UnsupportedCipherSuite) as exc:
                    return _failed(me, exc)
                del wire[:n]
                moved = True
        if client.done and server.done:
            c, s = client.result(), server.result()
            assert (c.tx.key, c.tx.iv, c.tx.seq) == (s.rx.key, s.rx.iv, s.rx.seq)
            assert (c.rx.key, c.rx.iv) == (s.tx.key, s.tx.iv)
            return "done"
        if not moved:  # stalled: the bytes one side waits for never come
            for me in (server, client):
                if not me.done and me.bytes_wanted():
                    with pytest.raises(ssl.SSLError) as info:
                        me.receive_eof()
                    _failed(me, info.value)
                    return "eof"
            pytest.fail("neither side is done nor waiting")
    pytest.fail("the handshake did not end")


def _failed(hs: handoff.Handshake, exc: BaseException) -> str:
    assert not hs.done and hs.bytes_wanted() == 0 and "failed" in repr(hs)
    with pytest.raises(ValueError, match="not done"):
        hs.result()
    hs.data_to_send()  # the alert ssl produced: best effort
    return "failed"


@FUZZ_HANDSHAKE
@given(
    version=st.sampled_from(HANDSHAKE_VERSIONS),
    side=st.booleans(),
    flight=st.integers(0, 2),
    data=st.data(),
)
def test_fuzz_handshake_reader(version: str, side: bool, flight: int, data: st.DataObject) -> None:
    pool = real_flights(version)
    plan = data.draw(PLANS)  # drawn before the handshake, whose bytes differ run to run
    first: list[bytes] = []

    def change(client: bool, n: int, out: bytes) -> bytes:
        if (client, n) == (side, flight):
            out = mutate(plan, out, pool)
        if client and n == 0:
            first.append(out)
        return out

    outcome = exchange(version, change, data.draw)
    if side and flight == 0 and outcome != "done":  # a ClientHello the server refuses
        note("handshake", outcome, {"version": version, "hello": first[0].hex()})


@pytest.mark.parametrize("case", corpus("handshake"))
def test_handshake_corpus(case: dict[str, Any]) -> None:
    """A changed ClientHello, replayed to a fresh server (the rest of the exchange is new)."""
    hello = bytes.fromhex(case["hello"])
    outcome = exchange(case["version"], lambda client, n, out: hello if client and not n else out)
    assert outcome == case["outcome"]


@FUZZ
@given(header=st.tuples(st.integers(0, 255), st.sampled_from([0x0300, 0x0301, 0x0303, 0x0304,
       0x0200, 0x0403]) | st.integers(0, 0xFFFF), st.sampled_from([0, 1, MAX_CIPHERTEXT_TLS12,
       MAX_CIPHERTEXT_TLS12 + 1]) | st.integers(0, 0xFFFF)))  # fmt: skip
def test_fuzz_record_length(header: tuple[int, int, int]) -> None:
    ctype, version, length = header
    raw = HEADER.pack(ctype, version, length)
    tls = ctype in (20, 21, 22, 23) and version >> 8 == 3 and length <= MAX_CIPHERTEXT_TLS12
    assert handoff.record_length(raw) == (length if tls else None)
    assert handoff.record_length(bytearray(raw) + b"more") == (length if tls else None)


# --- what the fuzzers found -----------------------------------------------------------------------


def test_hello_request_with_a_body_is_a_decode_error() -> None:
    """Found by test_fuzz_session: a TLS 1.2 HelloRequest whose length byte was flipped (a
    one-byte body) was reported as a HelloRequest. ``struct {} HelloRequest`` has no body
    (RFC 5246 7.4.1.1); OpenSSL refuses one with decode_error (SSL_R_LENGTH_MISMATCH)."""
    records = [(22, handshake_message(0, b"")), (22, handshake_message(0, b"\x00"))]
    outcome = run_session_case(0x0303, records, valid=False)
    assert outcome == "TLSProtocolError: HelloRequest with a body (decode_error)"
