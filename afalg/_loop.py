"""An asyncio event loop whose TLS is afalg's (re-exported by :mod:`afalg.aio`).

:func:`new_event_loop`, :func:`patch_loop`, :func:`loop_factory`.

uvloop: ``loop_factory(uvloop.new_event_loop)`` works (``uvloop.Loop`` is a Python class, so
its methods can be replaced per instance; its transports are asyncio transports in shape). Its
``Server`` does not count afalg's connections (uvloop keeps that count in C), and its
``start_tls`` keeps uvloop's own TLS (afalg takes only asyncio's transports there).
"""

# Design. The loop's public methods are replaced on the loop instance: create_connection,
# create_server, connect_accepted_socket, start_tls and sendfile. Not asyncio's private
# _make_ssl_transport: it must return a transport at once, before the handshake (afalg's transport
# exists only after it, and its mode is known only then); start_tls never reaches it; uvloop lacks
# it; and private signatures may move. The public methods are documented and stable, and a
# replacement sees the whole call, so it decides before the handshake whether afalg takes the
# connection (ssl= given and a TCP socket) or asyncio's own TLS does (anything else: the original
# method, unchanged).
#
# A connection afalg takes is made by the original method without ssl= and handed over before a
# byte is read (afalg._connect._Adopt: a duplicate descriptor); the handshake runs on the loop as
# in afalg.aio; then the caller's protocol gets a TLSTransport in the mode afalg.tls.choose_mode()
# picks, or mode "ssl" (afalg._sslmode) for a finished handshake whose suite afalg cannot seal.
#
# The asyncio.Server counts afalg's connections as it counts asyncio's transports
# (_attach/_detach, whose argument appeared in 3.13): a client in its handshake
# (afalg._connect._Handshaking), then its transport, so wait_closed() waits for them and
# close_clients()/abort_clients() (3.13) close them.

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import ssl as _ssl
from collections.abc import Callable
from typing import Any

from afalg import _connect, tls
from afalg._transport import TLSTransport
from afalg.ktls import KTLSSocket

__all__ = ["loop_factory", "new_event_loop", "patch_loop"]

logger = logging.getLogger("afalg.aio")

_METHODS = (
    "create_connection",
    "create_server",
    "connect_accepted_socket",
    "start_tls",
    "sendfile",
)


def _is_tcp(sock: Any) -> bool:
    """A socket afalg can take: TCP over IPv4 or IPv6 (kTLS and the hand-off need TCP)."""
    try:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
    except AttributeError:
        return False


class _LoopTLS:
    """afalg's TLS for one loop: the replacements of its methods, and the originals."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mode: str,
        algif_backend: str,
        records_per_key: int | None,
    ) -> None:
        tls.check_options(mode, algif_backend, records_per_key)
        self.loop = loop
        self.mode = mode
        self.algif_backend = algif_backend
        self.records_per_key = records_per_key
        self.base = {name: getattr(loop, name) for name in _METHODS}

    def _options(
        self, context: Any, handshake_timeout: Any, shutdown_timeout: Any, hostname: Any = None
    ) -> _connect._Options:
        return _connect._Options.check(
            context,
            mode=self.mode,
            algif_backend=self.algif_backend,
            suppress_ragged_eofs=True,
            records_per_key=self.records_per_key,
            handshake_timeout=handshake_timeout,
            shutdown_timeout=shutdown_timeout,
            limit=_connect._DEFAULT_LIMIT,
            half_close=False,
            server_hostname=hostname,
        )

    async def _secure(self, sock: socket.socket, o: _connect._Options, **kw: Any) -> Any:
        return await _connect._secure(self.loop, sock, o, userspace=o.mode == "auto", **kw)

    def _transport(
        self, tls_sock: Any, protocol: Any, o: _connect._Options, extra: dict[str, Any], **kw: Any
    ) -> tuple[TLSTransport, asyncio.Future[None]]:
        waiter: asyncio.Future[None] = self.loop.create_future()
        transport = TLSTransport(
            self.loop,
            tls_sock,
            protocol,
            dict(extra),
            waiter=waiter,
            shutdown_timeout=o.shutdown_timeout,
            **kw,
        )
        return transport, waiter

    # -- the replaced methods --
    async def create_connection(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        *,
        ssl: Any = None,
        server_hostname: Any = None,
        ssl_handshake_timeout: Any = None,
        ssl_shutdown_timeout: Any = None,
        sock: Any = None,
        **kwds: Any,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """:meth:`asyncio.loop.create_connection`; with ``ssl=`` over TCP, afalg's TLS."""
        if not ssl or (sock is not None and not _is_tcp(sock)):
            return await self.base["create_connection"](
                protocol_factory,
                host,
                port,
                ssl=ssl,
                server_hostname=server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
                sock=sock,
                **kwds,
            )
        hostname = _connect._client_hostname(host, server_hostname)
        o = self._options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout, hostname)
        _, adopt = await self.base["create_connection"](
            _connect._Adopt, host, port, sock=sock, **kwds
        )
        assert adopt.sock is not None
        peer = adopt.extra.get("peername")
        tls_sock = await self._secure(
            adopt.sock, o, server_side=False, server_hostname=hostname, peer=peer
        )
        protocol = _made(protocol_factory, tls_sock)
        transport, waiter = self._transport(tls_sock, protocol, o, adopt.extra)
        try:
            await waiter
        except BaseException:
            transport.abort()
            raise
        return transport, protocol

    async def create_server(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: Any = None,
        port: Any = None,
        *,
        ssl: Any = None,
        ssl_handshake_timeout: Any = None,
        ssl_shutdown_timeout: Any = None,
        sock: Any = None,
        **kwds: Any,
    ) -> asyncio.Server:
        """:meth:`asyncio.loop.create_server`; with ``ssl=`` over TCP, afalg's TLS per client.

        A client whose handshake fails loses only its connection."""
        if ssl is None or (sock is not None and not _is_tcp(sock)):
            return await self.base["create_server"](
                protocol_factory,
                host,
                port,
                ssl=ssl,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
                sock=sock,
                **kwds,
            )
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")  # asyncio's words
        o = self._options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        handshakes: set[asyncio.Task[None]] = set()  # strong references while they run

        def accepted(raw: socket.socket, extra: dict[str, Any], server: Any) -> None:
            task = self.loop.create_task(self._serve(raw, extra, protocol_factory, o, server))
            handshakes.add(task)
            task.add_done_callback(handshakes.discard)
            _connect._Handshaking(server, task).start()

        return await self.base["create_server"](
            lambda: _connect._Adopt(accepted), host, port, sock=sock, **kwds
        )

    async def _serve(
        self,
        raw: socket.socket,
        extra: dict[str, Any],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        o: _connect._Options,
        server: Any,
    ) -> None:
        """Serve one accepted client: handshake, then the protocol over afalg's transport.

        The client is counted by ``server`` as asyncio's transports are."""
        peer = extra.get("peername")
        try:
            tls_sock = await self._secure(raw, o, server_side=True, peer=peer)
        except _connect._HandOffFailed as exc:  # strings only: a kept record keeps no socket
            level = logging.DEBUG if exc.errno == errno.ENOTCONN else logging.WARNING
            logger.log(level, "afalg: the hand-off of %s failed: %s", peer, exc.args[0])
            return
        except Exception as exc:  # that client's loss only
            logger.debug("afalg: a client's handshake failed: %s", repr(exc))
            return
        try:
            protocol = _made(protocol_factory, tls_sock)
        except Exception as exc:
            self.loop.call_exception_handler(
                {"message": "the protocol factory failed", "exception": exc}
            )
            return
        self._transport(tls_sock, protocol, o, extra, server=server)

    async def connect_accepted_socket(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        *,
        ssl: Any = None,
        ssl_handshake_timeout: Any = None,
        ssl_shutdown_timeout: Any = None,
    ) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
        """:meth:`asyncio.loop.connect_accepted_socket`; with ``ssl=`` over TCP, afalg's TLS.

        afalg's TLS runs the server side."""
        if not ssl or not _is_tcp(sock):
            return await self.base["connect_accepted_socket"](
                protocol_factory,
                sock,
                ssl=ssl,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        o = self._options(ssl, ssl_handshake_timeout, ssl_shutdown_timeout)
        sock.setblocking(False)
        extra = {"peername": _address(sock.getpeername), "sockname": _address(sock.getsockname)}
        tls_sock = await self._secure(sock, o, server_side=True, peer=extra["peername"])
        protocol = _made(protocol_factory, tls_sock)
        transport, waiter = self._transport(tls_sock, protocol, o, extra)
        try:
            await waiter
        except BaseException:
            transport.abort()
            raise
        return transport, protocol

    async def start_tls(
        self,
        transport: asyncio.BaseTransport,
        protocol: asyncio.BaseProtocol,
        sslcontext: _ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> asyncio.Transport:
        """:meth:`asyncio.loop.start_tls`; for a TCP transport of this loop, afalg's TLS.

        The old transport is spent (as asyncio's); the protocol's ``connection_made`` is not
        called."""
        raw = transport.get_extra_info("socket")
        if not isinstance(transport, asyncio.Transport) or not _is_tcp(raw):
            return await self.base["start_tls"](
                transport,
                protocol,
                sslcontext,
                server_side=server_side,
                server_hostname=server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
            )
        if not isinstance(sslcontext, _ssl.SSLContext):
            raise TypeError(
                f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
            )
        hostname = None if server_side else server_hostname  # "": no name checked, on purpose
        o = self._options(sslcontext, ssl_handshake_timeout, ssl_shutdown_timeout, hostname)
        transport.pause_reading()
        await _drained(transport)  # what was written before goes out in the clear first
        extra = {key: transport.get_extra_info(key) for key in ("peername", "sockname")}
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        transport.set_protocol(asyncio.Protocol())  # the old transport's end is nobody's news
        transport.abort()  # its descriptor closes; the duplicate carries the connection
        tls_sock = await self._secure(
            sock, o, server_side=server_side, server_hostname=hostname, peer=extra["peername"]
        )
        tls, waiter = self._transport(tls_sock, protocol, o, extra, connection_made=False)
        await waiter
        return tls

    async def sendfile(
        self,
        transport: asyncio.WriteTransport,
        file: Any,
        offset: int = 0,
        count: int | None = None,
        *,
        fallback: bool = True,
    ) -> int:
        """:meth:`asyncio.loop.sendfile`; over afalg's transport, :func:`afalg.aio.sendfile`.

        Native under kTLS; sealed in chunks otherwise, unless ``fallback`` is False:
        :class:`asyncio.SendfileNotAvailableError`, as asyncio."""
        if not isinstance(transport, TLSTransport):
            return await self.base["sendfile"](transport, file, offset, count, fallback=fallback)
        if transport.is_closing():
            raise RuntimeError("Transport is closing")  # asyncio's words
        if not fallback and not isinstance(transport.get_extra_info("socket"), KTLSSocket):
            raise asyncio.SendfileNotAvailableError(
                f"the kernel's sendfile needs kTLS; this connection runs "
                f"{transport.get_extra_info('mode')}"
            )
        return await transport.sendfile(file, offset, count)


def _made(protocol_factory: Callable[[], asyncio.BaseProtocol], tls_sock: Any) -> Any:
    """The protocol from ``protocol_factory``; if it raises, ``tls_sock`` is closed."""
    try:
        return protocol_factory()
    except BaseException:
        tls_sock.close()
        raise


def _address(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except OSError:
        return None


async def _drained(transport: asyncio.Transport) -> None:
    """Until asyncio's transport has written what it holds (or is closing)."""
    while transport.get_write_buffer_size() and not transport.is_closing():
        await asyncio.sleep(0.01)


def patch_loop(
    loop: asyncio.AbstractEventLoop,
    *,
    mode: str = "auto",
    algif_backend: str = "auto",
    records_per_key: int | None = None,
) -> asyncio.AbstractEventLoop:
    """Give ``loop`` afalg's TLS and return it; a patched loop is returned unchanged.

    ``ssl=`` in ``create_connection``, ``create_server``, ``connect_accepted_socket`` and
    ``start_tls`` (so in :func:`asyncio.open_connection` and :func:`asyncio.start_server`) runs
    the handshake on the loop and the records in the kernel (``mode``, ``algif_backend``,
    ``records_per_key`` as for :func:`afalg.tls.wrap`); ``loop.sendfile`` over such a transport
    is the kernel's under kTLS. A socket that is not TCP keeps asyncio's TLS; a suite afalg
    cannot seal runs mode "ssl" (``get_extra_info("mode")``). Idempotent.

    Raises :class:`TypeError` for something that is not an event loop or a loop type whose
    methods cannot be replaced (naming it), :class:`RuntimeError` for a closed loop or one
    running in another thread, and what :func:`afalg.tls.check_options` raises."""
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise TypeError(f"patch_loop needs an asyncio event loop, not {type(loop).__name__}")
    if loop.is_closed():
        raise RuntimeError(f"patch_loop: the loop {loop!r} is closed")
    if loop.is_running() and asyncio._get_running_loop() is not loop:
        raise RuntimeError(f"patch_loop: the loop {loop!r} runs in another thread")
    if isinstance(getattr(loop.create_connection, "__self__", None), _LoopTLS):
        return loop
    patch = _LoopTLS(loop, mode, algif_backend, records_per_key)
    try:
        for name in _METHODS:
            setattr(loop, name, getattr(patch, name))
    except (AttributeError, TypeError):  # no instance dict (a C loop type): none was set
        kind = f"{type(loop).__module__}.{type(loop).__qualname__}"
        raise TypeError(
            f"patch_loop cannot patch a {kind}: its methods cannot be replaced on the instance"
        ) from None
    return loop


def loop_factory(
    base: Callable[[], asyncio.AbstractEventLoop] | None = None,
    *,
    mode: str = "auto",
    algif_backend: str = "auto",
    records_per_key: int | None = None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a zero-argument loop factory: ``base()`` given afalg's TLS by :func:`patch_loop`.

    ``base`` is asyncio's selector loop by default. The options are checked now."""
    tls.check_options(mode, algif_backend, records_per_key)
    make = base if base is not None else asyncio.SelectorEventLoop

    def factory() -> asyncio.AbstractEventLoop:
        loop = make()
        try:
            return patch_loop(
                loop, mode=mode, algif_backend=algif_backend, records_per_key=records_per_key
            )
        except BaseException:
            loop.close()
            raise

    return factory


def new_event_loop() -> asyncio.AbstractEventLoop:
    """Return a new asyncio event loop with afalg's TLS (:func:`patch_loop`, mode "auto").

    For ``asyncio.run(main(), loop_factory=afalg.aio.new_event_loop)``, ``asyncio.Runner`` and
    ``uvicorn --loop afalg.aio:new_event_loop``."""
    return loop_factory()()
