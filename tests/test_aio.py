"""afalg.aio: asyncio streams, servers and sendfile over afalg's TLS sockets. Each test runs for
kTLS and algif in the VM and algif on the cryptography backend on the host; peers are afalg.aio
itself, asyncio's own TLS streams (both roles) and openssl, byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import resource
import socket
import ssl
import struct
import tempfile
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from _env import CAFILE, IN_VM, SLOW, WRAP_MODES, independent_of_the_kernel, scaled
from test_tls_helpers import (
    client_context,
    openssl_server,
    pattern,
    read_stdout,
    require_openssl,
    server_context,
)

from afalg import aio, tls
from afalg.algif import AlgTLSSocket
from afalg.handoff import Handshake
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import RecordLayer
from afalg.wire import ContentType, key_update_message

Mode = tuple[str, str]
T = 60 * SLOW  # a generous bound for anything that should finish


def run(coro: Awaitable[Any], timeout: float = 3 * T) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def open_fds() -> set[int]:
    gc.collect()  # an SSLContext's key log (a memfd) lives as long as the context
    return {int(name) for name in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked
                        if os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


def kw(mode: Mode) -> dict[str, str]:
    return {"mode": mode[0], "algif_backend": mode[1]}


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(2**16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        await close(writer)


@contextlib.asynccontextmanager
async def serving(
    handler: Handler, mode: Mode | None, version: str = "TLSv1.3", **kwargs: Any
) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 running ``handler`` for each client, afalg.aio's in ``mode``
    (None: asyncio's own TLS server); ``kwargs`` to start_server. Yields its port; on the way
    out, waits for the handlers still running (their clients have gone by then)."""
    handlers: set[asyncio.Task[Any]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A handler left running when the test's loop ends is cancelled, and 3.12.1's streams
        # then never close its transport (task.exception() on a cancelled task raises in
        # their done callback): its descriptors would count as leaked.
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await handler(reader, writer)
        finally:
            handlers.discard(task)

    if mode is None:
        server = await asyncio.start_server(
            tracked, "127.0.0.1", 0, ssl=server_context(version), **kwargs
        )
    else:
        server = await aio.start_server(
            tracked, "127.0.0.1", 0, ssl=server_context(version), **kw(mode), **kwargs
        )
    async with server:
        yield server.sockets[0].getsockname()[1]
    if handlers:
        await asyncio.wait(set(handlers), timeout=T)


async def connect(
    port: int,
    mode: Mode | None,
    version: str = "TLSv1.3",
    context: ssl.SSLContext | None = None,
    **kwargs: Any,
) -> Streams:
    """A TLS client of 127.0.0.1:``port`` (``context``: a new client context of ``version``),
    afalg.aio's in ``mode`` (None: asyncio's own TLS client); ``kwargs`` to open_connection
    (with ``sock``, a socket connected to the port already)."""
    ctx = context or client_context(version)
    if "sock" not in kwargs:  # else a socket connected to it already
        kwargs.update(host="127.0.0.1", port=port)
    if mode is None:
        return await asyncio.open_connection(ssl=ctx, server_hostname="localhost", **kwargs)
    return await aio.open_connection(ssl=ctx, server_hostname="localhost", **kw(mode), **kwargs)


@contextlib.asynccontextmanager
async def client_of(
    handler: Handler,
    mode: Mode,
    version: str = "TLSv1.3",
    *,
    server: dict[str, Any] | None = None,
    client: dict[str, Any] | None = None,
    asyncio_server: bool = False,
) -> AsyncIterator[Streams]:
    """The usual set-up: a server running ``handler`` (:func:`serving`: afalg.aio's in
    ``mode``, or asyncio's own) and one afalg.aio client in ``mode`` connected to it (``server``
    and ``client``: their keyword arguments); the client is closed on the way out."""
    server_mode = None if asyncio_server else mode
    async with serving(handler, server_mode, version, **(server or {})) as port:
        reader, writer = await connect(port, mode, version, **(client or {}))
        try:
            yield reader, writer
        finally:
            await close(writer)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


# --- echo, concurrency, interop ------------------------------------------------------------------


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_echo_server_many_clients(mode: Mode, version: str) -> None:
    """An echo server from start_server and concurrent afalg clients, each a different
    message, byte for byte; both ends in ``mode``; nothing left open afterwards."""
    clients = scaled(10 if IN_VM else 30, 100)
    size = scaled(20_000, 200_000)

    async def client(port: int, i: int) -> None:
        reader, writer = await connect(port, mode, version)
        assert writer.get_extra_info("mode") == mode[0]
        message = pattern(size + i, i)
        writer.write(message)
        await writer.drain()
        assert await reader.readexactly(len(message)) == message
        await close(writer)

    async def main() -> None:
        async with serving(echo, mode, version) as port:
            await asyncio.gather(*(client(port, i) for i in range(clients)))
            await asyncio.sleep(0)

    # Both ends live in this process: in algif mode on the kernel's AEAD each end holds five
    # descriptors (TCP, and an AF_ALG transform and operation socket per direction), so 100
    # clients need more than the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 12 * clients + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    try:
        with no_fd_leak():
            run(main())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_interop_asyncio_tls_client(mode: Mode, version: str) -> None:
    """asyncio's own TLS client against an afalg.aio server."""
    message = pattern(scaled(300_000, 3_000_000), 7)

    async def main() -> None:
        async with serving(echo, mode, version) as port:
            reader, writer = await connect(port, None, version)
            writer.write(message)
            got = await reader.readexactly(len(message))
            assert hashlib.sha256(got).digest() == hashlib.sha256(message).digest()
            await close(writer)

    run(main())


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_interop_asyncio_tls_server(mode: Mode, version: str) -> None:
    """An afalg.aio client against asyncio's own TLS server; the server closes, the client
    reads a clean end of file."""
    message = pattern(scaled(300_000, 3_000_000), 8)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(len(message))
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with client_of(handler, mode, version, asyncio_server=True) as (reader, writer):
            assert writer.get_extra_info("ssl_object").version() == version
            writer.write(message)
            assert await reader.readexactly(len(message)) == message[::-1]
            assert await reader.read() == b""  # close_notify: EOF

    run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_interop_openssl_server(mode: Mode) -> None:
    """An afalg.aio client over a socket connected to ``openssl s_server``."""
    message = b"hello from afalg.aio\n"

    async def main(sock: socket.socket, proc: Any) -> None:
        sock.setblocking(False)
        reader, writer = await aio.open_connection(
            ssl=client_context("TLSv1.3"), sock=sock, server_hostname="localhost", **kw(mode)
        )
        writer.write(message)
        await writer.drain()
        got = await asyncio.get_running_loop().run_in_executor(
            None, read_stdout, proc, len(message)
        )
        assert got == message
        proc.stdin.write(b"reply\n")
        proc.stdin.flush()
        assert await reader.readexactly(6) == b"reply\n"
        await close(writer)

    with openssl_server("TLSv1.3", "TLS_AES_128_GCM_SHA256") as (proc, sock):
        run(main(sock, proc))


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_interop_openssl_client(mode: Mode) -> None:
    """``openssl s_client`` against an afalg.aio server: what it sends is echoed back."""
    message = b"hello from s_client\n"

    async def main() -> None:
        async with serving(echo, mode) as port:
            proc = await asyncio.create_subprocess_exec(
                require_openssl(), "s_client", "-quiet", "-connect", f"127.0.0.1:{port}",
                "-servername", "localhost", "-CAfile", CAFILE, "-verify_return_error",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(message)
                await proc.stdin.drain()
                assert await proc.stdout.readexactly(len(message)) == message
            finally:
                proc.kill()
                await proc.wait()

    run(main())


# --- extra info, sessions, ends ------------------------------------------------------------------


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_get_extra_info(mode: Mode) -> None:
    async def main() -> None:
        async with serving(echo, mode) as port:
            ctx = client_context("TLSv1.3")
            _, writer = await connect(port, mode, context=ctx)
            info = writer.get_extra_info
            assert isinstance(info("ssl_object"), ssl.SSLObject)
            assert info("sslcontext") is ctx
            assert info("peercert")["subjectAltName"]
            assert info("cipher")[1] == "TLSv1.3"
            assert info("peername")[1] == port
            assert info("sockname")[0] == "127.0.0.1"
            sock = info("socket")
            assert isinstance(sock, (tls.KTLSSocket, tls.AlgTLSSocket))
            assert info("mode") == mode[0] == sock.mode
            assert info("backend") == sock.backend
            assert isinstance(writer.transport, aio.TLSTransport)
            await close(writer)

    run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_open_connection_holds_no_read_buffer(mode: Mode) -> None:
    """An open connection keeps no read buffer of its own: the transports of an event loop read
    into one buffer per thread. (Each used to hold 256 KiB, resident for as long as it lived
    and, once a failed connection's stored error held it in a reference cycle, until the cycle
    collector ran: the RSS growth of issue 16.) Python memory of connections that have read,
    both ends afalg.aio in this process, by tracemalloc: about 20 KiB per connection."""
    n = 8

    async def exchange(port: int) -> asyncio.StreamWriter:
        reader, writer = await connect(port, mode)
        writer.write(b"x")
        await writer.drain()
        assert await reader.readexactly(1) == b"x"  # both transports have read
        return writer

    async def main() -> int:
        async with serving(echo, mode) as port:
            writers = [await exchange(port)]  # contexts, key logs, this thread's buffer
            gc.collect()
            tracing = tracemalloc.is_tracing()
            if not tracing:
                tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                writers += [await exchange(port) for _ in range(n)]
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
            finally:
                if not tracing:
                    tracemalloc.stop()
            for writer in writers:
                await close(writer)
        return held // n

    per_connection = run(main())
    assert per_connection < 128 * 1024, per_connection  # two read buffers made it > 512 KiB


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_session_resumes(mode: Mode) -> None:
    """The TLS 1.3 server's NewSessionTicket reaches ssl: the second connection resumes."""

    async def main() -> None:
        async with serving(echo, mode) as port:
            ctx = client_context("TLSv1.3")
            reader, writer = await connect(port, mode, context=ctx)
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"  # the tickets came before it
            session = writer.get_extra_info("ssl_object").session
            await close(writer)
            reader, writer = await connect(port, mode, context=ctx, session=session)
            assert writer.get_extra_info("ssl_object").session_reused
            writer.write(b"y")
            assert await reader.readexactly(1) == b"y"
            await close(writer)

    run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_write_eof_tls13_half_close(mode: Mode) -> None:
    """TLS 1.3 with ``half_close=True`` at both ends: write_eof() sends close_notify and
    half-closes; the server reads to the end, answers, and the client still reads the answer.
    (By default, as asyncio's TLS, no half-close: tests/test_aio_api.py.)"""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")  # the hand-off is done (kTLS attaches to open connections only)
        data = await reader.read()  # to close_notify
        writer.write(hashlib.sha256(data).digest())
        await writer.drain()
        await close(writer)

    async def main() -> None:
        half = {"half_close": True}
        async with client_of(handler, mode, server=half, client=half) as (reader, writer):
            assert writer.can_write_eof()
            assert await reader.readexactly(5) == b"ready"
            message = pattern(100_000, 5)
            writer.write(message)
            writer.write_eof()
            with pytest.raises(RuntimeError):
                writer.write(b"more")
            assert await reader.readexactly(32) == hashlib.sha256(message).digest()
            assert await reader.read() == b""

    run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_write_eof_tls12_refused(mode: Mode) -> None:
    """TLS 1.2 promises no half-close: can_write_eof() is False even with half_close=True,
    write_eof() raises, as for asyncio's TLS; the connection goes on."""

    async def main() -> None:
        half = {"half_close": True}
        async with client_of(echo, mode, "TLSv1.2", client=half) as (reader, writer):
            assert not writer.can_write_eof()
            with pytest.raises(NotImplementedError):
                writer.write_eof()
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"

    run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_close_is_clean_abort_is_not(mode: Mode) -> None:
    """close() ends with close_notify (the peer reads a clean EOF even with
    suppress_ragged_eofs=False); abort() sends none (the peer sees a truncation)."""
    outcome: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            outcome.append(await reader.read())
        except Exception as exc:
            outcome.append(type(exc))  # not exc: its traceback would keep the sockets
        await close(writer)

    async def main() -> None:
        async with serving(handler, mode, suppress_ragged_eofs=False) as port:
            for how in ("close", "abort"):
                _, writer = await connect(port, mode)
                writer.write(b"data")
                await writer.drain()
                await asyncio.sleep(0.2 * SLOW)  # "data" read first (else abort drops it)
                if how == "close":
                    await close(writer)
                else:
                    writer.transport.abort()
                    await writer.wait_closed()
                while len(outcome) < (1 if how == "close" else 2):
                    await asyncio.sleep(0.05)
                assert writer.transport.is_closing()

    with no_fd_leak():
        run(main())
    assert outcome[0] == b"data"
    assert issubclass(outcome[1], ssl.SSLEOFError), outcome[1]


# --- flow control, cancellation ------------------------------------------------------------------


@pytest.mark.parametrize("peer", ["afalg", "asyncio-reader", "asyncio-writer"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_slow_reader_backpressure(mode: Mode, peer: str) -> None:
    """The server writes with drain(), the client does not read at first: the client's
    transport pauses reading once its reader holds more than twice its limit, the server's
    drain() waits with the buffer at the high water mark; then the client reads it all, byte
    for byte. Both ends afalg.aio in ``mode``, or one of them asyncio's own TLS (the slow reader,
    or the writer); the afalg end's water marks are checked."""
    total = scaled(3_000_000, 30_000_000)
    chunk = 64 * 1024
    state: dict[str, Any] = {"max_buffer": 0, "waits": 0}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.transport.set_write_buffer_limits(high=128 * 1024)
        done = 0
        while done < total:
            piece = pattern(chunk, done // chunk)[: total - done]
            writer.write(piece)
            state["max_buffer"] = max(state["max_buffer"], writer.transport.get_write_buffer_size())
            state["waits"] += writer.transport.get_write_buffer_size() > 128 * 1024
            await writer.drain()
            done += len(piece)
        await close(writer)

    async def main() -> None:
        server_mode = None if peer == "asyncio-writer" else mode
        client_mode = None if peer == "asyncio-reader" else mode
        async with serving(handler, server_mode) as port:
            sock = socket.socket()  # a bounded receive window (above the MSS: no stalls)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await connect(port, client_mode, sock=sock, limit=32 * 1024)
            transport = writer.transport
            deadline = asyncio.get_running_loop().time() + T
            while transport.is_reading():  # paused by the reader, not by a timer
                assert asyncio.get_running_loop().time() < deadline, "never paused"
                await asyncio.sleep(0.05)
            h = hashlib.sha256()
            got = 0
            while data := await reader.read(2**16):
                h.update(data)
                got += len(data)
            want = hashlib.sha256()
            for off in range(0, total, chunk):
                want.update(pattern(chunk, off // chunk)[: total - off])
            assert got == total and h.digest() == want.digest()
            await close(writer)

    run(main())
    if peer != "asyncio-writer":  # afalg's transport wrote: its water marks
        assert state["waits"] > 0  # drain() had something to wait for
        assert state["max_buffer"] <= 128 * 1024 + 2 * chunk + 70_000  # bounded by the mark


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_cancelled_reads_and_drains_lose_nothing(mode: Mode) -> None:
    """Reads cancelled in the middle (readexactly, read) and a cancelled drain(): what arrives
    is all read afterwards, once, in order."""
    total = scaled(1_000_000, 10_000_000)
    message = pattern(total, 11)

    async def main() -> None:
        async with client_of(echo, mode) as (reader, writer):
            writer.transport.set_write_buffer_limits(high=16 * 1024)
            writer.write(message)
            drain = asyncio.ensure_future(writer.drain())
            await asyncio.sleep(0)
            drain.cancel()  # the data stays queued and goes out
            with contextlib.suppress(asyncio.CancelledError):
                await drain
            got = bytearray()
            while len(got) < total:
                # One byte more than will come: this read never completes, it is cancelled.
                task = asyncio.ensure_future(reader.readexactly(total - len(got) + 1))
                await asyncio.sleep(0.01)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                got += await reader.read(total - len(got))  # what the cancelled read waited on
            assert bytes(got) == message

    run(main())


# --- the handshake on the loop, hostile clients --------------------------------------------------


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_hostile_clients_cost_only_their_connection(mode: Mode) -> None:
    """Garbage instead of a ClientHello, a silent client (handshake timeout), a forged record
    and a truncated record after the handshake: each loses its own connection; the server goes
    on serving the others, and no descriptor is left."""
    errors: list[type[BaseException]] = []

    ended: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi")  # the hand-off is done: what follows goes to the TLS socket
        got = b""
        try:
            while data := await reader.read(2**16):
                got += data
        except Exception as exc:
            errors.append(type(exc))  # not exc: its traceback would keep the sockets
        ended.append(got)
        await close(writer)

    async def raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", port)

    def afalg_client(port: int) -> Any:
        sock = socket.create_connection(("127.0.0.1", port), timeout=T)
        conn = tls.wrap(
            sock, client_context("TLSv1.3"), server_hostname="localhost", mode="algif",
            algif_backend="cryptography",
        )  # fmt: skip
        assert conn.recv(2) == b"hi"
        return conn

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with serving(handler, mode, ssl_handshake_timeout=2 * SLOW) as port:
            # garbage: the server answers (an alert, or nothing) and closes
            r, w = await raw(port)
            w.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
            with contextlib.suppress(ConnectionError):  # RST: it closed with data unread
                await asyncio.wait_for(r.read(), T)
            w.close()
            # silent: the handshake timeout closes it
            r, w = await raw(port)
            assert await asyncio.wait_for(r.read(), T) == b""
            w.close()
            # a forged application record after the handshake
            conn = await loop.run_in_executor(None, afalg_client, port)
            conn._sock.sendall(b"\x17\x03\x03\x00\x30" + os.urandom(0x30))
            await loop.run_in_executor(None, conn._sock.recv, 100)  # the alert, or EOF
            conn.close()
            # a truncated record, then FIN
            conn = await loop.run_in_executor(None, afalg_client, port)
            conn._sock.sendall(b"\x17\x03\x03\x01\x00" + os.urandom(40))
            conn._sock.shutdown(socket.SHUT_WR)
            await loop.run_in_executor(None, conn._sock.recv, 100)
            conn.close()
            # meanwhile and afterwards: a good client is served
            reader, writer = await connect(port, mode)
            assert await reader.readexactly(2) == b"hi"
            writer.write(b"ping")
            await writer.drain()
            await close(writer)
            while len(ended) < 3:
                await asyncio.sleep(0.05)

    with no_fd_leak():
        run(main())
    # the forged record: a TLS error (bad_record_mac); the truncated one: the end of the stream
    # (suppress_ragged_eofs, as ssl); the good client: its ping
    assert errors and all(issubclass(e, ssl.SSLError) for e in errors), errors
    assert b"ping" in ended


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_failed_handshakes_are_freed_when_they_end(mode: Mode) -> None:
    """A client whose handshake fails (garbage, a reset after half a ClientHello, silence until
    the handshake timeout) leaves nothing behind for the cycle collector: the server's
    Handshake (and with it its ssl object and buffers) is freed as the handshake ends. Under
    asyncio.wait_for its task kept the error, whose traceback held wait_for's frame and so that
    task; loop.sock_recv_into's future kept a reset's error the same way: reference cycles
    that held each failed handshake until a full collection. Counted with the cycle collector
    disabled."""
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)  # half a ClientHello

    async def main() -> None:
        async with serving(echo, mode, ssl_handshake_timeout=SLOW) as port:
            for kind in ("garbage", "reset", "silent") * 3:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if kind == "reset":
                    writer.write(hello)
                    await writer.drain()
                    await asyncio.sleep(0.1 * SLOW)  # the server is reading the ClientHello
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    continue
                if kind == "garbage":
                    writer.write(b"GET / HTTP/1.0\r\n\r\n")
                with contextlib.suppress(ConnectionError):  # the server ends it
                    await asyncio.wait_for(reader.read(), T)
                writer.close()
            # a good client last: the handshakes before it have ended
            reader, writer = await connect(port, mode)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await close(writer)

    gc.collect()
    gc.disable()
    try:
        run(main())
        left = [o for o in gc.get_objects() if isinstance(o, Handshake)]
    finally:
        gc.enable()
    assert not left, left


def test_peername_survives_a_reset_after_the_handshake(monkeypatch: Any) -> None:
    """A client that resets right after its handshake, before the server's handler runs: the
    handler still gets the peer's address (accept()'s, as asyncio's own servers give), not None
    (getpeername() fails on a reset socket). Found by tests/test_hostile_load.py: a handler
    doing ``writer.get_extra_info("peername")[0]`` raised TypeError."""
    handshake_done = threading.Event()
    real_hand_off = tls.hand_off

    def hand_off_after_reset(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
        handshake_done.set()  # the client resets now; wait until this socket knows
        for _ in range(int(200 * SLOW)):
            try:
                sock.getpeername()
            except OSError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the client's reset never arrived")
        return real_hand_off(sock, *args, **kwargs)

    def client(port: int) -> tuple[str, int]:
        raw = socket.create_connection(("127.0.0.1", port), timeout=T)
        conn = client_context("TLSv1.3").wrap_socket(raw, server_hostname="localhost")
        address = conn.getsockname()[:2]
        assert handshake_done.wait(T)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        return address

    peers: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername"))
        writer.transport.abort()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with serving(handler, ("algif", "cryptography")) as port:
            address = await loop.run_in_executor(None, client, port)
            while not peers:
                await asyncio.sleep(0.05)
        assert peers == [address]

    monkeypatch.setattr(tls, "hand_off", hand_off_after_reset)
    with no_fd_leak():
        run(main())


# algif: the handshake never completes, so no key reaches AF_ALG (kTLS's start probes the ULP)
@pytest.mark.parametrize("mode", independent_of_the_kernel(WRAP_MODES, "algif"))
def test_handshake_does_not_block_the_loop(mode: Mode) -> None:
    """While a client stalls in the middle of its handshake, the loop serves another client;
    the client's own handshake timeout raises TimeoutError and leaves nothing open."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        accepted: list[socket.socket] = []

        async def accept() -> None:
            conn, _ = await loop.sock_accept(listener)
            accepted.append(conn)  # never answers the ClientHello

        acc = asyncio.ensure_future(accept())
        with pytest.raises(TimeoutError):
            await connect(port, mode, ssl_handshake_timeout=1.0 * SLOW)
        await acc
        t.cancel()
        assert ticks > 5  # the loop ran while the handshake waited
        for s in (*accepted, listener):
            s.close()

    with no_fd_leak():
        run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_max_handshakes_closes_connections_beyond_it(mode: Mode) -> None:
    """start_server(max_handshakes=2): while two clients stall before their ClientHello, a third
    connection is closed by the server without an answer; once a staller leaves, an honest
    client gets its echo; nothing is left open."""

    async def refused(port: int) -> bool:
        """A plain TCP client that sends a ClientHello-sized nothing: True if the server ends
        the connection without a byte."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(reader.read(1), T) == b""
        except ConnectionError:
            return True
        finally:
            writer.close()

    async def echo_once(port: int) -> bytes:
        reader, writer = await connect(port, mode)
        try:
            writer.write(b"through")
            return await reader.readexactly(7)
        finally:
            await close(writer)

    async def main() -> None:
        server = {"max_handshakes": 2, "ssl_handshake_timeout": 3 * T}
        async with serving(echo, mode, **server) as port:
            stallers = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            assert await refused(port)
            stallers.pop()[1].close()  # its handshake fails: a slot is free again
            deadline = time.monotonic() + T
            while True:  # until the server has seen the staller go
                try:
                    assert await echo_once(port) == b"through"
                    break
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                    assert time.monotonic() < deadline, "no slot came free"
                    await asyncio.sleep(0.05)
            for _, writer in stallers:
                writer.close()

    with no_fd_leak():
        run(main())


def test_max_handshakes_is_checked() -> None:
    async def main(value: Any) -> None:
        await aio.start_server(echo, "127.0.0.1", 0, ssl=server_context("TLSv1.3"),
                               max_handshakes=value)  # fmt: skip

    for value in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="max_handshakes"):
            run(main(value))


# --- sendfile ------------------------------------------------------------------------------------


class NoRead:
    """A binary file whose read/readinto fail: only its descriptor can be sent (natively)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.mode = "rb"

    def fileno(self) -> int:
        return int(self._f.fileno())

    def seek(self, *args: Any) -> int:
        return int(self._f.seek(*args))

    def tell(self) -> int:
        return int(self._f.tell())

    def read(self, *args: Any) -> bytes:
        raise AssertionError("read() called: sendfile was not native")

    readinto = read


@pytest.fixture
def big_file() -> Iterator[tuple[str, bytes]]:
    size = scaled(4 * 2**20, 64 * 2**20)
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(delete=False) as f:
        for i in range(0, size, 2**20):
            block = pattern(min(2**20, size - i), i // 2**20)
            f.write(block)
            h.update(block)
    try:
        yield f.name, h.digest()
    finally:
        os.unlink(f.name)


async def _receive_digest(port_reader: asyncio.StreamReader, n: int) -> bytes:
    h = hashlib.sha256()
    got = 0
    while got < n:
        data = await port_reader.read(min(2**18, n - got))
        assert data, f"EOF after {got} of {n}"
        h.update(data)
        got += len(data)
    return h.digest()


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendfile(mode: Mode, big_file: tuple[str, bytes]) -> None:
    """aio.sendfile of a large file, SHA-256 checked at the other end, after a write (which
    goes first). Under kTLS it is native: the file object's read() is never called. The file's
    position ends after what was sent, and nothing is left open."""
    path, digest = big_file
    size = os.path.getsize(path)
    prefix = b"HEADER\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with open(path, "rb") as raw:
            f: Any = NoRead(raw) if writer.get_extra_info("mode") == "ktls" else raw
            writer.write(prefix)
            assert await aio.sendfile(writer, f) == size
            assert f.tell() == size
        await writer.drain()
        await close(writer)

    async def main() -> None:
        async with client_of(handler, mode) as (reader, _):
            assert await reader.readexactly(len(prefix)) == prefix
            assert await _receive_digest(reader, size) == digest
            assert await reader.read() == b""

    with no_fd_leak():
        run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendfile_range_and_loop_sendfile(mode: Mode, big_file: tuple[str, bytes]) -> None:
    """A range (offset, count) with aio.sendfile, and asyncio's loop.sendfile on the transport
    (its fallback path), each byte for byte."""
    path, _ = big_file
    with open(path, "rb") as f:
        content = f.read()
    offset, count = 12_345, 300_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with open(path, "rb") as f:
            assert await aio.sendfile(writer, f, offset, count) == count
            assert f.tell() == offset + count
            loop = asyncio.get_running_loop()
            f.seek(0)  # asyncio's fallback seeks only to a non-zero offset
            assert await loop.sendfile(writer.transport, f, 0, 100_000) == 100_000
        await close(writer)

    async def main() -> None:
        async with client_of(handler, mode) as (reader, _):
            assert await reader.readexactly(count) == content[offset : offset + count]
            assert await reader.readexactly(100_000) == content[:100_000]

    run(main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendfile_cancelled_in_the_middle(mode: Mode, big_file: tuple[str, bytes]) -> None:
    """aio.sendfile (kTLS: native; algif: sealed chunks) cancelled while the client does not
    read: CancelledError, the file's position after exactly what was sent, the connection goes
    on. The client then reads, with no bad record: what was written before, the file up to
    that position, what was written after, and a clean end."""
    path, _ = big_file
    with open(path, "rb") as f:
        content = f.read()
    state: dict[str, Any] = {}
    cancel = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        with open(path, "rb") as f:
            writer.write(b"BEFORE")
            task = asyncio.ensure_future(aio.sendfile(writer, f))
            await cancel.wait()
            assert not task.done()  # it waits for the client
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            state["sent"] = f.tell()
        writer.write(b"AFTER")
        await writer.drain()
        await close(writer)

    async def main() -> None:
        sock = socket.socket()  # a small receive window: sendfile stalls soon
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        async with serving(handler, mode) as port:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            reader, writer = await connect(port, mode, sock=sock, limit=32 * 1024)
            deadline = asyncio.get_running_loop().time() + T
            while writer.transport.is_reading():  # file data came: the reader is full
                assert asyncio.get_running_loop().time() < deadline, "never paused"
                await asyncio.sleep(0.05)
            cancel.set()
            assert await reader.readexactly(6) == b"BEFORE"
            got = bytearray()
            while data := await reader.read(2**18):  # a bad record would raise here
                got += data
            await close(writer)
            sent = state["sent"]
            assert 0 < sent < len(content)
            assert got[-5:] == b"AFTER" and len(got) == sent + 5
            assert got[:sent] == content[:sent]  # a prefix, nothing lost, nothing twice

    with no_fd_leak():
        run(main())


# --- the example: an asyncio file server ---------------------------------------------------------


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_example_file_server(mode: Mode, tmp_path: Any) -> None:
    """examples/aio_file_server.py: a file by aio.sendfile, SHA-256 checked, to asyncio's own
    TLS client; ServeDir's refusals (outside the directory, a symlink out, missing) as 404; the
    per-address cap of ServerLimits."""
    from aio_file_server import FileServer

    from afalg.serving import ServerLimits

    served = tmp_path / "www"
    served.mkdir()
    blob = pattern(scaled(1_000_000, 16_000_000), 21)
    (served / "blob.bin").write_bytes(blob)
    (served / "out").symlink_to("/etc/passwd")

    async def get(port: int, target: str) -> tuple[bytes, bytes]:
        reader, writer = await connect(port, None)  # asyncio's own TLS client
        writer.write(f"GET {target} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read()
        await close(writer)
        return head, body

    async def main() -> None:
        server = FileServer(str(served), ServerLimits(max_conns_per_address=1))
        listening = await server.start(server_context("TLSv1.3"), "127.0.0.1", 0, mode=mode[0])
        async with listening:
            port = listening.sockets[0].getsockname()[1]
            head, body = await get(port, "/blob.bin")
            assert head.startswith(b"HTTP/1.0 200 OK") and f"{len(blob)}".encode() in head
            assert hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
            for target in ("/../../etc/passwd", "/out", "/missing"):
                head, body = await get(port, target)
                assert head.startswith(b"HTTP/1.0 404"), (target, head)
            assert server.served == 1
            # the cap: a second connection from 127.0.0.1 while one is open is closed at once
            _, held = await connect(port, mode)
            await asyncio.sleep(0.2 * SLOW)  # admitted (its handler runs)
            r2, w2 = await connect(port, mode)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                assert await asyncio.wait_for(r2.read(), T) == b""
            await close(w2)
            await close(held)

    run(main())


@pytest.mark.parametrize(
    "backend", [pytest.param("kernel", marks=pytest.mark.kernel), "cryptography"]
)
def test_close_and_write_eof_write_out_what_the_socket_queued(backend: str) -> None:
    """close() and write_eof() wait for the records the TLS socket queued by itself (here a
    KeyUpdate sent through ``get_extra_info("socket")`` while the TCP send buffer is full, so
    the transport's own buffer is empty and no writer is registered): once the peer reads, the
    KeyUpdate and then close_notify under the next keys go out, and the connection ends."""
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    ours_keys, theirs_keys = (
        TrafficKeys.tls13(suite, b"\1" * 32),
        TrafficKeys.tls13(suite, b"\2" * 32),
    )

    async def main(end: str) -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        filler = 0
        with contextlib.suppress(BlockingIOError):
            while True:  # the send buffer full of bytes before any record
                filler += a.send(bytes(65536))
        conn = AlgTLSSocket(a, ours_keys, theirs_keys, backend=backend)
        lost: asyncio.Future[Exception | None] = loop.create_future()

        class Protocol(asyncio.Protocol):
            def connection_lost(self, exc: Exception | None) -> None:
                lost.set_result(exc)

        transport = aio.TLSTransport(loop, conn, Protocol(), half_close=True)
        await asyncio.sleep(0)
        transport.get_extra_info("socket").key_update()
        assert conn.pending_output() > 0  # the socket took none of it
        if end == "close":
            transport.close()
        else:
            transport.write_eof()
        with b:
            b.setblocking(False)
            wire = bytearray()
            while not (lost.done() and conn.fileno() == -1) or end == "write_eof":
                try:
                    data = await loop.sock_recv(b, 65536)
                except ConnectionError:
                    break
                if not data:
                    break
                wire += data
                if end == "write_eof" and len(wire) > filler and conn.pending_output() == 0:
                    break
            del wire[:filler]
            with RecordLayer(rx=ours_keys, backend="cryptography") as peer:
                peer.feed(bytes(wire))
                assert peer.next_record() == (ContentType.handshake, key_update_message(False))
                peer.rekey_rx()
                assert peer.next_record() == (ContentType.alert, b"\x01\x00")  # close_notify
        if end == "close":
            assert await lost is None
        else:
            transport.close()
            await lost

    with no_fd_leak():
        run(main("close"))
        run(main("write_eof"))
