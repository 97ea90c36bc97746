"""TLS sockets whose record crypto runs in the kernel: the public face of afalg's TLS::

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
- ``mode="auto"`` (:func:`choose_mode`): kTLS when this kernel runs the negotiated suite both
  ways; else algif on the kernel's AEAD; else algif on pyca/cryptography's AEAD (where AF_ALG
  is missing, denied, or refuses the suite's AEAD, as Linux 7.3's ``crypto.af_alg_restrict``
  does for ``gcm(aes)``). ``conn.mode`` and ``conn.backend`` (``"kernel"`` or
  ``"cryptography"``) say which ran. When the mode asked for cannot run, the peer gets a fatal
  ``internal_error`` alert before :func:`wrap` raises.

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
import errno
import socket
import ssl
import threading
from typing import Any

from afalg import handoff, ktls
from afalg.aead_backend import kernel_refusal
from afalg.errors import (
    AlertDescription,
    AlgError,
    KTLSError,
    TLSAlertReceived,
    TLSProtocolError,
)
from afalg.keys import TLS_1_3_VERSION, CipherSuite, TrafficKeys
from afalg.ktls import KTLSSocket, TLSSocketBase, tls_stats
from afalg.record import ContentType, RecordLayer
from afalg.session import CT_APPLICATION_DATA

__all__ = [
    "BACKENDS",
    "MODES",
    "AlgTLSSocket",
    "KTLSSocket",
    "TLSAlertReceived",
    "choose_mode",
    "tls_stats",
    "wrap",
]

MODES = ("auto", "ktls", "algif")
BACKENDS = ("auto", "kernel", "cryptography")
_SEND_CHUNK = 4 * 2**14  # plaintext sealed per send() call: four full records
_RECV_CHUNK = 2**16


def choose_mode(
    version: int, suite: CipherSuite, mode: str = "auto", algif_backend: str = "auto"
) -> tuple[str, str]:
    """Where the records of a connection using ``suite`` in ``version`` (``0x0303``/``0x0304``)
    are protected: ``(mode, backend)``, one of ``("ktls", "kernel")``, ``("algif", "kernel")``,
    ``("algif", "cryptography")``. The one definition of ``mode="auto"``:

    1. kTLS, if this kernel runs the suite both ways (``TLS_TX`` and ``TLS_RX``);
    2. else algif on the kernel's AEAD, if AF_ALG binds it (``algif_backend`` "auto"/"kernel");
    3. else algif on pyca/cryptography (``algif_backend`` "auto"/"cryptography").

    ``mode="ktls"`` or ``"algif"`` and ``algif_backend="kernel"`` or ``"cryptography"`` narrow
    the choice. When nothing allowed can run it raises :class:`afalg.errors.KTLSError` (kTLS
    asked for) or :class:`afalg.AlgorithmNotAvailable` (the kernel AEAD asked for; its message
    says why, e.g. ``crypto.af_alg_restrict``). Each call tries the kernel afresh.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if algif_backend not in BACKENDS:
        raise ValueError(f"algif_backend must be one of {BACKENDS}, not {algif_backend!r}")
    if mode in ("auto", "ktls"):
        if ktls.supports(version, suite.ktls_cipher_type):
            return "ktls", "kernel"
        if mode == "ktls":
            name = "TLSv1.3" if version == TLS_1_3_VERSION else "TLSv1.2"
            raise KTLSError(
                errno.ENOPROTOOPT,
                f"this kernel does not run kTLS for {suite.name} in {name} both ways "
                "(`afalg info` shows what it runs); use mode='auto' or 'algif'",
            )
    if algif_backend in ("auto", "kernel"):
        refusal = kernel_refusal(suite)
        if refusal is None:
            return "algif", "kernel"
        if algif_backend == "kernel":
            raise refusal
    return "algif", "cryptography"


def _refuse(sock: socket.socket, tx: TrafficKeys) -> None:
    """Tell the peer the connection cannot go on: a fatal internal_error alert, sealed under our
    first traffic keys by pyca/cryptography (it needs neither AF_ALG nor kTLS), then our FIN."""
    with contextlib.suppress(Exception):
        layer = RecordLayer(tx=tx, backend="cryptography")
        alert = bytes([2, AlertDescription.internal_error])
        sock.sendall(layer.seal(ContentType.alert, alert))
        layer.close()
        sock.shutdown(socket.SHUT_WR)


def wrap(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    mode: str = "auto",
    suppress_ragged_eofs: bool = True,
    session: ssl.SSLSession | None = None,
    algif_backend: str = "auto",
) -> KTLSSocket | AlgTLSSocket:
    """Handshake on the connected TCP socket ``sock`` with ``context`` and return a TLS socket
    whose records the kernel protects. The result owns ``sock`` (it is closed on failure too).

    ``mode`` is ``"ktls"``, ``"algif"`` or ``"auto"`` and ``algif_backend`` the AEAD of algif
    mode (``"auto"``, ``"kernel"``, ``"cryptography"``), chosen by :func:`choose_mode`; the
    result's ``.mode`` and ``.backend`` say which ran. The handshake honours ``sock``'s timeout.
    Raises what ssl raises for a failed handshake, :class:`afalg.keys.UnsupportedCipherSuite`
    for a non-AEAD suite; when the mode asked for cannot run (:class:`afalg.errors.KTLSError`,
    :class:`afalg.AlgorithmNotAvailable`) the peer first gets a fatal ``internal_error`` alert.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if algif_backend not in BACKENDS:
        raise ValueError(f"algif_backend must be one of {BACKENDS}, not {algif_backend!r}")
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    try:
        h = handoff.handshake(
            sock, context, server_side=server_side, server_hostname=server_hostname,
            session=session,
        )  # fmt: skip
        common: dict[str, Any] = {
            "ssl_object": h.ssl_object,
            "suppress_ragged_eofs": suppress_ragged_eofs,
            "tickets": h.ticket_feed(),
        }
        try:
            chosen, backend = choose_mode(h.version, h.cipher_suite, mode, algif_backend)
            if chosen == "algif":
                return AlgTLSSocket(sock, h.tx, h.rx, backend=backend, **common)
        except (AlgError, KTLSError):
            _refuse(sock, h.tx)  # nothing was installed on sock: the peer hears why, in TLS
            raise
        return KTLSSocket(sock, h.tx, h.rx, **common)
    except BaseException:
        sock.close()
        raise


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
        tickets: handoff.TicketFeed | None = None,
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
                if record.content_type == CT_APPLICATION_DATA:
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
