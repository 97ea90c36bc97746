"""Mode "ssl": a connection afalg cannot seal, carried on by its handshake's ssl object.

The ssl object that did its handshake carries the connection on in userspace
(:class:`SSLObjectSocket`).

Whether afalg can protect a connection's records is known only once its handshake is done: a
suite that is not AEAD (TLS 1.2 CBC) or a version before TLS 1.2 cannot go to the kernel, and
no public API lets asyncio (or :mod:`ssl`) take over a finished :class:`ssl.SSLObject`. Such a
connection goes on over that ssl object and its MemoryBIOs: OpenSSL seals and opens every
record, as asyncio's own TLS would (or :class:`ssl.SSLSocket`). The socket offers what
:class:`afalg.aio.TLSTransport` uses (send, recv_into, pending_output, flush, shutdown, close,
the ssl facts) and what a blocking caller of :class:`afalg.tls.SSLContext` uses, as afalg's
other TLS sockets do (sendall, recv, makefile, sendfile, unwrap, timeouts), blocking or
non-blocking as the TCP socket is. As with ssl, one thread may send while another receives.
"""

from __future__ import annotations

import contextlib
import errno
import io
import select
import socket
import ssl
import threading
import time
from typing import Any

from afalg._face import SocketFace
from afalg._socket import sendfile_by_send

__all__ = ["SSLObjectSocket"]

_CHUNK = 64 * 1024  # plaintext sealed per send()
_HIGH_WATER = 256 * 1024  # sealed bytes queued before send() refuses more


class _Failure:
    """The part of :class:`afalg.session.Session` the transport uses: the first error."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc


class SSLObjectSocket(SocketFace):
    """A TLS connection whose records OpenSSL protects in userspace. Owns ``sock``.

    It runs over the ssl object of a finished handshake (``mode == "ssl"``, ``backend ==
    "openssl"``).

    ``pending_out`` is what the handshake produced and has not sent yet (its last flight).
    ``recv_into`` returns 0 at the peer's close_notify (and at a TCP end without it, unless
    ``suppress_ragged_eofs`` is False: :class:`ssl.SSLEOFError`); on a non-blocking socket
    ``send``/``recv_into``/``flush`` raise :class:`BlockingIOError` when they cannot go on.
    Blocking, the socket's timeout applies to each read and write (:class:`TimeoutError`)."""

    mode = "ssl"
    backend = "openssl"

    def __init__(
        self,
        sock: socket.socket,
        ssl_object: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        *,
        pending_out: bytes = b"",
        suppress_ragged_eofs: bool = True,
    ) -> None:
        self._sock = sock
        self._ssl = ssl_object
        self._in = incoming
        self._outgoing = outgoing
        self._out = bytearray(pending_out)
        self._eof = False
        self._close_notify_sent = False
        self._closed = False  # close() was called (files from makefile() may keep it open)
        self._released = False  # the TCP socket is closed, or given back by unwrap()
        self._io_refs = 0
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.tls_session = _Failure()
        # The ssl object, its BIOs and the sealed output are one state (_lock); one thread
        # writes the socket (_tx_lock) and one reads it (_rx_lock), as with ssl.SSLSocket.
        self._lock = threading.Lock()
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()

    @classmethod
    def from_handshake(
        cls, sock: socket.socket, hs: Any, *, suppress_ragged_eofs: bool = True
    ) -> SSLObjectSocket:
        """Return the connection of ``hs``, a finished handshake whose keys afalg refused.

        ``hs`` is an :class:`afalg.handoff.Handshake` whose ssl handshake finished, refused with
        :class:`afalg.errors.UnsupportedCipherSuite`: its ssl object and BIOs go on, and its
        last flight is sent first. Owns ``sock``."""
        if hs.ssl_object.cipher() is None:  # ssl did not finish: nothing to carry on
            raise ValueError("the handshake did not finish")
        # The Handshake's BIOs are its own (private): this is the one place that takes them.
        return cls(
            sock,
            hs.ssl_object,
            hs._incoming,
            hs._outgoing,
            pending_out=hs.data_to_send(),
            suppress_ragged_eofs=suppress_ragged_eofs,
        )

    def __repr__(self) -> str:
        state = "closed" if self._sock.fileno() < 0 else f"fd={self._sock.fileno()}"
        cipher = self.cipher()
        return f"<SSLObjectSocket {state} mode=ssl {self.version()} {cipher[0] if cipher else '?'}>"

    # -- the ssl facts --
    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    @property
    def context(self) -> ssl.SSLContext:
        return self._ssl.context

    @property
    def server_side(self) -> bool:
        return self._ssl.server_side

    @property
    def server_hostname(self) -> str | None:
        return self._ssl.server_hostname

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._ssl.session

    @property
    def session_reused(self) -> bool:
        return self._ssl.session_reused

    def do_handshake(self) -> None:
        """Nothing to do: the handshake is done (as ssl's ``do_handshake`` once done)."""

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    def version(self) -> str | None:
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    # -- the TCP socket: afalg._face.SocketFace --

    # -- sending --
    def send(self, data: Any, flags: int = 0) -> int:
        """Seal up to 64 KiB of ``data``, write what the socket takes; return the bytes taken.

        The count is of plaintext bytes. Non-blocking, with too much sealed output queued:
        :class:`BlockingIOError` (nothing taken)."""
        self._check_open()
        if flags:
            raise ValueError("flags are not supported on SSLObjectSocket")
        if len(self._out) >= _HIGH_WATER:
            self.flush()
            if len(self._out) >= _HIGH_WATER:
                raise BlockingIOError("the socket takes no more now")
        with memoryview(data).cast("B") as whole, whole[:_CHUNK] as view:
            if not view:
                return 0
            with self._lock:
                n = self._ssl.write(view)
                self._out += self._outgoing.read()
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self.flush()
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Send all of ``data``: returns once the socket took every sealed byte."""
        with memoryview(data).cast("B") as view:
            sent = 0
            while sent < len(view):
                with view[sent:] as rest:
                    sent += self.send(rest, flags)
        self.flush()

    def write(self, data: Any) -> int:
        return self.send(data)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file (opened in binary mode) as :meth:`socket.socket.sendfile` does.

        It is read and sealed in chunks (ssl's way: no zero-copy in userspace TLS). The file
        position ends after the last byte sent; a non-blocking socket is refused
        (``ValueError``)."""
        self._check_open()
        return sendfile_by_send(self, file, offset, count, _CHUNK)

    def pending_output(self) -> int:
        """Sealed bytes not yet written to the socket."""
        return len(self._out)

    def flush(self) -> None:
        """Write out the sealed bytes.

        All of them (blocking socket, within its timeout), or what the socket takes
        (non-blocking: :class:`BlockingIOError` if some remain)."""
        with self._tx_lock:  # only here are bytes taken off the front of _out
            while True:
                with self._lock:
                    chunk = bytes(self._out[:_HIGH_WATER])
                if not chunk:
                    return
                if self._sock.gettimeout() != 0.0:
                    self._sock.sendall(chunk)
                    n = len(chunk)
                else:
                    n = self._sock.send(chunk)
                with self._lock:
                    del self._out[:n]

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Open records into ``buffer``: the plaintext bytes, 0 at the end."""
        self._check_open()
        if flags:
            raise ValueError("flags are not supported on SSLObjectSocket")
        with memoryview(buffer).cast("B") as view, self._rx_lock:
            if nbytes < 0 or nbytes > len(view):
                raise ValueError("nbytes out of range for the buffer")
            size = nbytes or len(view)
            while not self._eof and size:
                try:
                    with self._lock:
                        n = int(self._ssl.read(size, view))  # with a buffer: a count
                except ssl.SSLWantReadError:
                    self._fill()
                    continue
                except ssl.SSLZeroReturnError:  # close_notify
                    self._eof = True
                except ssl.SSLEOFError:  # TCP's end without close_notify
                    self._eof = True
                    if not self.suppress_ragged_eofs:
                        raise
                else:
                    self._answer()
                    return n
            return 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buf = bytearray(bufsize)
        del buf[self.recv_into(buf, bufsize, flags) :]
        return bytes(buf)

    def read(self, n: int = 1024) -> bytes:
        return self.recv(n)

    def pending(self) -> int:
        return self._ssl.pending()

    def _fill(self) -> None:
        """Move what the socket holds into ssl's BIO (BlockingIOError when nothing is there)."""
        data = self._sock.recv(256 * 1024)
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()

    def _answer(self) -> None:
        """Queue and try to send what reading produced (a KeyUpdate's answer)."""
        with self._lock:
            out = self._outgoing.read()
            self._out += out
        if out:
            with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                self.flush()

    # -- ending --
    def shutdown(self, how: int) -> None:
        """Shut down one or both directions, as :meth:`socket.socket.shutdown`.

        For SHUT_WR and SHUT_RDWR: close_notify after what is queued, then TCP's shutdown
        (non-blocking and not all written: :class:`BlockingIOError`, call again)."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._queue_close_notify()
            self.flush()
        self._sock.shutdown(how)

    def _queue_close_notify(self) -> None:
        with self._lock:
            if self._close_notify_sent:
                return
            self._close_notify_sent = True
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()  # writes close_notify; then wants the peer's (not awaited)
            self._out += self._outgoing.read()

    def unwrap(self) -> socket.socket:
        """End TLS as :meth:`ssl.SSLSocket.unwrap` and return the plain TCP socket.

        Sends close_notify and waits for the peer's (within the socket's timeout); this object
        no longer owns the socket returned."""
        self._check_open()
        self._queue_close_notify()
        self.flush()
        with self._rx_lock:
            while True:
                try:
                    with self._lock:
                        self._ssl.unwrap()
                    break
                except ssl.SSLWantReadError:
                    self._fill()
        self._released = self._closed = True
        return self._sock

    def detach(self) -> int:
        raise io.UnsupportedOperation(
            "SSLObjectSocket cannot give its socket back with TLS on it: unwrap() ends TLS first"
        )

    def close(self) -> None:
        """Send close_notify unless the connection failed, and close the socket. Idempotent.

        Does not wait on a non-blocking socket; files from :meth:`makefile` keep the connection
        open until they are closed."""
        self._closed = True
        if self._io_refs > 0 or self._released:
            return
        self._released = True
        try:
            if self.tls_session.error is None:
                self._queue_close_notify()
                with contextlib.suppress(OSError):
                    self.flush()
                self._discard_input()
        finally:
            self._sock.close()

    def _discard_input(self) -> None:
        """Read and drop, without waiting, what the peer sent that nobody read. Best effort.

        Linux answers a close() that leaves unread input with a reset, which can throw away our
        close_notify on its way (the peer sees ConnectionResetError). Bounded by twice the
        receive buffer and the socket's timeout."""
        timeout = self._sock.gettimeout()
        deadline = time.monotonic() + timeout if timeout else None
        budget = 2 * self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while budget > 0 and poller.poll(0):
            try:
                data = self._sock.recv(min(budget, 2**16), socket.MSG_DONTWAIT)
            except OSError:
                return
            if not data:
                return
            budget -= len(data)
            if deadline is not None and time.monotonic() > deadline:
                return

    def _check_open(self) -> None:
        if self._released or self._sock.fileno() < 0:
            raise OSError(errno.EBADF, "the TLS socket is closed")  # as a closed socket
