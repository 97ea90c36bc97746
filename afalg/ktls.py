"""Kernel TLS sockets: the kernel seals and opens the records, Python sees plaintext.

After the userspace handshake (:mod:`afalg.handoff`), :func:`enable` attaches the ``tls`` upper
layer protocol to the TCP socket and installs the keys of both directions::

    setsockopt(SOL_TCP, TCP_ULP, "tls")
    setsockopt(SOL_TLS, TLS_TX, struct tls12_crypto_info_*)   # key, iv/salt, rec_seq
    setsockopt(SOL_TLS, TLS_RX, struct tls12_crypto_info_*)

From then on ``send()`` writes application_data records and ``recv()`` returns the plaintext of
application_data records. Every other record stops a read and comes back with a
``TLS_GET_RECORD_TYPE`` control message; :class:`KTLSSocket` always passes a control buffer to
``recvmsg()`` (without one the kernel answers such a record with a bare EIO) and gives them to
its :class:`afalg.session.Session`, acting on the events: close_notify is EOF, a fatal alert
raises :class:`afalg.TLSAlertReceived`, a NewSessionTicket is consumed, a KeyUpdate installs
the next receive keys where the kernel can rekey (Linux 6.14+) and otherwise raises
:class:`afalg.errors.KeyUpdateUnsupported`. Control records are sent with
a ``TLS_SET_RECORD_TYPE`` control message (close_notify on close, fatal alerts on errors).

Rekeying (TLS 1.3 KeyUpdate, Linux 6.14+): a peer's KeyUpdate installs the next receive keys
as soon as it is read; :meth:`KTLSSocket.key_update` sends ours under the old keys, then installs
the new send keys. A peer's update_requested is answered with one KeyUpdate as soon as the
records read so far are handled and no other thread is sending (the receiving side sends it),
else before our next application data (RFC 8446 4.6.3), however many requests came meanwhile.

A record that fails authentication makes the kernel set the socket error (EBADMSG); until it is
read with ``SO_ERROR`` every send fails. :class:`KTLSSocket` reads it, sends the bad_record_mac
alert and raises :class:`afalg.TLSProtocolError` (bad_record_mac); the connection is then dead.

The kernel's TLS counters (``/proc/net/tls_stat``) are :func:`tls_stats`; what the kernel holds
for one connection (ULP, version, cipher, which directions are set up, the record sequence
numbers, the zero-copy and no-pad flags) is :func:`kernel_state` (``conn.kernel_state()`` on
either afalg socket), read back from the kernel and never from afalg's memory.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import socket
import ssl
import time
from typing import Any, Literal, NoReturn

from afalg import _uapi
from afalg._ktls.setup import attach_ulp as attach_ulp
from afalg._ktls.setup import enable, install_keys, supports, supports_rekey
from afalg._ktls.setup import loopback as loopback
from afalg._ktls.setup import missing_ulp_reason as missing_ulp_reason
from afalg._ktls.state import KernelTLSState, kernel_state, record_sequence, tls_stats
from afalg._socket import TLSSocketBase, deadline_after, wait_readable, wait_writable
from afalg._uapi import TLS_1_3_VERSION
from afalg._uapi import TLSCipherType as TLSCipherType  # KernelTLSState's annotations
from afalg.cmsg import (
    parse_record_type,
    record_type_cmsg,
)
from afalg.errors import (
    KeyUpdateUnsupported,
    KTLSError,
    WantRead,
    WantWrite,
)
from afalg.handoff import TicketFeed
from afalg.keys import TrafficKeys
from afalg.record import default_records_per_key
from afalg.wire import MAX_PLAINTEXT, AlertDescription, ContentType

__all__ = [
    "KTLSSocket",
    "KernelTLSState",
    "enable",
    "kernel_state",
    "record_sequence",
    "supports",
    "supports_rekey",
    "tls_stats",
]

# Documented and pickled as afalg.ktls's, where users import them from (the code of all but
# KTLSSocket is in afalg._ktls: state, what the kernel holds; setup, attaching and keying).
for _name in set(__all__) - {"KTLSSocket"}:  # KTLSSocket is defined below, here
    globals()[_name].__module__ = __name__
del _name

# Rekeying in the kernel (Documentation/networking/tls.rst): the kernel pauses reading after a
# handshake record that starts with a KeyUpdate (msg_type 24; TlsRxRekeyReceived) until TLS_RX is
# set again (meanwhile reads fail with EKEYEXPIRED or, on 7.3, a blocking one just waits);
# KTLSSocket installs the next generation as soon as it has read the KeyUpdate (TlsRxRekeyOk).
# The kernel only looks at a record's first byte, so it also pauses where there is no complete
# KeyUpdate yet (a KeyUpdate fragmented over records, or a fragment of another message that
# starts with the byte 24): there the current keys are installed again at the kernel's sequence
# number (getsockopt(TLS_RX)) to read on. On the send side there is no pause: our KeyUpdate goes
# out under the old keys, then TLS_TX gets the new ones (TlsTxRekeyOk).

_ANCBUFSIZE = socket.CMSG_SPACE(1)
_SENDFILE_CHUNK = 2**24  # bytes per os.sendfile loop (checked against the key usage limit)
# os.sendfile's errors for an input it cannot read from (a pipe, a socket, a character device)
_NOT_A_FILE = (errno.EINVAL, errno.ESPIPE)
_RECORD_BUF = 2**14 + 1024  # one whole record's plaintext fits
_APPLICATION_DATA = int(ContentType.application_data)
_DONTWAIT = int(socket.MSG_DONTWAIT)  # an int: | on the IntFlag runs enum's Python code


def _record_type(ancdata: list[tuple[int, int, bytes]]) -> int:
    """Return the record type kTLS reports (TLS_GET_RECORD_TYPE) in ``recvmsg``'s cmsgs.

    application_data when there is none (a bare end of file)."""
    for level, kind, data in ancdata:
        if level == _uapi.SOL_TLS and kind == _uapi.TLS_GET_RECORD_TYPE:
            return parse_record_type(data)
    return _APPLICATION_DATA


# --- kTLS ----------------------------------------------------------------------------------------

_RECV_ERRORS = {
    errno.EBADMSG: (AlertDescription.bad_record_mac, "record failed authentication"),
    errno.EMSGSIZE: (AlertDescription.record_overflow, "record too long"),
    errno.EINVAL: (AlertDescription.decode_error, "malformed record header"),
    errno.EIO: (AlertDescription.unexpected_message, "kernel refused a record (EIO)"),
    errno.EKEYEXPIRED: (
        AlertDescription.internal_error,
        "the kernel paused reading for a KeyUpdate and could not be resumed (EKEYEXPIRED)",
    ),
}


def _wait_writable(fd: int, deadline: float | None) -> None:
    """Wait until ``fd`` takes more, by ``deadline`` (``TimeoutError`` after, as socket's)."""
    if not wait_writable(fd, deadline):
        raise TimeoutError("timed out")


class KTLSSocket(TLSSocketBase):
    """A TCP socket whose records the kernel seals and opens (kernel TLS).

    Construct it with :func:`afalg.tls.wrap` (which runs the handshake), or from a connected
    TCP socket and the keys of both directions: ``KTLSSocket(sock, tx, rx)``. The object owns
    ``sock``. ``recv`` returns application data only; see the module docstring for the rest.
    """

    mode: Literal["ktls"] = "ktls"
    backend: Literal["kernel"] = "kernel"  # the kernel's TLS does the crypto

    def __init__(
        self,
        sock: socket.socket,
        tx: TrafficKeys,
        rx: TrafficKeys,
        *,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        tickets: TicketFeed | None = None,
        records_per_key: int | None = None,
        server_side: bool | None = None,
    ) -> None:
        if records_per_key is not None and records_per_key < 3:
            raise ValueError("records_per_key must be at least 3 under kTLS")
        enable(sock, tx, rx)
        super().__init__(
            sock,
            version=tx.version,
            ssl_object=ssl_object,
            suppress_ragged_eofs=suppress_ragged_eofs,
            tickets=tickets,
            server_side=server_side,
        )
        self._tx_keys = tx.with_seq(0) if tx.secret is not None else None  # for KeyUpdate only
        self._rx_keys = rx.with_seq(0) if rx.secret is not None else None
        self._scratch: memoryview | None = None  # one record's room, for small reads
        self._rx_paused = False  # EKEYEXPIRED seen and the current keys installed again
        self._cipher_type = tx.cipher_suite.ktls_cipher_type
        self._records_per_key = records_per_key or default_records_per_key(tx.cipher_suite)
        self._tx_budget = 0  # records surely left to the send key (re-read from the kernel)
        self._poll_sees_all = tx.version != TLS_1_3_VERSION or not supports_rekey()

    @property
    def poll_sees_every_record(self) -> bool:
        """Whether a readable poll() reports every record the kernel holds for this socket.

        True where the kernel stops a read early only before a record of another type, which
        then waits in its rx_list, readable: an event loop may wait for readable after a short
        read. False for TLS 1.3 where the kernel pauses reading after a KeyUpdate (Linux 6.14+):
        it stopped before the KeyUpdate, decrypted it, and poll() reports nothing until the
        next keys are in; read until the socket would block first. Held on 6.1, 6.12 and 7.3
        by ``test_records_of_other_types_in_one_burst``."""
        return self._poll_sees_all

    def kernel_state(self) -> KernelTLSState:
        """Return what the kernel holds for this connection, read from the kernel now.

        As :func:`afalg.ktls.kernel_state`: under kTLS the ULP, version, cipher, TX/RX set up,
        record sequence numbers and the zero-copy/no-pad flags; in algif mode ``ulp=None`` (the
        kernel holds no TLS state). Never a key. Raises :class:`afalg.errors.ClosedError` once
        closed."""
        self._check_open()
        return kernel_state(self._sock)

    # -- sending --
    def send(self, data: Any, flags: int = 0) -> int:
        self._check_open()
        with memoryview(data).cast("B") as view, self._tx_lock:
            # The session's one check, under the lock: another thread may have failed the
            # connection (its fatal alert sent) or sent close_notify while this one waited.
            self._session.sending_data()
            try:
                if self._session.key_update_due:
                    self._answer_key_update()
                n = len(view)
                cost = -(-n // MAX_PLAINTEXT) + 1
                if cost > self._tx_budget:
                    n = self._tx_allowance(n)
                else:
                    self._tx_budget -= cost
                if n < len(view):
                    with view[:n] as part:  # released even if an error keeps this frame
                        return self._send_view(part, flags)
                return self._send_view(view, flags)
            except BlockingIOError:
                raise WantWrite(errno.EAGAIN, "the socket takes no more now") from None
            except OSError as exc:
                self._raise_translated(exc)

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Send all of ``data``, as :meth:`socket.socket.sendall`; the kernel seals it.

        One lock, one check of the session and one send key budget for the whole call; on a
        blocking socket the loop over ``send`` is the socket's own (in C); with a timeout, each
        send waits for room within it, as :meth:`send` does. A KeyUpdate due, a
        budget that does not cover ``data``, or ``flags`` go through :meth:`send` piece by piece
        (the same rules, more Python)."""
        self._check_open()
        with memoryview(data).cast("B") as view:
            if flags or not view:
                super().sendall(view, flags)
                return
            with self._tx_lock:
                self._session.sending_data()
                cost = -(-len(view) // MAX_PLAINTEXT) + 1
                if cost > self._tx_budget or self._session.key_update_due:
                    super().sendall(view, flags)  # the lock is reentrant
                    return
                self._tx_budget -= cost
                try:
                    if self._sock.gettimeout() is None:
                        self._sock.sendall(view)
                        return
                    sent = self._send_view(view, 0)
                    while sent < len(view):  # the socket had no room for it all at once
                        self._session.sending_data()  # another thread may have failed it since
                        with view[sent:] as rest:  # released even if an error keeps this frame
                            sent += self._send_view(rest, 0)
                except BlockingIOError:
                    raise WantWrite(errno.EAGAIN, "the socket takes no more now") from None
                except OSError as exc:
                    self._raise_translated(exc)

    def _send_view(self, view: memoryview, flags: int) -> int:
        """Make one ``send``, waiting only while the socket has no room.

        With a timeout Python would poll before it: the twin (:meth:`_twin`) sends at once, and
        polls only while the socket has no room, within the timeout (:class:`TimeoutError`
        after)."""
        timeout = self._sock.gettimeout()
        if not timeout:
            return self._sock.send(view, flags)
        twin = self._twin()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return twin.send(view, flags | _DONTWAIT)
            except BlockingIOError:
                _wait_writable(twin.fileno(), deadline)

    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        self._send_record(ContentType.alert, bytes([level, description]), wait=wait)

    def _send_record(self, content_type: int, payload: bytes, *, wait: bool = True) -> None:
        flags = 0 if wait else socket.MSG_DONTWAIT
        # Best effort without waiting (a fatal alert from the receiving thread): never behind a
        # send in another thread, which holds the kernel's TLS TX mutex while it waits for
        # room (MSG_DONTWAIT would not help): the alert is skipped then, the error is what counts.
        if not self._tx_lock.acquire(blocking=wait):
            return
        try:
            self._sock.sendmsg([payload], [record_type_cmsg(content_type)], flags)
        finally:
            self._tx_lock.release()

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file with ``os.sendfile`` as :meth:`socket.socket.sendfile`; return the count.

        The kernel encrypts the pages it reads. Honours the timeout (per wait); what
        ``os.sendfile`` cannot read (an in-memory file, a pipe) goes through :meth:`send`; the
        file position ends after the last byte sent. One ``os.sendfile`` per chunk of up to 16
        MiB, and no other system call but the final ``lseek``."""
        self._check_send()
        timeout = self._sock.gettimeout()
        if timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported: use sendfile_nowait()")
        try:
            fd = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            return self._sendfile_by_send(file, offset, count, _SENDFILE_CHUNK)
        sock_fd = self._sock.fileno()
        total = 0
        with self._tx_lock:
            try:
                self._answer_key_update()
                while count is None or total < count:
                    self._session.sending_data()  # under the lock, before each chunk
                    want = _SENDFILE_CHUNK if count is None else min(_SENDFILE_CHUNK, count - total)
                    try:
                        sent = os.sendfile(sock_fd, fd, offset + total, self._tx_allowance(want))
                    except BlockingIOError:  # a socket with a timeout is non-blocking inside
                        _wait_writable(sock_fd, deadline_after(timeout))
                        continue
                    except OSError as exc:
                        if total or exc.errno not in _NOT_A_FILE:
                            raise
                        break  # not a regular file (nothing was sent): through send below
                    if not sent:
                        return total  # end of file
                    total += sent
                else:
                    return total
            except OSError as exc:
                self._raise_translated(exc)
            finally:
                if total and hasattr(file, "seek"):
                    file.seek(offset + total)
        return self._sendfile_by_send(file, offset, count, _SENDFILE_CHUNK)

    def sendfile_nowait(self, fd: int, offset: int, count: int) -> int:
        """Make one non-blocking ``os.sendfile`` step from ``fd``; return the bytes sent.

        From the file descriptor ``fd`` at ``offset``, at most ``count`` bytes (the file
        position is not used): the kernel encrypts the pages it reads. Returns 0 at the end of
        the file, or raises :class:`~afalg.errors.WantWrite` having sent nothing. As with
        :meth:`send`, a KeyUpdate the peer asked for goes out first, and the step is cut where
        the send key reaches ``records_per_key`` (our KeyUpdate goes first where it can;
        :class:`~afalg.errors.KeyLimitReached`, having sent nothing, where it cannot). For
        event loops (:func:`afalg.aio.sendfile`)."""
        self._check_send()
        with self._tx_lock:
            self._session.sending_data()  # again under the lock (another thread may have failed)
            try:
                self._answer_key_update()
                return os.sendfile(self._sock.fileno(), fd, offset, self._tx_allowance(count))
            except BlockingIOError:
                raise WantWrite(errno.EAGAIN, "the socket takes no more now") from None
            except OSError as exc:
                self._raise_translated(exc)

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        # The view is released however this ends: a poisoning error keeps this frame (its
        # traceback), which must not keep the caller's buffer exported (unresizable).
        with self._recv_view(buffer, nbytes, flags) as view:
            return self._recv_into(view)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read up to ``bufsize`` bytes of application data, as :meth:`ssl.SSLSocket.recv`.

        The common case is one read, the socket's own ``recv`` (no buffer of ours, no copy):
        nothing buffered, the session open with no KeyUpdate due, room for a whole record. A
        record of another type, the end, an error or a KeyUpdate's pause go through
        :meth:`recv_into`, which reads them again."""
        session = self._session
        if (
            bufsize < MAX_PLAINTEXT
            or flags
            or self._plain
            or not session.quiet
            or self._sock.fileno() < 0
        ):
            return super().recv(bufsize, flags)
        timeout = self._sock.gettimeout()
        try:
            if timeout and not self._poll_sees_all:
                data = self._recv_reading_first(bufsize)
            else:  # with a timeout, the socket polls first (in C)
                data = self._sock.recv(bufsize)
        except BlockingIOError:
            raise WantRead(errno.EAGAIN, "no whole record yet: wait for readable") from None
        except TimeoutError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EKEYEXPIRED):
                self._raise_translated(exc)
            return super().recv(bufsize, flags)
        if not data:  # the end, or a failure behind it
            return super().recv(bufsize, flags)
        self._rx_paused = False
        self._data_record(len(data))  # data: True, or it raises
        if session.key_update_due:
            self._answer_key_update(wait=False)
        return data

    def _recv_reading_first(self, bufsize: int) -> bytes:
        """Read on the twin; when nothing is there, the socket's own poll-then-recv (in C).

        Where poll() misses a record the kernel paused on (:attr:`poll_sees_every_record`):
        the kernel pauses only on a KeyUpdate it has decrypted, in a read, and the next read
        returns that record; a read that finds nothing leaves none paused, so the poll after it
        sees the next record. The wait gets the whole timeout."""
        try:
            return self._twin().recv(bufsize, _DONTWAIT)
        except BlockingIOError:
            return self._sock.recv(bufsize)

    def _recv_into(self, view: memoryview) -> int:
        if self._plain:
            n = min(len(view), len(self._plain))
            view[:n] = self._plain[:n]
            del self._plain[:n]
            return n
        session = self._session
        if session.error is not None:
            raise session.error
        if session.eof or not view:
            return 0
        while True:
            if session.key_update_due and not self._readable_now():
                self._answer_key_update(wait=False)  # before waiting: the peer may wait for it
            # A read of at least a record's plaintext goes straight into the caller's buffer;
            # a shorter one reads whole records (a control record must come whole) and keeps
            # the rest for the next calls (pending()).
            small = len(view) < MAX_PLAINTEXT
            target = view
            if small:
                if self._scratch is None:
                    self._scratch = memoryview(bytearray(_RECORD_BUF))
                target = self._scratch
            try:
                n, content_type = self._read(target)
            except BlockingIOError:
                raise WantRead(errno.EAGAIN, "no whole record yet: wait until readable") from None
            except OSError as exc:
                if exc.errno == errno.EKEYEXPIRED and self._resume_rx():
                    continue
                self._raise_translated(exc)
            self._rx_paused = False
            if content_type == ContentType.application_data:
                if not n:  # the kernel never returns an empty record: the end, or a failure
                    failed = self._pending_error()
                    if failed is not None:
                        self._raise_translated(failed)
                    return self._ragged_eof()
                self._data_record(n)  # n > 0: True, or it raises
                if session.key_update_due:
                    self._answer_key_update(wait=False)  # after the records read: one answer
                if small:
                    k = min(n, len(view))
                    view[:k] = target[:k]
                    self._plain += target[k:n]
                    return k
                return n
            payload = bytes(target[:n])
            rx_generation = self._rx_keys
            if self._control_record(content_type, payload):
                return 0  # close_notify
            if content_type == ContentType.handshake and payload[:1] == b"\x18":
                self._follow_kernel_pause(rx_generation)

    def _read(self, target: memoryview) -> tuple[int, int]:
        """Make one read into ``target``; return (bytes, record type).

        The kernel hands application data to a plain ``recv`` and refuses any other record
        with EIO when no control buffer is given (Documentation/networking/tls.rst; the record
        stays queued), so a plain ``recv_into`` comes first and ``recvmsg`` with room for the
        record type (TLS_GET_RECORD_TYPE) only after EIO. With a timeout, Python would poll
        before reading; but poll() does not report a socket that the kernel paused for a
        KeyUpdate, even when that KeyUpdate waits decrypted in the kernel (read together with
        the data before it). So with a timeout the read comes first (non-blocking, on the twin,
        whose own timeout is 0) and poll() only when there was nothing to read."""
        timeout = self._sock.gettimeout()
        if not timeout:  # blocking (the kernel hands out decrypted records first) or 0
            try:
                return self._sock.recv_into(target), _APPLICATION_DATA
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
            n, ancdata, _flags, _addr = self._sock.recvmsg_into([target], _ANCBUFSIZE)
            return n, _record_type(ancdata)
        twin = self._twin()
        deadline = time.monotonic() + timeout
        while True:
            try:
                try:
                    return twin.recv_into(target, 0, socket.MSG_DONTWAIT), _APPLICATION_DATA
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                n, ancdata, _flags, _addr = twin.recvmsg_into(
                    [target], _ANCBUFSIZE, socket.MSG_DONTWAIT
                )
                return n, _record_type(ancdata)
            except BlockingIOError:
                pass
            if not wait_readable(twin, deadline):
                raise TimeoutError("timed out")

    def _release(self) -> None:
        super()._release()
        self._scratch = None

    def _cannot_rekey(self, what: str) -> str:
        return (
            f"{what}, but this kernel ({os.uname().release}) cannot install new kTLS keys on a "
            "live socket: kTLS rekeying needs Linux 6.14+; use mode='algif' with peers that "
            "update keys"
        )

    def _key_update(self, *, update_requested: bool) -> None:
        """Install the next receive keys at once: the peer moved to its next traffic secret.

        The kernel reads nothing more until then. If the peer asked for ours, the session has
        our KeyUpdate due: sent by the receiving side where it can, else before our next
        application data (one for any number of requests read together)."""
        if self._rx_keys is None:
            raise self._fatal(
                AlertDescription.internal_error,
                KeyUpdateUnsupported(AlertDescription.internal_error, "no traffic secret kept"),
            )
        if not supports_rekey():
            raise self._fatal(
                AlertDescription.internal_error,
                KeyUpdateUnsupported(
                    AlertDescription.internal_error,
                    self._cannot_rekey("peer sent a TLS 1.3 KeyUpdate"),
                ),
            )
        nxt = self._rx_keys.next_generation()
        try:
            install_keys(self._sock, _uapi.TLS_RX, nxt)
        except KTLSError as exc:
            raise self._fatal(
                AlertDescription.internal_error,
                KeyUpdateUnsupported(
                    AlertDescription.internal_error,
                    f"installing the next kTLS receive keys after the peer's KeyUpdate failed: "
                    f"{exc}",
                ),
            ) from exc
        self._rx_keys = nxt

    def _follow_kernel_pause(self, before: TrafficKeys | None) -> None:
        """Read on after the kernel paused on a handshake record that starts with the byte 24.

        24 is KeyUpdate's msg_type, which is all the kernel looks at. Unless it was a complete
        KeyUpdate (the next keys are in already), read on under the current keys: a KeyUpdate
        fragmented over records, or another message's fragment that starts with 24. (A blocking
        read would otherwise wait for ever: 7.3 reports EKEYEXPIRED only to some reads.)"""
        if self._rx_keys is not before or self._version != TLS_1_3_VERSION:
            return  # a new generation is installed (or TLS 1.2: no pause)
        if not supports_rekey():
            return  # no pause either
        if not self._resume_rx():
            raise self._protocol_error(
                AlertDescription.internal_error,
                "the kernel paused reading on a fragment starting with the byte 24 and "
                "could not be resumed",
            )

    def _resume_rx(self) -> bool:
        """Install the current receive keys again so that reading goes on; False if not done.

        For a kernel paused on a record that starts with the byte 24 but was no complete
        KeyUpdate (a fragment), or a read that failed with EKEYEXPIRED: the keys go in at the
        kernel's next sequence number (``getsockopt(TLS_RX)``). False if that is not possible,
        or was just done (the error then stands)."""
        if self._rx_paused or self._rx_keys is None or self._session.error is not None:
            return False
        try:
            seq = record_sequence(self._sock, _uapi.TLS_RX, self._cipher_type)
            install_keys(self._sock, _uapi.TLS_RX, self._rx_keys.with_seq(seq))
        except (OSError, ValueError):
            return False
        self._rx_paused = True  # a second EKEYEXPIRED before any record read is an error
        return True

    def _tx_allowance(self, nbytes: int) -> int:
        """Return how much of ``nbytes`` one send may take within ``records_per_key``.

        The send key must not seal more than ``records_per_key`` records (the session's rule,
        :meth:`_tx_room`). A send of n bytes closes at most ceil(n / 2**14) + 1 records (one may
        be open from before); our KeyUpdate goes first when nothing else fits. Called with the
        TX lock."""
        cost = -(-nbytes // MAX_PLAINTEXT) + 1
        if cost > self._tx_budget:
            self._tx_budget = self._tx_room()
            if self._tx_budget == 0:
                self._send_key_update(request_peer=False)
                self._session.sending_data()  # the new key seals data now
                self._tx_budget = self._tx_room()
            nbytes = min(nbytes, (self._tx_budget - 1) * MAX_PLAINTEXT)
            cost = -(-nbytes // MAX_PLAINTEXT) + 1
        self._tx_budget -= cost
        return nbytes

    def _tx_room(self) -> int:
        """Return the records the send key may surely still seal; 0: our KeyUpdate first.

        Counted from the kernel's TX sequence number
        (:meth:`afalg.session.Session.records_to_seal`, at least 2: a send may close a record
        left open). :class:`~afalg.errors.KeyLimitReached` where none can go: TLS 1.2, keys
        without their secret, a kernel without kTLS rekeying."""
        cannot = None
        if self._tx_keys is None:
            cannot = (
                f"the kTLS send key has sealed its {self._records_per_key} records and its "
                "traffic secret was not kept to update it: open a new connection"
            )
        elif not supports_rekey():
            cannot = self._cannot_rekey(
                f"the kTLS send key has sealed its {self._records_per_key} records"
            )
        return self._session.records_to_seal(
            self._tx_left(), self._records_per_key, at_least=2, cannot_update=cannot
        )

    def _tx_left(self) -> int:
        """Return the records the send key may still seal, from the kernel's TX sequence number.

        TLS 1.3 keys start at 0; the first TLS 1.2 record, the Finished, was ssl's."""
        seq = record_sequence(self._sock, _uapi.TLS_TX, self._cipher_type)
        return max(0, self._records_per_key - seq)

    def _send_key_update_message(self, message: bytes, *, wait: bool) -> None:
        # MSG_DONTWAIT without waiting: the base class checked the socket is writable.
        self._send_key_update(message=message, wait=wait)

    def _send_key_update(
        self, *, request_peer: bool = False, message: bytes | None = None, wait: bool = True
    ) -> None:
        """Send our KeyUpdate, then install the next send keys, as one step under the TX lock.

        Sends ``message``, else a new one, under the current keys: no application data of
        another thread may come between the two (it would go out under the old keys)."""
        assert self._tx_keys is not None
        nxt = self._tx_keys.next_generation()
        with self._tx_lock:
            if message is None:
                message = self._session.key_update(request_peer=request_peer)
            try:
                self._send_record(ContentType.handshake, message, wait=wait)
            except OSError as exc:
                self._raise_translated(exc)
            try:
                install_keys(self._sock, _uapi.TLS_TX, nxt)
            except KTLSError as exc:  # the KeyUpdate is out: the old keys may not be used again
                raise self._fatal(
                    AlertDescription.internal_error,
                    KeyUpdateUnsupported(
                        AlertDescription.internal_error,
                        f"installing the next kTLS send keys after our KeyUpdate failed "
                        f"({os.uname().release}): {exc.strerror}",
                    ),
                ) from exc
            self._tx_keys = nxt
            self._session.key_update_sent()  # any KeyUpdate of ours answers a request

    def key_update(self, *, request_peer: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and move to the next send keys (Linux 6.14+).

        ``request_peer`` asks the peer to update its keys too (update_requested). Where the
        kernel cannot rekey, :class:`afalg.errors.KeyUpdateUnsupported` is raised before
        anything is sent and the connection carries on under its current keys."""
        self._check_send()
        if self._tx_keys is None:
            raise ValueError("KeyUpdate needs TLS 1.3 keys with their traffic secret")
        if not supports_rekey():
            raise KeyUpdateUnsupported(
                AlertDescription.internal_error,
                f"this kernel ({os.uname().release}) cannot rekey kTLS (Linux 6.14+ can); "
                "nothing was sent, the connection goes on under its current keys",
            )
        self._send_key_update(request_peer=request_peer)

    def _pending_error(self) -> OSError | None:
        """Return the error the kernel left on the socket (and clear it), or None.

        A read that reports the end (0 bytes) may still have a failed record behind it: the
        kernel's receive wait checks the socket's error before it parses what is queued and the
        stream's end after (``tls_rx_rec_wait``), so a record refused during that parse leaves
        its error in ``SO_ERROR`` for the next call. Seen once on Linux 6.1 under load: a forged
        record's read returned 0 and the close_notify that followed found EBADMSG. Such a read
        is that failure, not the peer's end."""
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return OSError(err, os.strerror(err)) if err else None

    def _raise_translated(self, exc: OSError) -> NoReturn:
        """Raise a kernel TLS error as a TLS error (never a bare EIO).

        The session's error if the connection failed earlier; ``exc`` itself, as it is, for a
        timeout or an error of the socket; else the TLS error it means, raised from it (the
        matching alert sent, SO_ERROR read so that later sends work)."""
        error = self._session.error
        if error is not None and error is not exc:
            raise error from exc
        if error is exc or exc.errno not in _RECV_ERRORS:
            raise exc  # a timeout, a would-block, an interruption, an error of the socket
        with contextlib.suppress(OSError):
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # clears sk_err
        alert, what = _RECV_ERRORS[exc.errno]
        raise self._protocol_error(alert, f"kTLS: {what} ({exc.strerror})") from exc
