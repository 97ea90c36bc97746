"""The socket face both afalg TLS sockets share (:class:`TLSSocketBase`), and their protocol driver.

A subclass opens records somewhere (the kernel under kTLS, :mod:`afalg.record` in algif mode) and
gives each record that is not application data to :meth:`TLSSocketBase._control_record`, which hands
it to the socket's :class:`afalg.session.Session` and acts on the events: a NewSessionTicket goes
back to ssl (:class:`afalg.handoff.TicketFeed`), a KeyUpdate installs the peer's next keys (the
subclass's ``_key_update``), close_notify is end of file. Errors poison the session, and the peer
gets the fatal alert it is owed (the subclass's ``_send_alert``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import select
import socket
import ssl
import threading
import time
from typing import Any

from afalg._face import SocketFace
from afalg._uapi import TLS_1_3_VERSION
from afalg.errors import ClosedError, TLSProtocolError
from afalg.handoff import TicketFeed
from afalg.session import CloseNotify, Event, KeyUpdate, NewSessionTicket, Session
from afalg.wire import AlertDescription

__all__ = ["TLSSocketBase"]

# Room for kTLS's record type (TLS_GET_RECORD_TYPE): without it a kTLS socket answers the read
# of a record that is not application data with EIO. A plain TCP socket sends none.
_ANCBUFSIZE = socket.CMSG_SPACE(1)
_RECV_BUF = 2**16  # recv() up to this size reads into a buffer of the thread's
_per_thread = threading.local()


def _recv_buffer() -> memoryview:
    """This thread's buffer for :meth:`TLSSocketBase.recv`: 64 KiB, made once per thread.

    ``recv`` copies what it read out of it before returning."""
    buf: memoryview | None = getattr(_per_thread, "recv_buffer", None)
    if buf is None:
        buf = _per_thread.recv_buffer = memoryview(bytearray(_RECV_BUF))
    return buf


def sendfile_by_send(sock: Any, file: Any, offset: int, count: int | None, chunk: int) -> int:
    """Send ``file`` through the TLS socket ``sock``, reading ``chunk`` bytes at a time.

    ``sock`` offers ``send``, ``flush`` and ``_sock``. Each chunk is read into one buffer and sent
    (sealed into whole records); returns the bytes sent. The file position ends after the last byte
    the socket took, as with :meth:`socket.socket.sendfile`, even when a send raised. A non-blocking
    socket is refused (``ValueError``)."""
    if sock._sock.gettimeout() == 0.0:
        raise ValueError("non-blocking sockets are not supported")
    if offset:
        file.seek(offset)
    total = 0
    buf = memoryview(bytearray(chunk))
    try:
        while count is None or total < count:
            n = file.readinto(buf[: chunk if count is None else min(chunk, count - total)])
            if not n:
                break
            view = buf[:n]
            while view:
                sent = sock.send(view)
                total += sent
                view = view[sent:]
        sock.flush()
    finally:
        if total > 0 and getattr(file, "seekable", bool)():  # not a pipe
            file.seek(offset + total)
    return total


class TLSSocketBase(SocketFace):
    """What both afalg TLS sockets share, the driver of the post-handshake protocol included.

    Ownership of the TCP socket (its face, timeouts and makefile included, is
    :class:`afalg._face.SocketFace`'s), the ssl facts of the handshake, sendall, and driving the
    post-handshake protocol (:class:`afalg.session.Session`): each
    opened record goes to the session, and the socket acts on its events. ``server_side``: our role,
    by default the handshake's (``ssl_object.server_side``), else unknown. Subclasses implement
    ``send``, ``recv_into``, ``sendfile``, ``_send_alert`` and ``_key_update`` (install the peer's
    next receive keys)."""

    mode = "?"

    def __init__(
        self,
        sock: socket.socket,
        *,
        version: int,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        tickets: TicketFeed | None = None,
        server_side: bool | None = None,
    ) -> None:
        if server_side is None and ssl_object is not None:
            server_side = ssl_object.server_side  # the role the handshake played
        # The protocol state, poisoned by the first error; it knows our role (a server refuses
        # what only servers send).
        self._session = Session(version, server_side=server_side)
        self._sock = sock
        self._ssl = ssl_object
        self._tickets = tickets  # a TLS 1.3 client's NewSessionTickets go back to ssl
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self._closed = False
        self._io_refs = 0
        self._plain = bytearray()  # opened application data not yet returned
        self._close_notify_retry: bytes | None = None  # close_notify the socket took none of
        self._version = version  # TLS_1_2_VERSION or TLS_1_3_VERSION
        # Sending a record and what goes with it (sealing in sequence order; a KeyUpdate and
        # the next send keys) is one step: one sender at a time.
        self._tx_lock = threading.RLock()
        # The same connection with timeout 0 (:meth:`_twin`), for sockets with a timeout.
        self._twin_sock: socket.socket | None = None

    # -- facts from the handshake --
    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._ssl

    @property
    def context(self) -> ssl.SSLContext | None:
        return self._ssl.context if self._ssl is not None else None

    @property
    def server_side(self) -> bool:
        return bool(self._session.server_side)

    @property
    def server_hostname(self) -> str | None:
        return self._ssl.server_hostname if self._ssl is not None else None

    @property
    def session(self) -> ssl.SSLSession | None:
        return self._ssl.session if self._ssl is not None else None

    @property
    def session_reused(self) -> bool | None:
        return self._ssl.session_reused if self._ssl is not None else None

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl.getpeercert(binary_form) if self._ssl is not None else None

    def version(self) -> str | None:
        """The protocol version: ``"TLSv1.3"`` or ``"TLSv1.2"``.

        From ssl, or from the keys for a socket made from keys alone."""
        if self._ssl is not None:
            return self._ssl.version()
        return "TLSv1.3" if self._version == TLS_1_3_VERSION else "TLSv1.2"

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher() if self._ssl is not None else None

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol() if self._ssl is not None else None

    # -- the TCP socket: afalg._face.SocketFace --

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        cipher = self.cipher()
        return (
            f"<{type(self).__name__} {state} mode={self.mode} "
            f"{self.version() or '?'} {cipher[0] if cipher else '?'}>"
        )

    # -- data --
    def send(self, data: Any, flags: int = 0) -> int:
        raise NotImplementedError

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        raise NotImplementedError

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Send all of ``data``, as :meth:`socket.socket.sendall`.

        Returns once the socket has taken it all (in algif mode: its records written, none left
        queued, see :meth:`flush`), or raises (:class:`TimeoutError` per the socket's timeout)."""
        with memoryview(data).cast("B") as view:  # released however this ends
            sent = self.send(view, flags) if view else 0
            while sent < len(view):
                with view[sent:] as rest:
                    sent += self.send(rest, flags)
        if not sent or self.pending_output():
            self.flush()  # what algif still holds; on nothing sent, EBADF once closed

    def _sendfile_by_send(self, file: Any, offset: int, count: int | None, chunk: int) -> int:
        """Send a file by reading ``chunk`` bytes at a time (:func:`sendfile_by_send`)."""
        return sendfile_by_send(self, file, offset, count, chunk)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if bufsize > _RECV_BUF:
            buf = bytearray(bufsize)
            n = self.recv_into(buf, bufsize, flags)
            del buf[n:]
            return bytes(buf)
        # Up to 64 KiB: read into this thread's buffer and copy out what came (a fresh
        # zero-filled buffer per call costs more than the copy, ~80 us for 16 KiB under TCG)
        view = _recv_buffer()[:bufsize]
        n = self.recv_into(view, 0, flags)
        return bytes(view[:n])

    def read(self, n: int = 1024) -> bytes:
        return self.recv(n)

    def write(self, data: Any) -> int:
        return self.send(data)

    def _check_open(self) -> None:
        """EBADF once closed (a file from :meth:`makefile` keeps the socket open)."""
        if self._sock.fileno() < 0:
            raise ClosedError(type(self).__name__)

    def _recv_view(self, buffer: Any, nbytes: int, flags: int) -> memoryview:
        """The checks every ``recv_into`` starts with; the bytes of ``buffer`` to fill."""
        self._check_open()
        if flags:
            raise ValueError(f"flags are not supported on {type(self).__name__}")
        view = memoryview(buffer).cast("B")
        if nbytes:
            if nbytes < 0 or nbytes > len(view):
                raise ValueError("nbytes out of range for the buffer")
            view = view[:nbytes]
        return view

    def _check_send(self) -> None:
        self._check_open()
        self._session.check_send()

    def _twin(self) -> socket.socket:
        """This connection on a duplicate descriptor with timeout 0, closed with this socket.

        A socket with a timeout makes Python poll before every ``send`` and ``recv``; the twin's
        calls with ``MSG_DONTWAIT`` go first, and a poll follows only when they would block."""
        twin = self._twin_sock
        if twin is None:
            sock = self._sock
            twin = socket.socket(sock.family, sock.type, sock.proto, os.dup(sock.fileno()))
            twin.settimeout(0.0)  # the shared O_NONBLOCK is set already (a timeout)
            self._twin_sock = twin
        return twin

    # -- the session --
    @property
    def tls_session(self) -> Session:
        """The post-handshake protocol state (:class:`afalg.session.Session`)."""
        return self._session

    def _receive(self, content_type: int, payload: Any) -> list[Event]:
        """Give one opened record to the session.

        On a protocol error the peer gets the fatal alert it is owed (best effort) before the error
        is raised."""
        try:
            return self._session.receive(content_type, payload)
        except BaseException:
            self._send_fatal_alert()
            raise

    def _data_record(self, length: int) -> bool:
        """Give the session an opened application_data record of ``length`` bytes.

        Returns True when it carries data, False for an empty one
        (:meth:`afalg.session.Session.application_data`); on a protocol error the peer gets its
        fatal alert first."""
        try:
            return self._session.application_data(length)
        except BaseException:
            self._send_fatal_alert()
            raise

    def _act_on(self, events: list[Event]) -> bool:
        """Act on the events of a record other than application data; True at close_notify."""
        for event in events:
            if isinstance(event, NewSessionTicket):
                if self._tickets is not None:  # ssl stores the session (``self.session``)
                    self._tickets.ticket(event.body)
            elif isinstance(event, KeyUpdate):
                self._key_update(update_requested=event.update_requested)
            elif isinstance(event, CloseNotify):
                return True
        return False

    def _control_record(self, content_type: int, payload: bytes) -> bool:
        """Act on a non-application record; True when it was close_notify."""
        return self._act_on(self._receive(content_type, payload))

    def _send_fatal_alert(self) -> None:
        """Send the fatal alert the session owes the peer, if any.

        Best effort, never waiting (another thread may be sending)."""
        alert = self._session.fatal_alert()
        if alert is not None and self._sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                self._send_alert(alert[0], alert[1], wait=False)

    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        raise NotImplementedError

    def _send_close_notify(self, *, wait: bool) -> None:
        """Send close_notify, once.

        If the socket took none of it (kTLS queues nothing when the send times out; algif keeps the
        sealed alert queued), the next :meth:`shutdown` or :meth:`close` sends it."""
        if self._sock.fileno() < 0 or self._session.error is not None:
            return
        alert = self._session.close_notify() or self._close_notify_retry
        if alert is None:
            return
        self._close_notify_retry = None
        try:
            self._send_alert(alert[0], alert[1], wait=wait)
        except OSError:
            if self.pending_output() == 0:  # nothing of it queued
                self._close_notify_retry = alert
            if wait:
                raise

    def _fatal(self, alert: int | None, exc: BaseException) -> BaseException:
        """Poison the connection with ``exc`` after sending the fatal ``alert`` (best effort).

        Returns the connection's error: the first one stays."""
        error = self._session.fail(exc, alert)
        self._send_fatal_alert()
        return error

    def _protocol_error(self, alert: AlertDescription, message: str) -> BaseException:
        """:meth:`_fatal` with a :class:`TLSProtocolError` carrying ``alert``."""
        return self._fatal(alert, TLSProtocolError(alert, message))

    def _key_update(self, *, update_requested: bool) -> None:
        raise NotImplementedError

    def _answer_key_update(self, *, wait: bool = True) -> None:
        """Send the KeyUpdate that answers the peer's requests, if the session has one due.

        See :meth:`afalg.session.Session.key_update_answer`. With ``wait``: before our application
        data (the TX lock held or waited for), which the new key then seals: the session counts it
        used (:meth:`~afalg.session.Session.sending_data`), so the peer's next request gets its
        own answer (RFC 8446 4.6.3). Without: from the receiving side, when it would block
        or returns, so that a peer waiting for the answer does not wait for ever; only if the TX
        lock is free (never behind a sending thread) and the socket takes it now, else it is left
        for the next send."""
        if not self._session.key_update_due or not self._tx_lock.acquire(blocking=wait):
            return
        try:
            message = self._session.key_update_answer()
            if message is None or not (wait or self._writable_now()):
                return
            try:
                self._send_key_update_message(message, wait=wait)
                if wait:
                    self._session.sending_data()  # the caller's data: under the new key
            except OSError:
                # Without waiting (the receiving side, which may have taken data already):
                # nothing raised here. Nothing was sent and the next send answers, or the
                # session is poisoned (new keys failed) and the next call raises its error.
                if wait:
                    raise
        finally:
            self._tx_lock.release()

    def _send_key_update_message(self, message: bytes, *, wait: bool) -> None:
        """Send our KeyUpdate ``message`` under the current keys, then move to the next send keys.

        The session is told (``key_update_sent``). Called with the TX lock."""
        raise NotImplementedError

    def _writable_now(self) -> bool:
        return ready_now(self._sock, select.POLLOUT)

    def _readable_now(self) -> bool:
        """Whether the TCP socket has something to read right now.

        More records may follow: read them before answering, so that one KeyUpdate answers them all.
        """
        return ready_now(self._sock, select.POLLIN)

    def _ragged_eof(self) -> int:
        self._session.receive_eof(suppress_ragged_eofs=self.suppress_ragged_eofs)
        return 0

    # -- buffers --
    def pending(self) -> int:
        """Bytes of application data readable now without reading the socket.

        They were opened already (in algif mode, every complete record received is opened before
        ``recv`` returns), so a select loop reads on while this is non-zero, as with
        :meth:`ssl.SSLSocket.pending`."""
        return len(self._plain)

    def pending_output(self) -> int:
        """Bytes sealed but not yet written to the socket; :meth:`flush` writes them.

        Algif mode only: under kTLS the kernel holds them and this is 0."""
        return 0

    def flush(self) -> None:
        """Write out what :meth:`pending_output` counts, within the socket's timeout."""
        self._check_open()

    # -- ending --
    def shutdown(self, how: int) -> None:
        """Send close_notify (for SHUT_WR and SHUT_RDWR), then shut the TCP socket down.

        For SHUT_WR and SHUT_RDWR, what is queued is written out and close_notify sent within the
        socket's timeout (raising, with the connection still open, if they could not go out)."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self.flush()
            self._send_close_notify(wait=True)
        self._sock.shutdown(how)

    def close(self) -> None:
        """Write out what is queued, send close_notify, then close the socket.

        Writing out and close_notify stay within the socket's timeout (without waiting on a
        non-blocking socket). Idempotent; file
        objects from :meth:`makefile` keep the socket open until they are closed. If queued
        application data could not be written, the socket is closed all the same and the error
        (:class:`TimeoutError`, :class:`~afalg.errors.WantWrite`, ...) is raised: that data was
        lost."""
        self._closed = True
        if self._io_refs > 0:
            return
        if self._sock.fileno() < 0:
            return
        lost: TimeoutError | BlockingIOError | None = None
        try:
            if self._session.error is None:
                self.flush()
        except (TimeoutError, BlockingIOError) as exc:
            lost = exc  # queued application data did not go out in time: no close_notify
        except OSError:
            pass  # the connection is gone (the failing send reported it): close quietly
        try:
            if lost is None:
                # Blocking (or timeout) sockets wait for room for the alert, as sendall would.
                with contextlib.suppress(OSError):
                    self._send_close_notify(wait=self._sock.gettimeout() != 0.0)
        finally:
            self._discard_input()
            self._release()
            self._sock.close()
        if lost is not None:
            raise lost

    def _discard_input(self) -> None:
        """Read and drop what the peer sent that nobody read, without waiting for more.

        That is a TLS 1.3 server's NewSessionTickets, or data after ours ended: Linux answers a
        close() that leaves unread input with a TCP reset instead of a FIN, which throws away what
        is still on its way to the peer (close_notify too) and gives the peer ConnectionResetError.
        Bounded by the socket's timeout and by twice its receive buffer (a peer that keeps sending
        gets its reset); a read error stops it (best effort). A failed connection is left as it is:
        no record is opened after its error (under kTLS a read would try the forged record again),
        and the peer has our fatal alert."""
        if self._session.error is not None:
            return
        timeout = self._sock.gettimeout()
        deadline = time.monotonic() + timeout if timeout else None
        budget = 2 * self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        while budget > 0 and poller.poll(0):
            try:
                # With a timeout Python polls before reading: readable now, so it does not wait.
                data, ancdata, _flags, _addr = self._sock.recvmsg(
                    min(budget, 2**16), _ANCBUFSIZE, socket.MSG_DONTWAIT
                )
            except OSError:
                return  # nothing after all, or a record kTLS cannot open: leave it
            if not data and not ancdata:
                return  # the peer's FIN: nothing more can come
            budget -= max(len(data), 1)  # an empty kTLS record counts too
            if deadline is not None and time.monotonic() > deadline:
                return

    def _release(self) -> None:
        """Free this connection's buffered plaintext (and in algif mode its AF_ALG sockets)."""
        self._plain.clear()
        if self._tickets is not None:
            self._tickets.close()
        if self._twin_sock is not None:
            self._twin_sock.close()
            self._twin_sock = None

    def detach(self) -> int:
        raise io.UnsupportedOperation(
            f"{type(self).__name__} cannot give its socket back: the keys live in it"
        )


def wait_writable(sock: socket.socket | int, deadline: float | None) -> bool:
    """Wait until ``sock`` (a socket or a descriptor) takes more; False if not by ``deadline``.

    ``deadline`` is on ``time.monotonic()``: None waits without limit; once it has passed this
    returns False without looking, so that a loop of "would block, wait" ends at its deadline
    even where poll() and the call disagree. The one writable wait of kTLS, algif and the
    asyncio transport."""
    return _wait(sock, select.POLLOUT, deadline)


def wait_readable(sock: socket.socket | int, deadline: float | None) -> bool:
    """Wait until ``sock`` has something to read (or its end); False if not by ``deadline``.

    As :func:`wait_writable`."""
    return _wait(sock, select.POLLIN | select.POLLPRI, deadline)


def ready_now(sock: socket.socket | int, events: int) -> bool:
    """Whether poll() reports any of ``events`` on ``sock`` now, without waiting."""
    poller = select.poll()
    poller.register(sock, events)
    return bool(poller.poll(0))


def _wait(sock: socket.socket | int, events: int, deadline: float | None) -> bool:
    poller = select.poll()
    poller.register(sock, events)
    while True:
        left = None
        if deadline is not None:
            left = math.ceil((deadline - time.monotonic()) * 1e3)
            if left <= 0:
                return False
        if poller.poll(left):
            return True


def deadline_after(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` deadline ``timeout`` seconds from now (None: no deadline)."""
    return None if timeout is None else time.monotonic() + timeout
