"""Mode "ssl": a connection afalg cannot seal carried on in userspace by the ssl object that
did its handshake (:class:`SSLObjectSocket`).

Whether afalg can protect a connection's records is known only once its handshake is done: a
suite that is not AEAD (TLS 1.2 CBC) or a version before TLS 1.2 cannot go to the kernel, and
no public API lets asyncio (or :mod:`ssl`) take over a finished :class:`ssl.SSLObject`. Such a
connection goes on over that ssl object and its MemoryBIOs: OpenSSL seals and opens every
record, as asyncio's own TLS would. The socket offers what :class:`afalg.aio.TLSTransport` and
a blocking caller use (send, recv_into, pending_output, flush, shutdown, close, the ssl facts),
blocking or non-blocking as the TCP socket is.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import Any

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


class SSLObjectSocket:
    """A TLS connection whose records OpenSSL protects in userspace, over the ssl object of a
    finished handshake (``mode == "ssl"``, ``backend == "openssl"``). Owns ``sock``.

    ``pending_out`` is what the handshake produced and has not sent yet (its last flight).
    ``recv_into`` returns 0 at the peer's close_notify (and at a TCP end without it, unless
    ``suppress_ragged_eofs`` is False: :class:`ssl.SSLEOFError`); on a non-blocking socket
    ``send``/``recv_into``/``flush`` raise :class:`BlockingIOError` when they cannot go on."""

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
        self._closed = False
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.tls_session = _Failure()

    @classmethod
    def from_handshake(
        cls, sock: socket.socket, hs: Any, *, suppress_ragged_eofs: bool = True
    ) -> SSLObjectSocket:
        """The connection of ``hs``, an :class:`afalg.handoff.Handshake` whose ssl handshake
        finished but whose keys afalg refused (:class:`afalg.errors.UnsupportedCipherSuite`):
        its ssl object and BIOs go on, and its last flight is sent first. Owns ``sock``."""
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
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        return f"<SSLObjectSocket {state} mode=ssl {self.version()}>"

    # -- the ssl facts --
    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._ssl

    @property
    def context(self) -> ssl.SSLContext:
        return self._ssl.context

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._ssl.session

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form)

    def version(self) -> str | None:
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    # -- the TCP socket --
    def fileno(self) -> int:
        return self._sock.fileno()

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def __enter__(self) -> SSLObjectSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending --
    def send(self, data: Any, flags: int = 0) -> int:
        """Seal up to 64 KiB of ``data`` and write what the socket takes; returns the
        plaintext bytes taken. Non-blocking, with too much sealed output queued:
        :class:`BlockingIOError` (nothing taken)."""
        self._check_open()
        if len(self._out) >= _HIGH_WATER:
            self.flush()
            if len(self._out) >= _HIGH_WATER:
                raise BlockingIOError("the socket takes no more now")
        view = memoryview(data).cast("B")[:_CHUNK]
        if not view:
            return 0
        n = self._ssl.write(view)
        self._out += self._outgoing.read()
        with contextlib.suppress(BlockingIOError, InterruptedError):
            self.flush()
        return n

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self.send(view) :]
        self.flush()

    def pending_output(self) -> int:
        """Sealed bytes not yet written to the socket."""
        return len(self._out)

    def flush(self) -> None:
        """Write out the sealed bytes: all of them (blocking socket), or what the socket takes
        (non-blocking: :class:`BlockingIOError` if some remain)."""
        while self._out:
            if self._sock.gettimeout() != 0.0:
                self._sock.sendall(self._out)
                self._out.clear()
                return
            n = self._sock.send(self._out)
            del self._out[:n]

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Open records into ``buffer``: the plaintext bytes, 0 at the end."""
        self._check_open()
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        while not self._eof:
            try:
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
        buf = bytearray(bufsize)
        return bytes(buf[: self.recv_into(buf)])

    def pending(self) -> int:
        return self._ssl.pending()

    def _fill(self) -> None:
        """Move what the socket holds into ssl's BIO (BlockingIOError when nothing is there)."""
        data = self._sock.recv(256 * 1024)
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    def _answer(self) -> None:
        """Queue and try to send what reading produced (a KeyUpdate's answer)."""
        out = self._outgoing.read()
        if out:
            self._out += out
            with contextlib.suppress(BlockingIOError, InterruptedError, OSError):
                self.flush()

    # -- ending --
    def shutdown(self, how: int) -> None:
        """For SHUT_WR and SHUT_RDWR: close_notify after what is queued, then TCP's shutdown
        (non-blocking and not all written: :class:`BlockingIOError`, call again)."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._queue_close_notify()
            self.flush()
        self._sock.shutdown(how)

    def _queue_close_notify(self) -> None:
        if self._close_notify_sent:
            return
        self._close_notify_sent = True
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()  # writes close_notify; then wants the peer's (not awaited)
        self._out += self._outgoing.read()

    def close(self) -> None:
        """Send close_notify unless the connection failed, without waiting on a non-blocking
        socket, and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.tls_session.error is None:
                self._queue_close_notify()
                with contextlib.suppress(OSError):
                    self.flush()
        finally:
            self._sock.close()

    def _check_open(self) -> None:
        if self._closed:
            raise OSError(9, "the TLS socket is closed")  # EBADF, as a closed socket
