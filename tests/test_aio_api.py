"""afalg.aio's arguments and defaults as asyncio's: the hostname rules of
``loop.create_connection(ssl=)``, arguments checked before a byte is sent, the write buffer
counted in bytes, end of file as asyncio's TLS has it (and TLS 1.3 half-close by name), the
handshake timeout's message, ``mode="ktls"`` refused at start where the kernel cannot run it.

Host tests: afalg.aio in algif mode on the cryptography backend; peers are asyncio's own TLS.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import socket
import ssl
from typing import Any

import pytest
from _env import CAFILE, SLOW, WRAP_MODES
from test_aio import client_of, close, connect, echo, kw, no_fd_leak, run, serving
from test_tls_helpers import (
    EMPTY_NAME_REFUSED,
    client_context,
    pattern,
    server_context,
    tcp_pair,
)

from afalg import aio, ktls
from afalg.errors import KTLSError

Mode = tuple[str, str]
HOST: Mode = ("algif", "cryptography")
T = 60 * SLOW


def ktls_runs() -> bool:
    try:
        with ktls.loopback() as sock:
            ktls.attach_ulp(sock)
    except OSError:
        return False
    return True


def nothing_sent(peer: socket.socket) -> bool:
    """True if ``peer`` (the other end of a TCP connection) has received no byte yet."""
    peer.setblocking(False)
    try:
        peer.recv(1)
    except BlockingIOError:
        return True
    return False


# --- the hostname rules (asyncio's) --------------------------------------------------------------


def test_sock_without_server_hostname_is_refused_before_a_byte() -> None:
    """``sock=`` with ssl and no server_hostname: asyncio's ValueError, no ClientHello sent
    (today's code handshook without checking the certificate's name)."""
    client, peer = tcp_pair(timeout=T)
    with client, peer:

        async def main() -> None:
            with pytest.raises(ValueError, match="server_hostname"):
                await aio.open_connection(sock=client, ssl=client_context(), **kw(HOST))
            with pytest.raises(ValueError, match="server_hostname"):
                await asyncio.open_connection(sock=client, ssl=client_context())

        run(main())
        assert nothing_sent(peer)


def test_no_host_without_server_hostname_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="server_hostname"):
            await aio.open_connection(None, 1, ssl=client_context(), **kw(HOST))

    run(main())


def test_empty_server_hostname_turns_the_check_off() -> None:
    """``server_hostname=""``: the certificate is verified, its name is not (asyncio's way to
    say so on purpose); a wrong name still fails; with a host, "" wins over the host."""

    async def refused() -> None:  # Python 3.14+: ssl's wrap_bio refuses "", as asyncio does
        for opener, extra in ((aio.open_connection, kw(HOST)), (asyncio.open_connection, {})):
            client, peer = tcp_pair()
            with client, peer:
                with pytest.raises(ValueError, match="requires server_hostname"):
                    await opener(sock=client, ssl=client_context(), server_hostname="", **extra)
                peer.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    assert peer.recv(1) == b""  # no byte sent (the socket may be closed)

    async def main() -> None:
        if EMPTY_NAME_REFUSED:
            return await refused()
        server = await asyncio.start_server(echo, "127.0.0.2", 0, ssl=server_context())
        async with server:
            port = server.sockets[0].getsockname()[1]
            for how in ("sock", "host"):
                kwargs: dict[str, Any] = {"host": "127.0.0.2", "port": port}  # not in the cert
                if how == "sock":
                    kwargs = {"sock": socket.create_connection(("127.0.0.2", port))}
                reader, writer = await aio.open_connection(
                    ssl=client_context(), server_hostname="", **kw(HOST), **kwargs
                )
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"
                await close(writer)
            sock = socket.create_connection(("127.0.0.2", port))
            with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                await aio.open_connection(
                    sock=sock, ssl=client_context(), server_hostname="example.org", **kw(HOST)
                )

    with no_fd_leak():
        run(main())


def test_host_is_the_default_server_hostname() -> None:
    """No server_hostname: the host is checked against the certificate (127.0.0.2 is not in
    it, 127.0.0.1 is)."""

    async def main() -> None:
        for host, named in (("127.0.0.1", True), ("127.0.0.2", False)):
            server = await asyncio.start_server(echo, host, 0, ssl=server_context())
            async with server:
                port = server.sockets[0].getsockname()[1]
                if named:
                    _, writer = await aio.open_connection(
                        host, port, ssl=client_context(), **kw(HOST)
                    )
                    await close(writer)
                else:
                    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                        await aio.open_connection(host, port, ssl=client_context(), **kw(HOST))

    run(main())


def test_ssl_true_is_asyncios_default_context(monkeypatch: Any) -> None:
    """``ssl=True``: the default client context (the CA from SSL_CERT_FILE), the hostname
    checked; with ``server_hostname=""`` the default context checks no name, as asyncio's."""
    monkeypatch.setenv("SSL_CERT_FILE", CAFILE)

    async def main() -> None:
        async with serving(echo, None) as port:
            for opener in (asyncio.open_connection, aio.open_connection):
                extra = kw(HOST) if opener is aio.open_connection else {}
                _, writer = await opener("127.0.0.1", port, ssl=True, **extra)
                await close(writer)
                sock = socket.create_connection(("127.0.0.1", port))
                _, writer = await opener(sock=sock, ssl=True, server_hostname="", **extra)
                await close(writer)
                sock = socket.create_connection(("127.0.0.1", port))
                with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
                    await opener(sock=sock, ssl=True, server_hostname="example.org", **extra)

    run(main())


# --- arguments before a byte ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"limit": 0}, ValueError),
        ({"limit": -5}, ValueError),
        ({"limit": "big"}, TypeError),
        ({"ssl_handshake_timeout": 0}, ValueError),
        ({"ssl_handshake_timeout": -1.0}, ValueError),
        ({"ssl_shutdown_timeout": 0}, ValueError),
        ({"half_close": "yes"}, TypeError),
        ({"server_hostname": b"localhost"}, TypeError),
    ],
)
def test_arguments_are_checked_before_a_byte(kwargs: dict[str, Any], error: type) -> None:
    """A bad argument raises before the handshake: the peer receives nothing, no TLS socket is
    left for the garbage collector (today ``limit`` was checked after the hand-off)."""
    client, peer = tcp_pair(timeout=T)
    with client, peer:

        async def main() -> None:
            kwargs.setdefault("server_hostname", "localhost")
            with pytest.raises(error):
                await aio.open_connection(sock=client, ssl=client_context(), **kw(HOST), **kwargs)

        with no_fd_leak():
            run(main())
        assert nothing_sent(peer)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"limit": 0}, ValueError),
        ({"limit": "big"}, TypeError),
        ({"ssl_handshake_timeout": 0}, ValueError),
        ({"ssl_shutdown_timeout": -1}, ValueError),
        ({"half_close": 1}, TypeError),
    ],
)
def test_server_arguments_are_checked_before_listening(kwargs: dict[str, Any], error: type) -> None:
    async def main() -> None:
        with pytest.raises(error):
            await aio.start_server(echo, "127.0.0.1", 0, ssl=server_context(), **kwargs)

    with no_fd_leak():
        run(main())


# --- the write buffer ----------------------------------------------------------------------------


def test_write_buffer_size_counts_bytes_of_wide_memoryviews() -> None:
    """A memoryview of 8-byte items: the buffer size is in bytes, never negative, 0 once
    drained; the peer gets the bytes (today: -7000 for 1000 items)."""
    items = array.array("q", range(1000))
    views = [memoryview(items), memoryview(items)[::2]]
    wanted = b"".join(v.tobytes() for v in views)

    async def main() -> None:
        async with client_of(echo, HOST, asyncio_server=True) as (reader, writer):
            for view in views:
                writer.write(view)
                size = writer.transport.get_write_buffer_size()
                assert 0 <= size <= view.nbytes, size
            await writer.drain()
            assert await reader.readexactly(len(wanted)) == wanted
            assert writer.transport.get_write_buffer_size() == 0

    run(main())


def test_write_buffer_size_while_the_peer_does_not_read() -> None:
    """A peer that reads nothing: what is queued is counted in bytes (the data written minus
    what TCP took), so drain() blocks and the protocol is paused."""
    chunk = memoryview(array.array("d", [1.5]) * 2**16)  # 512 KiB, 8-byte items

    async def main() -> None:
        async with serving(echo, None) as port:
            _, writer = await connect(port, HOST)
            total = 0
            for _ in range(64):  # more than loopback TCP takes: the loop does not run meanwhile
                writer.write(chunk)
                total += chunk.nbytes
            size = writer.transport.get_write_buffer_size()
            assert 0 < size <= total, (size, total)
            writer.transport.abort()

    run(main())


# --- end of file as asyncio's TLS ----------------------------------------------------------------


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes
) -> bytes:
    """What a portable client does: write, half-close if the transport offers it, read the
    echo to its end (or until all of it came back, where no half-close is offered)."""
    writer.write(payload)
    if writer.can_write_eof():
        writer.write_eof()
        return await reader.read()
    got = bytearray()
    while len(got) < len(payload) and (chunk := await reader.read(2**16)):
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_asyncio_echo_server_gets_everything_back(mode: Mode) -> None:
    """200,000 bytes to ``asyncio.start_server(ssl=)``'s echo by a client that half-closes when
    allowed: all come back (today 147,456: afalg said it could half-close, asyncio's TLS ended
    the connection at the close_notify)."""
    payload = pattern(200_000, 3)

    async def main() -> None:
        async with client_of(echo, mode, asyncio_server=True) as (reader, writer):
            assert not writer.can_write_eof()
            with pytest.raises(NotImplementedError):
                writer.write_eof()
            assert await round_trip(reader, writer, payload) == payload

    run(main())


@pytest.mark.parametrize("server", ["asyncio", "afalg"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_peer_close_notify_ends_the_connection(
    mode: Mode, server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """By default the peer's close_notify is end of file and the transport closes (asyncio's
    TLS does so), in TLS 1.3 too: the writer is closing once EOF is read, and wait_closed()
    returns without our close(). Silently: the streams' protocol does not ask a transport that
    cannot half-close to stay open (which logged asyncio's "returning true from eof_received()"
    warning for every connection a peer ended)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        await close(writer)

    async def main() -> None:
        async with serving(handler, None if server == "asyncio" else mode) as port:
            reader, writer = await connect(port, mode)
            assert await reader.read() == b"bye"
            assert await reader.read() == b""
            assert writer.is_closing()
            await writer.wait_closed()

    with caplog.at_level(logging.INFO, logger="afalg"), no_fd_leak():
        run(main())
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_half_close_by_name_against_a_default_server(mode: Mode) -> None:
    """``half_close=True`` on the client only: it may write_eof() in TLS 1.3, and a default
    afalg server then ends the connection as asyncio's would: the client reads a clean EOF."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        await reader.read()
        writer.write(b"late")  # the transport is closing: dropped, as asyncio's TLS does

    async def main() -> None:
        async with client_of(handler, mode, client={"half_close": True}) as (reader, writer):
            assert writer.can_write_eof()
            assert await reader.readexactly(5) == b"ready"
            writer.write_eof()
            assert await reader.read() == b""

    run(main())


# --- errors that say what happened ---------------------------------------------------------------


def test_handshake_timeout_says_what_and_how_long() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as listener:  # never answers
            port = listener.getsockname()[1]
            with pytest.raises(TimeoutError, match=r"handshake.*0\.5 s"):
                await connect(port, HOST, ssl_handshake_timeout=0.5)

    with no_fd_leak():
        run(main())


@pytest.mark.skipif(ktls_runs(), reason="the kernel has the tls ULP")
def test_start_server_ktls_refused_where_the_kernel_cannot() -> None:
    """``mode="ktls"`` where the kernel has no tls ULP: start_server raises at once, naming the
    tls ULP, and listens on nothing (today it started and failed every client at DEBUG)."""

    async def main() -> None:
        with pytest.raises(KTLSError, match="tls"):
            await aio.start_server(echo, "127.0.0.1", 0, ssl=server_context(), mode="ktls")
        with pytest.raises(KTLSError, match="tls"):
            await aio.open_connection("127.0.0.1", 1, ssl=client_context(), mode="ktls")

    with no_fd_leak():
        run(main())


@pytest.mark.kernel
def test_start_server_ktls_starts_where_the_kernel_can() -> None:
    async def main() -> None:
        async with serving(echo, ("ktls", "kernel")) as port:
            reader, writer = await connect(port, ("ktls", "kernel"))
            assert writer.get_extra_info("mode") == "ktls"
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            await close(writer)

    run(main())


def af_alg_runs() -> bool:
    try:
        with socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET) as alg:
            alg.bind(("aead", "gcm(aes)"))
    except OSError:
        return False
    return True


@pytest.mark.skipif(af_alg_runs(), reason="AF_ALG runs here: nothing refuses the hand-off")
def test_a_refused_hand_off_is_logged_above_debug(
    monkeypatch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-off the kernel refuses (here: algif_backend="kernel" on a host without AF_ALG, or
    a suite it lacks) costs that connection and is logged at WARNING; a client's failed
    handshake stays at DEBUG."""

    async def main() -> None:
        server = await aio.start_server(
            echo, "127.0.0.1", 0, ssl=server_context(), mode="algif", algif_backend="kernel"
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
                reader, writer = await connect(port, HOST)
                await reader.read()
                await close(writer)
            for _ in range(int(100 * SLOW)):
                if any(r.levelno >= logging.WARNING for r in caplog.records):
                    break
                await asyncio.sleep(0.05)

    with caplog.at_level(logging.DEBUG, logger="afalg.aio"), no_fd_leak():
        run(main())  # the records kept hold strings, not the connection's objects
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned and "hand" in warned[0].getMessage(), caplog.records
