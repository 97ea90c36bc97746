"""Both example file servers' request path and limits, through real TLS connections.

The asyncio one (examples/aio_file_server.py) runs on its own event loop in a thread, the
threaded one (examples/tls_echo_server.py, ``--serve-dir``) as in test_echo_server; clients are
Python's ``ssl``. On the host: the asyncio server in algif mode (its record layer on
``cryptography``), the threaded one in its reference mode (plain ``ssl``); the request path
(:class:`afalg.serving.FileRequest`, :class:`afalg.serving.ServeDir`) is the same in every mode.
Kernel-marked cases run the kernel modes in the VM.

- Any request target gets an HTTP status (200, 400, 403, 404, 500), never a connection dropped
  without one, never an unhandled exception; a 200 carries the file the target's *path* names
  (``//x/f`` is ``x/f``, not ``/f``).
- A client that asks for a file larger than the socket buffers and never reads is ended within
  the request's deadline, the close included, and its slot stays counted until the socket is
  closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from _env import CAFILE, CERTS, IN_VM, SERVER_MODES, SLOW
from aio_file_server import FileServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_echo_server import Running
from tls_echo_server import server_context

from afalg.serving import ServerLimits

STATUSES = (200, 400, 403, 404, 500)
# A file bigger than what a client's small receive buffer, the server's send buffer and the
# transport's buffer hold together: a client that never reads blocks the response.
BIG = 24 * 2**20
MID = 2**20


def _files(root: Any) -> None:
    """Each file's content is its own path under the root: a 200 says which file was served."""
    for rel in ("f", "x/f", "x/y/f", "sub/small.txt", "[x/f", "%41"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rel.encode())


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("served")
    _files(root)
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "mid.bin").write_bytes(os.urandom(MID))
    return root


class AioServer:
    """examples/aio_file_server.py's FileServer on an event loop in a thread. ``open`` counts
    the server-side sockets not yet closed, ``violations`` the moments (checked every few ms)
    when fewer slots were counted than such sockets, ``ended`` the handlers that returned."""

    def __init__(self, root: str, limits: ServerLimits, mode: str, tune: Any = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: list[asyncio.StreamWriter] = []
        self.violations: list[tuple[int, int]] = []
        self.ended = 0
        outer = self

        class Watched(FileServer):
            async def handle(self, reader: Any, writer: Any) -> None:
                outer.writers.append(writer)
                if tune is not None:
                    tune(writer)
                try:
                    await super().handle(reader, writer)
                finally:
                    outer.ended += 1

        self.server = Watched(root, limits)
        ctx = server_context(str(CERTS / "server.pem"), str(CERTS / "server.key"))
        self.listening = self.call(self.server.start(ctx, "127.0.0.1", 0, mode=mode))
        self.port = self.listening.sockets[0].getsockname()[1]
        self.watch = asyncio.run_coroutine_threadsafe(self._watch(), self.loop)

    def call(self, coro: Any, timeout: float = 30 * SLOW) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self) -> int:
        """Server-side TLS sockets of this server still open."""
        socks = [w.get_extra_info("socket") for w in self.writers]
        return sum(1 for s in socks if s is not None and s.fileno() >= 0)

    async def _watch(self) -> None:
        while True:
            still_open, counted = self.open(), self.server.admission.count()
            if counted < still_open:
                self.violations.append((still_open, counted))
            await asyncio.sleep(0.005)

    def wait(self, condition: Any, timeout: float) -> bool:
        async def poll() -> bool:
            async with asyncio.timeout(timeout):
                while not condition():
                    await asyncio.sleep(0.01)
            return True

        try:
            return bool(self.call(poll(), timeout + 10 * SLOW))
        except TimeoutError:
            return False

    def stop(self) -> None:
        self.watch.cancel()

        async def close() -> None:
            self.listening.close()
            for writer in self.writers:
                writer.transport.abort()

        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30 * SLOW)
        self.loop.close()


def _client(port: int, *, rcvbuf: int | None = None) -> ssl.SSLSocket:
    raw = socket.socket()
    if rcvbuf is not None:  # before connect(): the window the server sees stays small
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(30 * SLOW)
    raw.connect(("127.0.0.1", port))
    ctx = ssl.create_default_context(cafile=CAFILE)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _get(port: int, target: str) -> bytes:
    """The whole response to ``GET target HTTP/1.0`` (the server closes after it)."""
    with _client(port) as tls:
        tls.sendall(f"GET {target} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode("latin-1"))
        response = b""
        try:
            while more := tls.recv(65536):
                response += more
        except (ssl.SSLEOFError, ConnectionResetError):
            pass  # an end without close_notify: the status line (or its absence) tells
        return response


def _check_response(target: str, response: bytes) -> None:
    assert response.startswith(b"HTTP/1.0 "), (target, response[:80])
    status = int(response[9:12])
    assert status in STATUSES, (target, response[:80])
    if status == 200:
        body = response.partition(b"\r\n\r\n")[2]
        path = urllib.parse.unquote(target.partition("?")[0].partition("#")[0])
        # the file its path names below the root: every "/" separates, none names a host
        assert body == os.path.normpath(path.lstrip("/")).encode(), (target, body)


# Request targets: any latin-1 text (as both servers decode it), and paths built from the
# pieces that confused urlsplit (hosts, IPv6 brackets, escapes).
_PIECES = [
    "",
    ".",
    "..",
    "[",
    "[x",
    "]",
    "%",
    "%2f",
    "%2e%2e",
    "%00",
    "%41",
    "?",
    "#",
    ":",
    "@",
    "f",
    "x",
    "y",
    "sub",
    "small.txt",
    "//",
    "[::1]",
    "%5b",
]
TARGETS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF), max_size=30) | st.builds(
    lambda parts: "/" + "/".join(parts), st.lists(st.sampled_from(_PIECES), max_size=6)
)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def aio_server(tree: Any) -> Iterator[AioServer]:
    srv = AioServer(str(tree), ServerLimits(handshake_timeout=30 * SLOW), mode="auto")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def threaded_server(tree: Any) -> Iterator[Running]:
    srv = Running("userspace", serve_dir=str(tree), handshake_timeout=30 * SLOW)
    yield srv
    srv.stop()


@given(target=TARGETS)
@example(target="//[x/")
@example(target="//x/f")
@example(target="//[x/f")
@example(target="/%5bx/f")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_asyncio_server_answers_any_target(aio_server: AioServer, target: str) -> None:
    """Every target gets a status; the server logs no error (before: ``//[x/`` dropped the
    client and asyncio logged an unhandled ValueError; ``//x/f`` served ``/f``)."""
    errors = _Errors()
    for name in ("asyncio", "aio_file_server"):
        logging.getLogger(name).addHandler(errors)
    try:
        _check_response(target, _get(aio_server.port, target))
    finally:
        for name in ("asyncio", "aio_file_server"):
            logging.getLogger(name).removeHandler(errors)
    assert not errors.records, [r.getMessage() for r in errors.records]


@given(target=TARGETS)
@example(target="//[x/")
@example(target="//x/f")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_threaded_server_answers_any_target(threaded_server: Running, target: str) -> None:
    """The same for the threaded server's file requests."""
    _check_response(target, _get(threaded_server.port, target))


# --- a client that asks for a big file and never reads ----------------------------------------

REQUEST_TIMEOUT = 10.0 if IN_VM else 1.0
AIO_MODES = [
    pytest.param("auto", id="algif-host"),
    pytest.param("ktls", marks=pytest.mark.kernel),
    pytest.param("algif", marks=pytest.mark.kernel),
]


def _small_buffers_large_low_water(writer: asyncio.StreamWriter) -> None:
    """The response's tail certain to wait in the transport's buffer when sendfile returns:
    small kernel buffers, a low-water mark above the file's size. (With the defaults, 64 KiB
    and 16 KiB, that happens for the band of sizes that leave at most 16 KiB unsent when the
    kernel's buffers are full: the case the issue saw; the limits make it every size.)"""
    tls = writer.get_extra_info("socket")
    with socket.socket(fileno=os.dup(tls.fileno())) as dup:
        dup.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    writer.transport.set_write_buffer_limits(high=4 * MID, low=2 * MID)


@pytest.mark.parametrize("mode", AIO_MODES)
def test_asyncio_server_ends_a_client_that_never_reads(tree: Any, mode: str) -> None:
    """Two clients GET a file larger than the kernel's buffers and never read: each is ended
    (its handler returns, its socket is closed) within the request deadline, close included,
    and its slot is counted until its socket is closed (before: the response was "served"
    into the transport's buffer, the slot freed, then the close waited for ever)."""
    limits = ServerLimits(
        handshake_timeout=30 * SLOW, request_timeout=REQUEST_TIMEOUT, max_conns=4,
        max_conns_per_address=2,
    )  # fmt: skip
    srv = AioServer(str(tree), limits, mode, tune=_small_buffers_large_low_water)
    clients = []
    try:
        for target in ("/mid.bin", "/big.bin"):
            tls = _client(srv.port, rcvbuf=4096)
            tls.sendall(f"GET {target} HTTP/1.0\r\n\r\n".encode())
            clients.append(tls)
        # generous: the deadline (1 s on the host) plus a loaded machine; never met before
        assert srv.wait(lambda: srv.ended == 2, 60 * SLOW), (srv.ended, srv.open())
        assert srv.open() == 0 and srv.server.admission.count() == 0
        assert not srv.violations, srv.violations[:5]
        # the slots are free again: a reading client is served
        assert _get(srv.port, "/x/f").endswith(b"\r\n\r\nx/f")
    finally:
        for tls in clients:
            tls.close()
        srv.stop()


@pytest.mark.parametrize("mode", SERVER_MODES)
def test_threaded_server_ends_a_client_that_never_reads(tree: Any, mode: str) -> None:
    """The threaded server: the same client is shut down at the request deadline; its slot is
    released only after its socket is closed."""
    srv = Running(
        mode, serve_dir=str(tree), handshake_timeout=30 * SLOW, request_timeout=REQUEST_TIMEOUT,
        idle_timeout=600.0, max_conns=4, max_conns_per_address=2,
    )  # fmt: skip
    seen: list[tuple[str, bool, int]] = []
    srv.server.on_close = lambda conn: (
        seen.append((conn.outcome, conn.closed, srv.server.admission.count())),
        srv._on_close(conn),
    )
    clients = []
    try:
        for _ in range(2):
            tls = _client(srv.port, rcvbuf=4096)
            tls.sendall(b"GET /big.bin HTTP/1.0\r\n\r\n")
            clients.append(tls)
        srv.finished(2, timeout=60 * SLOW)
        assert seen == [("request-timeout", True, 2), ("request-timeout", True, 1)], seen
        deadline = time.monotonic() + 10 * SLOW  # the release follows the log line
        while srv.server.admission.count():
            assert time.monotonic() < deadline, srv.server.admission
            time.sleep(0.01)
    finally:
        for tls in clients:
            tls.close()
        srv.stop()
