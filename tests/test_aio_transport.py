"""afalg.aio's TLSTransport as a state machine: named states per direction, moves checked, and
a closing deadline (asyncio's ``ssl_shutdown_timeout``): a peer that never reads cannot hold a
closing connection, at either end.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest
from _env import SLOW, WRAP_MODES, scaled
from test_aio import close, connect, kw, no_fd_leak, run, serving
from test_tls_helpers import Bg, client_context, pattern, server_context, tcp_pair

from afalg import aio, tls
from afalg.algif import AlgTLSSocket
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import RecordLayer
from afalg.wire import ContentType

Mode = tuple[str, str]
BIG = scaled(24, 24) * 2**20  # more than loopback TCP buffers hold, both ends together
DEADLINE = 1.0 * SLOW


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_server_close_deadline_aborts_a_client_that_never_reads(mode: Mode) -> None:
    """The server writes more than TCP holds to a client that reads nothing, then closes: after
    ``ssl_shutdown_timeout`` the connection is aborted, wait_closed() raises TimeoutError naming
    it, and nothing is left open (before, the close waited for the client forever)."""
    outcome: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(pattern(BIG, 1))
        writer.close()
        try:
            await writer.wait_closed()
        except TimeoutError as exc:
            outcome.append(str(exc))
        except Exception as exc:
            outcome.append(type(exc))
        else:
            outcome.append(None)

    async def main() -> None:
        async with serving(handler, mode, ssl_shutdown_timeout=DEADLINE) as port:
            _, writer = await connect(port, mode)  # reads nothing past the reader's limit
            while not outcome:
                await asyncio.sleep(0.05)
            writer.transport.abort()
            await asyncio.sleep(0)

    with no_fd_leak():
        run(main(), timeout=30 * SLOW)
    assert "ssl_shutdown_timeout" in outcome[0], outcome


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_client_close_deadline_aborts_a_server_that_never_reads(mode: Mode) -> None:
    """open_connection(ssl_shutdown_timeout=): the same for a client whose server (asyncio's
    own) reads nothing."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.transport.abort()

    async def main() -> None:
        async with serving(handler, None) as port:
            _, writer = await connect(port, mode, ssl_shutdown_timeout=DEADLINE)
            writer.write(pattern(BIG, 2))
            writer.close()
            assert writer.is_closing()
            with pytest.raises(TimeoutError, match="ssl_shutdown_timeout"):
                await writer.wait_closed()
            release.set()
            await asyncio.sleep(0)

    run(main(), timeout=30 * SLOW)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_a_clean_close_is_not_cut_by_the_deadline(mode: Mode) -> None:
    """A peer that reads: a close within the deadline ends cleanly (connection_lost(None)), and
    the deadline's timer does not fire afterwards."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")  # the hand-off is done (kTLS attaches to open connections only)
        assert await reader.read() == b"x" * 10
        await close(writer)

    async def main() -> None:
        async with serving(handler, mode) as port:
            reader, writer = await connect(port, mode, ssl_shutdown_timeout=0.2 * SLOW)
            assert await reader.readexactly(5) == b"ready"
            writer.write(b"x" * 10)
            writer.close()
            await writer.wait_closed()  # raises if the deadline cut it
            transport: Any = writer.transport
            assert transport._deadline is None

    with no_fd_leak():
        run(main())


# --- the states, on a socketpair with a peer record layer ----------------------------------------

SUITE = CipherSuite.TLS_AES_128_GCM_SHA256
OURS, THEIRS = TrafficKeys.tls13(SUITE, b"\1" * 32), TrafficKeys.tls13(SUITE, b"\2" * 32)


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.data = bytearray()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


def records(wire: bytes) -> list[tuple[int, bytes]]:
    out = []
    with RecordLayer(rx=OURS, backend="cryptography") as peer:
        peer.feed(wire)
        while (record := peer.next_record()) is not None:
            out.append((record.content_type, record.payload))
    return out


def test_states_and_their_moves() -> None:
    """New transport: write open, read new then reading; close(): closing then closed, read
    stopped; a move the table lacks raises; write() after close() is dropped (asyncio's TLS
    drops it too): the peer reads the data, then close_notify, and nothing after it."""
    from afalg._transport import _Read, _Write

    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        conn = AlgTLSSocket(a, OURS, THEIRS, backend="cryptography")
        protocol = Recorder()
        loop = asyncio.get_running_loop()
        transport = aio.TLSTransport(loop, conn, protocol)
        assert "write=open read=new" in repr(transport)
        await asyncio.sleep(0)
        assert transport._read_state is _Read.ACTIVE and transport.is_reading()
        transport.pause_reading()
        assert transport._read_state is _Read.PAUSED and not transport.is_reading()
        transport.resume_reading()
        transport.write(b"data")
        transport.close()
        assert transport.is_closing() and not transport.is_reading()
        transport.write(b"after close")
        assert await protocol.lost is None
        assert transport._write_state is _Write.CLOSED
        assert transport._read_state is _Read.STOPPED
        with pytest.raises(RuntimeError, match="closed -> open"):
            transport._set_write(_Write.OPEN)
        with b:
            wire = b.recv(2**16)
        assert records(wire) == [
            (ContentType.application_data, b"data"),
            (ContentType.alert, b"\x01\x00"),
        ]

    run(main())


def test_peer_close_notify_closes_and_warns_about_keep_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A protocol whose eof_received() returns True without half_close: asyncio's warning, and
    the transport closes anyway (as asyncio's TLS)."""

    class KeepOpen(Recorder):
        def eof_received(self) -> bool:
            return True

    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        conn = AlgTLSSocket(a, OURS, THEIRS, backend="cryptography")
        protocol = KeepOpen()
        transport = aio.TLSTransport(asyncio.get_running_loop(), conn, protocol)
        with RecordLayer(tx=THEIRS, backend="cryptography") as peer, b:
            b.sendall(peer.seal(ContentType.alert, b"\x01\x00"))
            assert await protocol.lost is None
        assert transport.is_closing()

    run(main())
    assert any("eof_received" in r.getMessage() for r in caplog.records)


def test_handshake_connects_with_a_context_check_hostname_off() -> None:
    """Pinned here for the hostname rules' other side: a context with check_hostname off and
    no server_hostname still needs one with sock= (asyncio's rule is about the argument)."""
    client, peer = socket.socketpair()
    with client, peer:

        async def main() -> None:
            ctx = client_context()
            ctx.check_hostname = False
            with pytest.raises(ValueError, match="server_hostname"):
                await aio.open_connection(sock=client, ssl=ctx, **kw(("algif", "cryptography")))

        run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_records_of_other_types_in_one_burst(mode: Mode, version: str) -> None:
    """Data, a user_canceled alert, data again and close_notify, in one TCP write: the reader
    gets both data, then the end. A read stops before a record of another type (kTLS hands out
    one type per read); where the kernel cannot pause for a KeyUpdate the transport reads once
    per readable event when a read comes back short, so this pins that poll() reports the
    record that stopped it (kept in the kernel's rx_list) and no record is left unread."""
    csock, ssock = tcp_pair()
    ctx = server_context(version)
    peer = Bg(
        lambda: tls.wrap(ssock, ctx, server_side=True, mode="algif", algif_backend="cryptography")
    )

    async def main() -> bytes:
        reader, writer = await aio.open_connection(
            sock=csock, ssl=client_context(version), server_hostname="localhost", **kw(mode)
        )
        theirs = peer.result(60)
        layer = theirs.record_layer
        burst = b"".join(
            (
                layer.seal(ContentType.application_data, b"a" * 1000),
                layer.seal(ContentType.alert, bytes([1, 90])),  # warning, user_canceled
                layer.seal(ContentType.application_data, b"b" * 1000),
                layer.seal(ContentType.alert, bytes([1, 0])),  # close_notify
            )
        )
        theirs._sock.sendall(burst)
        try:
            return await reader.read()  # to the end
        finally:
            await close(writer)
            with contextlib.suppress(OSError):
                theirs.close()

    got = run(main(), timeout=60 * SLOW)
    assert got == b"a" * 1000 + b"b" * 1000
