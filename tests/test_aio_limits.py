"""afalg.aio and the key usage limit (RFC 8446 section 5.5) and KeyUpdate: writes and
aio.sendfile never seal more than ``records_per_key`` records under one send key (a KeyUpdate
goes first where keys can be updated; KeyLimitReached where they cannot), and a KeyUpdate the
peer requests is answered before our next data, by write() or by aio.sendfile.

The peer is independent of afalg's sockets, as in test_key_limits: ssl's handshake
(afalg.handoff), then a bare RecordLayer on the cryptography backend over the TCP socket, which
counts the records each of our keys sealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from _env import SLOW, WRAP_MODES
from test_key_limits import LIMIT, read_per_key
from test_tls_helpers import Bg, client_context, pattern, server_context, tcp_pair

from afalg import aio, handoff, ktls
from afalg.errors import KeyLimitReached, KeyUpdateUnsupported
from afalg.record import RecordLayer
from afalg.wire import AlertDescription, ContentType, HandshakeType, key_update_message

Mode = tuple[str, str]
T = 60 * SLOW


def can_rekey(mode: Mode) -> bool:
    """algif always updates keys; kTLS from Linux 6.14."""
    return mode[0] == "algif" or ktls.supports_rekey()


async def open_to_peer(
    mode: Mode, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, socket.socket, handoff.Handoff]:
    """An afalg.aio client over TLS 1.3 (``kwargs`` to open_connection) and the peer: the
    server end of the TCP connection, whose handshake ran in a thread, and its keys."""
    csock, ssock = tcp_pair(timeout=T)
    csock.setblocking(False)
    sctx = server_context("TLSv1.3", None, num_tickets=0)  # nothing for the client to read
    peer = Bg(lambda: handoff.handshake(ssock, sctx, server_side=True))
    try:
        reader, writer = await aio.open_connection(
            sock=csock, ssl=client_context("TLSv1.3"), server_hostname="localhost",
            mode=mode[0], algif_backend=mode[1], **kwargs,
        )  # fmt: skip
    except BaseException:
        ssock.close()
        raise
    loop = asyncio.get_running_loop()
    return reader, writer, ssock, await loop.run_in_executor(None, peer.result, T)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_writes_and_sendfile_keep_the_limit(mode: Mode, tmp_path: Any) -> None:
    """records_per_key=8: writes, a 1 MiB aio.sendfile, a write. The peer counts the records of
    each key: at most 8 (algif: exactly 8, the last a KeyUpdate), the data byte for byte. kTLS
    before 6.14 cannot rekey: aio.sendfile raises KeyLimitReached naming 6.14, the file's
    position after exactly what the peer received; a second sendfile sends nothing; the
    connection still closes with close_notify within the limit."""
    heads = [pattern(n, i) for i, n in enumerate((100, 5_000, 40_000))]
    body = pattern(2**20, 13)
    tail = b"the end"
    path = tmp_path / "body"
    path.write_bytes(body)
    result: dict[str, Any] = {}

    async def main() -> None:
        _, writer, peer, h = await open_to_peer(mode, records_per_key=LIMIT)
        with peer:
            counted = Bg(lambda: read_per_key(peer, h))
            for head in heads:
                writer.write(head)
                await writer.drain()
            with open(path, "rb") as f:
                if can_rekey(mode):
                    assert await aio.sendfile(writer, f) == len(body)
                    writer.write(tail)
                else:
                    with pytest.raises(KeyLimitReached, match=r"6\.14"):
                        await aio.sendfile(writer, f)
                    result["sent"] = sent = f.tell()
                    with pytest.raises(KeyLimitReached, match=r"6\.14"):
                        await aio.sendfile(writer, f, sent)
                    assert f.tell() == sent  # nothing more went out
            await close(writer)
            loop = asyncio.get_running_loop()
            result["peer"] = await loop.run_in_executor(None, counted.result, T)

    asyncio.run(asyncio.wait_for(main(), 3 * T))
    data, counts, closed = result["peer"]
    assert closed  # close_notify, within the limit too
    assert max(counts) <= LIMIT, counts
    if can_rekey(mode):
        assert data == b"".join(heads) + body + tail
        total = len(data)
        assert len(counts) >= total // (LIMIT * 2**14), counts  # one KeyUpdate per key
        assert all(n >= 3 for n in counts[:-1]), counts  # keys are used, not wasted
        if mode[0] == "algif":
            assert counts[:-1] == [LIMIT] * (len(counts) - 1), counts  # exactly at the limit
    else:
        sent = result["sent"]
        assert 0 <= sent < len(body)
        assert data == b"".join(heads) + body[:sent]  # what was reported, once, in order
        assert len(counts) == 1, counts


def peer_requests_key_update(peer: socket.socket, h: handoff.Handoff, before: bytes,
                             after: bytes) -> list[tuple[int, int, bytes]]:  # fmt: skip
    """The peer sends ``before``, a KeyUpdate with update_requested, and ``after`` under its
    next key; then reads our records to the end: [(our key generation, content type,
    payload)]."""
    layer = RecordLayer(tx=h.tx, rx=h.rx, backend="cryptography")
    with layer:
        out = layer.seal(ContentType.application_data, before)
        out += layer.seal(ContentType.handshake, key_update_message(True))
        layer.rekey_tx()
        out += layer.seal(ContentType.application_data, after)
        peer.sendall(out)
        events: list[tuple[int, int, bytes]] = []
        generation = 0
        while True:
            try:
                chunk = peer.recv(2**16)
            except ConnectionResetError:  # we closed with the peer's record unread (kTLS < 6.14)
                break
            if not chunk:
                break
            layer.feed(chunk)
            while (record := layer.next_record()) is not None:
                events.append((generation, record.content_type, record.payload))
                if record.content_type == ContentType.handshake:
                    assert record.payload[0] == HandshakeType.key_update, record.payload[:4]
                    layer.rekey_rx()
                    generation += 1
    return events


@pytest.mark.parametrize("how", ["write", "sendfile"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_peer_requested_key_update_is_answered(mode: Mode, how: str, tmp_path: Any) -> None:
    """The peer sends data, a KeyUpdate asking for ours, data under its next key. The aio
    client reads both pieces, then sends (write() or aio.sendfile): our KeyUpdate
    (update_not_requested) comes first, then the data under our next key, then close_notify.
    kTLS before 6.14 cannot follow the peer's key: the read raises KeyUpdateUnsupported naming
    6.14 and the peer receives no application data, only the fatal alert."""
    before, after = b"before the update|", b"after the update"
    reply = pattern(50_000, 17)
    path = tmp_path / "reply"
    path.write_bytes(reply)
    result: dict[str, Any] = {}

    async def main() -> None:
        reader, writer, peer, h = await open_to_peer(mode)
        with peer:
            events = Bg(lambda: peer_requests_key_update(peer, h, before, after))
            if can_rekey(mode):
                assert await reader.readexactly(len(before + after)) == before + after
                if how == "write":
                    writer.write(reply)
                    await writer.drain()
                else:
                    with open(path, "rb") as f:
                        assert await aio.sendfile(writer, f) == len(reply)
            else:
                with pytest.raises(KeyUpdateUnsupported, match=r"6\.14"):
                    await reader.readexactly(len(before + after))
            writer.close()
            failed = () if can_rekey(mode) else (KeyUpdateUnsupported,)
            with contextlib.suppress(*failed):  # the connection's error, once more
                await writer.wait_closed()
            loop = asyncio.get_running_loop()
            result["events"] = await loop.run_in_executor(None, events.result, T)

    asyncio.run(asyncio.wait_for(main(), 3 * T))
    events = result["events"]
    kinds = [(gen, kind) for gen, kind, _ in events]
    if can_rekey(mode):
        assert kinds[0] == (0, ContentType.handshake), kinds
        assert events[0][2] == key_update_message(False)  # an answer asks for nothing
        data = b"".join(p for gen, kind, p in events if kind == ContentType.application_data)
        assert data == reply
        assert all(gen == 1 for gen, kind, _ in events[1:]), kinds  # all under the next key
        assert events[-1][1:] == (ContentType.alert, b"\x01\x00")  # close_notify
    else:
        assert all(kind == ContentType.alert for _, kind, _ in events), kinds  # no data
        # the fatal alert, unless the reset of our close (the peer's record unread) overtook it
        assert not events or events[-1][2] == bytes([2, AlertDescription.internal_error])
