"""asyncio over afalg's TLS: streams, servers, sendfile, and an event loop for frameworks.

The records are sealed and opened in the kernel (kTLS, or the kernel's AEAD in algif mode),
the handshake is Python's ssl, driven by the event loop.

Switching from asyncio's own TLS streams is one line::

    reader, writer = await asyncio.open_connection(host, 443, ssl=ctx)      # before
    reader, writer = await afalg.aio.open_connection(host, 443, ssl=ctx)    # after

    server = await afalg.aio.start_server(handle, "0.0.0.0", 8443, ssl=server_ctx)
    async with server:
        await server.serve_forever()

:func:`open_connection` and :func:`start_server` take what their asyncio namesakes take (the
rest of the keyword arguments go to :meth:`loop.create_connection` /
:meth:`loop.create_server`), plus ``mode``, ``algif_backend`` and ``records_per_key`` as for
:func:`afalg.tls.wrap`. They return asyncio's own :class:`asyncio.StreamReader`,
:class:`asyncio.StreamWriter` and :class:`asyncio.Server`; the transport is a
:class:`TLSTransport`.

- The handshake (:class:`afalg.handoff.Handshake`, sans-I/O) runs on the loop: reads and writes
  never block it, and ``ssl_handshake_timeout`` (60 s by default) bounds it. A client whose
  handshake fails or times out costs the server only that connection.
- Then the keys go to the kernel (:func:`afalg.tls.hand_off`). Records other than application
  data go to the socket's session core: alerts, close_notify (end of file), NewSessionTickets
  (``writer.get_extra_info("ssl_object").session`` resumes, pass it as ``session=``), KeyUpdate
  (answered before our next data, by ``write()`` or :func:`sendfile`).
- The usage limit: no send key seals more than ``records_per_key`` records (by default the AEAD
  limit of RFC 8446 section 5.5), writes and :func:`sendfile` included; in TLS 1.3 a KeyUpdate
  goes first (algif; kTLS on Linux 6.14+). Where keys cannot be updated (TLS 1.2, kTLS before
  6.14), the kTLS :func:`sendfile` raises :class:`afalg.errors.KeyLimitReached` having sent
  nothing more (the connection stays open: it can still read and close cleanly); a ``write()``
  past the limit (and so algif's sealed :func:`sendfile`) is fatal to the connection, as any
  write error.
- Flow control as in asyncio: ``await writer.drain()`` waits while more than the high water mark
  (64 KiB by default, :meth:`~asyncio.WriteTransport.set_write_buffer_limits`) is queued,
  counting sealed records not yet written (algif); the reader pauses the transport when its
  buffer passes twice its ``limit``.
- :func:`sendfile` sends a file with the kernel's ``sendfile`` under kTLS (the page cache is
  encrypted in the kernel; Python never reads the file), and in sealed chunks in algif mode.
  ``loop.sendfile(writer.transport, file)`` works too, through asyncio's fallback (the file is
  read into Python and written, also under kTLS). Use :func:`sendfile`, which is native and
  keeps the usage limit and the answer to a peer's KeyUpdate.
- afalg's event loop (:func:`new_event_loop`, :func:`patch_loop`, :func:`loop_factory`) runs
  asyncio's own ``ssl=`` calls (``create_server``, ``create_connection``, ``start_tls``,
  ``connect_accepted_socket``, so :func:`asyncio.start_server` and frameworks) on this
  transport, and its ``loop.sendfile`` is :func:`sendfile`: see the Frameworks guide.
- Cancellation loses and duplicates nothing: a cancelled read leaves the data in the reader; a
  cancelled ``drain()`` leaves what was written queued, and it goes out; a cancelled
  :func:`sendfile` raises :class:`asyncio.CancelledError` with the file's position after
  exactly the bytes it sent (kTLS) or queued (algif), and the connection stays open: the peer
  receives that prefix of the file, in whole records, then what is written next.
- ``writer.get_extra_info()`` answers ``"ssl_object"``, ``"sslcontext"``, ``"peercert"``,
  ``"cipher"``, ``"compression"``, ``"peername"``, ``"sockname"``, ``"socket"`` (the afalg TLS
  socket: :class:`afalg.ktls.KTLSSocket` or :class:`afalg.algif.AlgTLSSocket`, e.g. for
  ``key_update()``; do not read or write it behind the transport's back), ``"mode"`` and
  ``"backend"``.
- Ending: ``writer.close()`` writes out what is queued, then close_notify, then closes the
  socket, within ``ssl_shutdown_timeout`` (30 s by default; then it aborts: a peer that never
  reads cannot hold a closing connection); ``transport.abort()`` closes at once, without
  close_notify (the peer sees a truncated stream, not a clean end). As asyncio's TLS, by default
  ``writer.can_write_eof()`` is False and the peer's close_notify is end of file, then the
  connection closes. ``half_close=True`` offers TLS 1.3's half-close (RFC 8446 section 6.1):
  ``write_eof()`` sends close_notify and half-closes TCP while reading goes on, and the peer's
  close_notify leaves the writer open (close it when done); TLS 1.2 promises no half-close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import Any

from afalg._connect import (
    _DEFAULT_LIMIT,
    _Adopt,
    _client_hostname,
    _HandOffFailed,
    _Handshaking,
    _Options,
    _secure,
)
from afalg._sslmode import SSLObjectSocket
from afalg._transport import TLSTransport
from afalg.algif import AlgTLSSocket
from afalg.ktls import KTLSSocket

__all__ = [
    "TLSTransport",
    "loop_factory",
    "new_event_loop",
    "open_connection",
    "patch_loop",
    "sendfile",
    "start_server",
]

logger = logging.getLogger(__name__)

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"
]


# --- streams -------------------------------------------------------------------------------------


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, whose end of file keeps the writer open on half-close.

    The writer stays open when the transport offers half-close (``half_close=True``, TLS 1.3);
    else the transport closes, as asyncio's TLS does."""

    half_close = False  # set by _streams: the transport keeps writing after the peer's end

    def eof_received(self) -> bool:
        super().eof_received()
        # Asking a transport that cannot half-close to stay open only draws its warning (as
        # asyncio's TLS logs it), once per connection the peer ends.
        return self.half_close


def _streams(
    loop: asyncio.AbstractEventLoop,
    tls_sock: KTLSSocket | AlgTLSSocket | SSLObjectSocket,
    options: _Options,
    client_connected_cb: ClientConnectedCallback | None = None,
    extra: dict[str, Any] | None = None,
    server: Any = None,
) -> tuple[asyncio.StreamReader, _StreamProtocol, TLSTransport, asyncio.Future[None]]:
    reader = asyncio.StreamReader(limit=options.limit, loop=loop)
    protocol = _StreamProtocol(reader, client_connected_cb, loop=loop)
    waiter: asyncio.Future[None] = loop.create_future()
    transport = TLSTransport(
        loop,
        tls_sock,
        protocol,
        dict(extra or {}),
        waiter=waiter,
        half_close=options.half_close,
        shutdown_timeout=options.shutdown_timeout,
        server=server,
    )
    protocol.half_close = transport.can_write_eof()
    return reader, protocol, transport, waiter


async def open_connection(
    host: str | None = None,
    port: int | str | None = None,
    *,
    ssl: _ssl.SSLContext | bool,
    server_hostname: str | None = None,
    mode: str = "auto",
    algif_backend: str = "auto",
    limit: int = _DEFAULT_LIMIT,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    suppress_ragged_eofs: bool = True,
    session: _ssl.SSLSession | None = None,
    records_per_key: int | None = None,
    half_close: bool = False,
    **kwds: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, handshake and hand the keys to the kernel; return ``(reader, writer)``.

    Connects to ``host``:``port``, handshakes with ``ssl`` (an :class:`ssl.SSLContext`, or True
    for asyncio's default client context) and returns asyncio's ``(StreamReader,
    StreamWriter)``, as :func:`asyncio.open_connection`.

    ``server_hostname`` (the name checked in the server's certificate) defaults to ``host``; with
    ``sock=`` it must be given (:class:`ValueError`, as asyncio); ``""`` checks no name, on
    purpose. ``mode`` and ``algif_backend`` choose where the records are protected, as for
    :func:`afalg.tls.wrap` (``writer.get_extra_info("mode")`` says which ran); ``session``
    resumes a session; ``records_per_key`` bounds the records each send key seals (see the
    module docstring); ``half_close=True`` offers TLS 1.3's half-close (``write_eof()``, and
    the peer's close_notify leaves the writer open). The handshake runs on the loop within
    ``ssl_handshake_timeout`` seconds (60 by default; :class:`TimeoutError`), closing within
    ``ssl_shutdown_timeout`` (30; then the connection is aborted). Other keyword arguments
    (``sock``, ``family``, ``local_addr``, ``happy_eyeballs_delay``, ...) go to
    :meth:`loop.create_connection`. Every argument is checked before a byte is sent. Raises
    what ssl raises for a failed handshake and what :func:`afalg.tls.hand_off` raises when the
    mode cannot run; nothing is left open then.
    """
    server_hostname = _client_hostname(host, server_hostname)
    options = _Options.check(
        ssl,
        mode=mode,
        algif_backend=algif_backend,
        suppress_ragged_eofs=suppress_ragged_eofs,
        records_per_key=records_per_key,
        handshake_timeout=ssl_handshake_timeout,
        shutdown_timeout=ssl_shutdown_timeout,
        limit=limit,
        half_close=half_close,
        server_hostname=server_hostname,
    )
    loop = asyncio.get_running_loop()
    _, adopt = await loop.create_connection(_Adopt, host, port, **kwds)  # type: ignore[arg-type]
    assert isinstance(adopt, _Adopt) and adopt.sock is not None
    tls_sock = await _secure(
        loop,
        adopt.sock,
        options,
        server_side=False,
        server_hostname=server_hostname,
        session=session,
        peer=adopt.extra.get("peername"),
    )
    reader, protocol, transport, waiter = _streams(loop, tls_sock, options, extra=adopt.extra)
    try:
        await waiter
    except BaseException:
        transport.abort()
        raise
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | list[str] | None = None,
    port: int | str | None = None,
    *,
    ssl: _ssl.SSLContext,
    mode: str = "auto",
    algif_backend: str = "auto",
    limit: int = _DEFAULT_LIMIT,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    suppress_ragged_eofs: bool = True,
    records_per_key: int | None = None,
    max_handshakes: int | None = None,
    half_close: bool = False,
    **kwds: Any,
) -> asyncio.Server:
    """Serve TLS on ``host``:``port`` as :func:`asyncio.start_server`; return the server.

    For each client whose handshake succeeds within ``ssl_handshake_timeout``,
    ``client_connected_cb(reader, writer)`` is called (a coroutine becomes a task). Returns the
    :class:`asyncio.Server` (``async with``, ``serve_forever()``, ``sockets``). ``mode``,
    ``algif_backend`` and ``records_per_key`` as for :func:`afalg.tls.wrap`; ``limit``, the
    timeouts and ``half_close`` as for :func:`open_connection`; other keyword arguments
    (``backlog``, ``reuse_port``, ``sock``, ...) go to :meth:`loop.create_server`. Every
    argument is checked before listening; ``mode="ktls"`` on a kernel without the tls ULP
    raises :class:`afalg.errors.KTLSError`.

    A client that fails its handshake (garbage, a timeout, a refused certificate) loses only
    its connection; the failure is logged at debug level on the ``afalg.aio`` logger. A
    connection whose hand-off this host refuses (e.g. a suite the kernel lacks in
    ``mode="ktls"``) is logged as a warning.

    ``max_handshakes`` bounds the handshakes in progress at once (None: unbounded, as
    asyncio): a connection accepted while that many are pending is closed at once, before a
    byte is read (logged at debug level). A flood of clients that connect and stall then costs
    newcomers a refused connection, for at most ``ssl_handshake_timeout``, rather than costing
    the server memory without bound.
    """
    if ssl is True:
        raise TypeError("start_server needs an ssl.SSLContext (with the server's certificate)")
    if max_handshakes is not None and (
        not isinstance(max_handshakes, int)
        or isinstance(max_handshakes, bool)
        or max_handshakes < 1
    ):
        raise ValueError(f"max_handshakes must be a positive int or None, not {max_handshakes!r}")
    options = _Options.check(
        ssl,
        mode=mode,
        algif_backend=algif_backend,
        suppress_ragged_eofs=suppress_ragged_eofs,
        records_per_key=records_per_key,
        handshake_timeout=ssl_handshake_timeout,
        shutdown_timeout=ssl_shutdown_timeout,
        limit=limit,
        half_close=half_close,
    )
    loop = asyncio.get_running_loop()
    handshakes: set[asyncio.Task[None]] = set()  # strong references while they run

    async def serve(sock: socket.socket, extra: dict[str, Any], server: Any) -> None:
        peer = extra.get("peername")
        try:
            tls_sock = await _secure(loop, sock, options, server_side=True, peer=peer)
        except _HandOffFailed as exc:  # strings only: a kept record keeps no socket
            level = logging.DEBUG if exc.errno == errno.ENOTCONN else logging.WARNING
            message = "afalg.aio: the hand-off of %s failed, connection closed: %s"
            logger.log(level, message, peer, exc.args[0])
            return
        except Exception as exc:  # that client's loss only
            logger.debug("afalg.aio: a client's handshake failed: %s", repr(exc))
            return
        _streams(loop, tls_sock, options, client_connected_cb, extra, server)

    def accepted(sock: socket.socket, extra: dict[str, Any], server: Any) -> None:
        if max_handshakes is not None and len(handshakes) >= max_handshakes:
            logger.debug(
                "afalg.aio: %s closed: %d handshakes pending",
                extra.get("peername"),
                len(handshakes),
            )
            sock.close()
            return
        task = loop.create_task(serve(sock, extra, server))
        handshakes.add(task)
        task.add_done_callback(handshakes.discard)
        _Handshaking(server, task).start()

    return await loop.create_server(lambda: _Adopt(accepted), host, port, **kwds)  # type: ignore[arg-type]


# Why loop.sendfile is asyncio's fallback and not native here: asyncio's native path cannot be
# offered soundly. It calls os.sendfile on the socket itself (loop.sock_sendfile), past afalg's
# accounting, so the usage limit could only be checked before knowing what is sent (with
# count=None it sends until the end of a file that may grow meanwhile), and it pauses reading for
# the whole file, so a KeyUpdate the peer asks for then waits; it also needs the transport
# registered in the loop's private _transports, which makes the loop refuse the transport's own
# add_reader/add_writer. sendfile() below is native and keeps both.


async def sendfile(
    writer: asyncio.StreamWriter, file: Any, offset: int = 0, count: int | None = None
) -> int:
    """Send part or all of the binary ``file`` over the afalg stream ``writer``; return the count.

    Sends ``count`` bytes (None: to the end) from ``offset``; the file's position ends after
    the bytes sent (as :meth:`loop.sendfile`). What was written before goes first; ``write()``
    raises while this runs. Cancelled, it raises :class:`asyncio.CancelledError` with the
    file's position after the bytes sent (kTLS) or queued (algif); the connection goes on after
    them.

    Under kTLS, with a regular file, this is the kernel's ``sendfile(2)``: the kernel reads
    the pages and encrypts them; the file object's ``read`` is never called. In algif mode (or
    for a file without a descriptor) the file is read in chunks and sealed, with flow control.
    Both respect the usage limit (``records_per_key``). Under kTLS, where the key cannot be
    updated, :class:`afalg.errors.KeyLimitReached` is raised with the file's position after
    the last byte sent, and the connection stays usable for reading and closing.
    """
    transport = writer.transport
    if not isinstance(transport, TLSTransport):
        raise TypeError("sendfile needs a writer from afalg.aio (open_connection, start_server)")
    return await transport.sendfile(file, offset, count)


# afalg's event loop (afalg._loop uses this module's handshake and options)
from afalg._loop import loop_factory, new_event_loop, patch_loop  # noqa: E402
