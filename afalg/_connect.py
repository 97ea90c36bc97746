"""The TLS handshake on an event loop and the hand-off to the kernel, for aio and the loop.

What :mod:`afalg.aio`'s streams and afalg's event loop (:mod:`afalg._loop`) share. The arguments
are checked once (:class:`_Options`); :func:`_secure` runs :class:`afalg.handoff.Handshake` on
the loop within the handshake timeout and hands the keys off; :class:`_Adopt` takes a connected
socket from the transport asyncio made for it before that transport reads a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl as _ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from afalg import handoff as _handoff
from afalg import ktls, tls
from afalg._sslmode import SSLObjectSocket
from afalg._transport import (
    SHUTDOWN_TIMEOUT,
    _set_result_unless_cancelled,
    server_attach,
    server_detach,
)
from afalg.algif import AlgTLSSocket
from afalg.errors import KTLSError, UnsupportedCipherSuite
from afalg.ktls import KTLSSocket

_DEFAULT_LIMIT = 2**16  # asyncio.streams' default StreamReader limit
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default ssl_handshake_timeout


# --- the handshake -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """What :func:`open_connection` and :func:`start_server` take for each connection.

    Checked once (:meth:`check`) before any connection is made: a bad argument costs no
    handshake."""

    context: _ssl.SSLContext
    mode: str
    algif_backend: str
    suppress_ragged_eofs: bool
    records_per_key: int | None
    handshake_timeout: float
    shutdown_timeout: float
    limit: int
    half_close: bool

    @classmethod
    def check(
        cls,
        context: Any,
        *,
        mode: str,
        algif_backend: str,
        suppress_ragged_eofs: bool,
        records_per_key: int | None,
        handshake_timeout: float | None,
        shutdown_timeout: float | None,
        limit: int,
        half_close: bool,
        server_hostname: str | None = None,
    ) -> _Options:
        """Check the options; raise TypeError, ValueError or KTLSError for a bad one.

        ``context``: an :class:`ssl.SSLContext`, or True for asyncio's default client context
        (no name checked when ``server_hostname`` is ""); the timeouts and ``limit`` as asyncio
        checks them; the rest as :func:`afalg.tls.check_options` checks them. ``mode="ktls"``
        where the kernel has no tls ULP: :class:`~afalg.errors.KTLSError`."""
        tls.check_options(mode, algif_backend, records_per_key)
        if not isinstance(limit, int) or isinstance(limit, bool):
            raise TypeError(f"limit must be an int, not {type(limit).__name__}")
        if limit <= 0:
            raise ValueError("Limit cannot be <= 0")  # asyncio.StreamReader's words
        handshake = _positive("ssl_handshake_timeout", handshake_timeout, _HANDSHAKE_TIMEOUT)
        shutdown = _positive("ssl_shutdown_timeout", shutdown_timeout, SHUTDOWN_TIMEOUT)
        flags = {"half_close": half_close, "suppress_ragged_eofs": suppress_ragged_eofs}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, not {type(flag).__name__}")
        if context is True:  # asyncio's _create_transport_context
            context = _ssl.create_default_context()
            if not server_hostname:
                context.check_hostname = False
        if not isinstance(context, _ssl.SSLContext):
            raise TypeError(
                f"ssl must be an ssl.SSLContext (or True), not {type(context).__name__}"
            )
        if mode == "ktls":
            _check_ktls_runs()
        return cls(
            context,
            mode,
            algif_backend,
            suppress_ragged_eofs,
            records_per_key,
            handshake,
            shutdown,
            limit,
            half_close,
        )


def _positive(name: str, value: float | None, default: float) -> float:
    """A timeout as asyncio checks it: None for ``default``, else a number above 0."""
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number or None, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} should be a positive number, got {value}")
    return float(value)


def _client_hostname(host: Any, server_hostname: Any) -> str | None:
    """Return the name checked in the server's certificate, by asyncio's rule.

    ``server_hostname``, else the host connected to; neither (``sock=``, or no host):
    ValueError. An empty ``server_hostname`` turns the name check off on purpose (the
    handshake's own opt-out)."""
    if server_hostname is not None and not isinstance(server_hostname, str):
        raise TypeError(f"server_hostname must be a str, not {type(server_hostname).__name__}")
    if server_hostname is None:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        server_hostname = host
    return server_hostname


def _check_ktls_runs() -> None:
    """Refuse ``mode="ktls"`` before serving, naming why, where the kernel has no tls ULP.

    Refusing here beats failing every connection after its handshake. A suite the kernel lacks
    stays a per-connection outcome."""
    try:
        with ktls.loopback() as sock:
            ktls.attach_ulp(sock)
    except KTLSError as exc:
        raise KTLSError(exc.errno or 0, f"mode='ktls' cannot run here: {exc.strerror}") from None


async def _handshake(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, hs: _handoff.Handshake
) -> _handoff.Handoff:
    """Run ``hs``'s :meth:`~afalg.handoff.Handshake.steps` over the non-blocking ``sock``.

    It uses the loop's socket operations and never reads past the last handshake record.

    Reads wait for readability, then ``recv_into`` here rather than ``loop.sock_recv_into``,
    whose future keeps a failed read's error (a reset mid-handshake), and that error's
    traceback the frames up to this one: a reference cycle holding the Handshake, its ssl
    object and buffers until the cycle collector runs."""
    steps = hs.steps()
    n: int | None = None
    try:
        while True:
            try:
                step = steps.send(n)
            except StopIteration as done:
                return done.value
            n = None
            if isinstance(step, _handoff.Receive):
                while n is None:
                    try:
                        n = sock.recv_into(step.buffer)
                    except (BlockingIOError, InterruptedError):
                        await _readable(loop, sock)
            elif step.best_effort:
                with contextlib.suppress(OSError):
                    sock.send(step.data)  # the alert: without waiting
            else:
                await loop.sock_sendall(sock, step.data)
    finally:
        steps.close()


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` is readable (or has an error to report)."""
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), _set_result_unless_cancelled, fut)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


class _HandOffFailed(Exception):
    """The handshake succeeded but the mode asked for cannot run.

    A server logs it above DEBUG, as it is this host's limit (a suite the kernel lacks), not a
    client's fault; except ENOTCONN, a client that half-closed before the hand-off
    (``errno``)."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


async def _secure(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    options: _Options,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    session: _ssl.SSLSession | None = None,
    peer: Any = None,
    userspace: bool = False,
) -> KTLSSocket | AlgTLSSocket | SSLObjectSocket:
    """Handshake within the handshake timeout and hand off; the result owns ``sock``.

    ``sock`` is closed on any failure (a timeout, a cancelled task, a refused mode). A timeout
    raises :class:`TimeoutError` naming the peer and the time. With ``userspace`` (afalg's
    event loop), a finished handshake whose suite afalg cannot seal goes on in mode "ssl"."""
    o = options
    try:
        hs = _handoff.Handshake(
            o.context, server_side=server_side, server_hostname=server_hostname, session=session
        )
        # asyncio.timeout, not wait_for: wait_for's inner task keeps a failed handshake's
        # error, whose traceback holds wait_for's frame and so that task, in a reference cycle
        # (with the Handshake, its ssl object and buffers) until the cycle collector runs.
        deadline = asyncio.timeout(o.handshake_timeout)
        try:
            async with deadline:
                h = await _handshake(loop, sock, hs)
        except UnsupportedCipherSuite:
            if not userspace:
                raise
            return SSLObjectSocket.from_handshake(
                sock, hs, suppress_ragged_eofs=o.suppress_ragged_eofs
            )
        except TimeoutError:
            if not deadline.expired():
                raise  # the socket's own ETIMEDOUT
            raise TimeoutError(
                f"the TLS handshake with {peer or 'the peer'} did not finish within "
                f"{o.handshake_timeout:g} s (ssl_handshake_timeout)"
            ) from None
        try:
            return tls.hand_off(
                sock,
                h,
                mode=o.mode,
                algif_backend=o.algif_backend,
                suppress_ragged_eofs=o.suppress_ragged_eofs,
                records_per_key=o.records_per_key,
            )
        except Exception as exc:
            if server_side:
                raise _HandOffFailed(str(exc), getattr(exc, "errno", None)) from None
            raise
    except BaseException:
        sock.close()
        raise


class _Handshaking:
    """A server's client in its handshake, counted by the :class:`asyncio.Server`.

    Counted as asyncio's TLS counts its transport from the accept: ``wait_closed()`` waits for
    it, and ``close_clients()``/``abort_clients()`` (3.13) cancel the handshake, which closes
    the socket. Counted from :meth:`start` to the task's end."""

    def __init__(self, server: Any, task: asyncio.Task[None]) -> None:
        self._server = server
        self._task = task

    def start(self) -> None:
        server = server_attach(self._server, self)
        self._task.add_done_callback(lambda _: server_detach(server, self))

    def close(self) -> None:
        self._task.cancel()

    abort = close


class _Adopt(asyncio.Protocol):
    """Takes the connected socket from the transport asyncio made for it, before it reads.

    afalg gets a duplicate descriptor (non-blocking), and asyncio's transport is closed (the
    connection lives on in the duplicate) before it reads a byte. ``extra`` keeps the addresses
    asyncio knew (a server's from ``accept()``): a peer that resets during the handshake has no
    ``getpeername()`` afterwards, and the handler still gets its address. ``then(sock, extra,
    server)`` follows for a server's client: ``server`` the :class:`asyncio.Server` that
    accepted it (None for a loop whose transports name none), to count the connection
    (:class:`_Handshaking`)."""

    def __init__(
        self, then: Callable[[socket.socket, dict[str, Any], Any], None] | None = None
    ) -> None:
        self.sock: socket.socket | None = None
        self.extra: dict[str, Any] = {}
        self._then = then

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # An asyncio.Transport in shape (uvloop's transports do not subclass it)
        transport = cast(asyncio.Transport, transport)
        server = getattr(transport, "_server", None)  # asyncio's Server, for a server's client
        if self._then is not None and transport.is_closing():
            return  # the server closed it before it was made (Server.abort_clients())
        transport.pause_reading()  # asyncio's transport starts reading only after this
        self.extra = {key: transport.get_extra_info(key) for key in ("peername", "sockname")}
        try:
            raw = transport.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(False)
        finally:
            transport.abort()  # closes asyncio's descriptor; the duplicate stays
        self.sock = sock
        if self._then is not None:
            self._then(sock, self.extra, server)
