"""Adversarial tests of afalg's TLS sockets: a hostile peer after the handshake (garbage,
plaintext, forged, oversized and truncated records) and a careless caller (I/O after close).

Each test runs for ``algif-host`` (AlgTLSSocket on the cryptography backend) on the host and for
``ktls`` and ``algif`` (kernel AEAD) in the VM. The peer is afalg itself on the cryptography
backend, whose TCP socket the tests write raw bytes to. What must hold: a clear TLS error naming
the alert (never a bare OSError/EIO), no byte of an unauthenticated record, the fatal alert sent
to the peer, the connection poisoned, nothing hangs, and every descriptor closed.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from _env import SLOW, WRAP_MODES
from test_tls_helpers import Bg, connect, recv_exactly

import afalg
from afalg.errors import AlertDescription as A
from afalg.errors import KeyUpdateUnsupported
from afalg.ktls import supports_rekey
from afalg.session import MAX_EMPTY_RECORDS, MAX_KEY_UPDATES, MAX_WARNING_ALERTS
from afalg.wire import ContentType, key_update_message

HELLO = b"GET / HTTP/1.0\r\n\r\n"


def open_fds() -> set[int]:
    gc.collect()  # contexts (and their key log memfds) die with the last reference
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def assert_no_fd_leak(session: Callable[[], None]) -> None:
    before = open_fds()
    session()
    leaked = open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                        if os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


def assert_poisoned(ours: object, exc_type: type[Exception] = afalg.TLSProtocolError) -> None:
    with pytest.raises(exc_type):
        ours.recv(10)  # type: ignore[attr-defined]
    with pytest.raises(exc_type):
        ours.send(b"more")  # type: ignore[attr-defined]


def peer_gets_alert(theirs: object, alert: A) -> None:
    """The peer (afalg on cryptography) reads the fatal alert we sent."""
    with pytest.raises(afalg.TLSAlertReceived) as info:
        theirs.recv(10)  # type: ignore[attr-defined]
    assert info.value.alert is alert


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_plaintext_on_the_wire_after_the_handshake(mode: tuple[str, str]) -> None:
    """An HTTP request in clear (first byte 'G' = 71, no such content type): a TLS error with
    an alert, never EIO or data; the peer gets the alert; the connection stays dead."""

    def session() -> None:
        ours, theirs = connect(mode, "server", peer="afalg")
        with ours, theirs:
            theirs._sock.sendall(HELLO)
            with pytest.raises(afalg.TLSProtocolError) as info:
                ours.recv(100)
            assert isinstance(info.value, ssl.SSLError) and isinstance(info.value.alert, A)
            assert info.value.alert.name in str(info.value)
            assert_poisoned(ours)
            peer_gets_alert(theirs, info.value.alert)

    assert_no_fd_leak(session)


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_forged_record_between_good_ones(mode: tuple[str, str], version: str) -> None:
    """good | forged | good in one TCP write: the first comes out, then bad_record_mac, and the
    good record after the forged one is never delivered."""

    def session() -> None:
        ours, theirs = connect(mode, "client", peer="afalg", version=version)
        with ours, theirs:
            layer = theirs.record_layer
            good1 = layer.seal(23, b"good1")
            forged = bytearray(layer.seal(23, b"FORGED"))
            forged[7] ^= 0x20  # a ciphertext byte: the stream cipher would give "FoRGED"
            good2 = layer.seal(23, b"good2")
            theirs._sock.sendall(good1 + bytes(forged) + good2)
            assert recv_exactly(ours, 5) == b"good1"
            with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac") as info:
                ours.recv(100)
            assert info.value.alert is A.bad_record_mac
            assert_poisoned(ours)
            peer_gets_alert(theirs, A.bad_record_mac)

    assert_no_fd_leak(session)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_oversized_record_header(mode: tuple[str, str]) -> None:
    """A TLS 1.3 header announcing 2**14 + 257 bytes: record_overflow (kTLS: EMSGSIZE) as soon
    as the header is seen, without waiting for a body that never comes."""
    ours, theirs = connect(mode, "server", peer="afalg")
    with ours, theirs:
        ours.settimeout(20)
        theirs._sock.sendall(struct.pack(">BHH", 23, 0x0303, 2**14 + 257) + bytes(64))
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.record_overflow
        assert_poisoned(ours)


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("suppress", [True, False], ids=["suppress", "strict"])
def test_truncated_record_then_fin(mode: tuple[str, str], suppress: bool) -> None:
    """Half a record, then the peer's FIN: no byte of it, no hang; EOF (suppress_ragged_eofs)
    or ssl.SSLEOFError, as ssl does."""
    ours, theirs = connect(mode, "client", peer="afalg", suppress_ragged_eofs=suppress)
    with ours, theirs:
        ours.settimeout(20)
        record = theirs.record_layer.seal(23, b"secret payload" * 100)
        theirs._sock.sendall(record[: len(record) // 2])
        theirs._sock.shutdown(2)
        if suppress:
            assert ours.recv(100) == b""
        else:
            with pytest.raises(ssl.SSLEOFError):
                ours.recv(100)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_no_key_in_repr(mode: tuple[str, str]) -> None:
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        keys = [theirs.record_layer.tx_keys, theirs.record_layer.rx_keys]
        texts = [repr(ours), str(ours), repr(theirs), str(theirs), repr(theirs.record_layer)]
        ours.close()
        texts.append(repr(ours))
        for k in keys:
            for secret in (k.key, k.iv, k.secret or b"\x00" * 64):
                assert not any(secret.hex() in t or repr(secret) in t for t in texts), texts


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_io_after_close_is_refused(mode: tuple[str, str], tmp_path) -> None:
    """After close() no buffered plaintext comes out and nothing goes in: EBADF, as ssl."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        theirs.sendall(b"abcdef")
        assert recv_exactly(ours, 2) == b"ab"  # the rest may sit in our buffer
        ours.close()
        ours.close()  # idempotent
        assert ours.fileno() == -1
        (tmp_path / "f").write_bytes(b"file")
        with open(tmp_path / "f", "rb") as f:
            calls = (lambda: ours.recv(10), lambda: ours.send(b"x"), lambda: ours.sendfile(f))
        for call in calls:
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EBADF, info.value


@pytest.mark.parametrize("mode", WRAP_MODES)  # refused before any rekeying, so kTLS < 6.14 too
def test_key_update_must_end_its_record(mode: tuple[str, str]) -> None:
    """RFC 8446 5.1: a message preceding a key change must end at a record boundary (every
    variant of the rule: test_session.py); here, that it is refused before any data is read
    under the next keys, and the peer hears it."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        layer = theirs.record_layer
        wire = layer.seal(22, key_update_message(False) + b"\x04\x00\x00\x00")
        layer.rekey_tx()
        wire += layer.seal(23, b"after the key change")
        theirs._sock.sendall(wire)
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.unexpected_message
        peer_gets_alert(theirs, A.unexpected_message)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_warning_alerts_in_a_row_are_bounded(mode: tuple[str, str]) -> None:
    """TLS 1.2 warning alerts: the connection goes on after MAX_WARNING_ALERTS - 1 in a row
    (data starts a new run), and the MAX_WARNING_ALERTS-th ends it: unexpected_message, raised
    and sent to the peer."""
    ours, theirs = connect(mode, "client", peer="afalg", version="TLSv1.2")
    with ours, theirs:
        for _ in range(MAX_WARNING_ALERTS - 1):
            theirs._send_alert(1, A.no_renegotiation_RESERVED, wait=True)
        theirs.sendall(b"data")
        assert recv_exactly(ours, 4) == b"data"
        for _ in range(MAX_WARNING_ALERTS):
            theirs._send_alert(1, A.no_renegotiation_RESERVED, wait=True)
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.unexpected_message
        assert_poisoned(ours)
        peer_gets_alert(theirs, A.unexpected_message)


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("interleaved", [(23, b"interleaved"), (21, b"\x01\x00")],
                         ids=["application-data", "close-notify"])  # fmt: skip
def test_handshake_message_interrupted(mode: tuple[str, str], interleaved: tuple) -> None:
    """RFC 8446 5.1: no other record between the records of one handshake message."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        layer = theirs.record_layer
        wire = layer.seal(22, b"\x04\x00\x00\x10" + bytes(4))  # first half of a NewSessionTicket
        wire += layer.seal(*interleaved)
        theirs._sock.sendall(wire)
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.unexpected_message


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize(
    ("record", "alert"),
    [(b"", A.unexpected_message), (b"\x04\x7f\xff\xff", A.illegal_parameter)],
    ids=["empty-handshake-record", "8-MiB-ticket"],
)
def test_post_handshake_message_refused_at_its_header(
    mode: tuple[str, str], record: bytes, alert: A
) -> None:
    """An empty handshake record (RFC 8446 5.1 forbids them) and a handshake message announcing
    8 MiB are refused as soon as seen, not buffered."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        layer = theirs.record_layer
        if record:
            wire = layer.seal(22, record)
        else:  # the record layer refuses to seal one: bypass its check
            wire = layer._seal13(layer._tx, ContentType.handshake, memoryview(record))
        theirs._sock.sendall(wire)
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is alert
        peer_gets_alert(theirs, alert)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_forged_record_while_another_thread_is_blocked_sending(mode: tuple[str, str]) -> None:
    """One thread may send while another receives, as with ssl: a forged record ends the
    receiver's recv with bad_record_mac even while the sender is blocked in sendall (the peer
    reads nothing); the fatal alert, best effort, does not wait for the sender."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        ours.settimeout(None)  # blocking: the sender waits for as long as the peer reads nothing
        sender = Bg(lambda: ours.sendall(bytes(2**25)))  # 32 MiB: more than TCP's buffers hold
        queued = [-1, -2, -3]  # the peer's receive queue, polled until it stops growing: the
        while len(set(queued[-3:])) > 1 or not queued[-1]:  # sender is blocked from there on
            assert sender.running(), sender.result()
            time.sleep(0.1 * SLOW)  # under TCG sealing 64 KiB takes a while
            queued.append(
                struct.unpack("i", fcntl.ioctl(theirs._sock, termios.FIONREAD, b"\0" * 4))[0]
            )
        forged = bytearray(theirs.record_layer.seal(23, b"FORGED"))
        forged[7] ^= 0x20
        theirs._sock.sendall(bytes(forged))
        with pytest.raises(afalg.TLSProtocolError) as info:
            Bg(lambda: ours.recv(100)).result(120)
        assert info.value.alert is A.bad_record_mac
        ours._sock.shutdown(socket.SHUT_RDWR)  # the sender's blocked send fails now
        with pytest.raises(OSError):
            sender.result(120)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_a_poisoned_connection_keeps_no_buffer_of_the_caller(mode: tuple[str, str]) -> None:
    """The session keeps its error (every later call raises it) and the error keeps the frames
    it went through: they must not keep the caller's buffers exported. recv() returns the data
    before a forged record (it trims a buffer of its own); the buffers of the calls that raise
    the error can be resized afterwards."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        layer = theirs.record_layer
        good = layer.seal(23, b"good1")
        forged = bytearray(layer.seal(23, b"FORGED"))
        forged[7] ^= 0x20
        theirs._sock.sendall(good + bytes(forged))
        assert recv_exactly(ours, 5) == b"good1"
        buf, data = bytearray(100), bytearray(b"more")
        for _ in range(2):
            with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac"):
                ours.recv_into(buf)
            with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac"):
                ours.send(data)
            with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac"):
                ours.sendall(data)
            buf.extend(b"x")  # BufferError if a view of it were still alive
            data.extend(b"x")


class WatchedLock:
    """A socket's TX lock that tells when a thread other than its holder waits for it (so a
    test knows, without a timer, that a sender has passed its checks and waits for the lock)."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self.contended = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):  # free, or held by this thread (an RLock)
            return True
        if not blocking:
            return False
        self.contended.set()
        return bool(self._lock.acquire(True, timeout))

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> WatchedLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def records_to_eof(theirs: Any) -> list[int]:
    """The content types of every record the peer gets until the connection ends, opened by its
    record layer (no session: nothing is refused, so whatever came after an alert shows)."""
    wire = bytearray()
    while data := theirs._sock.recv(2**16):
        wire += data
    layer = theirs.record_layer
    layer.feed(bytes(wire))
    types = []
    while (record := layer.next_record()) is not None:
        types.append(record.content_type)
    return types


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("how", ["send", "sendall", "sendfile"])
def test_no_application_data_after_our_fatal_alert(
    mode: tuple[str, str], how: str, tmp_path: Any
) -> None:
    """One thread sends while another receives (as with ssl): a sender that passed its checks
    and waits for the TX lock while the receiver fails the connection (a forged record: our
    fatal alert goes out) must not seal its data after that alert: it raises the session's
    error, and the peer reads the alert and nothing after it. (The error is the session's, a
    Finished after the handshake: the record layer itself is not poisoned.)"""
    path = tmp_path / "late"
    path.write_bytes(b"LATE DATA")
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs, path.open("rb") as file:
        calls = {
            "send": lambda: ours.send(b"LATE DATA"),
            "sendall": lambda: ours.sendall(b"LATE DATA"),
            "sendfile": lambda: ours.sendfile(file),
        }
        lock = ours._tx_lock = WatchedLock(ours._tx_lock)
        theirs._sock.sendall(theirs.record_layer.seal(22, b"\x14\x00\x00\x00"))
        with lock:  # a send in progress, as far as the sending thread can tell
            sender = Bg(calls[how])
            assert lock.contended.wait(60 * SLOW), sender.result()
            with pytest.raises(afalg.TLSProtocolError) as info:
                ours.recv(100)  # this thread holds the lock: the alert goes out now
            assert info.value.alert is A.unexpected_message
        with pytest.raises(afalg.TLSProtocolError) as late:
            sender.result(120)
        assert late.value is info.value
        ours.close()
        assert records_to_eof(theirs) == [ContentType.alert]


def key_updates(theirs: Any, n: int) -> bytes:
    """``n`` KeyUpdates (update_not_requested) from the peer, each in its own record under the
    keys the one before announced (the peer's record layer moves on after each)."""
    layer = theirs.record_layer
    wire = b""
    for _ in range(n):
        wire += layer.seal(ContentType.handshake, key_update_message(False))
        layer.rekey_tx()
    return wire


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_key_updates_in_a_row_are_bounded(mode: tuple[str, str]) -> None:
    """MAX_KEY_UPDATES (32) KeyUpdates in a row, then data: all taken; 33 in a row: the 33rd is
    refused with unexpected_message (raised and sent), whatever follows it unread. (kTLS on
    Linux 6.14+ only: older kernels cannot take the first.)"""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        layer = theirs.record_layer
        theirs._sock.sendall(key_updates(theirs, MAX_KEY_UPDATES) + layer.seal(23, b"data"))
        if mode[0] == "ktls" and not supports_rekey():
            with pytest.raises(KeyUpdateUnsupported):
                ours.recv(100)
            return
        assert recv_exactly(ours, 4) == b"data"
        theirs._sock.sendall(key_updates(theirs, MAX_KEY_UPDATES + 1) + layer.seal(23, b"late"))
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.unexpected_message
        assert "33 KeyUpdates" in str(info.value)
        assert_poisoned(ours)
        peer_gets_alert(theirs, A.unexpected_message)


def empty_records(theirs: Any, n: int) -> bytes:
    layer = theirs.record_layer
    return b"".join(layer.seal(ContentType.application_data, b"") for _ in range(n))


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_empty_records_in_a_row(mode: tuple[str, str], version: str) -> None:
    """MAX_EMPTY_RECORDS (32) empty application_data records in a row, then data: the data comes
    out. 33 in a row: in algif mode the 33rd is refused (unexpected_message, raised and sent).
    Under kTLS the kernel never hands an empty record to recvmsg: it opens it (the receive
    sequence number moves on) and reads on within the same call, so the session never sees it
    and the data after 33 (or 100) of them comes out; pinned here on each kernel."""
    ours, theirs = connect(mode, "client", peer="afalg", version=version)
    with ours, theirs:
        layer = theirs.record_layer
        theirs._sock.sendall(empty_records(theirs, MAX_EMPTY_RECORDS) + layer.seal(23, b"data"))
        assert recv_exactly(ours, 4) == b"data"
        if mode[0] == "ktls":
            before = ours.kernel_state().rx_seq
            theirs._sock.sendall(empty_records(theirs, 100) + layer.seal(23, b"late"))
            assert recv_exactly(ours, 4) == b"late"
            assert ours.kernel_state().rx_seq == before + 101
            return
        theirs._sock.sendall(empty_records(theirs, MAX_EMPTY_RECORDS + 1) + layer.seal(23, b"late"))
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.unexpected_message
        assert "33 empty application_data records" in str(info.value)
        assert_poisoned(ours)
        peer_gets_alert(theirs, A.unexpected_message)


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize(
    ("version", "message"),
    [("TLSv1.3", b"\x04\x00\x00\x08" + bytes(8)), ("TLSv1.2", b"\x00\x00\x00\x00")],
    ids=["NewSessionTicket", "HelloRequest"],
)
def test_a_server_refuses_what_only_servers_send(
    mode: tuple[str, str], version: str, message: bytes
) -> None:
    """The role comes from the hand-off: our server, sent a NewSessionTicket (TLS 1.3) or a
    HelloRequest (TLS 1.2) by the client, answers unexpected_message (raised and sent); before,
    the ticket was buffered then dropped and the HelloRequest ignored."""
    ours, theirs = connect(mode, "server", peer="afalg", version=version)
    with ours, theirs:
        assert ours.server_side and ours.tls_session.server_side is True
        assert theirs.tls_session.server_side is False
        theirs._sock.sendall(theirs.record_layer.seal(ContentType.handshake, message))
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert is A.unexpected_message
        assert "from the client" in str(info.value)
        assert_poisoned(ours)
        peer_gets_alert(theirs, A.unexpected_message)


# --- KeyUpdates across a key change (RFC 8446 5.1: a handshake message must not span one) -----


def two_key_updates_one_record_future_keys(layer: Any) -> bytes:
    """tlsfuzzer's "two KeyUpdates in one record with future keys": one record holding a
    KeyUpdate and a second one, sealed under the keys the first announces."""
    layer.rekey_tx()
    return layer.seal(22, key_update_message(False) + key_update_message(True))


def first_fragmented_second_under_new_keys(layer: Any) -> bytes:
    """tlsfuzzer's "two KeyUpdates, first fragmented, second fragment under new keys together
    with second KeyUpdate": the first KeyUpdate's first byte under the current keys, the rest
    of it and a second KeyUpdate in one record under the next keys."""
    message = key_update_message(False)
    wire = layer.seal(22, message[:1])
    layer.rekey_tx()
    return wire + layer.seal(22, message[1:] + key_update_message(True))


def two_key_updates_one_record(layer: Any) -> bytes:
    """tlsfuzzer's "two KeyUpdates in one record", both under the current keys."""
    return layer.seal(22, key_update_message(False) + key_update_message(True))


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize(
    ("forge", "alerts"),
    [
        (two_key_updates_one_record_future_keys, {A.bad_record_mac}),
        (first_fragmented_second_under_new_keys, {A.bad_record_mac, A.unexpected_message}),
        (two_key_updates_one_record, {A.unexpected_message}),
    ],
    ids=["one-record-future-keys", "first-fragmented", "one-record"],
)
@pytest.mark.parametrize("timeout", [None, 30.0 * SLOW], ids=["blocking", "timeout"])
def test_key_updates_spanning_a_key_change(
    mode: tuple[str, str], forge: Callable[[Any], bytes], alerts: set[A], timeout: float | None
) -> None:
    """RFC 8446 5.1 (and 4.6.3): no handshake message may span a key change, and a record
    holding anything after a KeyUpdate is refused. Each of tlsfuzzer's three cases ends the
    connection (bad_record_mac where the record cannot be opened under the keys in force,
    unexpected_message where it can), raised and sent; the data after it is never read."""
    ours, theirs = connect(mode, "server", peer="afalg")
    with ours, theirs:
        ours.settimeout(timeout)  # Python polls before reading with a timeout: another path
        layer = theirs.record_layer
        theirs._sock.sendall(layer.seal(23, b"before"))
        assert recv_exactly(ours, 6) == b"before"
        theirs._sock.sendall(forge(layer) + layer.seal(23, HELLO))
        with pytest.raises(afalg.TLSProtocolError) as info:
            ours.recv(100)
        assert info.value.alert in alerts
        assert_poisoned(ours)
        peer_gets_alert(theirs, info.value.alert)
