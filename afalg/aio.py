"""asyncio streams over afalg's TLS: the records are sealed and opened in the kernel (kTLS, or
the kernel's AEAD in algif mode), the handshake is Python's ssl, driven by the event loop.

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
  read into Python and written, also under kTLS): asyncio's native path cannot be offered
  soundly. It calls ``os.sendfile`` on the socket itself (``loop.sock_sendfile``), past afalg's
  accounting, so the usage limit could only be checked before knowing what is sent (with
  ``count=None`` it sends until the end of a file that may grow meanwhile), and it pauses
  reading for the whole file, so a KeyUpdate the peer asks for then waits; it also needs the
  transport registered in the loop's private ``_transports``, which makes the loop refuse the
  transport's own ``add_reader``/``add_writer``. Use :func:`sendfile`, which is native and
  keeps both.
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
import collections
import contextlib
import io
import logging
import os
import select
import socket
import ssl as _ssl
import stat
import threading
from asyncio import constants as _constants
from asyncio import transports as _transports
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from afalg import handoff as _handoff
from afalg import ktls, tls
from afalg.algif import AlgTLSSocket
from afalg.errors import KeyLimitReached, KTLSError
from afalg.ktls import KTLSSocket

__all__ = ["TLSTransport", "open_connection", "sendfile", "start_server"]

logger = logging.getLogger(__name__)

_DEFAULT_LIMIT = 2**16  # asyncio.streams' default StreamReader limit
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default ssl_handshake_timeout
_SHUTDOWN_TIMEOUT = 30.0  # asyncio's default ssl_shutdown_timeout
_READ_SIZE = 256 * 1024  # one recv_into: several records (one such buffer per thread)
_READS_PER_CALL = 16  # then other callbacks get a turn
_FILE_CHUNK = 256 * 1024  # sealed sendfile: what is read from the file at a time
_SENDFILE_MAX = 0x7FFFF000  # the most one sendfile(2) moves

ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], "Awaitable[None] | None"
]


# --- the handshake -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """What :func:`open_connection` and :func:`start_server` take for each connection, checked
    once (:meth:`check`) before any connection is made: a bad argument costs no handshake."""

    context: _ssl.SSLContext
    mode: str
    algif_backend: str
    suppress_ragged_eofs: bool
    records_per_key: int | None
    handshake_timeout: float
    shutdown_timeout: float
    limit: int
    half_close: bool

    @classmethod
    def check(
        cls, context: Any, *, mode: str, algif_backend: str, suppress_ragged_eofs: bool,
        records_per_key: int | None, handshake_timeout: float | None,
        shutdown_timeout: float | None, limit: int, half_close: bool,
        server_hostname: str | None = None,
    ) -> _Options:  # fmt: skip
        """``context``: an :class:`ssl.SSLContext`, or True for asyncio's default client
        context (no name checked when ``server_hostname`` is ""); the timeouts and ``limit``
        as asyncio checks them; the rest as :func:`afalg.tls.check_options` checks them.
        ``mode="ktls"`` where the kernel has no tls ULP: :class:`~afalg.errors.KTLSError`."""
        tls.check_options(mode, algif_backend, records_per_key)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit <= 0:
            raise ValueError("Limit cannot be <= 0")  # asyncio.StreamReader's words
        handshake = _positive("ssl_handshake_timeout", handshake_timeout, _HANDSHAKE_TIMEOUT)
        shutdown = _positive("ssl_shutdown_timeout", shutdown_timeout, _SHUTDOWN_TIMEOUT)
        flags = {"half_close": half_close, "suppress_ragged_eofs": suppress_ragged_eofs}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        if context is True:  # asyncio's _create_transport_context
            context = _ssl.create_default_context()
            if not server_hostname:
                context.check_hostname = False
        if not isinstance(context, _ssl.SSLContext):
            raise TypeError(
                f"ssl must be an ssl.SSLContext (or True), not {type(context).__name__}"
            )
        if mode == "ktls":
            _check_ktls_runs()
        return cls(context, mode, algif_backend, suppress_ragged_eofs, records_per_key,
                   handshake, shutdown, limit, half_close)  # fmt: skip


def _positive(name: str, value: float | None, default: float) -> float:
    """A timeout as asyncio checks it: None for ``default``, else a number above 0."""
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or None, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} should be a positive number, got {value}")
    return float(value)


def _client_hostname(host: Any, server_hostname: Any) -> str | None:
    """asyncio's rule for the name checked in the server's certificate: ``server_hostname``,
    else the host connected to; neither (``sock=``, or no host): ValueError. An empty
    ``server_hostname`` turns the name check off on purpose (None for the handshake)."""
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError(f"server_hostname must be a str, not {type(server_hostname).__name__}")
    if server_hostname is None:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        server_hostname = host
    return server_hostname or None


def _check_ktls_runs() -> None:
    """``mode="ktls"`` needs the kernel's tls ULP: refuse before serving (naming why) rather
    than fail every connection after its handshake. A suite the kernel lacks stays a
    per-connection outcome."""
    try:
        with ktls.loopback() as sock:
            ktls.attach_ulp(sock)
    except KTLSError as exc:
        raise KTLSError(exc.errno or 0, f"mode='ktls' cannot run here: {exc.strerror}") from None


async def _handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, hs: _handoff.Handshake
) -> _handoff.Handoff:
    """Run ``hs``'s :meth:`~afalg.handoff.Handshake.steps` over the non-blocking ``sock``
    with the loop's socket operations; never reads past the last handshake record.

    Reads wait for readability, then ``recv_into`` here rather than ``loop.sock_recv_into``,
    whose future keeps a failed read's error (a reset mid-handshake), and that error's
    traceback the frames up to this one: a reference cycle holding the Handshake, its ssl
    object and buffers until the cycle collector runs."""
    steps = hs.steps()
    n: int | None = None
    try:
        while True:
            try:
                step = steps.send(n)
            except StopIteration as done:
                return done.value
            n = None
            if isinstance(step, _handoff.Receive):
                while n is None:
                    try:
                        n = sock.recv_into(step.buffer)
                    except (BlockingIOError, InterruptedError):
                        await _readable(loop, sock)
            elif step.best_effort:
                with contextlib.suppress(OSError):
                    sock.send(step.data)  # the alert: without waiting
            else:
                await loop.sock_sendall(sock, step.data)
    finally:
        steps.close()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` is readable (or has an error to report)."""
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), _set_result_unless_cancelled, fut)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


class _HandOffFailed(Exception):
    """The handshake succeeded but the mode asked for cannot run (``__cause__`` says why): a
    server logs it above DEBUG, as it is this host's limit, not a client's fault."""


async def _secure(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    options: _Options,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    session: _ssl.SSLSession | None = None,
    peer: Any = None,
) -> KTLSSocket | AlgTLSSocket:
    """Handshake (within the handshake timeout) and hand off; the result owns ``sock``, which
    is closed on any failure (a timeout, a cancelled task, a refused mode). A timeout raises
    :class:`TimeoutError` naming the peer and the time."""
    o = options
    try:
        hs = _handoff.Handshake(
            o.context, server_side=server_side, server_hostname=server_hostname, session=session
        )
        # asyncio.timeout, not wait_for: wait_for's inner task keeps a failed handshake's
        # error, whose traceback holds wait_for's frame and so that task, in a reference cycle
        # (with the Handshake, its ssl object and buffers) until the cycle collector runs.
        deadline = asyncio.timeout(o.handshake_timeout)
        try:
            async with deadline:
                h = await _handshake(loop, sock, hs)
        except TimeoutError:
            if not deadline.expired():
                raise  # the socket's own ETIMEDOUT
            raise TimeoutError(
                f"the TLS handshake with {peer or 'the peer'} did not finish within "
                f"{o.handshake_timeout:g} s (ssl_handshake_timeout)"
            ) from None
        try:
            return tls.hand_off(
                sock, h, mode=o.mode, algif_backend=o.algif_backend,
                suppress_ragged_eofs=o.suppress_ragged_eofs, records_per_key=o.records_per_key,
            )  # fmt: skip
        except Exception as exc:
            if server_side:
                raise _HandOffFailed(str(exc)) from exc
            raise
    except BaseException:
        sock.close()
        raise


class _Adopt(asyncio.Protocol):
    """Takes the connected socket from the transport asyncio made for it, before that
    transport reads a byte: a duplicate descriptor (non-blocking) for afalg, and asyncio's
    transport is closed (the connection lives on in the duplicate). ``extra`` keeps the
    addresses asyncio knew (a server's from ``accept()``): a peer that resets during the
    handshake has no ``getpeername()`` afterwards, and the handler still gets its address."""

    def __init__(self, then: Callable[[socket.socket, dict[str, Any]], None] | None = None) -> None:
        self.sock: socket.socket | None = None
        self.extra: dict[str, Any] = {}
        self._then = then

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # asyncio's transport starts reading only after this
        self.extra = {key: transport.get_extra_info(key) for key in ("peername", "sockname")}
        try:
            raw = transport.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
        finally:
            transport.abort()  # closes asyncio's descriptor; the duplicate stays
        self.sock = sock
        if self._then is not None:
            self._then(sock, self.extra)


# --- the transport -------------------------------------------------------------------------------


class TLSTransport(_transports._FlowControlMixin):
    """An :class:`asyncio.Transport` over an afalg TLS socket (non-blocking), driven by the
    loop's readiness callbacks. Made by :func:`open_connection` and :func:`start_server`.

    Reading: each readable event reads until the socket has no whole record left
    (:class:`~afalg.errors.WantRead`), so plaintext that ``pending()``
    counts is delivered without waiting for the socket again. The transports of a loop's
    thread read into one shared buffer: a connection holds no read buffer of its own. Writing:
    what the socket does not take is queued (bytes, and sealed records in algif mode) and
    written when writable; the write buffer size counts both, for ``drain()`` and the
    protocol's pause/resume_writing.
    """

    # asyncio's loop.sendfile() works through its fallback (reads the file, calls write());
    # afalg.aio.sendfile() is the native path under kTLS. Not TRY_NATIVE: the loop's native
    # path would bypass the usage limit and KeyUpdate answering (see the module docstring).
    _sendfile_compatible = _constants._SendfileMode.FALLBACK

    # Set by asyncio's flow-control base class (typeshed does not declare them).
    _loop: asyncio.AbstractEventLoop
    _extra: dict[str, Any]
    _low_water: int
    _high_water: int
    _protocol_paused: bool
    _maybe_pause_protocol: Callable[[], None]
    _maybe_resume_protocol: Callable[[], None]

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tls_sock: KTLSSocket | AlgTLSSocket,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None = None,
        waiter: asyncio.Future[None] | None = None,
        *,
        half_close: bool = False,
        shutdown_timeout: float = _SHUTDOWN_TIMEOUT,
    ) -> None:
        super().__init__(extra, loop)
        self._tls = tls_sock
        # TLS 1.3 half-close, asked for by name; TLS 1.2 promises none, asyncio's TLS offers none
        self._half_close = half_close and tls_sock.version() == "TLSv1.3"
        self._shutdown_timeout = shutdown_timeout
        self._fd = tls_sock.fileno()
        self._protocol = protocol
        self._buffer: collections.deque[memoryview] = collections.deque()
        self._buffer_size = 0
        self._closing = False  # close() called, or the connection failed
        self._conn_lost = 0
        self._paused = False  # reading paused by the protocol
        self._eof = False  # the peer's close_notify (or the TCP end) seen: reading is over
        self._eof_requested = False  # write_eof() called
        self._eof_sent = False
        self._reading = False  # a reader is registered with the loop
        self._writing = False  # a writer is registered with the loop
        self._sendfile_active = False
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (buffer size, future)
        self._extra.update(
            sslcontext=tls_sock.context,
            ssl_object=tls_sock.ssl_object,
            peercert=tls_sock.getpeercert(),
            cipher=tls_sock.cipher(),
            compression=None,
            socket=tls_sock,
            mode=tls_sock.mode,
            backend=tls_sock.backend,
        )
        for key, get in (("peername", tls_sock.getpeername), ("sockname", tls_sock.getsockname)):
            try:
                self._extra[key] = get()
            except OSError:  # the peer reset already: the address accept() gave, or None
                self._extra.setdefault(key, None)
        loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter)

    def __repr__(self) -> str:
        state = "closed" if self._conn_lost else "closing" if self._closing else "open"
        return f"<TLSTransport fd={self._fd} mode={self._tls.mode} {state}>"

    # -- protocol --
    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # -- reading --
    def is_reading(self) -> bool:
        return not self._paused and not self._closing and not self._eof

    def pause_reading(self) -> None:
        if not self.is_reading():
            return
        self._paused = True
        self._remove_reader()

    def resume_reading(self) -> None:
        if not self._paused or self._closing:
            return
        self._paused = False
        self._start_reading()

    def _start_reading(self) -> None:
        """Register the reader and read what is buffered already (the socket may hold
        plaintext that no readable event announces)."""
        if not self.is_reading() or self._conn_lost:
            return
        if not self._reading:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True
        self._loop.call_soon(self._read_ready)

    def _remove_reader(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _read_ready(self) -> None:
        buf = _read_buffer()
        for _ in range(_READS_PER_CALL):
            if not self.is_reading() or self._conn_lost:
                return
            try:
                n = self._tls.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return  # WantRead: no whole record yet
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "fatal read error on the TLS connection")
                return
            if n == 0:
                self._read_eof()
                return
            try:
                self._protocol.data_received(bytes(buf[:n]))  # type: ignore[attr-defined]
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "protocol.data_received() failed")
                return
        self._loop.call_soon(self._read_ready)  # more may be there: after the others' turn

    def _read_eof(self) -> None:
        self._eof = True
        self._remove_reader()
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "protocol.eof_received() failed")
            return
        if keep_open and not self._half_close:
            logger.warning("returning true from eof_received() has no effect when using ssl")
        if not keep_open or not self._half_close:
            self.close()  # as asyncio's TLS: the peer's close_notify ends the connection

    # -- writing --
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")
        if self._eof_requested:
            raise RuntimeError("cannot call write() after write_eof()")
        if self._sendfile_active:
            raise RuntimeError("unable to write; sendfile is in progress")
        self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._conn_lost:
            if self._conn_lost >= _constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("afalg TLS transport: write() on a lost connection")
            self._conn_lost += 1
            return
        view = memoryview(bytes(data))  # bytes() copies, one byte an item
        self._buffer.append(view)
        self._buffer_size += len(view)
        if not self._writing:
            self._write_out()  # at once, as asyncio's transports try
            if self._conn_lost:
                return
            if self._has_output():
                self._loop.add_writer(self._fd, self._write_ready)
                self._writing = True
        self._maybe_pause_protocol()

    def _has_output(self) -> bool:
        return bool(self._buffer) or self._tls.pending_output() > 0

    def get_write_buffer_size(self) -> int:
        """Bytes queued: not yet taken by the socket, plus (algif) sealed records not yet
        written to TCP."""
        if self._conn_lost:
            return 0
        return self._buffer_size + self._tls.pending_output()

    def _write_out(self) -> None:
        """Write what the socket takes now; a failure is fatal to the connection."""
        try:
            if self._tls.pending_output():
                self._tls.flush()
            while self._buffer:
                head = self._buffer[0]
                n = self._tls.send(head)
                self._buffer_size -= n
                if n == len(head):
                    self._buffer.popleft()
                else:
                    self._buffer[0] = head[n:]
            if self._tls.pending_output():
                self._tls.flush()
        except (BlockingIOError, InterruptedError):
            pass  # WantWrite: nothing was taken of what raised
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "fatal write error on the TLS connection")

    def _write_ready(self) -> None:
        if self._conn_lost:
            return
        self._write_out()
        if self._conn_lost:
            return
        self._maybe_resume_protocol()
        self._wake_waiters()
        if self._has_output():
            return
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._sendfile_active:
            return
        if self._closing:
            self._close_when_writable()
        elif self._eof_requested and not self._eof_sent:
            self._write_eof_now()

    def _wake_waiters(self) -> None:
        size = self.get_write_buffer_size()
        for item in list(self._waiters):
            limit, fut = item
            if size <= limit or self._conn_lost:
                self._waiters.remove(item)
                if not fut.done():
                    fut.set_result(None)

    async def _wait_buffer(self, limit: int) -> None:
        """Until no more than ``limit`` bytes are queued (or the connection is lost)."""
        if self.get_write_buffer_size() <= limit or self._conn_lost:
            return
        fut = self._loop.create_future()
        self._waiters.append((limit, fut))
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((limit, fut))

    def can_write_eof(self) -> bool:
        """False, as for asyncio's TLS, unless the transport was made with ``half_close=True``
        in TLS 1.3 (close_notify, then a TCP half-close, and reading goes on)."""
        return self._half_close

    def write_eof(self) -> None:
        """With ``half_close`` in TLS 1.3: send close_notify once what is queued is out, then
        shut down TCP's sending side; the peer may go on sending. Else
        :class:`NotImplementedError`, as asyncio's TLS."""
        if not self.can_write_eof():
            raise NotImplementedError(
                "TLS offers no half-close here: close the writer instead (half_close=True "
                "offers it in TLS 1.3)"
            )
        if self._closing or self._eof_requested:
            return
        self._eof_requested = True
        if self._sendfile_active:
            return  # sendfile's end comes back to it
        if self._has_output():
            self._ensure_writer()  # algif records queued by the socket itself (a KeyUpdate)
        else:
            self._write_eof_now()

    def _ensure_writer(self) -> None:
        if not self._writing:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writing = True

    def _close_when_writable(self) -> None:
        """Close now if close_notify fits in the socket, else once it is writable."""
        if self._socket_writable():
            self._lose(None)
        else:
            self._ensure_writer()  # _write_ready comes back here

    def _socket_writable(self) -> bool:
        """Room in the socket now: close_notify must not be dropped (kTLS sends it with
        MSG_DONTWAIT on close, and a refused alert may not be retried)."""
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return bool(poller.poll(0))

    def _write_eof_now(self) -> None:
        if not self._socket_writable():
            self._ensure_writer()  # _write_ready comes back here
            return
        try:
            self._tls.shutdown(socket.SHUT_WR)  # close_notify, then TCP's FIN
        except (BlockingIOError, InterruptedError):
            # algif: the close_notify is sealed and queued; shutdown() again once it is out
            self._ensure_writer()
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "write_eof failed")
            return
        self._eof_sent = True

    # -- ending --
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Write out what is queued, send close_notify and close the socket; the protocol's
        ``connection_lost(None)`` follows."""
        if self._closing:
            return
        self._closing = True
        self._remove_reader()
        if self._sendfile_active:
            return  # sendfile's end comes back to it
        if self._has_output():
            self._ensure_writer()  # algif records queued by the socket itself (a KeyUpdate)
        else:
            self._close_when_writable()

    def abort(self) -> None:
        """Close at once: queued data is dropped and no close_notify is sent (the peer sees the
        stream end without it: a truncation, not a clean end)."""
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):  # TLS errors are ssl.SSLErrors: OSErrors
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {"message": message, "exception": exc, "transport": self,
                 "protocol": self._protocol}
            )  # fmt: skip
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        session = self._tls.tls_session
        if session.error is None:  # no close_notify, nothing queued goes out
            session.fail(exc or ConnectionAbortedError("the transport was aborted"))
        self._buffer.clear()
        self._buffer_size = 0
        self._closing = True
        self._lose(exc)

    def _lose(self, exc: BaseException | None) -> None:
        """Close the socket now (close_notify unless the session failed) and tell the
        protocol soon."""
        if self._conn_lost:
            return
        self._conn_lost += 1
        self._remove_reader()
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        with contextlib.suppress(OSError):  # queued data that could not go out: the peer sees it
            self._tls.close()  # non-blocking: close_notify if the socket takes it now
        for _, fut in self._waiters:  # drain(), sendfile: they see the loss themselves
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        if self._sendfile_active:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        self._protocol.connection_lost(exc)  # type: ignore[arg-type]

    # -- sendfile --
    async def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """See :func:`sendfile`."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer (got {offset!r})")
        if count is not None and (not isinstance(count, int) or count <= 0):
            raise ValueError(f"count must be a positive integer (got {count!r})")
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if self._closing:
            raise ConnectionError("the transport is closing")
        if self._sendfile_active:
            raise RuntimeError("sendfile is in progress already")
        if self._eof_requested:
            raise RuntimeError("cannot sendfile after write_eof()")
        self._sendfile_active = True
        total = 0
        try:
            fd = _regular_fileno(file) if isinstance(self._tls, KTLSSocket) else None
            if fd is not None:
                await self._wait_buffer(0)  # what was written before goes first
                sent = self._sendfile_native(fd, offset, count)
            else:
                sent = self._sendfile_sealed(file, offset, count)
            async for n in sent:
                total += n
            return total
        finally:
            self._sendfile_active = False
            with contextlib.suppress(OSError, ValueError):
                file.seek(offset + total)  # as loop.sendfile: the position follows what was sent
            if not self._conn_lost:
                if self._has_output():
                    self._ensure_writer()
                elif self._closing:
                    self._close_when_writable()
                elif self._eof_requested and not self._eof_sent:
                    self._write_eof_now()

    async def _sendfile_native(self, fd: int, offset: int, count: int | None) -> Any:
        """kTLS: non-blocking sendfile(2) steps; the kernel reads and encrypts the pages."""
        assert isinstance(self._tls, KTLSSocket)
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        done = 0
        while done < count:
            self._check_sendfile()
            try:
                n = self._tls.sendfile_nowait(fd, offset + done, min(count - done, _SENDFILE_MAX))
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            except (SystemExit, KeyboardInterrupt, KeyLimitReached):
                raise  # KeyLimitReached: nothing of this step was sent; the connection goes on
            except BaseException as exc:
                self._fatal_error(exc, "sendfile failed")
                raise
            if n == 0:
                return  # the file ended early
            done += n
            yield n

    async def _sendfile_sealed(self, file: Any, offset: int, count: int | None) -> Any:
        """algif (or a file without a descriptor): read chunks, queue them, wait for room."""
        file.seek(offset)
        done = 0
        while count is None or done < count:
            self._check_sendfile()
            want = _FILE_CHUNK if count is None else min(_FILE_CHUNK, count - done)
            read = self._loop.run_in_executor(None, file.read, want)
            try:
                data = await asyncio.shield(read)
            except asyncio.CancelledError:
                # The thread's read ends before sendfile sets the file's position (a read still
                # running would move it past what was sent); its chunk is not sent.
                await asyncio.wait([read])
                raise
            if not data:
                return
            self._write(data)
            done += len(data)
            yield len(data)
            await self._wait_buffer(self._low_water)
        self._check_sendfile()

    def _check_sendfile(self) -> None:
        if self._conn_lost or self._closing:
            raise ConnectionError("the connection was closed during sendfile")

    async def _writable(self) -> None:
        """Until the socket is writable (sendfile's wait; the transport's own writer is not
        registered while sendfile runs, as its buffer is empty)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_writer(self._fd, _set_result_unless_cancelled, fut)
        self._waiters.append((-1, fut))  # woken (never by size) when the connection is lost
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((-1, fut))
            if not self._conn_lost:
                self._loop.remove_writer(self._fd)


_per_thread = threading.local()


def _read_buffer() -> memoryview:
    """The buffer transports of this thread's event loop read into: one per thread, not one
    per connection (256 KiB each, resident for as long as the connection lived, and longer
    when a failed connection's stored error keeps its frames in a reference cycle).
    :meth:`TLSTransport._read_ready` copies what it read out of it before anything else runs
    (the loop runs its callbacks in its thread, one at a time)."""
    buf: memoryview | None = getattr(_per_thread, "read_buffer", None)
    if buf is None:
        buf = _per_thread.read_buffer = memoryview(bytearray(_READ_SIZE))
    return buf


def _set_result_unless_cancelled(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _regular_fileno(file: Any) -> int | None:
    """The descriptor of a regular file (what sendfile(2) reads), else None."""
    try:
        fd = file.fileno()
    except (AttributeError, io.UnsupportedOperation, OSError):
        return None
    try:
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None


# --- streams -------------------------------------------------------------------------------------


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, whose end of file keeps the writer open when the transport
    offers half-close (``half_close=True``, TLS 1.3); else the transport closes, as asyncio's
    TLS does."""

    def eof_received(self) -> bool:
        super().eof_received()
        return True  # the transport decides (TLSTransport's half_close)


def _streams(
    loop: asyncio.AbstractEventLoop,
    tls_sock: KTLSSocket | AlgTLSSocket,
    options: _Options,
    client_connected_cb: ClientConnectedCallback | None = None,
    extra: dict[str, Any] | None = None,
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
    )
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
    """Connect to ``host``:``port``, handshake with ``ssl`` (an :class:`ssl.SSLContext`, or
    True for asyncio's default client context), hand the keys to the kernel and return
    asyncio's ``(StreamReader, StreamWriter)``, as :func:`asyncio.open_connection`.

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
        ssl, mode=mode, algif_backend=algif_backend, suppress_ragged_eofs=suppress_ragged_eofs,
        records_per_key=records_per_key, handshake_timeout=ssl_handshake_timeout,
        shutdown_timeout=ssl_shutdown_timeout, limit=limit, half_close=half_close,
        server_hostname=server_hostname,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    _, adopt = await loop.create_connection(_Adopt, host, port, **kwds)  # type: ignore[arg-type]
    assert isinstance(adopt, _Adopt) and adopt.sock is not None
    tls_sock = await _secure(
        loop, adopt.sock, options, server_side=False, server_hostname=server_hostname,
        session=session, peer=adopt.extra.get("peername"),
    )  # fmt: skip
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
    """Serve TLS on ``host``:``port`` as :func:`asyncio.start_server`: for each client whose
    handshake succeeds within ``ssl_handshake_timeout``, ``client_connected_cb(reader, writer)``
    is called (a coroutine becomes a task). Returns the :class:`asyncio.Server` (``async with``,
    ``serve_forever()``, ``sockets``). ``mode``, ``algif_backend`` and ``records_per_key`` as
    for :func:`afalg.tls.wrap`; ``limit``, the timeouts and ``half_close`` as for
    :func:`open_connection`; other keyword arguments (``backlog``, ``reuse_port``, ``sock``,
    ...) go to :meth:`loop.create_server`. Every argument is checked before listening;
    ``mode="ktls"`` on a kernel without the tls ULP raises :class:`afalg.errors.KTLSError`.

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
        ssl, mode=mode, algif_backend=algif_backend, suppress_ragged_eofs=suppress_ragged_eofs,
        records_per_key=records_per_key, handshake_timeout=ssl_handshake_timeout,
        shutdown_timeout=ssl_shutdown_timeout, limit=limit, half_close=half_close,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    handshakes: set[asyncio.Task[None]] = set()  # strong references while they run

    async def serve(sock: socket.socket, extra: dict[str, Any]) -> None:
        peer = extra.get("peername")
        try:
            tls_sock = await _secure(loop, sock, options, server_side=True, peer=peer)
        except _HandOffFailed as exc:  # this host's limit: worth a warning
            reason = exc.__cause__
            logger.warning(
                "afalg.aio: the hand-off of %s failed, connection closed: %s", peer, reason
            )
            return
        except Exception as exc:  # that client's loss only
            logger.debug("afalg.aio: a client's handshake failed: %r", exc)
            return
        _streams(loop, tls_sock, options, client_connected_cb, extra)

    def accepted(sock: socket.socket, extra: dict[str, Any]) -> None:
        if max_handshakes is not None and len(handshakes) >= max_handshakes:
            logger.debug(
                "afalg.aio: %s closed: %d handshakes pending",
                extra.get("peername"),
                len(handshakes),
            )
            sock.close()
            return
        task = loop.create_task(serve(sock, extra))
        handshakes.add(task)
        task.add_done_callback(handshakes.discard)

    return await loop.create_server(lambda: _Adopt(accepted), host, port, **kwds)  # type: ignore[arg-type]


async def sendfile(
    writer: asyncio.StreamWriter, file: Any, offset: int = 0, count: int | None = None
) -> int:
    """Send ``count`` bytes (None: to the end) of the binary ``file`` from ``offset`` over the
    afalg stream ``writer``; returns the bytes sent, and the file's position ends after them
    (as :meth:`loop.sendfile`). What was written before goes first; ``write()`` raises while
    this runs. Cancelled, it raises :class:`asyncio.CancelledError` with the file's position
    after the bytes sent (kTLS) or queued (algif); the connection goes on after them.

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
