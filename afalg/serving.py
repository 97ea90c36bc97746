"""Limits and path checks for servers that send files (``sendfile()`` over kTLS or not).

Nothing here touches a socket: a server asks :class:`ConnectionLimits` whether to admit a peer,
:class:`ServeDir` for the file a request names, and enforces the deadlines of
:class:`ServerLimits` itself (the example server, ``examples/tls_echo_server.py``, shuts a
connection down from its accept loop when a deadline passes, however slowly the peer trickles
bytes).

- **Admission**: a cap on all connections and one per peer address, so that a few slow clients
  from one address cannot hold every slot.
- **Deadlines**: the handshake and each request (reading it and sending the response) have an
  absolute deadline; an idle timeout applies to each read and write besides. A peer sending one
  byte just inside the idle timeout outlives the idle timeout, never the deadline.
- **Files**: a request target is resolved under one directory (``..`` and symlinks resolved,
  nothing outside it), then opened component by component from that directory with
  ``O_NOFOLLOW`` (a symlink swapped in after the check is refused) and the last component with
  ``O_NONBLOCK`` (a FIFO swapped in does not block the server), and it must be a regular file
  *after* opening. Refusals carry an HTTP status: 404 (missing, not a regular file, outside),
  403 (not readable), 500 (any other error).
- **Requests**: :class:`FileRequest` collects one request from bytes as they arrive (``GET
  /path``, or ``GET /path HTTP/1.x`` and headers up to an empty line, so ``curl`` works), and
  :func:`response_head` writes the ``HTTP/1.0`` head of the answer; a blocking server and an
  asyncio one share both.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "MAX_REQUEST",
    "ConnectionLimits",
    "FileRequest",
    "RequestRefused",
    "ServeDir",
    "ServerLimits",
    "response_head",
]

MAX_REQUEST = 8192  # bytes: a request line and its headers


@dataclass(frozen=True)
class ServerLimits:
    """A server's limits, in seconds and connections."""

    handshake_timeout: float = 10.0  # absolute, from accept() to the end of the handshake
    request_timeout: float = 30.0  # absolute, from a request's first byte to its last response byte
    idle_timeout: float = 60.0  # each read and write
    max_conns: int = 256  # all peers together
    max_conns_per_address: int = 64  # one peer address

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "request_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, not {type(value).__name__}")
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("max_conns", "max_conns_per_address"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")


class ConnectionLimits:
    """Admission under a total and a per-address cap; thread-safe.

    ``admit(address)`` returns None and counts the connection, or the name of the cap that
    refuses it (``"connection-cap"``, ``"address-cap"``); every admitted connection is
    ``release()``-d exactly once.
    """

    def __init__(self, max_conns: int, max_conns_per_address: int) -> None:
        ServerLimits(max_conns=max_conns, max_conns_per_address=max_conns_per_address)  # checks
        self.max_conns = max_conns
        self.max_conns_per_address = max_conns_per_address
        self._lock = threading.Lock()
        self._total = 0
        self._by_address: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"<ConnectionLimits {self._total}/{self.max_conns} "
            f"addresses={len(self._by_address)} per-address<={self.max_conns_per_address}>"
        )

    @staticmethod
    def key(address: str) -> str:
        """The address a peer is counted under (an IPv4-mapped IPv6 address as IPv4)."""
        return address[7:] if address.startswith("::ffff:") and "." in address else address

    def admit(self, address: str) -> str | None:
        key = self.key(address)
        with self._lock:
            if self._total >= self.max_conns:
                return "connection-cap"
            if self._by_address.get(key, 0) >= self.max_conns_per_address:
                return "address-cap"
            self._total += 1
            self._by_address[key] = self._by_address.get(key, 0) + 1
            return None

    def release(self, address: str) -> None:
        key = self.key(address)
        with self._lock:
            count = self._by_address.get(key, 0)
            if count <= 0:
                raise ValueError(f"release({address!r}) without admit()")
            self._total -= 1
            if count == 1:
                del self._by_address[key]
            else:
                self._by_address[key] = count - 1

    def count(self, address: str | None = None) -> int:
        """Connections admitted and not released (from ``address``, or all)."""
        with self._lock:
            return self._total if address is None else self._by_address.get(self.key(address), 0)


class RequestRefused(Exception):
    """A request that gets an HTTP error status instead of a file."""

    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(f"{status} {reason}" + (f": {detail}" if detail else ""))
        self.status = status
        self.reason = reason


class FileRequest:
    """One file request, read from bytes as they come (no I/O).

    ``GET /path\\n``, or ``GET /path HTTP/1.x\\r\\n`` then header lines up to an empty one
    (ignored). Feed what the peer sends until :meth:`feed` returns True; :attr:`target` is then
    the path asked for. Bytes after the request are ignored (the response closes the
    connection)."""

    def __init__(self, max_size: int = MAX_REQUEST) -> None:
        self.max_size = max_size
        self.target: str | None = None
        self._buf = bytearray()

    def feed(self, data: bytes) -> bool:
        """Add ``data``; return True once the request is whole.

        :class:`RequestRefused` (400) for a request that is not ``GET`` with a target, or that
        has no end within ``max_size``."""
        if self.target is not None:
            return True
        self._buf += data
        line, newline, rest = bytes(self._buf).partition(b"\n")
        if newline:
            parts = line.split()
            if len(parts) not in (2, 3) or parts[0] != b"GET":
                raise RequestRefused(400, "Bad Request", "not GET /path [HTTP/1.x]")
            if len(parts) == 2 or rest[:1] == b"\n" or rest[:2] == b"\r\n" or _blank_line(rest):
                self.target = parts[1].decode("latin-1")
                return True
        if len(self._buf) >= self.max_size:
            raise RequestRefused(400, "Bad Request", f"no end within {self.max_size} bytes")
        return False


def _blank_line(headers: bytes) -> bool:
    return b"\n\n" in headers or b"\n\r\n" in headers


def response_head(status: int, reason: str, length: int = 0) -> bytes:
    """Return the head of an ``HTTP/1.0`` response with ``length`` body bytes.

    The connection closes after it (a 200 carries ``application/octet-stream``)."""
    kind = "Content-Type: application/octet-stream\r\n" if status == 200 else ""
    return (
        f"HTTP/1.0 {status} {reason}\r\nContent-Length: {length}\r\n{kind}Connection: close\r\n\r\n"
    ).encode()


_NOT_FOUND = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EISDIR)
_FORBIDDEN = (errno.EACCES, errno.EPERM)


class ServeDir:
    """The files under one directory, as a server may hand them out."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root))

    def __repr__(self) -> str:
        return f"ServeDir({self.root!r})"

    def resolve(self, target: str) -> str | None:
        """Return the path under the root that a request target names, or None.

        The target is like ``/a/b?query``, percent-encoded; ``..`` and symlinks are resolved.
        None if it leaves the root or is not an absolute path. Whether it exists and what it is,
        :meth:`open` finds out."""
        # Origin-form (RFC 9112, 3.2.1): the target is a path, then "?query". Not urlsplit():
        # it reads "//x/f" as host x and path /f, and raises ValueError on "//[x/".
        path = urllib.parse.unquote(target.partition("?")[0].partition("#")[0])
        if "\x00" in path or not path.startswith("/"):
            return None
        full = os.path.realpath(os.path.join(self.root, path.lstrip("/")))
        if full == self.root or os.path.commonpath([self.root, full]) != self.root:
            return None
        return full

    def open(self, target: str) -> BinaryIO:
        """Return the regular file ``target`` names, open for reading (blocking).

        :class:`RequestRefused` (404, 403, 500) otherwise. See the module docstring for the
        checks."""
        full = self.resolve(target)
        if full is None:
            raise RequestRefused(404, "Not Found", "outside the served directory")
        parts = os.path.relpath(full, self.root).split(os.sep)
        try:
            fd = self._open_beneath(parts)
        except OSError as exc:
            if exc.errno in _NOT_FOUND:
                raise RequestRefused(404, "Not Found", exc.strerror or "") from None
            if exc.errno in _FORBIDDEN:
                raise RequestRefused(403, "Forbidden", exc.strerror or "") from None
            raise RequestRefused(500, "Internal Server Error", exc.strerror or "") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise RequestRefused(404, "Not Found", "not a regular file")
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def _open_beneath(self, parts: list[str]) -> int:
        """Open ``root/parts...`` one component at a time, never following a symlink."""
        directory = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in parts[:-1]:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                child = os.open(name, flags, dir_fd=directory)
                os.close(directory)
                directory = child
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
            return os.open(parts[-1], flags, dir_fd=directory)
        finally:
            os.close(directory)
