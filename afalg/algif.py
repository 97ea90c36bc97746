"""Algif mode: TLS over a plain TCP socket, records framed by :mod:`afalg.record` and sealed
and opened by the kernel's AEAD through AF_ALG (``gcm(aes)``, ``rfc7539(chacha20,poly1305)``),
or by pyca/cryptography where the kernel refuses them. This is the design of the 2015 kernel RFC
"Crypto kernel TLS socket" (algif_tls): the handshake in userspace, the record protection below
it. :class:`AlgTLSSocket` does the I/O; the protocol is the session's
(:mod:`afalg._socket`, :mod:`afalg.session`).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

from afalg._socket import TLSSocketBase
from afalg._uapi import TLS_1_3_VERSION
from afalg.errors import TLSProtocolError
from afalg.handoff import TicketFeed
from afalg.keys import TrafficKeys
from afalg.record import Record, RecordLayer
from afalg.wire import MAX_PLAINTEXT, ContentType

__all__ = ["AlgTLSSocket"]

_SEND_CHUNK = 4 * MAX_PLAINTEXT  # plaintext sealed per send() call: four full records
_RECV_CHUNK = 2**16


class AlgTLSSocket(TLSSocketBase):
    """TLS over a plain TCP socket: :class:`afalg.record.RecordLayer` frames the records, the
    kernel's AEAD (AF_ALG) seals and opens them, this object does the I/O.

    A TLS 1.3 peer's KeyUpdate moves the receive keys (and, if it asks, ours: our own KeyUpdate
    goes out before our next application data); :meth:`key_update` starts one, and sending does
    it by itself before the AEAD usage limit of RFC 8446 section 5.5. Thread-safety as for ssl
    sockets: one thread may send while another receives.
    """

    mode = "algif"

    def __init__(
        self,
        sock: socket.socket,
        tx: TrafficKeys,
        rx: TrafficKeys,
        *,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        backend: str = "kernel",
        tickets: TicketFeed | None = None,
    ) -> None:
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            raise TypeError("sock must be a connected SOCK_STREAM socket.socket")
        self._layer = RecordLayer(tx=tx, rx=rx, backend=backend)  # type: ignore[arg-type]
        super().__init__(
            sock, version=tx.version, ssl_object=ssl_object,
            suppress_ragged_eofs=suppress_ragged_eofs, tickets=tickets,
        )  # fmt: skip
        self._plain = bytearray()  # opened application data not yet returned
        self._out = bytearray()  # sealed bytes the socket has not taken yet (non-blocking)
        self._tx_lock = threading.RLock()  # seal + write are one step (sequence order)
        self._rx_lock = threading.RLock()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" backend={self._layer.backend}>"

    @property
    def backend(self) -> str:
        """The AEAD that protects the records: ``"kernel"`` (AF_ALG) or ``"cryptography"``."""
        return self._layer.backend

    @property
    def record_layer(self) -> RecordLayer:
        return self._layer

    # -- sending --
    def _flush(self, *, wait: bool = True) -> None:
        """Write out sealed bytes; with ``wait=False`` only what the socket takes now."""
        while self._out:
            try:
                if wait:
                    n = self._sock.send(self._out)
                else:
                    n = self._sock.send(self._out, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if wait:
                    raise
                return
            del self._out[:n]

    def send(self, data: Any, flags: int = 0) -> int:
        """Seal up to 64 KiB of ``data`` and write it; returns how much was taken. On a
        non-blocking socket the sealed bytes the socket could not take yet go out first on the
        next call (BlockingIOError while they are still pending)."""
        if flags:
            raise ValueError("flags are not supported on an afalg TLS socket")
        self._check_send()
        view = memoryview(data).cast("B")[:_SEND_CHUNK]
        with self._tx_lock:
            self._flush()
            if self._session.key_update_due:  # the peer asked: ours before our next data
                self._send_key_update(request_peer=False)
            try:
                self._out += self._layer.seal(ContentType.application_data, view)
            except TLSProtocolError as exc:
                raise self._fatal(exc.alert, exc) from exc
            with contextlib.suppress(BlockingIOError):
                self._flush()  # taken: what the socket refuses now goes out on the next call
            if self._version == TLS_1_3_VERSION and self._layer.tx_rekey_due:
                self._send_key_update(request_peer=False)
        return len(view)

    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        with self._tx_lock:
            self._out += self._layer.seal(ContentType.alert, bytes([level, description]))
            self._flush(wait=wait)

    def _send_key_update(self, *, request_peer: bool) -> None:
        with self._tx_lock:
            message = self._session.key_update(request_peer=request_peer)
            self._out += self._layer.seal(ContentType.handshake, message)
            self._layer.rekey_tx()
            self._session.key_update_sent()  # any KeyUpdate of ours answers a request
            with contextlib.suppress(BlockingIOError):
                self._flush()

    def key_update(self, *, request_peer: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and move to the next send keys; ``request_peer`` asks the
        peer to update its keys too (update_requested)."""
        self._check_send()
        if self._version != TLS_1_3_VERSION:
            raise ValueError("KeyUpdate exists in TLS 1.3 only")
        self._send_key_update(request_peer=request_peer)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file: read it in chunks, seal, write (the kernel AEAD encrypts each record).
        Honours the socket's timeout; the file position ends after the last byte sent."""
        self._check_send()
        if self._sock.gettimeout() == 0.0:
            raise ValueError("non-blocking sockets are not supported")
        if offset:
            file.seek(offset)
        total = 0
        buf = bytearray(_SEND_CHUNK)
        try:
            while count is None or total < count:
                want = _SEND_CHUNK if count is None else min(_SEND_CHUNK, count - total)
                n = file.readinto(memoryview(buf)[:want])
                if not n:
                    break
                self.sendall(memoryview(buf)[:n])
                total += n
        finally:
            if total > 0 and hasattr(file, "seek"):
                file.seek(offset + total)
        return total

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = self._recv_view(buffer, nbytes, flags)
        with self._rx_lock:
            while not self._plain:
                if self._session.error is not None:
                    raise self._session.error
                if self._session.eof or not view:
                    return 0
                record = self._next_record()
                if record is None:
                    return self._ragged_eof()
                if record.content_type == ContentType.application_data:
                    payload = record.payload
                    # straight into the caller's buffer; keep only the rest (empty: read on)
                    if self._receive(record.content_type, payload):
                        n = min(len(view), len(payload))
                        data = memoryview(payload)
                        view[:n] = data[:n]
                        self._plain += data[n:]
                        return n
                elif self._control_record(record.content_type, record.payload):
                    return 0  # close_notify
            n = min(len(view), len(self._plain))
            view[:n] = self._plain[:n]
            del self._plain[:n]
            return n

    def _next_record(self) -> Record | None:
        while True:
            try:
                record = self._layer.next_record()
            except TLSProtocolError as exc:
                raise self._fatal(exc.alert, exc) from exc
            if record is not None:
                return record
            data = self._sock.recv(_RECV_CHUNK)
            if not data:
                return None
            self._layer.feed(data)

    def _key_update(self, *, update_requested: bool) -> None:
        """The peer's KeyUpdate: its next keys open what follows. Our answer to a request is
        due before our next application data (:meth:`send`), one for any number of requests
        (RFC 8446 4.6.3)."""
        self._layer.rekey_rx()

    def pending(self) -> int:
        """Opened application data waiting to be read."""
        return len(self._plain)

    def _release(self) -> None:
        super()._release()
        self._plain.clear()
        self._out.clear()
        self._layer.close()
