"""Adversarial tests of the ssl hand-off (afalg.handoff) on the host: hostile or replayed
handshakes must cost only their own connection, never another connection's keys.

The server side of :func:`afalg.handoff.handshake` learns its traffic secrets from OpenSSL's key
log, whose lines are keyed by the ClientHello random. That random is chosen by the client and is
public (it crosses the wire in clear), so a hostile client can reuse the random of a concurrent
honest connection. The tests below play that client with Python's ssl over MemoryBIOs, the
ClientHello rewritten to carry the honest client's random.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tls_helpers import Bg, client_context, server_context, tcp_pair

from afalg import handoff, tls
from afalg.errors import HandoffError
from afalg.keys import UnsupportedCipherSuite

HELLO_RANDOM = slice(11, 43)  # record header (5) + msg_type (1) + length (3) + version (2)


class MemoryClient:
    """A Python ssl client driven by hand over MemoryBIOs, on its own TCP connection."""

    def __init__(self, ctx: ssl.SSLContext, address: tuple[str, int]) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        self.client_hello = self.outgoing.read()
        self.sock = socket.create_connection(address, timeout=10)

    def read_record(self) -> bytes:
        record, whole = handoff.read_record(self.sock)
        assert whole, f"server ended the connection: {record!r}"
        return record

    def run_until_finished(self) -> bytes:
        """Feed the server's flight to ssl until the client is done; return the client's last
        flight (its Finished), not yet sent."""
        while True:
            self.incoming.write(self.read_record())
            try:
                self.obj.do_handshake()
                return self.outgoing.read()
            except ssl.SSLWantReadError:
                continue

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def handoff_server(sctx: ssl.SSLContext) -> Iterator[tuple[tuple[str, int], Callable[[], Any]]]:
    """A listening socket's address, and ``serve()``: accept one connection and run the
    server-side hand-off on it (to run in a :class:`Bg`)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> handoff.Handoff:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with conn:
                return handoff.handshake(conn, sctx, server_side=True)

        yield listener.getsockname(), serve


def _logged_secret(path: Path, label: str, client_random: bytes) -> bytes:
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == label and fields[1] == client_random.hex():
            return bytes.fromhex(fields[2])
    raise AssertionError(f"{label} not in {path}")


def _server_answer(sock: socket.socket) -> bytes:
    """What the server sent first: ``b""`` (it ended the connection), ``b"alert"`` (an alert
    record), else the record itself."""
    try:
        record, whole = handoff.read_record(sock)
    except ConnectionResetError:  # closed with our bytes unread: also an end
        return b""
    if not whole:
        return b""
    return b"alert" if record[0] == 21 else record


def test_replayed_client_random_cannot_steal_or_break_another_handshake(tmp_path: Path) -> None:
    """The client picks the ClientHello random and it is public. A second handshake replaying
    a pending one's random is refused before ssl sees it; it neither shares nor discards the
    honest connection's secrets."""
    sctx = server_context()
    honest_log = tmp_path / "honest.keylog"
    with handoff_server(sctx) as (address, serve):
        # The honest client gets the server's whole first flight (the server has logged the
        # honest connection's application traffic secrets) and holds its Finished.
        honest = MemoryClient(client_context(keylog_filename=str(honest_log)), address)
        honest_server = Bg(serve)
        honest.sock.sendall(honest.client_hello)
        finished = honest.run_until_finished()
        random = honest.client_hello[HELLO_RANDOM]

        # A hostile client replays the honest random in its own ClientHello.
        hostile = MemoryClient(client_context(), address)
        hostile_server = Bg(serve)
        replay = bytearray(hostile.client_hello)
        replay[HELLO_RANDOM] = random
        hostile.sock.sendall(replay)
        # Refused at once: the server ends the connection before its first flight (an alert at
        # most), so no secret of this handshake is ever logged.
        assert _server_answer(hostile.sock) in (b"", b"alert")

        honest.sock.sendall(finished)
        h = honest_server.result(30)
        hostile.close()
        with pytest.raises(HandoffError, match="duplicate ClientHello random"):
            hostile_server.result(30)
        honest.close()

    # The honest connection's keys are its own.
    assert h.rx.secret == _logged_secret(honest_log, "CLIENT_TRAFFIC_SECRET_0", random)
    assert h.tx.secret == _logged_secret(honest_log, "SERVER_TRAFFIC_SECRET_0", random)


def test_replayed_client_random_after_the_honest_handshake_is_harmless(tmp_path: Path) -> None:
    """Once the honest connection has its keys, a replay of its random gets nothing of them:
    the secrets were forgotten (and punched out of the memfd) when they were taken."""
    sctx = server_context()
    honest_log = tmp_path / "honest.keylog"
    with handoff_server(sctx) as (address, serve):
        honest = MemoryClient(client_context(keylog_filename=str(honest_log)), address)
        server = Bg(serve)
        honest.sock.sendall(honest.client_hello)
        honest.sock.sendall(honest.run_until_finished())
        h = server.result(30)
        random = honest.client_hello[HELLO_RANDOM]
        assert h.rx.secret == _logged_secret(honest_log, "CLIENT_TRAFFIC_SECRET_0", random)
        log = handoff.keylog_for(sctx)
        assert log.take(random, True) == {}
        assert "pending=0" in repr(log)
        # and no secret in what the hand-off shows
        texts = [repr(h), str(h), repr(h.tx), repr(h.rx), repr(log)]
        for secret in (h.tx.key, h.tx.iv, h.tx.secret, h.rx.key, h.rx.iv, h.rx.secret):
            assert secret and not any(secret.hex() in t or repr(secret) in t for t in texts)
        # nor in the memfd: the lines were punched out once read
        with open(log.path, "rb") as f:
            assert f.read().strip(b"\x00") == b""
        honest.close()


def test_non_aead_suite_is_refused_by_name_and_cleaned_up() -> None:
    """The peer negotiates a CBC suite: UnsupportedCipherSuite naming it and how to restrict the
    context; the socket is closed, the connection's secrets are not kept."""
    cbc = "ECDHE-ECDSA-AES128-SHA256"
    sctx = server_context(version="TLSv1.2", cipher=cbc)
    cctx = client_context(version="TLSv1.2", cipher=cbc + ":ECDHE+AESGCM")
    log = handoff.keylog_for(cctx)
    gc.collect()
    before = set(os.listdir("/proc/self/fd"))
    csock, ssock = tcp_pair()
    peer = Bg(lambda: sctx.wrap_socket(ssock, server_side=True))
    with pytest.raises(UnsupportedCipherSuite) as info:
        tls.wrap(csock, cctx, server_hostname="localhost", mode="algif",
                 algif_backend="cryptography")  # fmt: skip
    assert cbc in str(info.value) and "set_ciphers" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert csock.fileno() == -1
    assert "pending=0" in repr(log)
    peer.result(30).close()
    del info
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) <= before


def test_closed_keylog_never_touches_a_reused_descriptor(tmp_path: Path) -> None:
    sctx = server_context()
    log = handoff.keylog_for(sctx)
    log.close()
    log.close()  # idempotent
    precious = b"precious data\n" * 512
    with open(tmp_path / "other", "w+b") as other:  # likely takes the memfd's old number
        other.write(precious)
        other.flush()
        cctx = client_context()
        csock, ssock = tcp_pair()
        peer = Bg(lambda: cctx.wrap_socket(csock, server_hostname="localhost"))
        with ssock:  # a closed key log is replaced by a new one: the handshake succeeds
            h = handoff.handshake(ssock, sctx, server_side=True)
        assert h.version == ssl.TLSVersion.TLSv1_3 and h.rx.secret and h.tx.secret
        peer.result(30).close()
        other.seek(0)
        assert other.read() == precious
    assert handoff.keylog_for(sctx) is not log
