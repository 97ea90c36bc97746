"""The ssl hand-off, on the host (no kernel): the keys and sequence numbers it returns must seal
records Python's ssl accepts and open the records ssl sends, in both roles, TLS 1.2 and 1.3.

The records here are sealed and opened with ``cryptography`` directly (RFC 8446 section 5.2,
RFC 5288, RFC 7905), independently of afalg.record, so a wrong sequence number or key shows up as
ssl refusing our record (bad_record_mac) or our tag check failing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _env import SLOW, scaled
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from test_tls_helpers import EMPTY_NAME_REFUSED

from afalg import handoff
from afalg.keys import TLS_1_3_VERSION, CipherSuite, TrafficKeys

CERTS = Path(__file__).parent / "certs"


def server_context(**kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def client_context(**kw: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(CERTS / "ca.pem")
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(10)
    server.settimeout(10)
    return client, server


# --- an independent record sealer/opener ---------------------------------------------------------


def _aead(keys: TrafficKeys) -> AESGCM | ChaCha20Poly1305:
    if keys.cipher_suite.is_chacha20:
        return ChaCha20Poly1305(keys.key)
    return AESGCM(keys.key)


def seal(keys: TrafficKeys, seq: int, content_type: int, payload: bytes) -> bytes:
    if keys.version == TLS_1_3_VERSION:
        inner = payload + bytes([content_type])
        header = bytes([23, 3, 3]) + (len(inner) + 16).to_bytes(2, "big")
        nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(12, "big"), strict=True))
        return header + _aead(keys).encrypt(nonce, inner, header)
    aad = seq.to_bytes(8, "big") + bytes([content_type, 3, 3]) + len(payload).to_bytes(2, "big")
    if keys.cipher_suite.is_chacha20:
        nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(12, "big"), strict=True))
        body = _aead(keys).encrypt(nonce, payload, aad)
    else:
        explicit = seq.to_bytes(8, "big")
        body = explicit + _aead(keys).encrypt(keys.iv + explicit, payload, aad)
    return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body


def open_record(keys: TrafficKeys, seq: int, record: bytes) -> tuple[int, bytes]:
    header, body = record[:5], record[5:]
    if keys.version == TLS_1_3_VERSION:
        nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(12, "big"), strict=True))
        inner = _aead(keys).decrypt(nonce, body, header).rstrip(b"\0")
        return inner[-1], inner[:-1]
    content_type = header[0]
    if keys.cipher_suite.is_chacha20:
        nonce = bytes(a ^ b for a, b in zip(keys.iv, seq.to_bytes(12, "big"), strict=True))
        ciphertext = body
    else:
        nonce, ciphertext = keys.iv + body[:8], body[8:]
    aad = seq.to_bytes(8, "big") + header[:3] + (len(ciphertext) - 16).to_bytes(2, "big")
    return content_type, _aead(keys).decrypt(nonce, ciphertext, aad)


def read_app_data(sock: socket.socket, keys: TrafficKeys, n: int) -> bytes:
    """Open records from ``sock`` from ``keys.seq`` on until ``n`` bytes of application data
    arrived (skipping NewSessionTicket handshake records)."""
    seq, out = keys.seq, b""
    while len(out) < n:
        record, whole = handoff.read_record(sock)
        assert whole, record
        content_type, payload = open_record(keys, seq, record)
        seq += 1
        if content_type == 23:
            out += payload
        else:
            assert content_type == 22 and payload[0] == 4, (content_type, payload[:4])
    return out


# --- the ssl peer --------------------------------------------------------------------------------


def run_peer(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # reported by the test
            result.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def peer_result(t: threading.Thread, result: list[object]) -> object:
    t.join(20)
    assert result, "peer thread hung"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


TLS12_CIPHERS = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                 "ECDHE-ECDSA-CHACHA20-POLY1305"]  # fmt: skip


def _params() -> list[object]:
    out: list[object] = [pytest.param("TLSv1.3", None, 2, id="tls13")]
    out += [pytest.param("TLSv1.3", None, n, id=f"tls13-tickets{n}") for n in (0, 1, 3)]
    out += [pytest.param("TLSv1.2", c, 2, id=f"tls12-{c}") for c in TLS12_CIPHERS]
    return out


def _contexts(version: str, cipher: str | None, tickets: int) -> tuple[ssl.SSLContext, ...]:
    tls = ssl.TLSVersion.TLSv1_3 if version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    sctx = server_context(maximum_version=tls, num_tickets=tickets)
    cctx = client_context(maximum_version=tls)
    if cipher:
        sctx.set_ciphers(cipher)
    return sctx, cctx


@pytest.mark.parametrize(("version", "cipher", "tickets"), _params())
def test_client_handoff_against_ssl_server(version: str, cipher: str | None, tickets: int) -> None:
    sctx, cctx = _contexts(version, cipher, tickets)
    csock, ssock = tcp_pair()

    def server() -> bytes:
        with sctx.wrap_socket(ssock, server_side=True) as s:
            s.sendall(b"from server")  # right after the handshake
            data = s.recv(100)
            s.sendall(b"again")
            return data

    t, res = run_peer(server)
    with csock:
        h = handoff.handshake(csock, cctx, server_hostname="localhost")
        assert h.ssl_object.version() == version
        assert h.tx.seq == (1 if version == "TLSv1.2" else 0)
        assert h.rx.seq == (1 if version == "TLSv1.2" else 0)
        if cipher:
            assert h.cipher_suite.openssl_name == cipher
        assert read_app_data(csock, h.rx, 11) == b"from server"
        csock.sendall(seal(h.tx, h.tx.seq, 23, b"from client"))
        assert peer_result(t, res) == b"from client"


@pytest.mark.parametrize(("version", "cipher", "tickets"), _params())
def test_server_handoff_against_ssl_client(version: str, cipher: str | None, tickets: int) -> None:
    sctx, cctx = _contexts(version, cipher, tickets)
    csock, ssock = tcp_pair()

    def client() -> bytes:
        with cctx.wrap_socket(csock, server_hostname="localhost") as c:
            c.sendall(b"from client")  # right after the handshake
            return c.recv(100)

    t, res = run_peer(client)
    with ssock:
        h = handoff.handshake(ssock, sctx, server_side=True)
        expected_tx = 1 if version == "TLSv1.2" else tickets
        assert (h.tx.seq, h.rx.seq) == (expected_tx, 1 if version == "TLSv1.2" else 0)
        assert read_app_data(ssock, h.rx, 11) == b"from client"
        ssock.sendall(seal(h.tx, h.tx.seq, 23, b"from server"))
        assert peer_result(t, res) == b"from server"


def test_both_ends_handoff_tls13_suites_agree() -> None:
    """Two hand-offs on one connection derive mirror-image keys."""
    sctx, cctx = _contexts("TLSv1.3", None, 1)
    csock, ssock = tcp_pair()
    t, res = run_peer(lambda: handoff.handshake(ssock, sctx, server_side=True))
    h = handoff.handshake(csock, cctx, server_hostname="localhost")
    hs = peer_result(t, res)
    assert isinstance(hs, handoff.Handoff)
    assert (h.tx.key, h.tx.iv, h.rx.key) == (hs.rx.key, hs.rx.iv, hs.tx.key)
    assert hs.tx.seq == 1 and h.rx.seq == 0
    assert h.cipher_suite is CipherSuite.TLS_AES_256_GCM_SHA384
    assert "key" not in repr(h).lower().replace("tx_seq", "")
    csock.close()
    ssock.close()


def test_nothing_read_past_the_handshake() -> None:
    """Bytes the peer sends right behind its last handshake record stay in the socket."""
    sctx, cctx = _contexts("TLSv1.2", TLS12_CIPHERS[0], 0)
    csock, ssock = tcp_pair()

    def server() -> None:
        with sctx.wrap_socket(ssock, server_side=True) as s:
            s.sendall(b"x" * 5000)
            s.recv(1)

    t, res = run_peer(server)
    h = handoff.handshake(csock, cctx, server_hostname="localhost")
    assert read_app_data(csock, h.rx, 5000) == b"x" * 5000
    csock.sendall(seal(h.tx, h.tx.seq, 23, b"!"))
    peer_result(t, res)
    csock.close()


def test_keylog_forwarded_and_not_accumulated(tmp_path: Path) -> None:
    user_log = tmp_path / "keys.log"
    sctx, cctx = _contexts("TLSv1.3", None, 0)
    cctx.keylog_filename = str(user_log)
    for _ in range(3):
        csock, ssock = tcp_pair()
        t, res = run_peer(lambda s=ssock: sctx.wrap_socket(s, server_side=True).close())
        h = handoff.handshake(csock, cctx, server_hostname="localhost")
        peer_result(t, res)
        csock.close()
    log = handoff.keylog_for(cctx)
    assert cctx.keylog_filename == log.path
    assert log.forward_to == str(user_log)
    lines = user_log.read_text().splitlines()
    assert sum("CLIENT_TRAFFIC_SECRET_0" in line for line in lines) == 3
    assert h.client_random.hex() in user_log.read_text()
    # Nothing left in memory: no pending connections and only zeros in the memfd.
    assert not log._expected
    fd = int(log.path.rsplit("/", 1)[1])
    size = os.fstat(fd).st_size
    assert size > 0 and os.pread(fd, size, 0).strip(b"\0") == b""


def test_failed_handshake_forgets_secrets() -> None:
    sctx, _ = _contexts("TLSv1.3", None, 0)
    cctx = client_context()  # verifies against our CA, but asks for the wrong name
    csock, ssock = tcp_pair()
    t, _res = run_peer(lambda: sctx.wrap_socket(ssock, server_side=True))
    with pytest.raises(ssl.SSLCertVerificationError):
        handoff.handshake(csock, cctx, server_hostname="wrong.example")
    t.join(10)
    assert not handoff.keylog_for(cctx)._expected
    csock.close()
    ssock.close()


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("role", ["client", "server"])
def test_mutual_authentication(version: str, role: str) -> None:
    """The server asks for a client certificate (CertificateRequest; in TLS 1.3 the client's
    Certificate and CertificateVerify come with its Finished): the hand-off's sequence numbers
    still hold, and the afalg side sees the peer's certificate."""
    from afalg import tls

    cipher = TLS12_CIPHERS[0] if version == "TLSv1.2" else None
    sctx, cctx = _contexts(version, cipher, 1)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(CERTS / "ca.pem")
    cctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    csock, ssock = tcp_pair()
    if role == "client":
        t, res = run_peer(lambda: sctx.wrap_socket(ssock, server_side=True))
        conn = tls.wrap(csock, cctx, server_hostname="localhost", mode="algif",
                        algif_backend="cryptography")  # fmt: skip
    else:
        t, res = run_peer(lambda: cctx.wrap_socket(csock, server_hostname="localhost"))
        conn = tls.wrap(ssock, sctx, server_side=True, mode="algif", algif_backend="cryptography")
    peer = peer_result(t, res)
    with conn, peer:
        assert conn.version() == version
        assert peer.getpeercert() and conn.getpeercert()  # each side verified the other
        conn.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        peer.sendall(b"pong")
        assert conn.recv(4) == b"pong"


def test_post_handshake_client_auth_is_refused_by_name() -> None:
    """A TLS 1.3 server asks for a client certificate after the handshake (the client context
    offered post_handshake_auth). The keys left ssl, so it cannot be answered: a clear error
    naming the setting, and the server gets unexpected_message."""
    import afalg
    from afalg import tls

    sctx, cctx = _contexts("TLSv1.3", None, 0)
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.post_handshake_auth = True
    sctx.load_verify_locations(CERTS / "ca.pem")
    cctx.post_handshake_auth = True
    cctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    csock, ssock = tcp_pair()

    def server() -> ssl.SSLSocket:
        s = sctx.wrap_socket(ssock, server_side=True)
        s.verify_client_post_handshake()
        s.sendall(b"x")  # the CertificateRequest goes out before it
        s.recv(10)
        return s

    t, res = run_peer(server)
    conn = tls.wrap(csock, cctx, server_hostname="localhost", mode="algif",
                    algif_backend="cryptography")  # fmt: skip
    with conn:
        with pytest.raises(afalg.TLSProtocolError, match="post_handshake_auth") as info:
            conn.recv(10)
        assert info.value.alert == afalg.AlertDescription.unexpected_message
    with pytest.raises(ssl.SSLError, match="UNEXPECTED_MESSAGE"):
        peer_result(t, res)


@pytest.mark.parametrize("role", ["client", "server"])
def test_hello_retry_request(role: str) -> None:
    """The server accepts only secp384r1, the client's first key share is x25519: a
    HelloRetryRequest and a second ClientHello (same random). The hand-off still finds the
    keys and sequence numbers, and data flows both ways right after it."""
    counts = []
    for curve in (None, "secp384r1"):
        sctx, cctx = _contexts("TLSv1.3", None, 1)
        if curve:
            sctx.set_ecdh_curve(curve)
        csock, ssock = tcp_pair()
        if role == "client":
            t, res = run_peer(lambda s=ssock, c=sctx: c.wrap_socket(s, server_side=True))
            h = handoff.handshake(csock, cctx, server_hostname="localhost")
            ours, theirs = csock, ssock
        else:
            t, res = run_peer(lambda s=csock, c=cctx: c.wrap_socket(s, server_hostname="localhost"))
            h = handoff.handshake(ssock, sctx, server_side=True)
            ours, theirs = ssock, csock
        peer = peer_result(t, res)
        counts.append(h.records_sent + h.records_received)
        ours.sendall(seal(h.tx, h.tx.seq, 23, b"ping"))
        assert peer.recv(4) == b"ping"
        peer.sendall(b"pong")
        assert read_app_data(ours, h.rx, 4) == b"pong"
        peer.close()
        ours.close()
        theirs.close()
    assert counts[1] > counts[0]  # the retry added records: it did happen


@pytest.mark.parametrize(
    "garbage",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x02\x00\x00\x10", b"\x63\x03\x03\x00\x10"],
    ids=["http-request", "major-version-2", "content-type-99"],
)
def test_header_that_is_not_tls_fails_at_once(garbage: bytes) -> None:
    """A header with a type outside 20..23 or a major version other than 3 is refused at once:
    the handshake does not wait for the body its length field would announce."""
    csock, ssock = tcp_pair()
    ssock.settimeout(30)
    csock.sendall(garbage)  # the connection stays open: only the header can end the wait
    sctx, _ = _contexts("TLSv1.3", None, 0)
    started = time.monotonic()
    with pytest.raises(ssl.SSLError):
        handoff.handshake(ssock, sctx, server_side=True)
    assert time.monotonic() - started < 10
    assert not handoff.keylog_for(sctx)._expected
    csock.close()
    ssock.close()


@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")
def test_one_context_in_both_roles_of_one_connection() -> None:
    """Client and server of one loopback connection share a context (so a key log and a client
    random): each role has its own pending entry, both get the keys."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS)
    ctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    ctx.load_verify_locations(CERTS / "ca.pem")
    csock, ssock = tcp_pair()
    t, res = run_peer(lambda: handoff.handshake(ssock, ctx, server_side=True))
    h = handoff.handshake(csock, ctx, server_hostname="localhost")
    hs = peer_result(t, res)
    assert isinstance(hs, handoff.Handoff)
    assert (h.tx.key, h.rx.key) == (hs.rx.key, hs.tx.key)
    assert not handoff.keylog_for(ctx)._expected
    csock.close()
    ssock.close()


def test_closed_keylog_is_replaced() -> None:
    sctx, cctx = _contexts("TLSv1.3", None, 0)
    log = handoff.keylog_for(cctx)
    log.close()
    assert log.closed and "closed" in repr(log)
    with pytest.raises(ValueError, match="closed"):
        log.expect(bytes(32), False)
    csock, ssock = tcp_pair()
    t, res = run_peer(lambda: sctx.wrap_socket(ssock, server_side=True).close())
    handoff.handshake(csock, cctx, server_hostname="localhost")
    peer_result(t, res)
    new = handoff.keylog_for(cctx)
    assert new is not log and not new.closed and new.forward_to is None
    csock.close()


def test_handshake_honours_timeout() -> None:
    csock, ssock = tcp_pair()  # the server never answers
    csock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        handoff.handshake(csock, client_context(), server_hostname="localhost")
    csock.close()
    ssock.close()


def test_nonblocking_socket_refused() -> None:
    csock, ssock = tcp_pair()
    csock.setblocking(False)
    with pytest.raises(ValueError, match="blocking"):
        handoff.handshake(csock, client_context(), server_hostname="localhost")
    csock.close()
    ssock.close()


# --- session resumption (the hand-off leaves sessions to ssl) ----------------------------------


def _algif_pair(sctx: ssl.SSLContext, cctx: ssl.SSLContext, session: object = None) -> tuple:
    from afalg import tls

    csock, ssock = tcp_pair()
    t, res = run_peer(lambda: sctx.wrap_socket(ssock, server_side=True))
    conn = tls.wrap(csock, cctx, server_hostname="localhost", mode="algif",
                    algif_backend="cryptography", session=session)  # fmt: skip
    return conn, peer_result(t, res)


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_client_resumes_a_session(version: str) -> None:
    """TLS 1.2: the ticket comes inside the handshake, ssl has it. TLS 1.3: the server's
    NewSessionTickets arrive after the hand-off, opened by afalg, not ssl; the TicketFeed
    passes them back to ssl. Either way ``session`` resumes (an abbreviated or PSK handshake
    on both ends) with the right keys and sequence numbers."""
    cipher = TLS12_CIPHERS[2] if version == "TLSv1.2" else None
    sctx, cctx = _contexts(version, cipher, 2)
    conn, peer = _algif_pair(sctx, cctx)
    with conn, peer:
        if version == "TLSv1.3":
            assert conn.session is None or not conn.session.has_ticket
        peer.sendall(b"1")
        assert conn.recv(1) == b"1"  # in TLS 1.3 the two tickets came first
        session = conn.session
        assert session is not None and session.has_ticket
    conn, peer = _algif_pair(sctx, cctx, session)
    with conn, peer:
        assert conn.session_reused and peer.session_reused
        conn.sendall(b"2")
        assert peer.recv(1) == b"2"
        peer.sendall(b"3")
        assert conn.recv(1) == b"3"
    if version == "TLSv1.3":
        assert "TicketFeed stopped" in repr(conn._tickets)  # closed with the connection


def test_ticket_feed_after_key_updates() -> None:
    """A ticket that comes after two KeyUpdates (sealed under the third key generation) still
    reaches ssl, whose copy of the keys stays at the first (OpenSSL stores any ticket a server
    sends; this one is made up, so it is only stored, not resumed)."""
    from afalg import tls

    sctx, cctx = _contexts("TLSv1.3", None, 0)  # no tickets from the handshake
    csock, ssock = tcp_pair()
    t, res = run_peer(lambda: tls.wrap(ssock, sctx, server_side=True, mode="algif",
                                       algif_backend="cryptography"))  # fmt: skip
    conn = tls.wrap(csock, cctx, server_hostname="localhost", mode="algif",
                    algif_backend="cryptography")  # fmt: skip
    srv = peer_result(t, res)
    with conn, srv:
        srv.key_update()
        srv.key_update()
        body = (7200).to_bytes(4, "big") + bytes(4) + b"\x01n" + b"\x00\x05" + b"tickt"
        body += b"\x00\x00"  # no extensions
        srv._sock.sendall(srv.record_layer.seal(22, b"\x04" + len(body).to_bytes(3, "big") + body))
        srv.sendall(b"after two updates")
        assert conn.recv(100) == b"after two updates"
        assert "TicketFeed active" in repr(conn._tickets)
        assert conn.session is not None and conn.session.has_ticket


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_server_side_resumption(version: str) -> None:
    """An ssl client resumes with the ticket our server's ssl issued; the abbreviated handshake
    gives the right keys and sequence numbers too."""
    from afalg import tls

    sctx, cctx = _contexts(version, TLS12_CIPHERS[0] if version == "TLSv1.2" else None, 1)
    session = None
    for attempt in range(2):
        csock, ssock = tcp_pair()

        def client(sock: socket.socket = csock, s: object = session) -> tuple:
            c = cctx.wrap_socket(sock, server_hostname="localhost", session=s)
            c.sendall(b"hi")
            data = c.recv(5)
            return c, data

        t, res = run_peer(client)
        srv = tls.wrap(ssock, sctx, server_side=True, mode="algif", algif_backend="cryptography")
        with srv:
            assert srv.recv(2) == b"hi"
            srv.sendall(b"hello")
            c, data = peer_result(t, res)
            assert data == b"hello"
            assert srv.session_reused == (attempt == 1)
            session = c.session
            c.close()


# --- the key log: other connections' secrets, fork ----------------------------------------------


def memfd_contents(log: handoff.KeyLog) -> bytes:
    """The memfd read back through its path, holes (read back as zeros) left out."""
    with open(log.path, "rb") as f:
        return f.read().replace(b"\0", b"")


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_plain_connections_on_the_context_leave_no_secret_in_the_memfd(version: str) -> None:
    """After an afalg hand-off both contexts carry afalg's key log; connections made with
    ``ctx.wrap_socket`` on them log there too. Once their handshake has finished (or failed),
    nothing of theirs may be left in the memfd."""
    cipher = None if version == "TLSv1.3" else TLS12_CIPHERS[0]
    sctx, cctx = _contexts(version, cipher, 1)
    csock, ssock = tcp_pair()
    t, res = run_peer(lambda: handoff.handshake(ssock, sctx, server_side=True))
    handoff.handshake(csock, cctx, server_hostname="localhost")
    peer_result(t, res)
    csock.close()
    ssock.close()
    slog, clog = handoff.keylog_for(sctx), handoff.keylog_for(cctx)
    assert memfd_contents(slog) == memfd_contents(clog) == b""

    for _ in range(3):
        csock, ssock = tcp_pair()

        def server(ssock: socket.socket = ssock) -> bytes:
            with sctx.wrap_socket(ssock, server_side=True) as s:
                left = memfd_contents(slog)  # the server's handshake has finished
                s.sendall(s.recv(4))
                return left

        t, res = run_peer(server)
        with cctx.wrap_socket(csock, server_hostname="localhost") as c:
            assert memfd_contents(clog) == b""  # the client's handshake has finished
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        assert peer_result(t, res) == b""
        assert memfd_contents(slog) == memfd_contents(clog) == b""

    # A failed handshake: the client refuses the certificate (wrong name) after both ends
    # derived their handshake secrets (TLS 1.3: the server all of its secrets).
    csock, ssock = tcp_pair()

    def failing_server() -> bytes:
        with pytest.raises((ssl.SSLError, OSError)):
            sctx.wrap_socket(ssock, server_side=True)
        return memfd_contents(slog)

    t, res = run_peer(failing_server)
    with pytest.raises(ssl.SSLCertVerificationError):
        cctx.wrap_socket(csock, server_hostname="wrong.example")
    assert memfd_contents(clog) == b""
    assert peer_result(t, res) == b""
    csock.close()
    ssock.close()
    assert not slog._expected and not clog._expected


def test_plain_ssl_objects_leave_no_secret_in_the_memfd() -> None:
    """The same through ``wrap_bio`` (asyncio's way), the handshake driven by hand."""
    sctx, cctx = _contexts("TLSv1.3", None, 0)
    slog = handoff.keylog_for(sctx)
    sin, sout, cin, cout = (ssl.MemoryBIO() for _ in range(4))
    server = sctx.wrap_bio(sin, sout, server_side=True)
    client = cctx.wrap_bio(cin, cout, server_hostname="localhost")
    for _ in range(4):
        for obj, out, peer_in in ((client, cout, sin), (server, sout, cin)):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
            peer_in.write(out.read())
            assert memfd_contents(slog) == b""
    assert server.version() == client.version() == "TLSv1.3"


def _prefork_worker(listener: socket.socket, sctx: ssl.SSLContext, out: int) -> None:
    """One worker of a pre-fork server: hand off every connection it accepts, echo one record
    with the keys, and report each connection on ``out`` (one line, written atomically)."""
    log = handoff.keylog_for(sctx)
    os.write(
        out, f"log {os.getpid()} {os.fstat(int(log.path.rsplit('/', 1)[1])).st_ino}\n".encode()
    )
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return  # the parent shut the listener down
        with conn:
            conn.settimeout(30 * SLOW)
            try:
                h = handoff.handshake(conn, sctx, server_side=True)
                data = read_app_data(conn, h.rx, 4)
                conn.sendall(seal(h.tx, h.tx.seq, 23, data))
                line = f"ok {os.getpid()} {data.decode()}"
            except Exception as exc:  # reported to the parent
                line = f"fail {os.getpid()} {exc!r}".replace("\n", " ")
        os.write(out, line.encode()[:400] + b"\n")


def test_pre_fork_server_works_in_every_worker() -> None:
    """The key log exists before ``fork()``; two workers share the listener. Worker A holds a
    connection whose server flight (with every secret of it) is out while worker B hands off
    many others; then A's connection finishes. Every connection must get its keys (before the
    fix the workers shared the memfd and B punched out A's lines), and each worker has a memfd
    of its own."""
    sctx, cctx = _contexts("TLSv1.3", None, 0)
    parent_log = handoff.keylog_for(sctx)
    parent_inode = os.fstat(int(parent_log.path.rsplit("/", 1)[1])).st_ino
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    address = listener.getsockname()
    results_r, results_w = os.pipe()
    workers = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the worker)
            status = 1
            try:
                os.close(results_r)
                _prefork_worker(listener, sctx, results_w)
                status = 0
            finally:
                os._exit(status)
        workers.append(pid)
    os.close(results_w)
    timeout = 30 * SLOW
    try:
        # Client 1: its ClientHello out, the server's whole flight in; its Finished held back.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        first = cctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        with contextlib.suppress(ssl.SSLWantReadError):
            first.do_handshake()
        first_sock = socket.create_connection(address, timeout=timeout)
        first_sock.sendall(outgoing.read())
        while True:
            record, whole = handoff.read_record(first_sock)
            assert whole, record
            incoming.write(record)
            try:
                first.do_handshake()
                break
            except ssl.SSLWantReadError:
                continue
        finished = outgoing.read()

        def client(n: int) -> bytes:
            sock = socket.create_connection(address, timeout=timeout)
            with cctx.wrap_socket(sock, server_hostname="localhost") as c:
                c.sendall(b"%04d" % n)
                return c.recv(4)

        def many(start: int, count: int) -> None:
            threads = [run_peer(lambda n=n: client(n)) for n in range(start, start + count)]
            for n, (t, res) in zip(range(start, start + count), threads, strict=True):
                t.join(timeout)
                assert res == [b"%04d" % n], res

        count = scaled(30, 120)
        many(1, count)  # all by the other worker: the first one's is waiting for client 1
        first.write(b"0000")
        first_sock.sendall(finished + outgoing.read())
        while True:
            try:
                assert first.read(4) == b"0000"
                break
            except ssl.SSLWantReadError:
                record, whole = handoff.read_record(first_sock)
                assert whole, f"worker ended client 1's connection: {record!r}"
                incoming.write(record)
        first_sock.close()
        many(1 + count, count)  # both workers free
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes both workers' accept()
        listener.close()
        deadline = time.monotonic() + timeout
        statuses = {}
        while len(statuses) < len(workers) and time.monotonic() < deadline:
            for pid in workers:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        statuses[pid] = status
            time.sleep(0.05)
        for pid in workers:
            if pid not in statuses:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
        with os.fdopen(results_r, "rb") as f:
            lines = f.read().decode().splitlines()
    assert all(os.waitstatus_to_exitcode(s) == 0 for s in statuses.values()), statuses
    assert sorted(statuses) == sorted(workers), "a worker did not stop"
    failures = [line for line in lines if not line.startswith(("ok ", "log "))]
    assert not failures, failures
    served = [line.split() for line in lines if line.startswith("ok ")]
    assert sorted(int(n) for _ok, _pid, n in served) == list(range(2 * count + 1))
    assert {int(pid) for _ok, pid, _n in served} == set(workers)  # both workers served
    inodes = {
        int(inode)
        for _log, _pid, inode in (line.split() for line in lines if line.startswith("log "))
    }
    assert len(inodes) == 2 and parent_inode not in inodes  # a memfd per process


# --- ssl's rules for the arguments of the blocking entry points --------------------------------


def _nothing_sent(peer: socket.socket) -> bool:
    peer.setblocking(False)
    try:
        return peer.recv(1) == b""  # EOF would mean closed, which is also "nothing sent"
    except BlockingIOError:
        return True


def _wrap(sock: socket.socket, ctx: ssl.SSLContext, **kw: Any) -> Any:
    from afalg import tls

    return tls.wrap(sock, ctx, mode="algif", algif_backend="cryptography", **kw)


ENTRY_POINTS: dict[str, Callable[..., Any]] = {
    "wrap": _wrap,
    "handshake": handoff.handshake,
    "Handshake": lambda sock, ctx, **kw: handoff.Handshake(ctx, **kw),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_check_hostname_requires_server_hostname(entry: str) -> None:
    """As ``ctx.wrap_socket(sock)``: a client context that checks host names, and no name to
    check, is refused before a byte is sent (and the socket is left to the caller, as ssl
    leaves it)."""
    csock, ssock = tcp_pair()
    with csock, ssock:
        with pytest.raises(ValueError, match=r"^check_hostname requires server_hostname$"):
            ENTRY_POINTS[entry](csock, client_context())
        assert _nothing_sent(ssock)
        assert csock.fileno() != -1


@pytest.mark.parametrize("entry", ["wrap", "handshake"])
def test_empty_server_hostname_is_refused_as_ssl_refuses_it(entry: str) -> None:
    csock, ssock = tcp_pair()
    with csock, ssock:
        with pytest.raises(ValueError, match=r"^check_hostname requires server_hostname$"):
            ENTRY_POINTS[entry](csock, client_context(), server_hostname="")
        assert _nothing_sent(ssock)


@pytest.mark.parametrize("entry", ["wrap", "handshake"])
def test_server_side_arguments_follow_ssl(entry: str) -> None:
    csock, ssock = tcp_pair()
    with csock, ssock:
        with pytest.raises(ValueError, match=r"^server_hostname can only be specified in client"):
            ENTRY_POINTS[entry](ssock, server_context(), server_side=True, server_hostname="x")
        with pytest.raises(ValueError, match=r"^check_hostname requires server_hostname$"):
            ENTRY_POINTS[entry](ssock, server_context(check_hostname=True), server_side=True)
        assert _nothing_sent(csock)


def test_check_arguments_is_ssls_rules_before_a_byte() -> None:
    """handoff.check_arguments alone: what ctx.wrap_socket refuses, refused the same way, and
    what it accepts, accepted; nothing sent either way."""
    csock, ssock = tcp_pair()
    with csock, ssock:
        handoff.check_arguments(csock, client_context(), server_hostname="localhost")
        handoff.check_arguments(ssock, server_context(), server_side=True)
        for sock, ctx, kwargs, error, match in [
            (csock, client_context(), {}, ValueError, "^check_hostname requires server_hostname$"),
            (csock, client_context(), {"server_hostname": ""}, ValueError, "requires"),
            (
                ssock,
                server_context(),
                {"server_side": True, "server_hostname": "x"},
                ValueError,
                "only be specified in client",
            ),
            (csock, object(), {}, TypeError, "must be an ssl.SSLContext"),
            (object(), client_context(), {}, TypeError, "must be a socket.socket"),
        ]:
            with pytest.raises(error, match=match):
                handoff.check_arguments(sock, ctx, **kwargs)  # type: ignore[arg-type]
        assert _nothing_sent(csock) and _nothing_sent(ssock)


def test_core_empty_server_hostname_turns_the_check_off_on_purpose() -> None:
    """The sans-I/O core takes asyncio's convention (its drivers apply asyncio's rules):
    ``server_hostname=""`` verifies the chain and checks no name; from Python 3.14 ssl's
    wrap_bio() refuses it under check_hostname, and so does the core (asyncio too)."""
    if EMPTY_NAME_REFUSED:
        with pytest.raises(ValueError, match="check_hostname requires server_hostname"):
            handoff.Handshake(client_context(), server_hostname="")
        return
    hs = handoff.Handshake(client_context(), server_hostname="")
    assert hs.ssl_object.server_hostname is None
    hs.close()


@pytest.mark.parametrize("entry", ["wrap", "handshake"])
def test_certificate_for_another_host_is_refused(entry: str) -> None:
    """The name is checked: the test certificate names localhost, not example.org."""
    csock, ssock = tcp_pair()
    with csock, ssock:
        t, res = run_peer(lambda: server_context().wrap_socket(ssock, server_side=True))
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            ENTRY_POINTS[entry](csock, client_context(), server_hostname="example.org")
        with pytest.raises(ssl.SSLError):
            peer_result(t, res)  # it heard our bad_certificate alert


@pytest.mark.parametrize("entry", ["wrap", "handshake"])
def test_check_hostname_off_needs_no_server_hostname(entry: str) -> None:
    csock, ssock = tcp_pair()
    with csock, ssock:
        t, res = run_peer(lambda: server_context().wrap_socket(ssock, server_side=True))
        ours = ENTRY_POINTS[entry](csock, client_context(check_hostname=False))
        peer = peer_result(t, res)
        assert isinstance(peer, ssl.SSLSocket)
        if entry == "wrap":
            ours.sendall(b"ping")
            assert peer.recv(4) == b"ping"
        else:
            assert isinstance(ours, handoff.Handoff)
            assert ours.ssl_object.server_hostname is None
        peer.close()


# --- sockets that cannot carry the handshake ---------------------------------------------------


@pytest.mark.parametrize("entry", ["wrap", "handshake"])
def test_an_ssl_socket_is_already_tls(entry: str) -> None:
    csock, ssock = tcp_pair()
    with csock, ssock:
        t, res = run_peer(lambda: server_context().wrap_socket(ssock, server_side=True))
        with client_context().wrap_socket(csock, server_hostname="localhost") as tlssock:
            peer = peer_result(t, res)
            assert isinstance(peer, ssl.SSLSocket)
            with pytest.raises(TypeError, match="already a TLS socket"):
                ENTRY_POINTS[entry](tlssock, client_context(), server_hostname="localhost")
            tlssock.sendall(b"still usable")  # refused before anything was sent on it
            assert peer.recv(12) == b"still usable"
            peer.close()


@pytest.mark.parametrize("entry", ["wrap", "handshake"])
@pytest.mark.parametrize("state", ["fresh", "listening"])
@pytest.mark.parametrize("server_side", [False, True], ids=["client", "server"])
def test_an_unconnected_socket_is_named(entry: str, state: str, server_side: bool) -> None:
    ctx = server_context() if server_side else client_context()
    hostname = None if server_side else "localhost"
    with socket.socket() as sock:
        if state == "listening":
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        with pytest.raises(OSError, match="not connected") as info:
            ENTRY_POINTS[entry](sock, ctx, server_side=server_side, server_hostname=hostname)
        assert info.value.errno == errno.ENOTCONN
        assert not isinstance(info.value, BrokenPipeError)
