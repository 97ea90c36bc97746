"""TLS sockets whose record crypto runs in the kernel: the public face of afalg's TLS.

    import socket, ssl
    from afalg import tls

    ctx = ssl.create_default_context()
    raw = socket.create_connection(("example.org", 443))
    with tls.wrap(raw, ctx, server_hostname="example.org") as conn:
        conn.sendall(b"GET / HTTP/1.0\\r\\nHost: example.org\\r\\n\\r\\n")
        print(conn.recv(4096), conn.mode)          # "ktls" or "algif"

:func:`wrap` runs Python's ssl handshake on the socket (see :mod:`afalg.handoff`), then hands
the record keys to the kernel:

- ``mode="ktls"``: kernel TLS (:class:`afalg.ktls.KTLSSocket`): the kernel seals and opens
  every record; ``sendfile`` is zero-copy from the page cache.
- ``mode="algif"``: :class:`AlgTLSSocket`: our record layer (:mod:`afalg.record`) frames the
  records and the kernel's AEAD (AF_ALG ``gcm(aes)`` / ``rfc7539(chacha20,poly1305)``) seals
  and opens them; full TLS 1.3 KeyUpdate both ways.
- ``mode="auto"``: kTLS when this kernel offers it for the negotiated suite, else algif.

Both objects offer send, sendall, recv, recv_into, sendfile, makefile, settimeout, setblocking,
shutdown, close (sends close_notify), fileno, the context manager protocol, getpeercert, version,
cipher and selected_alpn_protocol. A peer's fatal alert raises :class:`afalg.TLSAlertReceived`
(an :class:`ssl.SSLError`) naming it; close_notify is EOF; a TCP close without close_notify is
EOF too unless ``suppress_ragged_eofs=False`` (then :class:`ssl.SSLEOFError`), as in ssl.
Non-blocking sockets raise ``BlockingIOError`` like plain sockets.

Sessions stay ssl's: pass ``session=conn.session`` to resume (TLS 1.2 and 1.3). A TLS 1.3
server sends its NewSessionTickets after the hand-off, so the kernel (or the record layer) opens
them; :class:`afalg.handoff.TicketFeed` gives them back to ssl, which stores the session.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

from afalg import handoff, ktls
from afalg.errors import TLSAlertReceived, TLSProtocolError
from afalg.keys import TLS_1_3_VERSION, TrafficKeys
from afalg.ktls import (
    CT_APPLICATION_DATA,
    KTLSSocket,
    TLSSocketBase,
    key_update_message,
    tls_stats,
)
from afalg.record import ContentType, RecordLayer

__all__ = ["MODES", "AlgTLSSocket", "KTLSSocket", "TLSAlertReceived", "tls_stats", "wrap"]

MODES = ("auto", "ktls", "algif")
_SEND_CHUNK = 4 * 2**14  # plaintext sealed per send() call: four full records
_RECV_CHUNK = 2**16


def wrap(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    mode: str = "auto",
    suppress_ragged_eofs: bool = True,
    session: ssl.SSLSession | None = None,
    algif_backend: str = "kernel",
) -> KTLSSocket | AlgTLSSocket:
    """Handshake on the connected TCP socket ``sock`` with ``context`` and return a TLS socket
    whose records the kernel protects. The result owns ``sock`` (it is closed on failure too).

    ``mode`` is ``"ktls"``, ``"algif"`` or ``"auto"``; the result's ``.mode`` says which ran.
    The handshake honours ``sock``'s timeout. ``algif_backend`` picks the AEAD of algif mode
    (``"kernel"``; ``"cryptography"`` or ``"auto"`` where AF_ALG is missing).
    Raises what ssl raises for a failed handshake, :class:`afalg.keys.UnsupportedCipherSuite`
    for a non-AEAD suite, :class:`afalg.errors.KTLSError` when ``mode="ktls"`` and the kernel
    refuses kTLS for the suite.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    try:
        h = handoff.handshake(
            sock, context, server_side=server_side, server_hostname=server_hostname,
            session=session,
        )  # fmt: skip
        if mode == "auto":
            mode = "ktls" if ktls.supports(h.version, h.cipher_suite.ktls_cipher_type) else "algif"
        common: dict[str, Any] = {
            "ssl_object": h.ssl_object,
            "suppress_ragged_eofs": suppress_ragged_eofs,
            "tickets": h.ticket_feed(),
        }
        if mode == "ktls":
            return KTLSSocket(sock, h.tx, h.rx, **common)
        return AlgTLSSocket(sock, h.tx, h.rx, backend=algif_backend, **common)
    except BaseException:
        sock.close()
        raise


class AlgTLSSocket(TLSSocketBase):
    """TLS over a plain TCP socket: :class:`afalg.record.RecordLayer` frames the records, the
    kernel's AEAD (AF_ALG) seals and opens them, this object does the I/O.

    A TLS 1.3 peer's KeyUpdate moves the receive keys (and, if it asks, ours: we answer with our
    own KeyUpdate); :meth:`key_update` starts one, and sending does it by itself before the AEAD
    usage limit of RFC 8446 section 5.5. Thread-safety as for ssl sockets: one thread may send
    while another receives.
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
        tickets: handoff.TicketFeed | None = None,
    ) -> None:
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            raise TypeError("sock must be a connected SOCK_STREAM socket.socket")
        self._layer = RecordLayer(tx=tx, rx=rx, backend=backend)  # type: ignore[arg-type]
        super().__init__(
            sock, ssl_object=ssl_object, suppress_ragged_eofs=suppress_ragged_eofs, tickets=tickets
        )
        self._version = tx.version
        self._plain = bytearray()  # opened application data not yet returned
        self._out = bytearray()  # sealed bytes the socket has not taken yet (non-blocking)
        self._tx_lock = threading.RLock()  # seal + write are one step (sequence order)
        self._rx_lock = threading.RLock()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f" backend={self._layer.backend}>"

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
            self._out += self._layer.seal(ContentType.handshake, key_update_message(request_peer))
            self._layer.rekey_tx()
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
                if self._error is not None:
                    raise self._error
                if self._eof or not view:
                    return 0
                record = self._next_record()
                if record is None:
                    return self._ragged_eof()
                if record.content_type == CT_APPLICATION_DATA:
                    self._check_record_boundary(record.content_type)
                    payload = record.payload
                    if payload:  # straight into the caller's buffer; keep only the rest
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

    def _next_record(self) -> Any:
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
        self._layer.rekey_rx()
        if update_requested and not self._close_notify_sent:
            self._send_key_update(request_peer=False)

    def pending(self) -> int:
        """Opened application data waiting to be read."""
        return len(self._plain)

    def _release(self) -> None:
        super()._release()
        self._plain.clear()
        self._out.clear()
        self._layer.close()
