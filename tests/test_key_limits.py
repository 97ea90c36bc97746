"""Key usage limits (RFC 8446 section 5.5) on the afalg TLS sockets: no send key seals more than
``records_per_key`` records; writes and sendfile are split there and a TLS 1.3 KeyUpdate goes
first; where keys cannot be updated (TLS 1.2; kTLS before Linux 6.14) a send at the limit raises
having sent nothing, and the connection still closes cleanly.

The peer is independent of the sockets under test: ssl's handshake (afalg.handoff), then a bare
RecordLayer fed from the TCP socket, which counts the records each key opened.
"""

from __future__ import annotations

import hashlib
import socket
from typing import Any

import pytest
from _env import WRAP_MODES
from test_tls_helpers import Bg, client_context, pattern, server_context, tcp_pair

from afalg import handoff, ktls, tls
from afalg.errors import KeyLimitReached
from afalg.record import RecordLayer
from afalg.wire import ContentType, HandshakeType

LIMIT = 8


def connect(mode: tuple[str, str], version: str) -> tuple[Any, socket.socket, handoff.Handoff]:
    """(ours, the peer's TCP socket, the peer's keys): an afalg client with LIMIT records per
    key, and a server that only handshakes (its records are the test's to read)."""
    csock, ssock = tcp_pair()
    sctx = server_context(version, None, num_tickets=0)  # nothing for us to read: no RST at close
    bg = Bg(lambda: handoff.handshake(ssock, sctx, server_side=True))
    ours = tls.wrap(
        csock, client_context(version, None), server_hostname="localhost",
        mode=mode[0], algif_backend=mode[1], records_per_key=LIMIT,
    )  # fmt: skip
    return ours, ssock, bg.result(60)


def read_per_key(sock: socket.socket, h: handoff.Handoff) -> tuple[bytes, list[int], bool]:
    """Read until EOF: (application data, records opened under each key in turn, whether a
    close_notify came last). Each key's count includes the KeyUpdate that ends it."""
    layer = RecordLayer(rx=h.rx, backend="cryptography")
    data = bytearray()
    counts = [h.rx.seq]  # TLS 1.2: the Finished was the first record under these keys
    closed = False
    while chunk := sock.recv(2**16):
        layer.feed(chunk)
        while (record := layer.next_record()) is not None:
            counts[-1] += 1
            if record.content_type == ContentType.application_data:
                data += record.payload
            elif record.content_type == ContentType.handshake:
                assert record.payload[0] == HandshakeType.key_update, record.payload[:4]
                layer.rekey_rx()
                counts.append(0)
            elif record.content_type == ContentType.alert:
                closed = record.payload == b"\x01\x00"
    layer.close()
    return bytes(data), counts, closed


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_tls13_sendfile_rekeys_at_the_limit(mode: tuple[str, str], tmp_path: Any) -> None:
    """A 1 MiB sendfile with 8 records per key: every key seals at most 8 records, the last
    of them a KeyUpdate; the data arrives byte for byte. Where kTLS cannot rekey (before 6.14),
    sendfile stops at the limit with KeyLimitReached, and the connection still closes cleanly."""
    body = pattern(2**20, 11)
    path = tmp_path / "body"
    path.write_bytes(body)
    ours, peer, h = connect(mode, "TLSv1.3")
    reader = Bg(lambda: read_per_key(peer, h))
    rekeys = mode[0] == "algif" or ktls.supports_rekey()
    with ours, open(path, "rb") as f:
        if rekeys:
            assert ours.sendfile(f) == len(body)
        else:
            with pytest.raises(KeyLimitReached, match=r"6\.14"):
                ours.sendfile(f)
    data, counts, closed = reader.result()
    peer.close()
    assert max(counts) <= LIMIT, counts
    assert closed  # close_notify, within the limit too
    if rekeys:
        assert hashlib.sha256(data).digest() == hashlib.sha256(body).digest()
        assert len(counts) >= len(body) // (LIMIT * 2**14), counts  # one KeyUpdate per key
        assert all(n >= 3 for n in counts[:-1]), counts  # keys are used, not wasted
        if mode[0] == "algif":
            assert counts[:-1] == [LIMIT] * (len(counts) - 1)  # exactly at the limit
    else:
        assert len(counts) == 1 and data == body[: len(data)] and data


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_tls12_stops_at_the_limit_having_sent_nothing(mode: tuple[str, str]) -> None:
    """TLS 1.2 has no KeyUpdate: the send that would pass the limit raises, having taken
    nothing; what went before arrives whole, and close_notify still fits."""
    ours, peer, h = connect(mode, "TLSv1.2")
    reader = Bg(lambda: read_per_key(peer, h))
    message = memoryview(pattern(200_000, 12))
    sent = 0
    with ours:
        with pytest.raises(KeyLimitReached, match=r"TLS 1\.2"):
            while sent < len(message):
                sent += ours.send(message[sent:])
        assert 0 < sent < len(message)
        with pytest.raises(KeyLimitReached):
            ours.send(b"x")  # again: nothing more goes out
    data, counts, closed = reader.result()
    peer.close()
    assert data == bytes(message[:sent])
    assert counts == [counts[0]] and counts[0] <= LIMIT
    assert closed


def test_records_per_key_is_checked_before_the_handshake() -> None:
    csock, ssock = tcp_pair()
    with csock, ssock:
        for bad, error in ((2, ValueError), ("8", TypeError)):
            with pytest.raises(error, match="records_per_key"):
                tls.wrap(csock, client_context("TLSv1.3", None), records_per_key=bad)  # type: ignore[arg-type]
        ssock.settimeout(0.1)
        with pytest.raises(TimeoutError):
            ssock.recv(1)  # no ClientHello was sent
