"""The asyncio transport over an afalg TLS socket, driven by the loop's readiness callbacks.

:class:`TLSTransport` is re-exported by :mod:`afalg.aio`, its public face.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import socket
import sys
import threading
from asyncio import constants as _constants
from collections.abc import Callable
from typing import Any

from afalg._socket import ready_now
from afalg._sslmode import SSLObjectSocket
from afalg._transport_sendfile import SendfileTransport
from afalg._transport_state import _READ_MOVES, _WRITABLE, _WRITE_MOVES, _Read, _Write
from afalg.algif import AlgTLSSocket
from afalg.ktls import KTLSSocket
from afalg.session import Session

__all__ = ["TLSTransport"]

logger = logging.getLogger("afalg.aio")

SHUTDOWN_TIMEOUT = 30.0  # asyncio's default ssl_shutdown_timeout
_READ_SIZE = 256 * 1024  # one recv_into: several records (one such buffer per thread)
_READS_PER_CALL = 16  # then other callbacks get a turn


# Theory of operation. The transport keeps two named states, one per direction, and changes
# them only through TLSTransport._set_write and TLSTransport._set_read, which check the move
# against a table (afalg._transport_state):
#
# - writing: OPEN -> SENDFILE (sendfile owns the output) -> OPEN; OPEN -> EOF_PENDING
#   (write_eof(): close_notify and TCP's FIN once the output drains) -> EOF_SENT; any of them
#   -> CLOSING (close(): the output drains, then close_notify and the socket closes, within
#   shutdown_timeout, else an abort) -> CLOSED;
# - reading: NEW -> ACTIVE (a reader registered with the loop, and only then) <-> PAUSED (by
#   the protocol); ACTIVE -> EOF (the peer's close_notify or TCP's end); any of them -> STOPPED
#   once the transport closes.
#
# What follows when the output drains is decided in one place, TLSTransport._advance: the
# writer callback, write_eof(), close() and the end of a sendfile all call it.


class TLSTransport(SendfileTransport):
    """An :class:`asyncio.Transport` over a non-blocking afalg TLS socket, driven by loop callbacks.

    Made by :func:`afalg.aio.open_connection` and :func:`afalg.aio.start_server`.

    Reading: each readable event reads until the socket has no whole record left
    (:class:`~afalg.errors.WantRead`), so plaintext that ``pending()`` counts is delivered without
    waiting for the socket again; the transports of a loop's thread read into one shared buffer.
    Writing: what the socket does not take is queued (bytes, and sealed records in algif mode) and
    written when writable; the write buffer size counts both, in bytes, for ``drain()`` and the
    protocol's pause/resume_writing. ``half_close`` (TLS 1.3 only) offers ``write_eof()`` and keeps
    the transport open at the peer's close_notify when the protocol's ``eof_received()`` asks; else,
    as asyncio's TLS, that close_notify closes it. ``close()`` ends within ``shutdown_timeout``
    seconds, else aborts (``connection_lost`` gets a :class:`TimeoutError`).
    ``connection_made=False`` (for ``loop.start_tls()``) leaves the protocol's ``connection_made``
    uncalled."""

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
        tls_sock: KTLSSocket | AlgTLSSocket | SSLObjectSocket,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None = None,
        waiter: asyncio.Future[None] | None = None,
        *,
        half_close: bool = False,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
        connection_made: bool = True,
        server: Any = None,
    ) -> None:
        super().__init__(extra, loop)
        self._server = server_attach(server, self)  # the asyncio.Server counting it, or None
        self._tls = tls_sock
        self._fd = tls_sock.fileno()
        self._protocol = protocol
        # TLS 1.3 half-close, asked for by name; TLS 1.2 promises none, asyncio's TLS offers none
        self._half_close = half_close and tls_sock.version() == "TLSv1.3"
        self._shutdown_timeout = shutdown_timeout
        self._write_state = _Write.OPEN
        self._read_state = _Read.NEW
        self._buffer: collections.deque[memoryview] = collections.deque()
        self._buffer_size = 0
        self._writer_on = False  # bookkeeping of the loop's writer registration
        self._lost_writes = 0  # write() after the end, for asyncio's warning
        self._deadline: asyncio.TimerHandle | None = None  # the closing deadline
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []  # (buffer size, future)
        # The session of a socket whose short reads leave nothing behind (else None)
        self._drains = _short_read_drains(tls_sock)
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
        if connection_made:  # not for loop.start_tls(), which asyncio documents so
            loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._start_reading)
        loop.call_soon(self._advance)  # output queued already (mode "ssl": the last flight)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter)

    def __repr__(self) -> str:
        return (
            f"<TLSTransport fd={self._fd} mode={self._tls.mode} "
            f"write={self._write_state.value} read={self._read_state.value}>"
        )

    # -- states --
    def _set_write(self, new: _Write) -> None:
        """Move the sending direction to ``new``; a move the table does not allow is a bug."""
        if new not in _WRITE_MOVES[self._write_state]:
            raise RuntimeError(f"TLSTransport: write {self._write_state.value} -> {new.value}")
        self._write_state = new

    def _set_read(self, new: _Read) -> None:
        """Move the receiving direction to ``new``; the loop's reader is registered while ACTIVE.

        Exactly while ACTIVE. Entering ACTIVE reads what the socket holds already (plaintext that no
        readable event announces)."""
        old = self._read_state
        if new not in _READ_MOVES[old]:
            raise RuntimeError(f"TLSTransport: read {old.value} -> {new.value}")
        self._read_state = new
        if old is _Read.ACTIVE:
            self._loop.remove_reader(self._fd)
        elif new is _Read.ACTIVE:
            self._loop.add_reader(self._fd, self._read_ready)
            self._loop.call_soon(self._read_ready)

    def _stop_reading(self) -> None:
        if self._read_state is not _Read.STOPPED:
            self._set_read(_Read.STOPPED)

    def _writer(self, on: bool) -> None:
        """Register (or remove) the loop's writer callback, :meth:`_write_ready`."""
        if on and not self._writer_on:
            self._loop.add_writer(self._fd, self._write_ready)
        elif not on and self._writer_on:
            self._loop.remove_writer(self._fd)
        self._writer_on = on

    def _advance(self) -> None:
        """Decide what follows once the output drains: the one place that does.

        Close (CLOSING), close_notify and FIN (EOF_PENDING), or nothing more to wait for. While
        output is queued, the writer callback comes back here."""
        state = self._write_state
        if state is _Write.CLOSED:
            return
        if self._has_output():
            self._writer(True)
        elif state is _Write.CLOSING:
            self._close_when_writable()
        elif state is _Write.EOF_PENDING:
            self._write_eof_now()
        elif not self._waiting_writable():
            self._writer(False)

    # -- protocol --
    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    # -- reading --
    def is_reading(self) -> bool:
        return self._read_state in (_Read.NEW, _Read.ACTIVE)

    def pause_reading(self) -> None:
        if self.is_reading():
            self._set_read(_Read.PAUSED)

    def resume_reading(self) -> None:
        if self._read_state is _Read.PAUSED:
            self._set_read(_Read.ACTIVE)

    def _start_reading(self) -> None:
        if self._read_state is _Read.NEW:
            self._set_read(_Read.ACTIVE)

    def _read_ready(self) -> None:
        buf = _read_buffer()
        tls = self._tls
        for _ in range(_READS_PER_CALL):
            if self._read_state is not _Read.ACTIVE:
                return
            try:
                n = tls.recv_into(buf)
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
            session = self._drains  # algif may have opened an end or an error already
            if (
                n < _READ_SIZE
                and session is not None
                and not tls.pending()
                and session.error is None
                and not session.eof
            ):
                return  # nothing more now that the loop's next poll would not report
        self._loop.call_soon(self._read_ready)  # more may be there: after the others' turn

    def _read_eof(self) -> None:
        self._set_read(_Read.EOF)
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
        state = self._write_state
        if state in (_Write.EOF_PENDING, _Write.EOF_SENT):
            raise RuntimeError("cannot call write() after write_eof()")
        if state is _Write.SENDFILE:
            raise RuntimeError("unable to write; sendfile is in progress")
        self._write(data)

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._write_state in (_Write.CLOSING, _Write.CLOSED):  # as asyncio's TLS: dropped
            if self._lost_writes >= _constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                logger.warning("afalg TLS transport: write() on a closed connection")
            self._lost_writes += 1
            return
        if not self._writer_on and not self._buffer and isinstance(data, (bytes, bytearray)):
            # Nothing queued: straight to the socket, as asyncio's transports try, and only
            # what it does not take is copied (the caller may reuse a bytearray)
            try:
                n = self._tls.send(data)
            except (BlockingIOError, InterruptedError):
                n = 0  # WantWrite: nothing taken
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "fatal write error on the TLS connection")
                return
            if n == len(data):
                if self._tls.pending_output():  # algif: sealed records the socket has not taken
                    self._advance()
                    self._maybe_pause_protocol()
                return
            data = memoryview(data)[n:]
        view = memoryview(bytes(data))  # bytes() copies, one byte an item
        self._buffer.append(view)
        self._buffer_size += len(view)
        if not self._writer_on:
            self._write_out()  # at once, as asyncio's transports try
            self._advance()
        self._maybe_pause_protocol()

    def _has_output(self) -> bool:
        return bool(self._buffer) or self._tls.pending_output() > 0

    def get_write_buffer_size(self) -> int:
        """Bytes queued: not yet taken by the socket, plus (algif) sealed records not yet sent.

        The sealed records are those not yet written to TCP."""
        if self._write_state is _Write.CLOSED:
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
        if self._write_state is _Write.CLOSED:
            return
        self._write_out()
        if self._write_state is _Write.CLOSED:
            return
        self._maybe_resume_protocol()
        self._wake_waiters()
        self._advance()

    def _wake_waiters(self) -> None:
        size = self.get_write_buffer_size()
        for item in list(self._waiters):
            limit, fut = item
            if limit == _WRITABLE or size <= limit:
                self._waiters.remove(item)
                if not fut.done():
                    fut.set_result(None)

    def _waiting_writable(self) -> bool:
        return any(limit == _WRITABLE for limit, _ in self._waiters)

    async def _wait_buffer(self, limit: int) -> None:
        """Wait until no more than ``limit`` bytes are queued, or the connection is lost.

        With ``_WRITABLE``: until the socket is writable."""
        if limit != _WRITABLE and self.get_write_buffer_size() <= limit:
            return
        if self._write_state is _Write.CLOSED:
            return
        fut = self._loop.create_future()
        self._waiters.append((limit, fut))
        if limit == _WRITABLE:
            self._writer(True)
        try:
            await fut
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove((limit, fut))

    def can_write_eof(self) -> bool:
        """Whether :meth:`write_eof` works: False, as for asyncio's TLS, unless half-closing.

        True when the transport was made with ``half_close=True`` in TLS 1.3 (close_notify, then a
        TCP half-close, and reading goes on)."""
        return self._half_close

    def write_eof(self) -> None:
        """Send close_notify once what is queued is out, then shut down TCP's sending side.

        Only with ``half_close`` in TLS 1.3; the peer may go on sending. Else
        :class:`NotImplementedError`, as asyncio's TLS; :class:`RuntimeError` while a sendfile runs.
        """
        if not self.can_write_eof():
            raise NotImplementedError(
                "TLS offers no half-close here: close the writer instead (half_close=True "
                "offers it in TLS 1.3)"
            )
        if self._write_state is _Write.SENDFILE:
            raise RuntimeError("unable to write_eof; sendfile is in progress")
        if self._write_state is _Write.OPEN:
            self._set_write(_Write.EOF_PENDING)
            self._advance()

    def _close_when_writable(self) -> None:
        """Close now if close_notify fits in the socket, else once it is writable."""
        if self._socket_writable():
            self._lose(None)
        else:
            self._writer(True)  # _write_ready, then _advance, come back here

    def _socket_writable(self) -> bool:
        """Whether the socket has room now, so that close_notify is not dropped.

        kTLS sends it with MSG_DONTWAIT on close, and a refused alert may not be retried."""
        return ready_now(self._fd, select.POLLOUT)

    def _write_eof_now(self) -> None:
        if not self._socket_writable():
            self._writer(True)  # _write_ready, then _advance, come back here
            return
        try:
            self._tls.shutdown(socket.SHUT_WR)  # close_notify, then TCP's FIN
        except (BlockingIOError, InterruptedError):
            # algif: the close_notify is sealed and queued; shutdown() again once it is out
            self._writer(True)
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "write_eof failed")
            return
        self._set_write(_Write.EOF_SENT)
        self._advance()

    # -- ending --
    def is_closing(self) -> bool:
        return self._write_state in (_Write.CLOSING, _Write.CLOSED)

    def close(self) -> None:
        """Write out what is queued, send close_notify and close the socket.

        The protocol's ``connection_lost(None)`` follows. A peer that does not read for
        ``shutdown_timeout`` seconds meanwhile gets an abort, and ``connection_lost`` a
        :class:`TimeoutError`."""
        if self.is_closing():
            return
        self._set_write(_Write.CLOSING)
        self._stop_reading()
        self._deadline = self._loop.call_later(self._shutdown_timeout, self._closing_timed_out)
        self._advance()

    def _closing_timed_out(self) -> None:
        self._deadline = None
        if self._write_state is _Write.CLOSING:
            self._force_close(
                TimeoutError(
                    f"the TLS connection did not close within {self._shutdown_timeout:g} s "
                    "(ssl_shutdown_timeout): the peer did not read what was queued; aborted"
                )
            )

    def abort(self) -> None:
        """Close at once: queued data is dropped and no close_notify is sent.

        The peer sees the stream end without it: a truncation, not a clean end."""
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):  # TLS errors are ssl.SSLErrors: OSErrors
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._write_state is _Write.CLOSED:
            return
        session = self._tls.tls_session
        if session.error is None:  # no close_notify, nothing queued goes out
            session.fail(exc or ConnectionAbortedError("the transport was aborted"))
        self._buffer.clear()
        self._buffer_size = 0
        self._lose(exc)

    def _lose(self, exc: BaseException | None) -> None:
        """Close the socket now and tell the protocol soon.

        close_notify goes out unless the session failed."""
        if self._write_state is _Write.CLOSED:
            return
        self._set_write(_Write.CLOSED)
        self._stop_reading()
        self._writer(False)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        with contextlib.suppress(OSError):  # queued data that could not go out: the peer sees it
            self._tls.close()  # non-blocking: close_notify if the socket takes it now
        for _, fut in self._waiters:  # drain(), sendfile: they see the loss themselves
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)  # type: ignore[arg-type]
        finally:
            server, self._server = self._server, None
            server_detach(server, self)


def _short_read_drains(tls_sock: Any) -> Session | None:
    """The socket's session where a short read leaves nothing the loop's next poll would not report.

    Else None. With a session, a readable event needs one read, not one more that says "nothing".

    Algif mode: every complete record received is opened before the read returns (into
    ``pending()``, or the end or error the transport checks), and what TCP holds more is readable.
    kTLS: the kernel reads on while whole records wait and stops early only before a record of
    another type, which poll() reports (it waits in the kernel's rx_list), except where the kernel
    pauses reading after a TLS 1.3 KeyUpdate (Linux 6.14+): it stopped before the KeyUpdate,
    decrypted it, and poll() reports nothing until the next keys are in; there the transport reads
    until the socket would block, as in mode "ssl"."""
    if isinstance(tls_sock, AlgTLSSocket) or (
        isinstance(tls_sock, KTLSSocket) and tls_sock.poll_sees_every_record
    ):
        return tls_sock.tls_session
    return None


_per_thread = threading.local()


def _read_buffer() -> memoryview:
    """The buffer the transports of this thread's event loop read into: one per thread.

    Not one per connection: 256 KiB each, resident for as long as the connection lived, and longer
    when a failed connection's stored error keeps its frames in a reference cycle.
    :meth:`TLSTransport._read_ready` copies what it read out of it before anything else runs (the
    loop runs its callbacks in its thread, one at a time)."""
    buf: memoryview | None = getattr(_per_thread, "read_buffer", None)
    if buf is None:
        buf = _per_thread.read_buffer = memoryview(bytearray(_READ_SIZE))
    return buf


def server_attach(server: Any, client: Any) -> Any:
    """Count ``client`` in the :class:`asyncio.Server` ``server`` as asyncio's transports count.

    ``client`` is a transport, or a connection in its handshake (``close()`` and ``abort()``).
    Counted, ``wait_closed()`` waits for it, and from 3.13 ``close_clients()`` and
    ``abort_clients()`` reach it. Returns the server that counts it: None for a server without
    asyncio's counting (None, uvloop's)."""
    if not isinstance(server, asyncio.base_events.Server):
        return None
    # As Server._attach() (whose argument appeared in 3.13), without its assertion that the
    # server still listens: a handshake that began before close() may end after it, and the
    # connection was counted all along (asyncio's transport from the accept, then ours).
    if sys.version_info >= (3, 13):
        server._clients.add(client)  # type: ignore[attr-defined]
    else:
        server._active_count += 1  # type: ignore[attr-defined]
    return server


def server_detach(server: Any, client: Any) -> None:
    """``client`` ended: :func:`server_attach` undone (once per attach; None: nothing)."""
    if server is not None:
        server._detach(client) if sys.version_info >= (3, 13) else server._detach()


def _set_result_unless_cancelled(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
