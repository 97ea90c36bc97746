"""The post-handshake session core (afalg.session) with no socket: records in, events out.

Every protocol rule the socket tests pin (test_tls_sockets, test_adversarial_tls, test_ktls_rekey)
is pinned here once, on the core both sockets drive; those tests keep what needs I/O (the alert
reaching the peer, the kernel's pause after a KeyUpdate, nothing hanging). Records are written
byte by byte here, after RFC 8446 (sections 4, 4.6.3, 5.1, 6) and RFC 5246 (7.2, 7.4.1.1).
"""

from __future__ import annotations

import errno
import ssl
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afalg
from afalg.errors import AlertDescription as A
from afalg.session import (
    MAX_EMPTY_RECORDS,
    MAX_KEY_UPDATES,
    MAX_POST_HANDSHAKE_MESSAGE,
    MAX_WARNING_ALERTS,
    AlertReceived,
    ApplicationData,
    CloseNotify,
    HelloRequest,
    KeyUpdate,
    NewSessionTicket,
    Session,
)
from afalg.wire import handshake_message, key_update_message

TLS12, TLS13 = 0x0303, 0x0304
CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
TICKET = b"\x04" + (12).to_bytes(3, "big") + bytes(range(12))  # a NewSessionTicket, 12 bytes
KEY_UPDATE = b"\x18\x00\x00\x01\x00"  # update_not_requested
KEY_UPDATE_REQUESTED = b"\x18\x00\x00\x01\x01"


def refused(session: Session, alert: A, content_type: int, payload: bytes) -> None:
    """The record is refused with ``alert``; the session is poisoned and owes that alert once."""
    with pytest.raises(afalg.TLSProtocolError) as info:
        session.receive(content_type, payload)
    assert info.value.alert is alert
    assert_poisoned(session, info.value)
    assert session.fatal_alert() == bytes([2, alert])
    assert session.fatal_alert() is None  # once


def assert_poisoned(session: Session, error: BaseException) -> None:
    assert session.error is error
    for call in (
        lambda: session.receive(CT_APPDATA, b"more"),
        lambda: session.receive(CT_ALERT, b"\x01\x00"),
        lambda: session.receive_eof(),
        session.check_send,
        *([session.key_update] if session.version == TLS13 else []),
    ):
        with pytest.raises(type(error)) as info:
            call()
        assert info.value is error  # the same error, every time
    assert session.close_notify() is None and session.sending_closed
    assert not session.key_update_due


# --- construction and wire encodings ----------------------------------------------------------


@pytest.mark.parametrize("version", [0x0301, 0x0302, 0x0304 + 1, "TLSv1.3", None])
def test_version_checked_at_the_edge(version: object) -> None:
    with pytest.raises(ValueError, match="0x0303 or 0x0304"):
        Session(version)  # type: ignore[arg-type]


def test_handshake_message_framing() -> None:
    """RFC 8446 4: msg_type (1), length (3, big-endian), body; KeyUpdate 4.6.3."""
    assert handshake_message(4, b"abc") == b"\x04\x00\x00\x03abc"
    assert key_update_message(False) == KEY_UPDATE
    assert key_update_message(True) == KEY_UPDATE_REQUESTED
    assert repr(Session(TLS13)) == "<Session TLS 1.3 open>"


# --- application data and the end of the connection --------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_application_data_is_passed_through_not_copied(version: int) -> None:
    session = Session(version)
    data = memoryview(bytearray(b"hello"))
    [event] = session.receive(CT_APPDATA, data)
    assert event == ApplicationData(data) and event.data is data
    assert session.receive(CT_APPDATA, b"") == []  # an empty record carries nothing


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_close_notify_is_eof_and_we_may_still_send(version: int) -> None:
    session = Session(version)
    assert session.receive(CT_ALERT, b"\x01\x00") == [CloseNotify()]
    assert session.eof and session.error is None
    assert not session.quiet
    session.check_send()  # half-closed: our side is still open
    assert session.close_notify() == b"\x01\x00"
    assert session.close_notify() is None  # once
    with pytest.raises(BrokenPipeError) as info:
        session.check_send()
    assert info.value.errno == errno.EPIPE
    assert session.error is None  # closing is no error


def test_ragged_eof_suppressed_or_not() -> None:
    """A transport EOF without close_notify: EOF (suppress_ragged_eofs, as ssl) or SSLEOFError,
    which poisons without owing an alert (the peer is gone)."""
    quiet = Session(TLS13)
    quiet.receive_eof(suppress_ragged_eofs=True)
    assert quiet.eof and quiet.error is None
    strict = Session(TLS13)
    with pytest.raises(ssl.SSLEOFError) as info:
        strict.receive_eof(suppress_ragged_eofs=False)
    assert_poisoned(strict, info.value)
    assert strict.fatal_alert() is None


# --- alerts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_peer_fatal_alert_poisons_and_owes_nothing(version: int) -> None:
    session = Session(version)
    with pytest.raises(afalg.TLSAlertReceived, match="handshake_failure") as info:
        session.receive(CT_ALERT, bytes([2, A.handshake_failure]))
    assert info.value.alert is A.handshake_failure and info.value.level == 2
    assert isinstance(info.value, ssl.SSLError)
    assert_poisoned(session, info.value)
    assert not session.quiet
    assert session.fatal_alert() is None  # the connection is gone: we send nothing


def test_tls13_warning_level_is_fatal_but_user_canceled_is_not() -> None:
    """RFC 8446 6: in TLS 1.3 every alert but close_notify and user_canceled is fatal, whatever
    its level byte says."""
    session = Session(TLS13)
    assert session.receive(CT_ALERT, bytes([1, A.user_canceled])) == [
        AlertReceived(1, A.user_canceled)
    ]
    with pytest.raises(afalg.TLSAlertReceived) as info:
        session.receive(CT_ALERT, bytes([1, A.certificate_expired]))
    assert info.value.alert is A.certificate_expired and info.value.level == 1


def test_tls12_warnings_go_on_up_to_the_bound() -> None:
    """TLS 1.2 warnings are reported and the connection goes on, but MAX_WARNING_ALERTS in a
    row end it (unexpected_message), as OpenSSL does; a non-empty record of another type starts
    the count again, an empty one does not."""
    assert MAX_WARNING_ALERTS == 5
    session = Session(TLS12)
    warning = bytes([1, A.no_renegotiation_RESERVED])
    for _ in range(MAX_WARNING_ALERTS - 1):
        assert session.receive(CT_ALERT, warning) == [AlertReceived(1, A.no_renegotiation_RESERVED)]
    assert session.receive(CT_APPDATA, b"x") == [ApplicationData(b"x")]  # a new run
    for _ in range(MAX_WARNING_ALERTS - 1):
        session.receive(CT_ALERT, warning)
    assert session.receive(CT_APPDATA, b"") == []  # empty: the run goes on
    assert session.error is None
    refused(session, A.unexpected_message, CT_ALERT, warning)


def test_unknown_alert_description_is_kept_as_a_number() -> None:
    session = Session(TLS12)
    assert session.receive(CT_ALERT, bytes([1, 250])) == [AlertReceived(1, 250)]
    with pytest.raises(afalg.TLSAlertReceived) as info:
        session.receive(CT_ALERT, bytes([2, 251]))
    assert info.value.alert == 251


@pytest.mark.parametrize("payload", [b"", b"\x02", b"\x02\x28\x00"], ids=["0", "1", "3"])
def test_alert_of_bad_length(payload: bytes) -> None:
    refused(Session(TLS13), A.decode_error, CT_ALERT, payload)


# --- content types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [CT_CCS, 24, 71, 255], ids=["ccs", "heartbeat", "G", "255"]
)
def test_unexpected_content_type(content_type: int) -> None:
    """Nothing but application_data, alert and handshake after the handshake (a plaintext HTTP
    request's 'G' is content type 71)."""
    refused(Session(TLS13), A.unexpected_message, content_type, b"\x01")


# --- post-handshake messages ---------------------------------------------------------------------


def test_new_session_tickets_reassembled_over_records() -> None:
    session = Session(TLS13)
    other = handshake_message(4, b"second ticket")
    assert session.receive(CT_HANDSHAKE, TICKET[:3]) == []
    assert session.buffered_handshake_bytes == 3
    assert session.receive(CT_HANDSHAKE, TICKET[3:9]) == []
    assert session.receive(CT_HANDSHAKE, TICKET[9:] + other) == [
        NewSessionTicket(TICKET[4:]),
        NewSessionTicket(b"second ticket"),
    ]
    assert session.buffered_handshake_bytes == 0


@given(cuts=st.lists(st.integers(min_value=1, max_value=60), max_size=12))
def test_any_fragmentation_gives_the_same_events(cuts: list[int]) -> None:
    """RFC 8446 5.1: handshake messages may be split over records anywhere (and coalesced);
    the events depend on the bytes only."""
    stream = TICKET + handshake_message(4, bytes(40)) + TICKET + KEY_UPDATE_REQUESTED
    records, rest = [], stream
    for cut in cuts:
        if len(rest) > 5:  # the KeyUpdate's record ends with it (5.1)
            records.append(rest[: min(cut, len(rest) - 5)])
            rest = rest[len(records[-1]) :]
    records.append(rest)
    session = Session(TLS13)
    events = [e for r in records for e in session.receive(CT_HANDSHAKE, r)]
    assert events == [
        NewSessionTicket(TICKET[4:]),
        NewSessionTicket(bytes(40)),
        NewSessionTicket(TICKET[4:]),
        KeyUpdate(update_requested=True),
    ]


def test_tls12_hello_request_is_ignored_other_messages_refused() -> None:
    """RFC 5246 7.4.1.1: a HelloRequest may be ignored (renegotiation is not offered)."""
    assert Session(TLS12).receive(CT_HANDSHAKE, b"\x00\x00\x00\x00") == [HelloRequest()]
    refused(Session(TLS12), A.unexpected_message, CT_HANDSHAKE, TICKET)
    refused(Session(TLS12), A.unexpected_message, CT_HANDSHAKE, KEY_UPDATE)


@pytest.mark.parametrize(
    "message",
    [b"\x00\x00\x00\x00", b"\x01\x00\x00\x00", b"\x14\x00\x00\x00"],
    ids=["hello_request", "client_hello", "finished"],
)
def test_tls13_unexpected_post_handshake_message(message: bytes) -> None:
    refused(Session(TLS13), A.unexpected_message, CT_HANDSHAKE, message)


def test_post_handshake_certificate_request_cannot_be_answered() -> None:
    session = Session(TLS13)
    with pytest.raises(afalg.TLSProtocolError, match="post_handshake_auth") as info:
        session.receive(CT_HANDSHAKE, handshake_message(13, b"\x00\x00\x00"))
    assert info.value.alert is A.unexpected_message


def test_empty_handshake_record() -> None:
    """RFC 8446 5.1: implementations MUST NOT send zero-length fragments of Handshake types."""
    refused(Session(TLS13), A.unexpected_message, CT_HANDSHAKE, b"")


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_long_message_refused_at_its_header(version: int) -> None:
    """A message announcing more than MAX_POST_HANDSHAKE_MESSAGE bytes is refused as soon as its
    4-byte header is in, never buffered; one of exactly that length is waited for."""
    session = Session(version)
    header = b"\x04" + MAX_POST_HANDSHAKE_MESSAGE.to_bytes(3, "big")
    assert session.receive(CT_HANDSHAKE, header + bytes(100)) == []
    session = Session(version)
    assert session.receive(CT_HANDSHAKE, b"\x04\x7f") == []  # no length yet
    refused(session, A.illegal_parameter, CT_HANDSHAKE, b"\xff\xff")  # 8 MiB announced
    header = b"\x04" + (MAX_POST_HANDSHAKE_MESSAGE + 1).to_bytes(3, "big")
    refused(Session(version), A.illegal_parameter, CT_HANDSHAKE, header)


@pytest.mark.parametrize(
    "interleaved",
    [(CT_APPDATA, b"interleaved"), (CT_APPDATA, b""), (CT_ALERT, b"\x01\x00"),
     (CT_ALERT, bytes([2, A.internal_error]))],
    ids=["application-data", "empty-application-data", "close-notify", "fatal-alert"],
)  # fmt: skip
def test_no_record_inside_a_fragmented_handshake_message(interleaved: tuple) -> None:
    """RFC 8446 5.1: the records of one handshake message come with nothing between them (even
    a close_notify, even the peer's fatal alert: we refuse first)."""
    session = Session(TLS13)
    assert session.receive(CT_HANDSHAKE, TICKET[:8]) == []
    assert not session.quiet  # half a handshake message: the next records must complete it
    refused(session, A.unexpected_message, *interleaved)


# --- KeyUpdate -----------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", [False, True])
def test_key_update_event(requested: bool) -> None:
    session = Session(TLS13)
    [event] = session.receive(CT_HANDSHAKE, key_update_message(requested))
    assert event == KeyUpdate(update_requested=requested)
    assert session.key_update_due is requested


@pytest.mark.parametrize(
    "after",
    [b"\x04\x00", b"\x04\x00\x00\x00", TICKET],
    ids=["partial-message", "empty-message", "whole-ticket"],
)
def test_key_update_must_end_its_record(after: bytes) -> None:
    """RFC 8446 5.1: a message preceding a key change must end at a record boundary."""
    refused(Session(TLS13), A.unexpected_message, CT_HANDSHAKE, KEY_UPDATE + after)


def test_key_update_fragmented_over_records() -> None:
    """A KeyUpdate may span records (ending at a record boundary): one event, at its end."""
    session = Session(TLS13)
    assert session.receive(CT_HANDSHAKE, b"\x18") == []
    assert session.receive(CT_HANDSHAKE, b"\x00\x00") == []
    assert session.receive(CT_HANDSHAKE, b"\x01\x01") == [KeyUpdate(update_requested=True)]
    # after a message, in the same record
    assert session.receive(CT_HANDSHAKE, TICKET + KEY_UPDATE) == [
        NewSessionTicket(TICKET[4:]),
        KeyUpdate(update_requested=False),
    ]


@pytest.mark.parametrize(
    ("record", "alert"),
    [
        (b"\x18\x00\x00\x01\x02", A.illegal_parameter),  # request_update neither 0 nor 1
        (b"\x18\x00\x00\x02", A.decode_error),  # refused at its header: not 1 byte
        (b"\x18\x00\x00\x00", A.decode_error),  # empty
    ],
    ids=["request-2", "length-2-header", "length-0"],
)
def test_malformed_key_update(record: bytes, alert: A) -> None:
    refused(Session(TLS13), alert, CT_HANDSHAKE, record)


def test_one_reply_to_many_requests() -> None:
    """RFC 8446 4.6.3: update_requested obliges one KeyUpdate of ours before our next
    application data; several requests while we are silent get that one reply."""
    session = Session(TLS13)
    assert session.quiet
    for _ in range(5):
        session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED)
    assert session.key_update_due
    assert not session.quiet  # a socket's one-read path asks this: the reply comes first
    assert session.key_update() == KEY_UPDATE  # the reply does not ask back
    assert session.key_update_due  # not until it is out
    session.key_update_sent()
    assert not session.key_update_due
    assert session.quiet
    session.receive(CT_HANDSHAKE, KEY_UPDATE)
    assert not session.key_update_due
    session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED)
    assert not session.key_update_due  # still silent: the reply we sent answers it
    session.sending_data()  # about to seal data under that key
    session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED)
    assert session.key_update_due  # the key has sealed data now: a reply of its own
    assert session.key_update(request_peer=True) == KEY_UPDATE_REQUESTED
    session.key_update_sent()  # our own KeyUpdate answers the request too
    assert not session.key_update_due


def test_no_reply_owed_after_our_close_notify() -> None:
    session = Session(TLS13)
    assert session.close_notify() is not None
    assert session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED) == [KeyUpdate(True)]
    assert not session.key_update_due
    with pytest.raises(BrokenPipeError):
        session.key_update()


def test_key_update_is_tls13_only_and_refusing_it_poisons_nothing() -> None:
    session = Session(TLS12)
    with pytest.raises(ValueError, match=r"TLS 1\.3 only"):
        session.key_update()
    assert session.error is None
    session.check_send()


# --- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "message"),
    [(TLS13, TICKET), (TLS12, b"\x00\x00\x00\x00")],
    ids=["NewSessionTicket", "HelloRequest"],
)
def test_a_server_refuses_what_only_servers_send(version: int, message: bytes) -> None:
    """A TLS 1.3 NewSessionTicket and a TLS 1.2 HelloRequest go from server to client only
    (RFC 8446 4.6.1, RFC 5246 7.4.1.1): a server that gets one answers unexpected_message; a
    client takes it, and so does a session whose role is not known."""
    for server_side in (False, None):
        assert len(Session(version, server_side=server_side).receive(CT_HANDSHAKE, message)) == 1
    server = Session(version, server_side=True)
    assert server.server_side is True
    refused(server, A.unexpected_message, CT_HANDSHAKE, message)


def test_a_server_takes_key_updates() -> None:
    server = Session(TLS13, server_side=True)
    assert server.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED) == [KeyUpdate(True)]


@pytest.mark.parametrize("server_side", [1, "server", 0])
def test_role_checked_at_the_edge(server_side: object) -> None:
    with pytest.raises(TypeError, match="server_side"):
        Session(TLS13, server_side=server_side)  # type: ignore[arg-type]


# --- floods ----------------------------------------------------------------------------------


def test_key_updates_in_a_row_are_bounded() -> None:
    """MAX_KEY_UPDATES (32, BoringSSL's kMaxKeyUpdates) KeyUpdates in a row are taken, the next
    one is refused; a non-empty application_data record starts the count again, an empty one,
    a NewSessionTicket or an alert do not."""
    session = Session(TLS13)
    for _ in range(3):
        for i in range(MAX_KEY_UPDATES):
            assert session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED) == [KeyUpdate(True)], i
            session.key_update_sent()
        assert session.receive(CT_APPDATA, b"x") == [ApplicationData(b"x")]
    for _ in range(MAX_KEY_UPDATES - 1):
        session.receive(CT_HANDSHAKE, KEY_UPDATE)
    session.receive(CT_APPDATA, b"")
    session.receive(CT_HANDSHAKE, TICKET)
    session.receive(CT_ALERT, bytes([1, A.user_canceled]))
    session.receive(CT_HANDSHAKE, KEY_UPDATE)  # the 32nd
    refused(session, A.unexpected_message, CT_HANDSHAKE, KEY_UPDATE)


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_empty_records_in_a_row_are_bounded(version: int) -> None:
    """MAX_EMPTY_RECORDS (32, OpenSSL's MAX_EMPTY_RECORDS) empty application_data records in a
    row carry nothing and are taken; the next one is refused; data starts the count again."""
    session = Session(version)
    for _ in range(3):
        for _ in range(MAX_EMPTY_RECORDS):
            assert session.receive(CT_APPDATA, b"") == []
        assert session.receive(CT_APPDATA, b"x") == [ApplicationData(b"x")]
    for _ in range(MAX_EMPTY_RECORDS):
        session.receive(CT_APPDATA, b"")
    refused(session, A.unexpected_message, CT_APPDATA, b"")


def test_the_two_flood_counts_are_apart() -> None:
    """Empty records do not count as KeyUpdates nor the reverse: 32 of each, mixed, are taken."""
    session = Session(TLS13)
    for _ in range(MAX_KEY_UPDATES):
        session.receive(CT_APPDATA, b"")
        session.receive(CT_HANDSHAKE, KEY_UPDATE)
    assert session.error is None


def test_key_update_answer() -> None:
    """What answers the peer's requests, one rule for both sockets: one KeyUpdate
    (update_not_requested) while one is due and sending is open, none after it is sent, none
    after our close_notify."""
    session = Session(TLS13)
    assert session.key_update_answer() is None
    session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED)
    session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED)
    assert session.key_update_answer() == KEY_UPDATE
    session.key_update_sent()
    assert session.key_update_answer() is None
    session.receive(CT_HANDSHAKE, KEY_UPDATE_REQUESTED)
    session.close_notify()
    assert session.key_update_answer() is None


# --- the send-key budget -----------------------------------------------------------------------


def test_records_to_seal_keeps_the_keys_last_record() -> None:
    """The send-key budget, one rule for both sockets: the key's last record is kept (for our
    KeyUpdate in TLS 1.3, for close_notify in TLS 1.2); 0 asks for a KeyUpdate first; where
    none can go, KeyLimitReached names why and that nothing was sent."""
    tls13, tls12 = Session(TLS13), Session(TLS12)
    assert tls13.records_to_seal(10, 10) == 9
    assert tls13.records_to_seal(2, 10) == 1
    assert tls13.records_to_seal(1, 10) == 0
    assert tls13.records_to_seal(2, 10, at_least=2) == 0  # kTLS: a send may close two
    assert tls13.records_to_seal(3, 10, at_least=2) == 2
    with pytest.raises(afalg.errors.KeyLimitReached, match="no rekeying here; nothing was sent"):
        tls13.records_to_seal(1, 10, cannot_update="no rekeying here")
    assert tls12.records_to_seal(2, 10) == 1
    with pytest.raises(afalg.errors.KeyLimitReached, match=r"TLS 1\.2 .*has 1 left"):
        tls12.records_to_seal(1, 10)
    assert tls13.error is None and tls12.error is None  # refusing poisons nothing


# --- errors found by the socket -----------------------------------------------------------------


def test_fail_keeps_the_first_error_and_owes_its_alert_once() -> None:
    session = Session(TLS13)
    first = afalg.TLSProtocolError(A.bad_record_mac, "record failed authentication")
    assert session.fail(first, A.bad_record_mac) is first
    assert session.fail(OSError(errno.EIO, "later"), A.internal_error) is first
    assert session.fatal_alert() == bytes([2, A.bad_record_mac])
    assert session.fatal_alert() is None
    assert_poisoned(session, first)


def test_fail_after_our_close_notify_still_owes_the_alert() -> None:
    session = Session(TLS13)
    session.close_notify()
    session.fail(afalg.TLSProtocolError(A.bad_record_mac, "forged"), A.bad_record_mac)
    assert session.fatal_alert() == bytes([2, A.bad_record_mac])


def test_fail_without_alert() -> None:
    session = Session(TLS13)
    error = OSError(errno.ECONNRESET, "reset")
    session.fail(error)
    assert session.fatal_alert() is None
    assert_poisoned(session, error)


def test_a_bug_inside_receive_poisons_with_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any exception inside receive leaves the state unknown: poisoned, internal_error owed."""
    session = Session(TLS13)

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(session, "_handshake_record", broken)
    with pytest.raises(RuntimeError) as info:
        session.receive(CT_HANDSHAKE, TICKET)
    assert session.error is info.value
    assert session.fatal_alert() == bytes([2, A.internal_error])


def _fail_at_once(threads: int) -> list[tuple[Session, BaseException, bytes | None]]:
    """``threads`` threads fail one session at the same moment, each with its own error, then
    ask for the fatal alert: (session, the error fail() returned, the alert) per thread."""
    session = Session(TLS13)
    barrier = threading.Barrier(threads)
    results: list[tuple[Session, BaseException, bytes | None]] = []

    def fail(i: int) -> None:
        barrier.wait()
        kept = session.fail(afalg.TLSProtocolError(A.unexpected_message, str(i)), 10)
        results.append((session, kept, session.fatal_alert()))

    workers = [threading.Thread(target=fail, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


def test_threads_failing_at_once_owe_one_alert() -> None:
    """A receiver and a sender (or two of each) may fail the session at the same moment: one
    error wins, every thread gets that one back, and one fatal alert is owed, to one thread.
    (Under the GIL of CPython 3.11 the unlocked code could not be caught interleaving here; a
    free-threaded build can, which is what the session's lock is for.)"""
    for _ in range(200):
        results = _fail_at_once(8)
        session = results[0][0]
        assert {id(kept) for _, kept, _ in results} == {id(session.error)}
        assert [alert for _, _, alert in results if alert is not None] == [b"\x02\x0a"]
