"""Record boundaries are not message boundaries: the example server against tlslite-ng.

The example server (examples/tls_echo_server.py with ``--serve-dir``) decides between echo and
HTTP from the bytes, however they are split into records. tlslite-ng, an independent TLS 1.3
stack, is the client; it sends what Python's ``ssl`` cannot: 1-byte records, empty records,
KeyUpdates in a row, a KeyUpdate split over records, and (through its record layer) records of
any type in any order. Every case is written here (after tlsfuzzer's record-layer-fragmentation
and KeyUpdate conversations, none copied).

Modes: ``ktls`` and ``algif`` in the VM; on the host ``userspace`` (plain ``ssl``, the
reference) for the request cases and ``algif`` (on ``cryptography``) for the KeyUpdate cases.
The outcome per kernel: kTLS before Linux 6.14 cannot take a peer's KeyUpdate, so there the
first KeyUpdate ends the connection and the peer reads an ``internal_error`` alert
(docs/guides/conformance.md, "Record fragmentation and KeyUpdates").
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from _env import SERVER_MODES, SLOW
from test_echo_server import Running, _server_can_follow
from tlslite.constants import AlertDescription, ContentType, KeyUpdateMessageType
from tlslite.errors import TLSRemoteAlert
from tlslite.handshakesettings import HandshakeSettings
from tlslite.messages import Message
from tlslite.tlsconnection import TLSConnection

# The KeyUpdate cases: the kernel modes in the VM, and algif on the host (its record layer on
# ``cryptography`` there: the same session code as on the kernel backend).
KEY_UPDATE_MODES = [
    *(p for p in SERVER_MODES if p.values[0] != "userspace"),
    pytest.param("algif", id="algif-host"),
]
REQUEST = b"GET /small.txt HTTP/1.0\r\nHost: localhost\r\n\r\n"
BODY = b"hello over TLS\n"
HANDSHAKE = 60 * SLOW
MAX_KEY_UPDATES = 32  # in a row, then data; the 33rd is fatal (BoringSSL's kMaxKeyUpdates)


@pytest.fixture
def files(tmp_path: Any) -> Any:
    root = tmp_path / "www"
    root.mkdir()
    (root / "small.txt").write_bytes(BODY)
    return root


@pytest.fixture
def server(request: pytest.FixtureRequest, files: Any) -> Iterator[Running]:
    # tlslite-ng's handshake is pure Python (its ECDHE and signatures too): tens of seconds
    # under TCG, so a deadline far from it
    srv = Running(request.param, serve_dir=str(files), handshake_timeout=HANDSHAKE)
    yield srv
    srv.stop()


class Peer:
    """A tlslite-ng TLS 1.3 client of the server, with a count of the KeyUpdates it received."""

    def __init__(self, port: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30 * SLOW)
        self.conn = TLSConnection(sock)
        settings = HandshakeSettings()
        settings.minVersion = settings.maxVersion = (3, 4)
        self.conn.handshakeClientCert(settings=settings, serverName="localhost")
        self.key_updates_received = 0
        handle = self.conn._handle_keyupdate_request

        def counting(request: Any) -> Any:
            self.key_updates_received += 1
            yield from handle(request)

        self.conn._handle_keyupdate_request = counting

    def record(self, content_type: int, payload: bytes) -> None:
        """One record of ``content_type`` with ``payload`` (empty allowed), under the current
        keys; nothing else changes (a handshake message sent this way changes no keys)."""
        for _ in self.conn._sendMsgThroughSocket(Message(content_type, bytearray(payload))):
            pass

    def key_update(self, requested: bool = True, record_size: int | None = None) -> None:
        """A KeyUpdate (in records of ``record_size`` bytes), then our sending keys change."""
        kind = (KeyUpdateMessageType.update_requested if requested
                else KeyUpdateMessageType.update_not_requested)  # fmt: skip
        if record_size is not None:
            self.conn.recordSize = record_size
        for _ in self.conn.send_keyupdate_request(kind):
            pass
        self.conn.recordSize = 2**14

    def write(self, data: bytes, record_size: int = 2**14) -> None:
        self.conn.recordSize = record_size
        self.conn.write(data)
        self.conn.recordSize = 2**14

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            more = self.conn.read(max=n - len(out))
            if not more:
                break
            out += more
        return bytes(out)

    def read_all(self) -> bytes:
        """Everything until the server's close_notify (or the TCP end)."""
        out = b""
        while more := self.conn.read():
            out += more
        return bytes(out)

    def alert(self) -> str:
        """The name of the alert the server sends next; data or an end instead fail the test
        at once (a server that goes on echoes what it should have refused)."""
        with pytest.raises(TLSRemoteAlert) as info:
            data = self.conn.read()
            raise AssertionError(f"read {bytes(data)!r} where an alert was due")
        return AlertDescription.toStr(info.value.description)

    def close(self) -> None:
        self.conn.sock.close()


def _served(response: bytes) -> bool:
    return response.startswith(b"HTTP/1.0 200 OK\r\n") and response.endswith(b"\r\n\r\n" + BODY)


def _outcome(server: Running) -> str:
    (conn,) = server.finished(1, timeout=60 * SLOW)
    return conn.outcome


# --- a request whatever its records ------------------------------------------------------------


@pytest.mark.parametrize("server", SERVER_MODES, indirect=True)
def test_request_in_one_byte_records(server: Running) -> None:
    """``GET`` one byte a record: served, not echoed in pieces (before: the first read, "G",
    decided for echo)."""
    peer = Peer(server.port)
    try:
        peer.write(REQUEST, record_size=1)
        assert _served(peer.read_all())
    finally:
        peer.close()
    assert _outcome(server) == "served"


@pytest.mark.parametrize("server", SERVER_MODES, indirect=True)
def test_request_among_empty_records(server: Running) -> None:
    """Empty application-data records before the request, between each of its bytes and after
    it: they carry no bytes and decide nothing."""
    peer = Peer(server.port)
    try:
        peer.record(ContentType.application_data, b"")
        for byte in REQUEST:
            peer.record(ContentType.application_data, bytes([byte]))
            peer.record(ContentType.application_data, b"")
        assert _served(peer.read_all())
    finally:
        peer.close()
    assert _outcome(server) == "served"


@pytest.mark.parametrize("server", SERVER_MODES, indirect=True)
def test_prefix_of_get_then_echo(server: Running) -> None:
    """Bytes that start like ``GET `` and then differ are echoed once the difference arrives,
    all of them and in order (no timer: the server waited while they were a prefix)."""
    peer = Peer(server.port)
    try:
        peer.write(b"GE", record_size=1)
        peer.write(b"T!")
        assert peer.read(4) == b"GET!"
        peer.write(b"G")
        peer.write(b"ET /not-a-request")  # a request only as the first bytes
        assert peer.read(18) == b"GET /not-a-request"
    finally:
        peer.close()
    assert _outcome(server) == "ok"


# --- KeyUpdates: in a row, split, interleaved ---------------------------------------------------


@pytest.mark.parametrize("server", KEY_UPDATE_MODES, indirect=True)
def test_key_updates_in_a_row_one_answer(server: Running) -> None:
    """32 KeyUpdate requests in a row, then data: the data is echoed under the server's next
    keys, after one KeyUpdate of its own (the requests coalesce into one answer). kTLS before
    6.14: the first KeyUpdate ends the connection with internal_error."""
    can = _server_can_follow(server.server.mode)
    peer = Peer(server.port)
    try:
        for _ in range(MAX_KEY_UPDATES if can else 1):  # else the first is fatal
            peer.key_update(requested=True)
        peer.write(b"ping")
        if not can:
            assert peer.alert() == "internal_error"
            outcome = "alert:internal_error"
        else:
            assert peer.read(4) == b"ping"
            assert peer.key_updates_received == 1
            outcome = "ok"
    finally:
        peer.close()
    assert _outcome(server) == outcome


@pytest.mark.parametrize("server", KEY_UPDATE_MODES, indirect=True)
def test_key_updates_one_too_many(server: Running) -> None:
    """The 33rd KeyUpdate in a row (no application data between) is fatal: unexpected_message.
    kTLS before 6.14: internal_error at the first."""
    can = _server_can_follow(server.server.mode)
    peer = Peer(server.port)
    try:
        for _ in range(MAX_KEY_UPDATES + 1 if can else 1):  # else the first is fatal
            peer.key_update(requested=False)
        peer.write(b"ping")
        alert = peer.alert()
    finally:
        peer.close()
    want = "unexpected_message" if can else "internal_error"
    assert (alert, _outcome(server)) == (want, f"alert:{want}")


@pytest.mark.parametrize("server", KEY_UPDATE_MODES, indirect=True)
def test_key_update_split_over_records(server: Running) -> None:
    """A requested KeyUpdate one byte a record (5 records), then data: followed (the server
    answers and echoes under its next keys). kTLS before 6.14: internal_error."""
    peer = Peer(server.port)
    try:
        peer.write(b"before")
        assert peer.read(6) == b"before"
        peer.key_update(requested=True, record_size=1)
        peer.write(b"after")
        if not _server_can_follow(server.server.mode):
            assert peer.alert() == "internal_error"
            outcome = "alert:internal_error"
        else:
            assert peer.read(5) == b"after"
            assert peer.key_updates_received == 1
            outcome = "ok"
    finally:
        peer.close()
    assert _outcome(server) == outcome


@pytest.mark.parametrize("server", KEY_UPDATE_MODES, indirect=True)
def test_data_between_key_update_fragments(server: Running) -> None:
    """A KeyUpdate's first bytes, an application-data record, then its rest: handshake
    messages are not interleaved with other records (RFC 8446, 5.1), so unexpected_message,
    on every kernel (the KeyUpdate is never whole, so no key changes)."""
    peer = Peer(server.port)
    try:
        peer.write(b"before")
        assert peer.read(6) == b"before"
        peer.record(ContentType.handshake, b"\x18\x00")
        peer.record(ContentType.application_data, b"between")
        peer.record(ContentType.handshake, b"\x00\x01\x01")
        alert = peer.alert()
    finally:
        peer.close()
    assert (alert, _outcome(server)) == ("unexpected_message", "alert:unexpected_message")
