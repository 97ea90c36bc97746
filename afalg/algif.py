"""Algif mode: TLS records framed in Python and sealed by the kernel's AEAD through AF_ALG.

TLS over a plain TCP socket, records framed by :mod:`afalg.record` and sealed
and opened by the kernel's AEAD through AF_ALG (``gcm(aes)``, ``rfc7539(chacha20,poly1305)``),
or by pyca/cryptography where the kernel refuses them. This is the design of the 2015 kernel RFC
"Crypto kernel TLS socket" (algif_tls): the handshake in userspace, the record protection below
it. :class:`AlgTLSSocket` does the I/O; the protocol is the session's
(:mod:`afalg._socket`, :mod:`afalg.session`).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
import time
from typing import Any, Literal

from afalg._socket import TLSSocketBase, wait_readable, wait_writable
from afalg._uapi import TLS_1_3_VERSION
from afalg.aead_backend import Backend, ChosenBackend
from afalg.errors import TLSProtocolError, WantRead, WantWrite
from afalg.handoff import TicketFeed
from afalg.keys import TrafficKeys
from afalg.ktls import KernelTLSState, kernel_state
from afalg.record import Record, RecordLayer, default_records_per_key
from afalg.wire import MAX_PLAINTEXT, AlertDescription, ContentType

__all__ = ["AlgTLSSocket"]

_SEND_CHUNK = 4 * MAX_PLAINTEXT  # plaintext sealed per send() call: four full records
_RECV_CHUNK = 2**16


class AlgTLSSocket(TLSSocketBase):
    """TLS over a plain TCP socket, its records sealed and opened by the kernel's AEAD (AF_ALG).

    :class:`afalg.record.RecordLayer` frames the records, the kernel's AEAD seals and opens them,
    this object does the I/O.

    A TLS 1.3 peer's KeyUpdate moves the receive keys (and, if it asks, ours: our own KeyUpdate goes
    out once the records read so far are handled, if no other thread is sending, else before our
    next application data); :meth:`key_update` starts one, and sending does it by itself before a
    key seals more than ``records_per_key`` records (by default the AEAD usage limit of RFC 8446
    section 5.5: 2**24 for AES-GCM), the last of them the KeyUpdate. Thread-safety as for ssl
    sockets: one thread may send while another receives."""

    mode: Literal["algif"] = "algif"

    def __init__(
        self,
        sock: socket.socket,
        tx: TrafficKeys,
        rx: TrafficKeys,
        *,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        backend: Backend = "kernel",
        tickets: TicketFeed | None = None,
        records_per_key: int | None = None,
        server_side: bool | None = None,
    ) -> None:
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            raise TypeError("sock must be a connected SOCK_STREAM socket.socket")
        self._layer = RecordLayer(
            tx=tx,
            rx=rx,
            backend=backend,
            records_per_key=records_per_key or default_records_per_key(tx.cipher_suite),
        )
        super().__init__(
            sock,
            version=tx.version,
            ssl_object=ssl_object,
            suppress_ragged_eofs=suppress_ragged_eofs,
            tickets=tickets,
            server_side=server_side,
        )
        self._out = bytearray()  # sealed bytes the socket has not taken yet (non-blocking)
        self._rx_lock = threading.RLock()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" backend={self._layer.backend}>"

    @property
    def backend(self) -> ChosenBackend:
        """The AEAD that protects the records: ``"kernel"`` (AF_ALG) or ``"cryptography"``."""
        return "kernel" if self._layer.backend == "kernel" else "cryptography"

    @property
    def record_layer(self) -> RecordLayer:
        return self._layer

    def kernel_state(self) -> KernelTLSState:
        """What the kernel holds for this connection, read from the kernel now.

        As :func:`afalg.ktls.kernel_state`: under kTLS the ULP, version, cipher, TX/RX set up,
        record sequence numbers and the zero-copy/no-pad flags; in algif mode ``ulp=None`` (the
        kernel holds no TLS state). Never a key. Raises :class:`afalg.errors.ClosedError` once
        closed."""
        self._check_open()
        return kernel_state(self._sock)

    # -- sending --
    def _write_out(self, deadline: float | None) -> bool:
        """Write sealed bytes until none are left or ``deadline`` passes; True when all are out.

        ``deadline`` is on ``time.monotonic()``, None for none; one in the past writes only what the
        socket takes now. Called with the TX lock."""
        # A socket with a timeout polls before each send, even with MSG_DONTWAIT: its twin
        # (timeout 0) sends at once, and polls only while there is no room.
        sock = self._twin() if self._sock.gettimeout() else self._sock
        while self._out:
            try:
                n = sock.send(self._out, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait_writable(sock, deadline):
                    return False
                continue
            del self._out[:n]
        return True

    def _write_sealed(self, sealed: bytes, deadline: float | None) -> None:
        """Write ``sealed`` records after what is queued, within ``deadline``.

        What the socket does not take stays queued. With nothing queued they go straight out,
        without a copy into the queue. Called with the TX lock."""
        if not self._out:
            sock = self._twin() if self._sock.gettimeout() else self._sock
            try:
                n = sock.send(sealed, socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError:
                self._out += sealed  # as when queued first: the error is raised, they stay
                raise
            if n == len(sealed):
                return
            self._out += memoryview(sealed)[n:]
            if deadline is not None and deadline <= time.monotonic():
                return  # non-blocking: the rest waits for the next call
        else:
            self._out += sealed
        self._write_out(deadline)

    def _deadline(self) -> float | None:
        """When a write started now must give up: the socket's timeout from now.

        None when blocking; now when non-blocking."""
        timeout = self._sock.gettimeout()
        return None if timeout is None else time.monotonic() + timeout

    def _unsent(self) -> OSError:
        """The error for sealed records the socket did not take in time."""
        if self._sock.gettimeout() == 0.0:
            return WantWrite(errno.EAGAIN, "the socket takes no more now: wait until writable")
        return TimeoutError("timed out")

    def send(self, data: Any, flags: int = 0) -> int:
        """Seal up to 64 KiB of ``data`` and write it; returns how much was taken.

        Sealed records the socket does not take within the timeout (at once, non-blocking) stay
        queued: they go out first on the next ``send``, ``recv``, :meth:`flush` or ``close``.
        ``send`` raises (:class:`~afalg.errors.WantWrite`, :class:`TimeoutError`) only while
        earlier records are still queued, and then has taken nothing of ``data``: a retry never
        duplicates."""
        if flags:
            raise ValueError("flags are not supported on an afalg TLS socket")
        self._check_open()
        with memoryview(data).cast("B") as whole, self._tx_lock:  # released however this ends
            # The session's one check, under the lock: another thread may have failed the
            # connection (its fatal alert sealed) or sent close_notify while this one waited.
            self._session.sending_data()
            deadline = self._deadline()
            if self._out and not self._write_out(deadline):
                raise self._unsent()  # nothing of data taken
            if self._session.key_update_due:
                self._answer_key_update()  # the peer asked: ours before our next data
            n = min(len(whole), _SEND_CHUNK, self._data_room() * MAX_PLAINTEXT)
            with whole[:n] as view:
                try:
                    sealed = self._layer.seal(ContentType.application_data, view)
                except TLSProtocolError as exc:
                    raise self._fatal(exc.alert, exc) from exc
            self._write_sealed(sealed, deadline)  # taken: the rest goes out on the next call
        return n

    def _data_room(self) -> int:
        """Application data records the sending key may still seal.

        The session's rule (:meth:`~afalg.session.Session.records_to_seal`) on the record layer's
        count; our KeyUpdate is sealed first when nothing else is left (TLS 1.3)."""
        layer, limit = self._layer, self._layer.records_per_key or 2**64
        room = self._session.records_to_seal(layer.tx_records_left, limit)
        if room == 0:
            self._seal_key_update(request_peer=False)
            self._session.sending_data()  # the new key seals data now
            room = self._session.records_to_seal(layer.tx_records_left, limit)
        return room

    def flush(self) -> None:
        """Write out the sealed records the socket has not taken yet, within the socket's timeout.

        If some remain: :class:`TimeoutError`, or :class:`~afalg.errors.WantWrite` on a non-blocking
        socket (call again when writable)."""
        self._check_open()
        with self._tx_lock:
            if not self._write_out(self._deadline()):
                raise self._unsent()

    def pending_output(self) -> int:
        """Bytes of sealed records not yet written to the socket (:meth:`flush` writes them)."""
        return len(self._out)

    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        # Without waiting (a fatal alert from the receiving thread), never behind a thread that
        # is sending: the alert is best effort, the error is what counts.
        if not self._tx_lock.acquire(blocking=wait):
            return
        try:
            self._out += self._layer.seal(ContentType.alert, bytes([level, description]))
            if not self._write_out(self._deadline() if wait else time.monotonic()) and wait:
                raise self._unsent()
        finally:
            self._tx_lock.release()

    def _send_key_update_message(self, message: bytes, *, wait: bool) -> None:
        self._seal_key_update(message=message)
        if not wait:  # from the receiving side: what the socket takes now, the rest goes out
            with contextlib.suppress(OSError):  # with the next I/O call
                self._write_out(time.monotonic())

    def _seal_key_update(self, *, request_peer: bool = False, message: bytes | None = None) -> None:
        """Queue our KeyUpdate sealed under the current keys, and move to the next ones.

        ``message`` is the KeyUpdate to send, else a new one. If the next keys cannot be set up
        (with the kernel backend, a new AF_ALG socket: EMFILE, ENOMEM), the KeyUpdate is dropped
        unsent and the connection poisoned: nothing may follow a KeyUpdate under the old keys, and
        the peer sees the stream end without close_notify."""
        with self._tx_lock:
            if message is None:
                message = self._session.key_update(request_peer=request_peer)
            sealed = self._layer.seal(ContentType.handshake, message)
            try:
                self._layer.rekey_tx()
            except Exception as exc:
                raise self._fatal(
                    None,
                    TLSProtocolError(
                        AlertDescription.internal_error,
                        f"setting up our next send keys for a KeyUpdate failed: {exc}",
                    ),
                ) from exc
            self._out += sealed
            self._session.key_update_sent()  # any KeyUpdate of ours answers a request

    def key_update(self, *, request_peer: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and move to the next send keys.

        ``request_peer`` asks the peer to update its keys too (update_requested)."""
        self._check_send()
        if self._version != TLS_1_3_VERSION:
            raise ValueError("KeyUpdate exists in TLS 1.3 only")
        with self._tx_lock:
            self._seal_key_update(request_peer=request_peer)
            self._write_out(self._deadline())  # within the timeout; the rest stays queued

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file: read it in chunks, seal, write (the kernel AEAD encrypts each record).

        Honours the socket's timeout; the file position ends after the last byte sent."""
        self._check_send()
        return self._sendfile_by_send(file, offset, count, _SEND_CHUNK)

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Read application data into ``buffer``, as :meth:`socket.socket.recv_into`.

        Before returning, every complete record already received is opened, so :meth:`pending`
        counts all the plaintext readable without the socket (a select loop can rely on it). Raises
        :class:`~afalg.errors.WantRead` on a non-blocking socket with no whole record yet."""
        # The view is released however this ends: a poisoning error keeps this frame (its
        # traceback), which must not keep the caller's buffer exported (unresizable).
        with self._recv_view(buffer, nbytes, flags) as view:
            return self._recv_into(view)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read up to ``bufsize`` bytes of application data, as :meth:`ssl.SSLSocket.recv`.

        A record's plaintext that fits is returned as the record layer opened it (no buffer of
        ours, no copy). Raises :class:`~afalg.errors.WantRead` on a non-blocking socket with no
        whole record yet."""
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        self._check_open()
        if flags:
            raise ValueError(f"flags are not supported on {type(self).__name__}")
        return self._read(bufsize)

    def _recv_into(self, view: memoryview) -> int:
        data = self._read(len(view))
        n = len(data)
        view[:n] = data
        return n

    def _read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of plaintext, reading and opening records as needed.

        Every rule of receiving is here, for :meth:`recv` and :meth:`recv_into` alike: the
        session's error and end, control records, empty records, the ragged end, the records
        already received opened before returning, our KeyUpdate answer after them."""
        if self._out:
            self._flush_nowait()
        session = self._session
        with self._rx_lock:
            data = b""
            while not self._plain:
                if session.error is not None:
                    raise session.error
                if session.eof or not limit:
                    return b""
                record = self._next_record()
                if record is None:
                    self._ragged_eof()
                    return b""
                if record.content_type == ContentType.application_data:
                    payload = record.payload
                    if not self._data_record(len(payload)):
                        continue  # empty: read on
                    if len(payload) <= limit:  # all of it to the caller, no copy kept
                        data = payload
                        break
                    self._plain += payload
                elif self._control_record(record.content_type, record.payload):
                    return b""  # close_notify
            if self._layer.buffered:
                self._open_buffered()  # raises nothing: what it finds is for the next call
            if not data:
                data = bytes(self._plain[:limit])
                del self._plain[:limit]
        if session.key_update_due:
            self._answer_key_update(wait=False)  # after every record read so far: one answer
        return data

    def _flush_nowait(self) -> None:
        """Write what the socket takes now of the sealed records still queued.

        They go out with any I/O call, never waiting (nor behind a sending thread)."""
        if self._out and self._tx_lock.acquire(blocking=False):
            try:
                with contextlib.suppress(OSError):  # the next send or flush reports it
                    self._write_out(time.monotonic())
            finally:
                self._tx_lock.release()

    def _next_record(self) -> Record | None:
        """The next opened record, reading the socket as needed; None at EOF."""
        while True:
            try:
                record = self._layer.next_record()
            except TLSProtocolError as exc:
                raise self._fatal(exc.alert, exc) from exc
            if record is not None:
                return record
            if self._session.key_update_due and not self._readable_now():
                self._answer_key_update(wait=False)  # before waiting: the peer may wait for it
            try:
                data = self._read_some()
            except BlockingIOError:
                raise WantRead(errno.EAGAIN, "no whole record yet: wait until readable") from None
            if not data:
                return None
            self._layer.feed(data)

    def _read_some(self) -> bytes:
        """What the TCP socket has, up to 64 KiB.

        With a timeout, Python would poll before every read: the twin (timeout 0) reads first, and a
        poll follows only when there was nothing (:class:`TimeoutError` when the timeout passes)."""
        timeout = self._sock.gettimeout()
        if not timeout:
            return self._sock.recv(_RECV_CHUNK)
        twin = self._twin()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return twin.recv(_RECV_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait_readable(twin, deadline):
                    raise TimeoutError("timed out") from None

    def _open_buffered(self) -> None:
        """Open the complete records already received, without reading the socket, and act on them.

        Their plaintext joins :meth:`pending`. An error here poisons the session and is raised by
        the next call (a bug too, as internal_error): the plaintext returned now was authenticated
        before it, and a call that raises has taken nothing."""
        while self._session.error is None and not self._session.eof:
            try:
                record = self._layer.next_record()
                if record is None:
                    return
                if record.content_type == ContentType.application_data:
                    if self._data_record(len(record.payload)):
                        self._plain += record.payload
                else:
                    self._control_record(record.content_type, record.payload)
            except TLSProtocolError as exc:
                self._fatal(exc.alert, exc)
            except Exception as exc:  # the session's error, or a bug: raised by the next call
                self._fatal(AlertDescription.internal_error, exc)

    def _key_update(self, *, update_requested: bool) -> None:
        """Take the peer's KeyUpdate: its next keys open what follows.

        Our answer to a request goes out from the receiving side where it can
        (:meth:`_answer_key_update`), else before our next application data (:meth:`send`), one for
        any number of requests read together (RFC 8446 4.6.3). If the next keys cannot be set up (a
        new AF_ALG socket with the kernel backend: EMFILE, ENOMEM) the connection fails with
        internal_error."""
        try:
            self._layer.rekey_rx()
        except Exception as exc:
            raise self._fatal(
                AlertDescription.internal_error,
                TLSProtocolError(
                    AlertDescription.internal_error,
                    f"setting up the peer's next keys after its KeyUpdate failed: {exc}",
                ),
            ) from exc

    def _release(self) -> None:
        super()._release()
        self._out.clear()
        self._layer.close()
