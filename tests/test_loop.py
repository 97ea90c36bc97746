"""afalg's event loop (afalg.aio.new_event_loop, patch_loop, loop_factory): asyncio's own
``ssl=`` APIs run afalg's TLS unchanged; what afalg cannot take falls back (a Unix socket to
asyncio's TLS, a suite afalg cannot seal to mode "ssl"); ``loop.sendfile`` is native under kTLS.
Host tests run algif on the cryptography backend; the VM runs kTLS and algif on the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from _env import SLOW, WRAP_MODES, independent_of_the_kernel
from test_aio_limits import can_rekey
from test_key_limits import LIMIT, read_per_key
from test_tls_helpers import Bg, client_context, pattern, server_context, tcp_pair

from afalg import aio, handoff
from afalg._transport import TLSTransport
from afalg.errors import KeyLimitReached, KeyUpdateUnsupported
from afalg.record import RecordLayer
from afalg.wire import ContentType, HandshakeType, key_update_message

Mode = tuple[str, str]
T = 60 * SLOW


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Awaitable[Any]) -> Any:
    """Run ``coro`` on a loop from ``factory`` (asyncio.Runner, as 3.11 offers it)."""
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, 3 * T))  # type: ignore[arg-type]


def factory_for(mode: Mode) -> Callable[[], asyncio.AbstractEventLoop]:
    return aio.loop_factory(mode=mode[0], algif_backend=mode[1])


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


# --- the factories and patch_loop --------------------------------------------------------------


def test_new_event_loop_is_a_zero_argument_factory() -> None:
    loop = aio.new_event_loop()
    try:
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert aio.patch_loop(loop) is loop  # idempotent
        first = loop.create_server
        aio.patch_loop(loop)
        assert loop.create_server == first
    finally:
        loop.close()


def test_patch_loop_refuses_what_it_cannot_patch() -> None:
    with pytest.raises(TypeError, match="not object"):
        aio.patch_loop(object())  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        aio.patch_loop(loop)
    with pytest.raises(ValueError, match="mode"):
        aio.loop_factory(mode="bogus")


def test_patch_loop_refuses_a_loop_running_in_another_thread() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        while not loop.is_running():
            threading.Event().wait(0.01)
        with pytest.raises(RuntimeError, match="another thread"):
            aio.patch_loop(loop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class _Slotted(asyncio.SelectorEventLoop):
    """A loop type whose instances take no new attributes (as a C loop type)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("create_connection",):
            raise AttributeError(name)
        super().__setattr__(name, value)


def test_patch_loop_names_a_loop_type_it_cannot_patch() -> None:
    loop = _Slotted()
    try:
        with pytest.raises(TypeError, match="_Slotted"):
            aio.patch_loop(loop)
    finally:
        loop.close()


# --- asyncio's streams, unchanged, over afalg ---


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_asyncio_streams_run_afalg(mode: Mode, version: str) -> None:
    """asyncio.start_server(ssl=) and asyncio.open_connection(ssl=) on afalg's loop: both
    ends are afalg's transport, the mode chosen, the facts frameworks read there."""

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context(version))
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(version), server_hostname="localhost"
            )
            data = pattern(300_000)
            writer.write(data)
            await writer.drain()
            assert await reader.readexactly(len(data)) == data
            t = writer.transport
            assert isinstance(t, TLSTransport)
            assert t.get_extra_info("mode") == mode[0]
            assert t.get_extra_info("ssl_object").version() == version
            assert t.get_extra_info("sslcontext") is not None
            assert t.get_extra_info("peercert")["subject"]
            assert t.get_extra_info("cipher")[1] == version
            assert t.get_extra_info("peername")[1] == port
            assert t.get_extra_info("socket") is not None
            writer.close()
            await writer.wait_closed()

    run_on(factory_for(mode), main())


def test_asyncio_tls_peer_interoperates() -> None:
    """afalg's loop as a server for asyncio's own TLS client on a plain loop (another thread)."""
    ready: list[int] = []
    done = threading.Event()

    async def serve() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context())
        ready.append(server.sockets[0].getsockname()[1])
        async with server:
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    async def client(port: int) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
        )
        writer.write(b"ping" * 1000)
        got = await reader.readexactly(4000)
        writer.close()
        return got

    thread = threading.Thread(target=run_on, args=(aio.loop_factory(algif_backend="auto"), serve()))
    thread.start()
    try:
        while not ready:
            threading.Event().wait(0.01)
        assert asyncio.run(client(ready[0])) == b"ping" * 1000
    finally:
        done.set()
        thread.join()


# algif: every handshake fails, so no key reaches AF_ALG (kTLS's loop probes the ULP)
@pytest.mark.parametrize("mode", independent_of_the_kernel(WRAP_MODES, "algif"))
def test_handshake_errors_as_asyncio(mode: Mode) -> None:
    """A hostname mismatch raises ssl's verification error; ssl=True is asyncio's default
    context (our CA unknown to it: verification fails); a bad ssl= is a TypeError."""

    async def main() -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        async with server:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_context(), server_hostname="wrong.example"
                )
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.open_connection("127.0.0.1", port, ssl=True)
            with pytest.raises(TypeError, match="SSLContext"):
                await asyncio.open_connection("127.0.0.1", port, ssl="yes")
            with pytest.raises(TypeError, match="SSLContext"):
                await asyncio.start_server(echo, "127.0.0.1", 0, ssl=True)
            loop = asyncio.get_running_loop()
            with pytest.raises(TypeError, match="SSLContext"):
                await loop.create_server(asyncio.Protocol, "127.0.0.1", 0, ssl="yes")
            with pytest.raises(TypeError, match="SSLContext"):
                await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, ssl=b"ctx")
            plain, proto = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            with pytest.raises(TypeError, match="SSLContext"):
                await loop.start_tls(plain, proto, "ctx")  # type: ignore[arg-type]
            plain.close()

    run_on(factory_for(mode), main())


def test_handshake_timeout_as_asyncio() -> None:
    """A server that never answers: TimeoutError within ssl_handshake_timeout, naming it."""
    listener = socket.create_server(("127.0.0.1", 0))

    async def main() -> None:
        port = listener.getsockname()[1]
        with pytest.raises(TimeoutError, match="ssl_handshake_timeout"):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost",
                ssl_handshake_timeout=0.5,
            )  # fmt: skip

    with listener:
        run_on(aio.new_event_loop, main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_connect_accepted_socket_and_start_tls(mode: Mode) -> None:
    """connect_accepted_socket(ssl=) serves; start_tls upgrades a plain connection after a
    clear-text exchange (STARTTLS) and calls no connection_made."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = tcp_pair(timeout=T)
        a.setblocking(False)
        b.setblocking(False)
        received: asyncio.Queue[bytes] = asyncio.Queue()

        class Echo(asyncio.Protocol):
            def connection_made(self, transport: Any) -> None:
                self.t = transport

            def data_received(self, data: bytes) -> None:
                self.t.write(data)

        class Client(asyncio.Protocol):
            made = 0

            def connection_made(self, transport: Any) -> None:
                Client.made += 1

            def data_received(self, data: bytes) -> None:
                received.put_nowait(data)

        server_task = asyncio.ensure_future(
            loop.connect_accepted_socket(Echo, a, ssl=server_context())
        )
        plain, proto = await loop.create_connection(Client, sock=b)
        plain.write(b"STARTTLS\r\n")  # in the clear, before the handshake
        tls_t = await loop.start_tls(plain, proto, client_context(), server_hostname="localhost")
        server_t, _ = await server_task
        assert isinstance(server_t, TLSTransport) and isinstance(tls_t, TLSTransport)
        assert Client.made == 1  # start_tls made none
        tls_t.write(b"hello")
        got = b""
        while len(got) < 5:
            got += await received.get()
        assert got == b"hello"
        assert tls_t.get_extra_info("mode") == mode[0]
        tls_t.close()
        server_t.close()

    # The clear-text line reaches the server's socket before its handshake: read it first.

    async def patched_main() -> None:
        loop = asyncio.get_running_loop()
        original = loop.connect_accepted_socket

        async def reading_first(factory: Any, sock: socket.socket, **kw: Any) -> Any:
            await loop.sock_recv(sock, len(b"STARTTLS\r\n"))
            return await original(factory, sock, **kw)

        loop.connect_accepted_socket = reading_first  # type: ignore[method-assign]
        await main()

    run_on(factory_for(mode), patched_main())


# --- fallbacks ---


WHERE = [pytest.param("host"), pytest.param("kernel", marks=pytest.mark.kernel)]


@pytest.mark.parametrize("where", WHERE)
def test_unix_socket_runs_asyncio_tls(where: str, tmp_path: Any) -> None:
    """A Unix socket is not afalg's: asyncio's own TLS takes it, before the handshake (in the
    VM too, where afalg's TLS would run for TCP)."""

    async def main() -> None:
        path = str(tmp_path / "s")
        server = await asyncio.start_unix_server(echo, path, ssl=server_context())
        async with server:
            reader, writer = await asyncio.open_unix_connection(
                path, ssl=client_context(), server_hostname="localhost"
            )
            writer.write(b"over unix")
            assert await reader.readexactly(9) == b"over unix"
            assert not isinstance(writer.transport, TLSTransport)
            assert writer.get_extra_info("ssl_object") is not None
            writer.close()
            # create_server with a Unix sock= too
            sock = socket.socket(socket.AF_UNIX)
            sock.bind(path + "2")
            srv2 = await asyncio.get_running_loop().create_server(
                asyncio.Protocol, sock=sock, ssl=server_context()
            )
            srv2.close()

    run_on(aio.new_event_loop, main())


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("role", ["afalg-server", "afalg-client", "both"])
def test_cbc_suite_runs_mode_ssl(role: str, where: str) -> None:
    """TLS 1.2 CBC (not AEAD): neither the kernel nor afalg can seal it; the finished handshake
    carries on in userspace, mode "ssl", against asyncio's TLS or afalg's loop at the other
    end (in the VM too, where an AEAD suite would run kTLS)."""
    cbc = "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"

    def ctx(server: bool) -> ssl.SSLContext:
        c = server_context("TLSv1.2", cbc) if server else client_context("TLSv1.2", cbc)
        return c

    data = pattern(500_000)

    async def server_side(ready: list[int], done: threading.Event) -> None:
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ctx(True))
        ready.append(server.sockets[0].getsockname()[1])
        async with server:
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    async def client_side(port: int) -> str:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx(False), server_hostname="localhost"
        )
        writer.write(data)
        await writer.drain()
        assert await reader.readexactly(len(data)) == data
        assert writer.get_extra_info("cipher")[0] in cbc.split(":")
        mode = writer.get_extra_info("mode")
        writer.close()
        await writer.wait_closed()
        return str(mode)

    server_loop = aio.new_event_loop if role != "afalg-client" else asyncio.new_event_loop
    client_loop = aio.new_event_loop if role != "afalg-server" else asyncio.new_event_loop
    ready: list[int] = []
    done = threading.Event()
    thread = threading.Thread(target=run_on, args=(server_loop, server_side(ready, done)))
    thread.start()
    try:
        while not ready:
            threading.Event().wait(0.01)
        mode = run_on(client_loop, client_side(ready[0]))
    finally:
        done.set()
        thread.join()
    assert mode == ("ssl" if role != "afalg-server" else "None")


# --- loop.sendfile ---


@pytest.fixture
def big_file() -> Iterator[tuple[str, bytes]]:
    data = os.urandom(3 * 1024 * 1024 + 123)
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    yield f.name, data
    os.unlink(f.name)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_loop_sendfile(mode: Mode, big_file: tuple[str, bytes]) -> None:
    """loop.sendfile over afalg's transport: the whole file, then a range, byte for byte,
    the file's position after what was sent; a closing transport: asyncio's RuntimeError."""
    path, data = big_file

    async def main() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await reader.readexactly(len(data) + 1000))
            writer.close()

        server = await asyncio.start_server(receive, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        async with server:
            _, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            loop = asyncio.get_running_loop()
            with open(path, "rb") as f:
                assert await loop.sendfile(writer.transport, f) == len(data)
                assert f.tell() == len(data)
                assert await loop.sendfile(writer.transport, f, 5000, 1000) == 1000
                assert f.tell() == 6000
                assert (
                    hashlib.sha256(await got).digest()
                    == hashlib.sha256(data + data[5000:6000]).digest()
                )
                if mode[0] != "ktls":  # asyncio's answer where the kernel's sendfile cannot run
                    with pytest.raises(asyncio.SendfileNotAvailableError):
                        await loop.sendfile(writer.transport, f, fallback=False)
                writer.close()
                with pytest.raises(RuntimeError, match="closing"):
                    await loop.sendfile(writer.transport, f)

    run_on(factory_for(mode), main())


def test_loop_sendfile_without_tls_is_asyncios(big_file: tuple[str, bytes]) -> None:
    """A plain TCP transport on afalg's loop: asyncio's own loop.sendfile."""
    path, data = big_file

    async def main() -> None:
        got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(await reader.readexactly(len(data)))
            writer.close()

        server = await asyncio.start_server(receive, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            with open(path, "rb") as f:
                await asyncio.get_running_loop().sendfile(writer.transport, f)
            assert await got == data
            writer.close()

    run_on(aio.new_event_loop, main())


def test_a_failing_protocol_factory_leaks_nothing() -> None:
    """create_connection whose protocol factory raises: that error, and the connection is
    closed (the server sees its end)."""

    def broken() -> asyncio.Protocol:
        raise ZeroDivisionError

    async def main() -> None:
        ended: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            ended.set_result(await reader.read())
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context())
        async with server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(ZeroDivisionError):
                await asyncio.get_running_loop().create_connection(
                    broken, "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
                )
            assert await ended == b""

    run_on(aio.new_event_loop, main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_loop_sendfile_keeps_the_limit(mode: Mode, tmp_path: Any) -> None:
    """loop.sendfile on a loop made with records_per_key=8, counted at an independent peer
    (ssl's handshake, then a bare record layer): no key seals more than 8 records; where keys
    cannot be updated (kTLS before 6.14) KeyLimitReached, the file's position after exactly
    what the peer received."""
    body = pattern(2**20, 13)
    path = tmp_path / "body"
    path.write_bytes(body)
    result: dict[str, Any] = {}

    async def main() -> None:
        csock, ssock = tcp_pair(timeout=T)
        csock.setblocking(False)
        sctx = server_context("TLSv1.3", None, num_tickets=0)
        peer = Bg(lambda: handoff.handshake(ssock, sctx, server_side=True))
        loop = asyncio.get_running_loop()
        with ssock:
            _, writer = await asyncio.open_connection(
                sock=csock, ssl=client_context(), server_hostname="localhost"
            )
            h = await loop.run_in_executor(None, peer.result, T)
            counted = Bg(lambda: read_per_key(ssock, h))
            with open(path, "rb") as f:
                if can_rekey(mode):
                    assert await loop.sendfile(writer.transport, f) == len(body)
                    result["sent"] = len(body)
                else:
                    with pytest.raises(KeyLimitReached, match=r"6\.14"):
                        await loop.sendfile(writer.transport, f)
                    result["sent"] = f.tell()
            writer.close()
            await writer.wait_closed()
            result["peer"] = await loop.run_in_executor(None, counted.result, T)

    factory = aio.loop_factory(mode=mode[0], algif_backend=mode[1], records_per_key=LIMIT)
    run_on(factory, main())
    data, counts, closed = result["peer"]
    assert closed
    assert max(counts) <= LIMIT, counts
    assert data == body[: result["sent"]]
    if can_rekey(mode):
        assert len(counts) > 1, counts  # KeyUpdates went first


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_loop_sendfile_cancelled(mode: Mode, big_file: tuple[str, bytes]) -> None:
    """loop.sendfile cancelled while the client does not read: CancelledError, the file's
    position after exactly what was sent (kTLS) or queued (algif); the client then receives
    that prefix, then what is written next, and a clean end."""
    path, content = big_file
    state: dict[str, Any] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        served: asyncio.Future[tuple[Any, Any]] = loop.create_future()

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.set_result((reader, writer))

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context())
        async with server:
            sock = socket.socket()  # a small receive window: sendfile stalls soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.setblocking(False)
            await loop.sock_connect(sock, server.sockets[0].getsockname())
            reader, client = await asyncio.open_connection(
                sock=sock, ssl=client_context(), server_hostname="localhost", limit=32 * 1024
            )
            _, writer = await served
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            with open(path, "rb") as f:
                task = asyncio.ensure_future(loop.sendfile(writer.transport, f))
                while client.transport.is_reading():  # file data came: the reader is full
                    await asyncio.sleep(0.05)
                assert not task.done()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                state["sent"] = f.tell()
            writer.write(b"AFTER")
            writer.close()
            got = bytearray()
            while data := await reader.read(2**18):  # a bad record would raise here
                got += data
            client.close()
            sent = state["sent"]
            assert 0 < sent < len(content)
            assert bytes(got) == content[:sent] + b"AFTER"

    run_on(factory_for(mode), main())


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_peer_key_update_during_loop_sendfile(mode: Mode, tmp_path: Any) -> None:
    """The peer (an independent record layer) reads the first 64 KiB of a 4 MiB
    loop.sendfile, then sends a KeyUpdate asking for ours. The sendfile cannot have finished
    (the socket buffers hold far less than the file): our answer (update_not_requested) comes
    in the middle, the rest of the file under our next key, byte for byte, then close_notify.
    Where kTLS cannot follow the peer's key (before 6.14): the sendfile fails, the reader gets
    KeyUpdateUnsupported naming 6.14, and the peer received a prefix of the file, no answer."""
    rekeys = can_rekey(mode)
    body = pattern(4 * 2**20, 19)
    path = tmp_path / "body"
    path.write_bytes(body)
    first = 64 * 1024
    result: dict[str, Any] = {}

    def peer(sock: socket.socket, h: handoff.Handoff) -> list[tuple[int, int, bytes]]:
        layer = RecordLayer(tx=h.tx, rx=h.rx, backend="cryptography")
        events: list[tuple[int, int, bytes]] = []
        generation, received, asked = 0, 0, False
        with layer:
            while True:
                try:
                    chunk = sock.recv(2**16)
                except ConnectionResetError:  # closed with our KeyUpdate unread (kTLS < 6.14)
                    break
                if not chunk:
                    break
                layer.feed(chunk)
                while (record := layer.next_record()) is not None:
                    events.append((generation, record.content_type, record.payload))
                    if record.content_type == ContentType.application_data:
                        received += len(record.payload)
                    elif record.content_type == ContentType.handshake:
                        assert record.payload[0] == HandshakeType.key_update
                        layer.rekey_rx()
                        generation += 1
                if received >= first and not asked:
                    asked = True
                    sock.sendall(layer.seal(ContentType.handshake, key_update_message(True)))
                    layer.rekey_tx()
        return events

    async def main() -> None:
        csock, ssock = tcp_pair(timeout=T)
        csock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        ssock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        csock.setblocking(False)
        sctx = server_context("TLSv1.3", None, num_tickets=0)
        shake = Bg(lambda: handoff.handshake(ssock, sctx, server_side=True))
        loop = asyncio.get_running_loop()
        with ssock:
            reader, writer = await asyncio.open_connection(
                sock=csock, ssl=client_context(), server_hostname="localhost"
            )
            h = await loop.run_in_executor(None, shake.result, T)
            events = Bg(lambda: peer(ssock, h))
            with open(path, "rb") as f:
                if rekeys:
                    result["sent"] = await loop.sendfile(writer.transport, f)
                else:
                    with pytest.raises((ConnectionError, KeyUpdateUnsupported)):
                        await loop.sendfile(writer.transport, f)
                    with pytest.raises(KeyUpdateUnsupported, match=r"6\.14"):
                        await reader.read()
            writer.close()
            with contextlib.suppress(*(() if rekeys else (KeyUpdateUnsupported,))):
                await writer.wait_closed()
            result["events"] = await loop.run_in_executor(None, events.result, T)

    run_on(factory_for(mode), main())
    events = result["events"]
    data = b"".join(p for _, kind, p in events if kind == ContentType.application_data)
    updates = [i for i, (_, kind, _) in enumerate(events) if kind == ContentType.handshake]
    if not rekeys:
        assert first <= len(data) < len(body) and data == body[: len(data)]
        assert updates == []  # no answer: the connection failed
        return
    assert result["sent"] == len(body)
    assert data == body
    assert len(updates) == 1, updates
    (i,) = updates
    assert events[i][2] == key_update_message(False)  # an answer asks for nothing
    before = sum(len(p) for gen, kind, p in events[:i] if kind == ContentType.application_data)
    assert first <= before < len(body) - 2**20  # in the middle: most of the file after it
    assert all(gen == 1 for gen, _, _ in events[i + 1 :])  # the rest under our next key
    assert events[-1][1:] == (ContentType.alert, b"\x01\x00")  # close_notify


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_100_concurrent_clients(mode: Mode) -> None:
    """100 clients at once (asyncio's own TLS, on a plain loop in another thread) against
    asyncio.start_server(ssl=) on afalg's loop: each gets its own bytes back; every server
    transport is afalg's, in the mode asked for. The handshake timeout is generous: under a
    loaded host, 100 handshakes queue on one loop."""
    n = 100
    ready: list[int] = []
    done = threading.Event()
    modes: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        modes.append(writer.get_extra_info("mode"))
        await echo(reader, writer)

    async def serve() -> None:
        server = await asyncio.start_server(
            handler, "127.0.0.1", 0, ssl=server_context(), backlog=2 * n,
            ssl_handshake_timeout=30 * T,
        )  # fmt: skip
        ready.append(server.sockets[0].getsockname()[1])
        async with server:
            await asyncio.get_running_loop().run_in_executor(None, done.wait)

    async def one(port: int, i: int) -> bool:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost",
            ssl_handshake_timeout=30 * T,
        )  # fmt: skip
        data = pattern(10_000 + i, i)
        writer.write(data)
        ok = await reader.readexactly(len(data)) == data
        writer.close()
        await writer.wait_closed()
        return ok

    async def clients(port: int) -> list[bool]:
        return await asyncio.gather(*(one(port, i) for i in range(n)))

    thread = threading.Thread(target=run_on, args=(factory_for(mode), serve()))
    thread.start()
    try:
        while not ready and thread.is_alive():
            threading.Event().wait(0.01)
        assert ready, "the server did not start"
        with asyncio.Runner() as runner:
            results = runner.run(asyncio.wait_for(clients(ready[0]), 30 * T))
    finally:
        done.set()
        thread.join()
    assert results == [True] * n
    assert modes == [mode[0]] * n


# --- asyncio.Server counts afalg's connections ---


def counted(server: asyncio.Server) -> int:
    """The connections ``server`` counts (asyncio's private count: 3.13 keeps the transports)."""
    if sys.version_info >= (3, 13):
        return len(server._clients)  # type: ignore[attr-defined]
    return int(server._active_count)  # type: ignore[attr-defined]


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (the caller's wait_for bounds it): no timing assumed."""
    while not condition():
        await asyncio.sleep(0.01)


async def afalg_server(how: str, handler: Any) -> asyncio.Server:
    """A server of afalg's: asyncio.start_server on afalg's loop, or afalg.aio.start_server."""
    if how == "loop":
        return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context())
    return await aio.start_server(handler, "127.0.0.1", 0, ssl=server_context())


SERVERS = [("loop", aio.new_event_loop), ("aio", asyncio.new_event_loop)]


@pytest.mark.parametrize(("how", "factory"), SERVERS, ids=[h for h, _ in SERVERS])
def test_server_counts_afalg_connections(how: str, factory: Any) -> None:
    """asyncio.Server counts a client of afalg's from its accept (in its handshake) to the end
    of its transport, once; after close(), wait_closed() waits for it (3.12.1+, as asyncio)."""
    writers: list[asyncio.StreamWriter] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await afalg_server(how, handler)
        port = server.sockets[0].getsockname()[1]
        raw = socket.create_connection(("127.0.0.1", port))  # no handshake yet
        await until(lambda: counted(server) == 1)
        raw.close()  # its handshake fails: no longer counted
        await until(lambda: counted(server) == 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
        )
        await until(lambda: len(writers) == 1)
        assert counted(server) == 1  # the transport, not also the handshake or asyncio's
        server.close()
        closed = asyncio.ensure_future(server.wait_closed())
        for _ in range(20):
            await asyncio.sleep(0)
        if sys.version_info >= (3, 12, 1):
            assert not closed.done()  # the connection is open
        writers[0].close()
        assert await reader.read() == b""  # close_notify
        writer.close()
        await closed
        await until(lambda: counted(server) == 0)
        del loop

    run_on(factory, main())


# Server.close_clients() and abort_clients() are 3.13's: before, the test does not exist (a skip
# would fail the run, and there is nothing of afalg's to check where the method is missing).
if sys.version_info >= (3, 13):

    @pytest.mark.parametrize("abort", [False, True], ids=["close_clients", "abort_clients"])
    @pytest.mark.parametrize(("how", "factory"), SERVERS, ids=[h for h, _ in SERVERS])
    def test_close_clients_reaches_afalg_connections(how: str, factory: Any, abort: bool) -> None:
        """Server.close_clients() closes afalg's transports (the client reads close_notify: a
        clean end) and a client in its handshake (its socket sees the end); abort_clients() drops
        them (no close_notify: the client reads an error or a bare end). wait_closed() returns."""

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # until the end, whoever makes it

        async def main() -> None:
            server = await afalg_server(how, handler)
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            await until(lambda: counted(server) == 1)
            raw = socket.create_connection(("127.0.0.1", port), timeout=T)  # stays in its handshake
            await until(lambda: counted(server) == 2)
            server.close()
            server.abort_clients() if abort else server.close_clients()  # type: ignore[attr-defined]
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, raw.recv, 100) == b""
            raw.close()
            if abort:  # an error, or the end without close_notify
                with contextlib.suppress(ConnectionError, ssl.SSLError):
                    assert await reader.read() == b""
            else:
                assert await reader.read() == b""
            writer.close()
            await server.wait_closed()
            assert counted(server) == 0

        run_on(factory, main())


@pytest.mark.parametrize(("how", "factory"), SERVERS, ids=[h for h, _ in SERVERS])
def test_handshake_ending_after_server_close_is_served(how: str, factory: Any) -> None:
    """A client whose handshake began before Server.close() and ends after it is served (as
    asyncio serves a connection accepted before close()), and wait_closed() waits for it."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"served")
        writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await afalg_server(how, handler)
        port = server.sockets[0].getsockname()[1]
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = client_context("TLSv1.3").wrap_bio(incoming, outgoing, server_hostname="localhost")
        with socket.create_connection(("127.0.0.1", port), timeout=T) as sock:
            with pytest.raises(ssl.SSLWantReadError):
                obj.do_handshake()
            sock.sendall(outgoing.read())  # the ClientHello
            while True:  # the server's flight: the server is in its handshake
                incoming.write(await loop.run_in_executor(None, sock.recv, 65536))
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
            server.close()
            sock.sendall(outgoing.read())  # our Finished, after close()
            got = b""
            while data := await loop.run_in_executor(None, sock.recv, 65536):
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    got += obj.read(65536)
                    got += obj.read(65536)
            assert got == b"served"
        await server.wait_closed()
        assert counted(server) == 0

    run_on(factory, main())


# --- uvloop ---


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_uvloop_base(mode: Mode, big_file: tuple[str, bytes]) -> None:
    """afalg.aio.loop_factory(uvloop.new_event_loop): asyncio's streams with ssl= run afalg's
    transport on uvloop's loop (both ends), byte for byte, and loop.sendfile too."""
    uvloop = pytest.importorskip("uvloop")
    path, data = big_file
    factory = aio.loop_factory(uvloop.new_event_loop, mode=mode[0], algif_backend=mode[1])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            assert isinstance(writer.transport, TLSTransport)
            assert writer.get_extra_info("mode") == mode[0]
            writer.write(b"hello uvloop")
            assert await reader.readexactly(12) == b"hello uvloop"
            with open(path, "rb") as f:
                assert await loop.sendfile(writer.transport, f) == len(data)
            got = await reader.readexactly(len(data))
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
            writer.close()
            await writer.wait_closed()

    run_on(factory, main())
