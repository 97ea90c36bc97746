"""TLS sockets whose record crypto runs in the kernel: the public face of afalg's TLS.

In use::

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
- ``mode="algif"``: :class:`afalg.algif.AlgTLSSocket`: our record layer (:mod:`afalg.record`)
  frames the records and the kernel's AEAD (AF_ALG ``gcm(aes)`` /
  ``rfc7539(chacha20,poly1305)``) seals and opens them; full TLS 1.3 KeyUpdate both ways.
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

For libraries that take an :class:`ssl.SSLContext` (http.client, urllib3, http.server),
:class:`SSLContext` is one whose ``wrap_socket`` does what :func:`wrap` does, and never fails
where ssl's would have worked (a suite afalg cannot seal goes on in userspace, mode
``"ssl"``); :func:`inject_into_ssl` gives every ssl context that ``wrap_socket``.

Sessions stay ssl's: pass ``session=conn.session`` to resume (TLS 1.2 and 1.3). A TLS 1.3
server sends its NewSessionTickets after the hand-off, so the kernel (or the record layer) opens
them; :class:`afalg.handoff.TicketFeed` gives them back to ssl, which stores the session.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import sys
import threading
from typing import Any

from afalg import _mode, handoff
from afalg._mode import BACKENDS, MODES, check_options, choose_mode, hand_off
from afalg._socket import TLSSocketBase
from afalg._sslmode import SSLObjectSocket
from afalg.aead_backend import Backend, ChosenBackend
from afalg.algif import AlgTLSSocket
from afalg.errors import AlreadyWrapped, TLSAlertReceived, UnsupportedCipherSuite
from afalg.ktls import KTLSSocket, tls_stats

__all__ = [
    "BACKENDS",
    "MODES",
    "AlgTLSSocket",
    "Backend",
    "ChosenBackend",
    "ChosenMode",
    "KTLSSocket",
    "Mode",
    "SSLContext",
    "TLSAlertReceived",
    "check_options",
    "choose_mode",
    "create_default_context",
    "extract_from_ssl",
    "hand_off",
    "inject_into_ssl",
    "tls_stats",
    "wrap",
]

Mode = _mode.Mode
"""Where records may be protected (``mode=``): kTLS if it can run, else algif; or only one."""
ChosenMode = _mode.ChosenMode
"""Where a connection's records are protected (``conn.mode``)."""
# Backend and ChosenBackend (afalg.aead_backend): algif_backend= and conn.backend

# Documented as afalg.tls's, where users import them from (their code is afalg._mode's).
choose_mode.__module__ = check_options.__module__ = hand_off.__module__ = __name__


def wrap(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    mode: Mode = "auto",
    suppress_ragged_eofs: bool = True,
    session: ssl.SSLSession | None = None,
    algif_backend: Backend = "auto",
    records_per_key: int | None = None,
) -> KTLSSocket | AlgTLSSocket:
    """Handshake on the connected TCP socket ``sock`` and return a TLS socket the kernel protects.

    ``context`` is the :class:`ssl.SSLContext` of the handshake. The result owns ``sock`` (it is
    closed on failure too).

    ``mode`` is ``"ktls"``, ``"algif"`` or ``"auto"`` and ``algif_backend`` the AEAD of algif mode
    (``"auto"``, ``"kernel"``, ``"cryptography"``), chosen by :func:`choose_mode`; the result's
    ``.mode`` and ``.backend`` say which ran. The handshake honours ``sock``'s timeout.
    ``records_per_key`` caps the records one send key seals (default: the AEAD usage limit of RFC
    8446 section 5.5, 2**24 for AES-GCM, none for ChaCha20-Poly1305); writes and ``sendfile`` are
    split there and a TLS 1.3 KeyUpdate goes first (under kTLS the count is the kernel's sequence
    number, and rekeying needs Linux 6.14); TLS 1.2 cannot update keys, so a send at the limit
    raises :class:`afalg.errors.KeyLimitReached` having sent nothing. Raises what ssl raises for a
    failed handshake, :class:`afalg.keys.UnsupportedCipherSuite` for a non-AEAD suite; when the mode
    asked for cannot run (:class:`afalg.errors.KTLSError`, :class:`afalg.AlgorithmNotAvailable`) the
    peer first gets a fatal ``internal_error`` alert. Before a byte is sent it refuses what
    ``context.wrap_socket`` refuses (:func:`afalg.handoff.check_arguments`:
    ``ValueError("check_hostname requires server_hostname")`` ...), an :class:`ssl.SSLSocket`
    (already TLS) and an unconnected socket; ``sock`` stays the caller's then."""
    check_options(mode, algif_backend, records_per_key)
    handoff.check_arguments(
        sock, context, server_side=server_side, server_hostname=server_hostname, session=session
    )  # as ssl: a refused argument leaves sock to the caller
    try:
        h = handoff.handshake(
            sock, context, server_side=server_side, server_hostname=server_hostname, session=session
        )
        return hand_off(
            sock,
            h,
            mode=mode,
            algif_backend=algif_backend,
            suppress_ragged_eofs=suppress_ragged_eofs,
            records_per_key=records_per_key,
        )
    except BaseException:
        sock.close()
        raise


# --- the ssl-shaped face: an ssl.SSLContext whose wrap_socket is wrap() ----------------------

# The families the hand-off serves; any other stream socket (AF_UNIX) stays Python's ssl.
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)

# ssl's own wrap_socket, whatever inject_into_ssl() has put on ssl.SSLContext since.
_SSL_WRAP_SOCKET = ssl.SSLContext.wrap_socket


def _takes_over(sock: Any) -> bool:
    """Whether afalg wraps ``sock``: a blocking (or timeout) TCP socket; else Python's ssl does.

    Python's ssl then wraps it with its own behaviour and errors. A non-blocking socket stays ssl's:
    its caller drives the handshake with ``do_handshake()`` and ``SSLWantReadError``, which afalg's
    blocking handshake does not offer. Objects that are no socket go to afalg's checks, which name
    the mistake."""
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return True
    return (
        sock.family in _TCP_FAMILIES
        and sock.type == socket.SOCK_STREAM
        and sock.gettimeout() != 0.0
    )


def _check_not_tls(sock: Any) -> None:
    """Refuse an afalg TLS socket given to be wrapped again.

    Raises :class:`afalg.errors.AlreadyWrapped` (an ssl socket is refused by
    :func:`afalg.handoff.check_arguments`)."""
    if isinstance(sock, (TLSSocketBase, SSLObjectSocket, _PendingTLSSocket)):
        raise AlreadyWrapped(f"afalg's {type(sock).__name__}")


class _Options:
    """The per-socket arguments of ``wrap_socket`` and the context's afalg options.

    Kept for a later handshake."""

    def __init__(
        self,
        server_side: bool,
        suppress_ragged_eofs: bool,
        server_hostname: str | None,
        session: ssl.SSLSession | None,
        mode: Mode,
        records_per_key: int | None,
    ) -> None:
        self.server_side = server_side
        self.suppress_ragged_eofs = suppress_ragged_eofs
        self.server_hostname = server_hostname
        self.session = session
        self.mode = mode
        self.records_per_key = records_per_key


def _wrap_socket(
    context: ssl.SSLContext,
    sock: socket.socket,
    server_side: bool,
    do_handshake_on_connect: bool,
    suppress_ragged_eofs: bool,
    server_hostname: str | None,
    session: ssl.SSLSession | None,
    mode: Mode,
    records_per_key: int | None,
) -> Any:
    """``context.wrap_socket(sock, ...)`` afalg's way.

    What :meth:`SSLContext.wrap_socket` calls, and every ssl context's after
    :func:`inject_into_ssl`."""
    _check_not_tls(sock)
    if not _takes_over(sock):
        return _SSL_WRAP_SOCKET(
            context,
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            server_hostname,
            session,
        )
    try:
        handoff.check_arguments(
            sock, context, server_side=server_side, server_hostname=server_hostname, session=session
        )
        connected = True
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        connected = False  # everything else was checked before connectedness
    options = _Options(
        server_side, suppress_ragged_eofs, server_hostname, session, mode, records_per_key
    )
    if connected and do_handshake_on_connect:
        return _handshake(sock, context, options)
    return _PendingTLSSocket(sock, context, options, do_handshake_on_connect, connected)


def _handshake(
    sock: socket.socket, context: ssl.SSLContext, options: _Options
) -> KTLSSocket | AlgTLSSocket | SSLObjectSocket:
    """:func:`wrap`, never failing where ssl would not; the result owns ``sock``, closed on failure.

    A finished handshake whose suite afalg cannot seal (not AEAD, TLS before 1.2) goes on in
    userspace over its ssl object (mode "ssl", :class:`afalg._sslmode.SSLObjectSocket`)."""
    o = options
    try:
        handoff._check_blocking(sock)
        hs = handoff.Handshake(
            context, server_side=o.server_side, server_hostname=o.server_hostname, session=o.session
        )
        try:
            h = handoff._drive(sock, hs)
        except UnsupportedCipherSuite:
            conn = SSLObjectSocket.from_handshake(
                sock, hs, suppress_ragged_eofs=o.suppress_ragged_eofs
            )
            conn.flush()  # the handshake's last flight (a TLS 1.2 server's Finished)
            return conn
        return hand_off(
            sock,
            h,
            mode=o.mode,
            suppress_ragged_eofs=o.suppress_ragged_eofs,
            records_per_key=o.records_per_key,
        )
    except BaseException:
        sock.close()
        raise


class SSLContext(ssl.SSLContext):
    """An :class:`ssl.SSLContext` whose :meth:`wrap_socket` hands the connection to the kernel.

    The handshake runs with ssl, then the connection goes to the kernel as :func:`afalg.tls.wrap`
    does (kTLS or algif, ``conn.mode``).

    Same constructor and settings as ssl's (``protocol`` defaults to ``PROTOCOL_TLS_CLIENT``), plus
    ``mode`` (``"auto"``, ``"ktls"``, ``"algif"``) and ``records_per_key`` (see
    :func:`afalg.tls.wrap`), checked here and kept as attributes. Like ssl's, a bare context loads
    no CA certificates: :func:`create_default_context` does. ``wrap_bio`` stays ssl's (asyncio uses
    it). Never a failure where ssl's own context would have worked: a negotiated suite afalg cannot
    seal (not AEAD, or TLS before 1.2) goes on in userspace over ssl's object (``conn.mode ==
    "ssl"``), and a socket afalg cannot take is ssl's own :class:`ssl.SSLSocket` (see
    :meth:`wrap_socket`)."""

    mode: Mode
    records_per_key: int | None

    def __new__(cls, protocol: int = ssl.PROTOCOL_TLS_CLIENT, *args: Any, **kwargs: Any) -> Any:
        return super().__new__(cls, protocol)

    def __init__(
        self,
        protocol: int = ssl.PROTOCOL_TLS_CLIENT,
        *,
        mode: Mode = "auto",
        records_per_key: int | None = None,
    ) -> None:
        check_options(mode, "auto", records_per_key)
        self.mode = mode
        self.records_per_key = records_per_key

    def wrap_socket(  # type: ignore[override]  # returns afalg's sockets, not ssl.SSLSocket
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> Any:
        """Wrap ``sock`` as :meth:`ssl.SSLContext.wrap_socket` does, afalg's way.

        A connected, blocking (or timeout) TCP socket: with ``do_handshake_on_connect`` (the
        default) the handshake runs now and the result is :func:`afalg.tls.wrap`'s socket
        (:class:`afalg.tls.KTLSSocket` or :class:`afalg.tls.AlgTLSSocket`), or, for a suite
        afalg cannot seal, a socket of the same methods whose records ssl protects in
        userspace (``mode == "ssl"``); else a proxy that runs it on ``do_handshake()`` or on
        first I/O. An unconnected TCP socket gives the proxy too: ``connect()`` (handshake per
        ``do_handshake_on_connect``), or, listening, ``accept()`` returning afalg TLS sockets as
        ``SSLSocket.accept`` does. Any other stream socket (AF_UNIX) and a non-blocking one are
        Python's own :class:`ssl.SSLSocket`, decided before the handshake.
        Errors: ssl's (``ValueError("check_hostname requires server_hostname")``,
        ``NotImplementedError`` for a datagram socket, ``TimeoutError("The handshake operation
        timed out")``, ...), :class:`afalg.errors.AlreadyWrapped` (an :class:`ssl.SSLError`)
        for a socket that is already TLS, ``TypeError`` for an object that is no socket.
        """
        return _wrap_socket(
            self,
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            server_hostname,
            session,
            self.mode,
            self.records_per_key,
        )


# Names a socket not yet through its handshake answers itself: nothing here sends or reads data.
_SOCKET_LEVEL = frozenset(
    [
        "fileno",
        "family",
        "type",
        "proto",
        "getsockname",
        "getpeername",
        "gettimeout",
        "settimeout",
        "setblocking",
        "getblocking",
        "setsockopt",
        "getsockopt",
        "bind",
        "listen",
    ]
)


class _PendingTLSSocket:
    """A TCP socket wrapped by :class:`SSLContext` whose handshake has not run yet.

    Socket-level calls go to the TCP socket; ``do_handshake()``, and any other attribute
    (``send``, ``recv``, ``makefile``, ``getpeercert``, ...) on a connected socket, run the
    handshake, after which every attribute is the afalg TLS socket's. Before it no byte of
    application data can pass: only the names in ``_SOCKET_LEVEL`` reach the TCP socket.
    A listening socket's ``accept()`` returns afalg TLS sockets."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        options: _Options,
        do_handshake_on_connect: bool,
        connected: bool,
    ) -> None:
        self._sock = sock
        self.context = context
        self._options = options
        self.do_handshake_on_connect = do_handshake_on_connect
        self._connected = connected
        self._conn: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "handed off" if self._conn is not None else "before the handshake"
        return f"<afalg pending TLS socket fd={self._sock.fileno()} {state}>"

    @property
    def server_side(self) -> bool:
        return self._options.server_side

    @property
    def server_hostname(self) -> str | None:
        return self._options.server_hostname

    # What ssl reports before the handshake: nothing negotiated yet (no implicit handshake).
    def version(self) -> str | None:
        return None if self._conn is None else self._conn.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return None if self._conn is None else self._conn.cipher()

    def selected_alpn_protocol(self) -> str | None:
        return None if self._conn is None else self._conn.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate, as ``ssl.SSLSocket.getpeercert``.

        ``ValueError`` before the handshake, as ssl."""
        if self._conn is None:
            raise ValueError("handshake not done yet")
        return self._conn.getpeercert(binary_form)

    def do_handshake(self) -> None:
        """Run the handshake and hand the connection off (once; later calls do nothing)."""
        with self._lock:
            if self._conn is not None:
                return
            if not self._connected:
                raise OSError(errno.ENOTCONN, "the TLS socket is not connected")
            self._conn = _handshake(self._sock, self.context, self._options)

    def connect(self, address: Any) -> None:
        """Connect the TCP socket, then handshake per ``do_handshake_on_connect``.

        As in ssl, a server-side or already connected socket refuses (``ValueError``)."""
        if self._options.server_side:
            raise ValueError("can't connect in server-side mode")
        if self._connected:
            raise ValueError("attempt to connect already-connected SSLSocket!")
        self._sock.connect(address)
        self._connected = True
        if self.do_handshake_on_connect:
            self.do_handshake()

    def accept(self) -> tuple[Any, Any]:
        """Accept a connection on the listening socket, as ``ssl.SSLSocket.accept`` does.

        The new socket is wrapped server-side with the same context and options (handshake per
        ``do_handshake_on_connect``). A failed handshake closes the new socket and raises."""
        newsock, addr = self._sock.accept()
        o = self._options
        conn = _wrap_socket(
            self.context,
            newsock,
            True,
            self.do_handshake_on_connect,
            o.suppress_ragged_eofs,
            None,
            None,
            o.mode,
            o.records_per_key,
        )
        return conn, addr

    def close(self) -> None:
        """Close the TLS socket if handed off (close_notify), else the TCP socket."""
        (self._conn if self._conn is not None else self._sock).close()

    def detach(self) -> int:
        """Give up the file descriptor (see ``socket.detach``)."""
        return (self._conn if self._conn is not None else self._sock).detach()

    def __enter__(self) -> _PendingTLSSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        if self._conn is not None:
            return getattr(self._conn, name)
        if name in _SOCKET_LEVEL:
            return getattr(self._sock, name)
        if name.startswith("_") or not self._connected:
            raise AttributeError(name)
        self.do_handshake()  # first I/O: as ssl's implicit handshake in SSL_read/SSL_write
        return getattr(self._conn, name)


def create_default_context(
    purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH,
    *,
    cafile: str | None = None,
    capath: str | None = None,
    cadata: str | bytes | None = None,
    mode: Mode = "auto",
    records_per_key: int | None = None,
) -> SSLContext:
    """An afalg :class:`SSLContext` with ssl's defaults, as :func:`ssl.create_default_context`.

    ``Purpose.SERVER_AUTH`` (for clients) verifies certificates and host names; CA certificates are
    ``cafile``/``capath``/``cadata`` if given, else the system's; ``SSLKEYLOGFILE`` is honoured.
    ``purpose`` not an ``ssl.Purpose``: ``TypeError``."""
    if not isinstance(purpose, ssl.Purpose):
        raise TypeError(purpose)
    protocol = ssl.PROTOCOL_TLS_CLIENT
    if purpose == ssl.Purpose.CLIENT_AUTH:
        protocol = ssl.PROTOCOL_TLS_SERVER
    ctx = SSLContext(protocol, mode=mode, records_per_key=records_per_key)
    if sys.version_info >= (3, 13):  # ssl's stricter defaults from 3.13 on
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
    if cafile or capath or cadata:
        ctx.load_verify_locations(cafile, capath, cadata)
    elif ctx.verify_mode != ssl.CERT_NONE:
        ctx.load_default_certs(purpose)
    keylogfile = os.environ.get("SSLKEYLOGFILE")
    if keylogfile and not sys.flags.ignore_environment:
        ctx.keylog_filename = keylogfile
    return ctx


# --- inject_into_ssl: every ssl context's wrap_socket hands off ---------------------------------
#
# truststore replaces the class ssl.SSLContext. Here that would break ssl itself: its property
# setters (verify_mode, options, minimum_version, ...) call
# super(SSLContext, SSLContext).<name>.__set__ with the module's *current* SSLContext, which
# for a subclass of the real one finds the real property again, and recurses without end
# (ssl.create_default_context() raises RecursionError); and contexts made before the swap would
# stop being isinstance(ctx, ssl.SSLContext) (asyncio's start_tls checks that). Replacing the
# one method that matters, ssl.SSLContext.wrap_socket, reaches every context (made before or
# after, and subclasses that keep ssl's wrap_socket) and changes nothing else: wrap_bio, and so
# asyncio's TLS, stays ssl's.

_injection_lock = threading.Lock()
_injected: tuple[Mode, int | None] | None = None  # (mode, records_per_key) while injected


def _injected_wrap_socket(
    self: ssl.SSLContext,
    sock: socket.socket,
    server_side: bool = False,
    do_handshake_on_connect: bool = True,
    suppress_ragged_eofs: bool = True,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> Any:
    """ssl.SSLContext.wrap_socket while :func:`inject_into_ssl` is in force."""
    injected = _injected
    if injected is None:  # extracted meanwhile
        return _SSL_WRAP_SOCKET(
            self,
            sock,
            server_side,
            do_handshake_on_connect,
            suppress_ragged_eofs,
            server_hostname,
            session,
        )
    return _wrap_socket(
        self,
        sock,
        server_side,
        do_handshake_on_connect,
        suppress_ragged_eofs,
        server_hostname,
        session,
        *injected,
    )


def inject_into_ssl(*, mode: Mode = "auto", records_per_key: int | None = None) -> None:
    """Make every :class:`ssl.SSLContext`'s ``wrap_socket`` afalg's.

    For programs and libraries that build their own contexts (``ssl.create_default_context()``,
    urllib3, requests, smtplib, ...): each TLS socket they open is then handed to the kernel as
    :meth:`SSLContext.wrap_socket` does, with ``mode`` and ``records_per_key``. Idempotent (a second
    call changes only the options); :func:`extract_from_ssl` undoes it.

    For applications, at start-up, never for libraries: it changes every context of the process.
    What changes: those sockets are afalg's, not :class:`ssl.SSLSocket` (code that checks
    ``isinstance(sock, ssl.SSLSocket)`` or calls SSLSocket-only methods sees the difference); a
    non-blocking or non-TCP socket stays ssl's. What does not: ``wrap_bio``, and so asyncio's own
    TLS; the class ``ssl.SSLContext`` itself (isinstance checks, its settings); contexts whose class
    overrides ``wrap_socket`` (afalg's own, truststore's). Bad options: ``ValueError``/``TypeError``
    as :func:`check_options`, nothing injected."""
    global _injected
    check_options(mode, "auto", records_per_key)
    with _injection_lock:
        _injected = (mode, records_per_key)
        ssl.SSLContext.wrap_socket = _injected_wrap_socket  # type: ignore[method-assign,assignment]


def extract_from_ssl() -> None:
    """Undo :func:`inject_into_ssl`: ``ssl.SSLContext.wrap_socket`` is ssl's own again.

    Sockets already wrapped stay as they are. Idempotent."""
    global _injected
    with _injection_lock:
        ssl.SSLContext.wrap_socket = _SSL_WRAP_SOCKET  # type: ignore[method-assign]
        _injected = None
