"""The TCP socket's face that afalg's TLS sockets pass through unchanged.

:class:`SocketFace` is the base of :class:`afalg._socket.TLSSocketBase` (kTLS and algif) and of
:class:`afalg._sslmode.SSLObjectSocket` (mode ``"ssl"``): the descriptor, the addresses, the
timeout and blocking mode, the options and the context manager, as :class:`ssl.SSLSocket` has
them.
"""

from __future__ import annotations

import socket
from typing import Any, Self


class SocketFace:
    """The TCP socket ``_sock`` of a TLS socket, seen through it as through ``ssl.SSLSocket``."""

    _sock: socket.socket
    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
