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

Rekeying (TLS 1.3 KeyUpdate, Documentation/networking/tls.rst): the kernel pauses reading after a
handshake record that starts with a KeyUpdate (msg_type 24; ``TlsRxRekeyReceived``) until
``TLS_RX`` is set again (meanwhile reads fail with EKEYEXPIRED or, on 7.3, a blocking one just
waits); :class:`KTLSSocket` installs the next generation as soon as it has read the KeyUpdate
(``TlsRxRekeyOk``). The kernel only looks at a record's first byte, so it also pauses where
there is no complete KeyUpdate yet (a KeyUpdate fragmented over records, or a fragment of
another message that starts with the byte 24): there the current keys are installed again at
the kernel's sequence number (``getsockopt(TLS_RX)``) to read on. On
the send side there is no pause: our KeyUpdate goes out under the old keys, then ``TLS_TX`` gets
the new ones (``TlsTxRekeyOk``). A peer's update_requested is answered with one KeyUpdate before
our next application data (RFC 8446 4.6.3), however many requests came meanwhile.

A record that fails authentication makes the kernel set the socket error (EBADMSG); until it is
read with ``SO_ERROR`` every send fails. :class:`KTLSSocket` reads it, sends the bad_record_mac
alert and raises :class:`afalg.TLSProtocolError` (bad_record_mac); the connection is then dead.

The kernel's TLS counters (``/proc/net/tls_stat``) are :func:`tls_stats`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from afalg import _uapi
from afalg.cmsg import parse_record_type, record_type_cmsg, tls_crypto_info
from afalg.errors import (
    AlertDescription,
    KeyUpdateUnsupported,
    KTLSError,
    TLSProtocolError,
)
from afalg.keys import TLS_1_3_VERSION, TrafficKeys
from afalg.session import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_HANDSHAKE,
    CloseNotify,
    Event,
    KeyUpdate,
    NewSessionTicket,
    Session,
)

if TYPE_CHECKING:
    from afalg.handoff import TicketFeed

__all__ = ["KTLSSocket", "TLSSocketBase", "enable", "supports", "supports_rekey", "tls_stats"]

_ANCBUFSIZE = socket.CMSG_SPACE(1)
_RECORD_BUF = 2**14 + 1024  # one whole record's plaintext fits


def tls_stats() -> dict[str, int]:
    """The kernel's TLS counters from ``/proc/net/tls_stat`` (``TlsCurrTxSw``, ``TlsTxSw``,
    ``TlsDecryptError``, ...); empty when the ``tls`` module is not loaded."""
    try:
        with open(_uapi.TLS_STAT_PATH) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name and value.strip().isdigit():
            stats[name] = int(value)
    return stats


# --- setting kTLS up ----------------------------------------------------------------------------


def _crypto_info(keys: TrafficKeys) -> bytes:
    return tls_crypto_info(keys.version, keys.cipher_suite.ktls_cipher_type, **keys.ktls_params())


def _ulp(sock: socket.socket) -> str:
    try:
        name = sock.getsockopt(_uapi.SOL_TCP, _uapi.TCP_ULP, 16)
    except OSError:
        return ""
    return name.rstrip(b"\0").decode("ascii", "replace")


def _check_tcp(sock: socket.socket) -> None:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise KTLSError(errno.EOPNOTSUPP, "kTLS needs a TCP socket (AF_INET/AF_INET6 stream)")


def missing_ulp_reason() -> str:
    """Why ``TCP_ULP "tls"`` gave ENOENT. The kernel loads the tls module on demand only for a
    process with CAP_NET_ADMIN (net/ipv4/tcp_ulp.c), so an unprivileged one needs it loaded."""
    from afalg.probe import has_capability

    if os.path.exists("/sys/module/tls"):
        return "the kernel has no tls ULP although the tls module is loaded (ENOENT)"
    if not has_capability(_uapi.CAP_NET_ADMIN):
        return (
            "the tls module is not loaded, and only a process with CAP_NET_ADMIN may load it "
            "on demand: run 'modprobe tls' as root once (ENOENT)"
        )
    return "the kernel has no tls ULP (CONFIG_TLS missing or the tls module not loadable)"


def attach_ulp(sock: socket.socket) -> None:
    """``setsockopt(SOL_TCP, TCP_ULP, "tls")``, with errors that say what went wrong."""
    _check_tcp(sock)
    try:
        sock.setsockopt(_uapi.SOL_TCP, _uapi.TCP_ULP, b"tls")
    except OSError as exc:
        code = exc.errno or 0
        if code == errno.ENOTCONN:
            msg = ("the tls ULP needs an established TCP connection: set it after connect() or "
                   "accept(), not before (ENOTCONN)")  # fmt: skip
        elif code == errno.EEXIST:
            current = _ulp(sock)
            msg = (f"this socket already has the {current or 'a'} ULP attached; the tls ULP can "
                   "be set once per socket (EEXIST)")  # fmt: skip
        elif code == errno.ENOENT:
            msg = missing_ulp_reason()
        else:
            msg = f"setsockopt(TCP_ULP, 'tls') failed: {exc.strerror}"
        raise KTLSError(code, msg) from exc


def install_keys(sock: socket.socket, direction: int, keys: TrafficKeys) -> None:
    """``setsockopt(SOL_TLS, TLS_TX or TLS_RX, crypto_info)`` for ``keys``."""
    name = "TLS_TX" if direction == _uapi.TLS_TX else "TLS_RX"
    try:
        sock.setsockopt(_uapi.SOL_TLS, direction, _crypto_info(keys))
    except OSError as exc:
        code = exc.errno or 0
        what = f"{keys.cipher_suite.name} (TLS {'1.3' if keys.version == 0x0304 else '1.2'})"
        if code == errno.ENOPROTOOPT:
            msg = f"setsockopt(SOL_TLS, {name}) needs the tls ULP on the socket first"
        elif code == errno.EBUSY:
            msg = f"{name} keys are already installed on this socket (EBUSY)"
        elif code in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.ENOSYS):
            msg = f"the kernel refused {name} for {what}: {exc.strerror}"
        else:
            msg = f"setsockopt(SOL_TLS, {name}) for {what} failed: {exc.strerror}"
        raise KTLSError(code, msg) from exc


@functools.cache
def supports(version: int, cipher_type: int) -> bool:
    """Whether this kernel runs kTLS for ``(version, cipher_type)`` both ways: tried once per
    process on a throwaway loopback connection (ULP, then TLS_TX and TLS_RX with zero keys)."""
    from afalg.keys import CipherSuite

    suite = next(
        (s for s in CipherSuite
         if s.ktls_cipher_type == cipher_type and s.is_tls13 == (version == TLS_1_3_VERSION)),
        None,
    )  # fmt: skip
    if suite is None:
        return False
    iv = bytes(12 if suite.is_chacha20 or suite.is_tls13 else 4)
    keys = TrafficKeys(version, suite, bytes(suite.key_length), iv)
    return _trial(lambda sock: enable(sock, keys, keys))


@functools.cache
def supports_rekey() -> bool:
    """Whether this kernel replaces the keys of a live kTLS socket (TLS 1.3 KeyUpdate; Linux
    6.14+): tried once per process, setting ``TLS_TX`` twice on a throwaway connection (older
    kernels answer EBUSY)."""
    from afalg.keys import CipherSuite

    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))

    def rekey(sock: socket.socket) -> None:
        enable(sock, keys, keys)
        install_keys(sock, _uapi.TLS_TX, keys.next_generation())

    return _trial(rekey)


@contextmanager
def loopback() -> Iterator[socket.socket]:
    """The client end of a throwaway loopback TCP connection, ESTABLISHED (the tls ULP takes
    no other state), its peer kept open until the end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        peer, _ = listener.accept()
    with client, peer:
        yield client


def _trial(setup: Callable[[socket.socket], object]) -> bool:
    """Whether ``setup`` succeeds on a :func:`loopback` connection."""
    try:
        with loopback() as sock:
            setup(sock)
    except OSError:  # KTLSError included
        return False
    return True


def enable(sock: socket.socket, tx: TrafficKeys, rx: TrafficKeys) -> None:
    """Turn the connected TCP socket ``sock`` into a kTLS socket with these keys.

    ``tx.seq`` and ``rx.seq`` are the next records' sequence numbers. Raises
    :class:`afalg.errors.KTLSError` naming the cause (socket not connected, ULP already set,
    no tls module, cipher refused).
    """
    if not isinstance(tx, TrafficKeys) or not isinstance(rx, TrafficKeys):
        raise TypeError("tx and rx must be afalg.keys.TrafficKeys")
    attach_ulp(sock)
    install_keys(sock, _uapi.TLS_TX, tx)
    install_keys(sock, _uapi.TLS_RX, rx)


# --- the socket-like face shared by KTLSSocket and AlgTLSSocket ---------------------------------


class TLSSocketBase:
    """What both afalg TLS sockets share: ownership of the TCP socket, timeouts, the ssl facts
    of the handshake, makefile, sendall, context manager, and driving the post-handshake
    protocol (:class:`afalg.session.Session`): each opened record goes to the session, and the
    socket acts on its events. Subclasses implement ``send``, ``recv_into``, ``sendfile``,
    ``_send_alert`` and ``_key_update`` (install the peer's next receive keys)."""

    mode = "?"

    def __init__(
        self,
        sock: socket.socket,
        *,
        version: int,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        tickets: TicketFeed | None = None,
    ) -> None:
        self._session = Session(version)  # the protocol state; poisoned by the first error
        self._sock = sock
        self._ssl = ssl_object
        self._tickets = tickets  # a TLS 1.3 client's NewSessionTickets go back to ssl
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self._closed = False
        self._io_refs = 0
        self._version = version  # TLS_1_2_VERSION or TLS_1_3_VERSION

    # -- facts from the handshake --
    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self._ssl

    @property
    def context(self) -> ssl.SSLContext | None:
        return self._ssl.context if self._ssl is not None else None

    @property
    def server_side(self) -> bool:
        return bool(self._ssl and self._ssl.server_side)

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
        return self._ssl.version() if self._ssl is not None else None

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher() if self._ssl is not None else None

    def selected_alpn_protocol(self) -> str | None:
        return self._ssl.selected_alpn_protocol() if self._ssl is not None else None

    # -- the socket --
    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    @property
    def proto(self) -> int:
        return self._sock.proto

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def getblocking(self) -> bool:
        return self._sock.getblocking()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self._sock.fileno()}"
        cipher = self.cipher()
        return (
            f"<{type(self).__name__} {state} mode={self.mode} "
            f"{self.version() or '?'} {cipher[0] if cipher else '?'}>"
        )

    def __enter__(self) -> TLSSocketBase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- data --
    def send(self, data: Any, flags: int = 0) -> int:
        raise NotImplementedError

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        raise NotImplementedError

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self.send(view, flags)
            view = view[n:]

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize, flags)
        del buf[n:]
        return bytes(buf)

    def read(self, n: int = 1024) -> bytes:
        return self.recv(n)

    def write(self, data: Any) -> int:
        return self.send(data)

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object over the TLS connection, as :meth:`socket.socket.makefile`."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        raw = socket.SocketIO(self, ("r" if reading else "") + ("w" if writing else ""))  # type: ignore[arg-type]
        self._io_refs += 1
        if buffering is None or buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: Any
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, io.text_encoding(encoding), errors, newline)
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed:
            self.close()

    def _check_open(self) -> None:
        """EBADF once closed (a file from :meth:`makefile` keeps the socket open)."""
        if self._sock.fileno() < 0:
            raise OSError(errno.EBADF, f"{type(self).__name__} is closed")

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

    # -- the session --
    @property
    def tls_session(self) -> Session:
        """The post-handshake protocol state (:class:`afalg.session.Session`)."""
        return self._session

    def _receive(self, content_type: int, payload: Any) -> list[Event]:
        """Give one opened record to the session; on a protocol error the peer gets the fatal
        alert it is owed (best effort) before the error is raised."""
        try:
            return self._session.receive(content_type, payload)
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
        """Send the fatal alert the session owes the peer, if any: best effort, never
        waiting (another thread may be sending)."""
        alert = self._session.fatal_alert()
        if alert is not None and self._sock.fileno() >= 0:
            with contextlib.suppress(OSError):
                self._send_alert(alert[0], alert[1], wait=False)

    # -- ending --
    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        raise NotImplementedError

    def _send_close_notify(self, *, wait: bool) -> None:
        if self._sock.fileno() < 0:
            return
        alert = self._session.close_notify()
        if alert is None:
            return
        try:
            self._send_alert(alert[0], alert[1], wait=wait)
        except OSError:
            if wait:
                raise

    def _fatal(self, alert: int | None, exc: BaseException) -> BaseException:
        """Poison the connection with ``exc`` (the first error stays, and is what this
        returns) after sending the fatal ``alert`` (best effort)."""
        error = self._session.fail(exc, alert)
        self._send_fatal_alert()
        return error

    def _protocol_error(self, alert: AlertDescription, message: str) -> BaseException:
        """:meth:`_fatal` with a :class:`TLSProtocolError` carrying ``alert``."""
        return self._fatal(alert, TLSProtocolError(alert, message))

    def _key_update(self, *, update_requested: bool) -> None:
        raise NotImplementedError

    def _ragged_eof(self) -> int:
        self._session.receive_eof(suppress_ragged_eofs=self.suppress_ragged_eofs)
        return 0

    def shutdown(self, how: int) -> None:
        """Send close_notify (for SHUT_WR and SHUT_RDWR), then shut the TCP socket down."""
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_close_notify(wait=True)
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify (best effort, without blocking) and close the socket. Idempotent;
        file objects from :meth:`makefile` keep the socket open until they are closed."""
        self._closed = True
        if self._io_refs > 0:
            return
        if self._sock.fileno() >= 0:
            try:
                # Blocking (or timeout) sockets wait for room for the alert, as sendall would.
                self._send_close_notify(wait=self._sock.gettimeout() != 0.0)
            except OSError:
                pass
            finally:
                self._release()
                self._sock.close()

    def _release(self) -> None:
        """Free per-connection resources: buffered plaintext (and the AF_ALG sockets in algif
        mode)."""
        if self._tickets is not None:
            self._tickets.close()

    def detach(self) -> int:
        raise io.UnsupportedOperation(
            f"{type(self).__name__} cannot give its socket back: the keys live in it"
        )


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


class KTLSSocket(TLSSocketBase):
    """A TCP socket whose records the kernel seals and opens (kernel TLS).

    Construct it with :func:`afalg.tls.wrap` (which runs the handshake), or from a connected
    TCP socket and the keys of both directions: ``KTLSSocket(sock, tx, rx)``. The object owns
    ``sock``. ``recv`` returns application data only; see the module docstring for the rest.
    """

    mode = "ktls"
    backend = "kernel"  # the kernel's TLS does the crypto

    def __init__(
        self,
        sock: socket.socket,
        tx: TrafficKeys,
        rx: TrafficKeys,
        *,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        tickets: TicketFeed | None = None,
    ) -> None:
        enable(sock, tx, rx)
        super().__init__(
            sock, version=tx.version, ssl_object=ssl_object,
            suppress_ragged_eofs=suppress_ragged_eofs, tickets=tickets,
        )  # fmt: skip
        self._tx_keys = tx.with_seq(0) if tx.secret is not None else None  # for KeyUpdate only
        self._rx_keys = rx.with_seq(0) if rx.secret is not None else None
        self._rbuf = bytearray()  # plaintext read past a small caller buffer
        self._scratch: memoryview | None = None  # one record's room, for small reads
        # Sending a KeyUpdate and installing the next TX keys is one step: no application data
        # from another thread may come between them (it would go out under the old keys).
        self._tx_lock = threading.RLock()
        self._rx_paused = False  # EKEYEXPIRED seen and the current keys installed again
        self._reader: socket.socket | None = None  # a duplicate for reads with a timeout

    # -- sending --
    def send(self, data: Any, flags: int = 0) -> int:
        self._check_send()
        with self._tx_lock:
            self._answer_key_update()
            try:
                return self._sock.send(data, flags)
            except OSError as exc:
                raise self._translate(exc) from exc

    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        self._send_record(CT_ALERT, bytes([level, description]), wait=wait)

    def _send_record(self, content_type: int, payload: bytes, *, wait: bool = True) -> None:
        flags = 0 if wait else socket.MSG_DONTWAIT
        # Best effort without waiting (a fatal alert from the receiving thread): never block
        # behind a send in another thread.
        locked = self._tx_lock.acquire(blocking=wait)
        try:
            self._sock.sendmsg([payload], [record_type_cmsg(content_type)], flags)
        finally:
            if locked:
                self._tx_lock.release()

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file with ``os.sendfile`` (the kernel encrypts the pages it reads), as
        :meth:`socket.socket.sendfile`: honours the timeout, falls back to ``send`` for what
        is not a regular file; the file position ends after the last byte sent."""
        self._check_send()
        with self._tx_lock:
            self._answer_key_update()
            try:
                return self._sock.sendfile(file, offset, count)
            except OSError as exc:
                raise self._translate(exc) from exc

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = self._recv_view(buffer, nbytes, flags)
        if self._rbuf:
            n = min(len(view), len(self._rbuf))
            view[:n] = self._rbuf[:n]
            del self._rbuf[:n]
            return n
        if self._session.error is not None:
            raise self._session.error
        if self._session.eof or not view:
            return 0
        while True:
            small = len(view) < _RECORD_BUF
            target = view
            if small:
                if self._scratch is None:
                    self._scratch = memoryview(bytearray(_RECORD_BUF))
                target = self._scratch
            try:
                n, ancdata = self._recvmsg(target)
            except OSError as exc:
                if exc.errno == errno.EKEYEXPIRED and self._resume_rx():
                    continue
                raise self._translate(exc) from exc
            self._rx_paused = False
            content_type = CT_APPLICATION_DATA
            for level, kind, data in ancdata:
                if level == _uapi.SOL_TLS and kind == _uapi.TLS_GET_RECORD_TYPE:
                    content_type = parse_record_type(data)
            if n == 0 and not ancdata:
                return self._ragged_eof()
            if content_type == CT_APPLICATION_DATA:
                if not self._receive(content_type, target[:n]):
                    continue  # an empty application_data record carries nothing
                if small:
                    k = min(n, len(view))
                    view[:k] = target[:k]
                    self._rbuf += target[k:n]
                    return k
                return n
            payload = bytes(target[:n])
            rx_generation = self._rx_keys
            if self._control_record(content_type, payload):
                return 0  # close_notify
            if content_type == CT_HANDSHAKE and payload[:1] == b"\x18":
                self._follow_kernel_pause(rx_generation)

    def _recvmsg(self, target: memoryview) -> tuple[int, list[tuple[int, int, bytes]]]:
        """One ``recvmsg`` (with room for the record type). With a timeout, Python polls before
        reading; but poll() does not report a socket that the kernel paused for a KeyUpdate,
        even when that KeyUpdate waits decrypted in the kernel (read together with the data
        before it). So with a timeout the read comes first (non-blocking, on a duplicate whose
        own timeout is 0) and poll() only when there was nothing to read."""
        timeout = self._sock.gettimeout()
        if not timeout:  # blocking (the kernel hands out decrypted records first) or 0
            n, ancdata, _flags, _addr = self._sock.recvmsg_into([target], _ANCBUFSIZE)
            return n, ancdata
        if self._reader is None:
            self._reader = socket.fromfd(
                self._sock.fileno(), self._sock.family, self._sock.type, self._sock.proto
            )
            self._reader.settimeout(0.0)  # the shared O_NONBLOCK is set already (a timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                n, ancdata, _flags, _addr = self._reader.recvmsg_into(
                    [target], _ANCBUFSIZE, socket.MSG_DONTWAIT
                )
                return n, ancdata
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            poller = select.poll()
            poller.register(self._reader, select.POLLIN | select.POLLPRI)
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                raise TimeoutError("timed out")

    def _release(self) -> None:
        super()._release()
        self._rbuf.clear()
        self._scratch = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _cannot_rekey(self, what: str) -> str:
        return (
            f"{what}, but this kernel ({os.uname().release}) cannot install new kTLS keys on a "
            "live socket: kTLS rekeying needs Linux 6.14+; use mode='algif' with peers that "
            "update keys"
        )

    def _key_update(self, *, update_requested: bool) -> None:
        """The peer moved to its next traffic secret: install the next receive keys at once (the
        kernel reads nothing more until then). If it asked for ours, the session has our
        KeyUpdate due before our next application data (one for any number of requests)."""
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
        """The kernel paused reading after this handshake record: it starts with the byte 24
        (KeyUpdate's msg_type), which is all the kernel looks at. Unless it was a complete
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
        """The kernel paused on a record that starts with the byte 24 but was no complete
        KeyUpdate (a fragment), or a read failed with EKEYEXPIRED: install the current receive
        keys again at the kernel's next sequence number (``getsockopt(TLS_RX)``) so that reading
        goes on. False if that is not possible, or was just done (the error then stands)."""
        if self._rx_paused or self._rx_keys is None or self._session.error is not None:
            return False
        size = len(_crypto_info(self._rx_keys))
        try:
            current = self._sock.getsockopt(_uapi.SOL_TLS, _uapi.TLS_RX, size)
            seq = int.from_bytes(current[-8:], "big")  # rec_seq ends every crypto_info struct
            install_keys(self._sock, _uapi.TLS_RX, self._rx_keys.with_seq(seq))
        except (OSError, ValueError):
            return False
        self._rx_paused = True  # a second EKEYEXPIRED before any record read is an error
        return True

    def _answer_key_update(self) -> None:
        """Send the KeyUpdate the peer asked for, if it is due (called with the TX lock)."""
        if self._session.key_update_due:
            self._send_key_update(request_peer=False)  # clears it once sent

    def _send_key_update(self, *, request_peer: bool) -> None:
        assert self._tx_keys is not None
        nxt = self._tx_keys.next_generation()
        with self._tx_lock:
            message = self._session.key_update(request_peer=request_peer)
            try:
                self._send_record(CT_HANDSHAKE, message)
            except OSError as exc:
                raise self._translate(exc) from exc
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
        """Send a TLS 1.3 KeyUpdate and move to the next send keys (Linux 6.14+);
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

    def _translate(self, exc: OSError) -> BaseException:
        """Map a kernel TLS error to a TLS error (never a bare EIO), reading SO_ERROR so later
        sends work, and sending the matching alert."""
        if self._session.error is not None:
            return self._session.error
        if isinstance(exc, (TimeoutError, BlockingIOError, InterruptedError)):
            return exc
        if exc.errno not in _RECV_ERRORS:
            return exc
        with contextlib.suppress(OSError):
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # clears sk_err
        alert, what = _RECV_ERRORS[exc.errno]
        return self._protocol_error(alert, f"kTLS: {what} ({exc.strerror})")
