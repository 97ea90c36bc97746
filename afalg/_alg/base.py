"""The socket base of the AF_ALG classes: binding, sockets, buffers and I/O plumbing.

It covers binding, the transform and operation sockets and their lifetime, socket buffers
fitted to an operation, and the input and output plumbing."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from typing import Any, ClassVar, Self

from afalg import cmsg
from afalg._alg.refusal import _alg_error, not_available, socket_error
from afalg._uapi import (
    AF_ALG,
    ALG_SET_KEY,
    SOL_ALG,
    AlgOp,
)
from afalg.cmsg import Buffer
from afalg.errors import AlgError

_PAGE = os.sysconf("SC_PAGE_SIZE")
# plain ints for the hot paths (module globals: no enum attribute lookup per call)
_ENCRYPT, _DECRYPT = int(AlgOp.ENCRYPT), int(AlgOp.DECRYPT)
_SCRATCH_MAX = 256 * 1024  # an object keeps an output buffer up to this size for reuse
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def _view(value: Any, what: str) -> bytes | memoryview:
    """``value`` as bytes for a syscall, without a copy where it is contiguous."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        try:
            return memoryview(value).cast("B")
        except TypeError:  # not C-contiguous
            return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def bind(kind: str, name: str) -> socket.socket:
    """Return a new transform socket bound to ``(kind, name)``, the caller's to close.

    ``kind`` and ``name`` are e.g. ``("aead", "gcm(aes)")``. Errors as for the classes here:
    :class:`afalg.AlgorithmNotAvailable` when AF_ALG or the algorithm is missing or refused
    (see :func:`not_available`), :class:`afalg.AlgError` otherwise; TypeError/ValueError for a
    bad kind or name before any socket."""
    for what, value, limit in (
        ("kind", kind, cmsg.SALG_TYPE_MAX),
        ("name", name, cmsg.SALG_NAME_MAX),
    ):
        if not isinstance(value, str):
            raise TypeError(f"algorithm {what} must be str, not {type(value).__name__}")
        if not 0 < len(value.encode()) < limit:
            raise ValueError(f"algorithm {what} must be 1 to {limit - 1} bytes: {value!r}")
    try:
        sock = socket.socket(AF_ALG, socket.SOCK_SEQPACKET, 0)
    except OSError as exc:
        raise socket_error(exc) from None
    try:
        sock.bind((kind, name))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT:
            raise not_available(kind, name) from None
        raise _alg_error(exc, f"bind({kind!r}, {name!r})") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _buffer_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _fit_buffer(sock: socket.socket, need: int, *, send: bool) -> int:
    """Make the send (or receive) buffer of ``sock`` hold ``need`` bytes; return its size.

    The size returned is the usable one (the kernel counts whole pages). ValueError when the
    system limit is below ``need``."""
    opt, force = (
        (socket.SO_SNDBUF, _SO_SNDBUFFORCE) if send else (socket.SO_RCVBUF, _SO_RCVBUFFORCE)
    )
    need = max(need, _PAGE)
    usable = sock.getsockopt(socket.SOL_SOCKET, opt) & ~(_PAGE - 1)
    if usable >= need:
        return usable
    want = need + _PAGE  # the kernel doubles the request; ask for a page of slack
    for option in (opt, force):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, want)
        except PermissionError:
            continue
        usable = sock.getsockopt(socket.SOL_SOCKET, opt) & ~(_PAGE - 1)
        if usable >= need:
            return usable
    sysctl = "wmem_max" if send else "rmem_max"
    limit = _buffer_limit(f"/proc/sys/net/core/{sysctl}")
    raise ValueError(
        f"one operation needs {need} bytes of socket {'send' if send else 'receive'} buffer, "
        f"at most {usable} are available (net.core.{sysctl}={limit}); split the data or raise "
        f"net.core.{sysctl}"
    )


# An idle operation socket of a one-shot object (AEAD, SKCipher): the socket, the bytes its
# send and receive buffers hold, and its reused output buffer (or None).
_Op = tuple[socket.socket, int, int, memoryview | None]


class _AlgSocket:
    """The transform socket, the reused operation socket(s), and their lifetime.

    Hash and RNG keep one operation socket (``_op``, under the lock: a hash's running state
    lives there). AEAD and SKCipher operations are complete in one sendmsg + recv, so their
    operation sockets wait in ``_idle`` between calls: a call takes one with ``list.pop()``
    and gives it back with ``append()`` (each atomic: no lock on the hot path), and threads
    calling at once each get their own (accepted when none is idle)."""

    _kind: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self._tfm: socket.socket | None = None
        self._op: socket.socket | None = None
        self._idle: list[_Op] = []
        self._lock = threading.RLock()
        if not isinstance(name, str):  # before any regex or socket sees it
            raise TypeError(f"name must be str, not {type(name).__name__}")
        if not 0 < len(name.encode()) < cmsg.SALG_NAME_MAX:
            raise ValueError(f"name must be 1 to {cmsg.SALG_NAME_MAX - 1} bytes: {name!r}")
        self.name = name

    def _open(self, key: bytes | None = None) -> None:
        self._tfm = bind(self._kind, self.name)
        if key is not None:
            try:
                self._tfm.setsockopt(SOL_ALG, ALG_SET_KEY, key)
            except OSError as exc:
                self.close()
                if exc.errno == errno.EINVAL:
                    raise ValueError(
                        f"{self.name}: the kernel refused a {len(key)}-byte key"
                    ) from None
                raise _alg_error(exc, f"{self.name}: setting the key") from None

    # -- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> socket.socket:
        if self._tfm is None:
            raise AlgError(errno.EBADF, f"{type(self).__name__}({self.name!r}) is closed")
        return self._tfm

    def _op_socket(self) -> socket.socket:
        tfm = self._check_open()
        if self._op is None:
            try:
                self._op, _ = tfm.accept()
            except OSError as exc:
                raise _alg_error(exc, f"{self.name}: accept()") from None
        return self._op

    def _drop_op(self) -> None:
        """Forget the operation socket after an error: its kernel state is unknown."""
        if self._op is not None:
            self._op.close()
            self._op = None

    def _claim(self, sending: int, receiving: int, entry: _Op | None = None) -> _Op:
        """Return an operation socket whose buffers hold ``sending`` and ``receiving`` bytes.

        That is ``entry`` refitted, or a new one (the hot paths' slow path, when none is
        idle)."""
        if entry is None:
            with self._lock:
                tfm = self._check_open()
                try:
                    sock = tfm.accept()[0]
                except OSError as exc:
                    raise _alg_error(exc, f"{self.name}: accept()") from None
            entry = (sock, 0, 0, None)
        sock, snd, rcv, scratch = entry
        try:
            if sending > snd:
                snd = _fit_buffer(sock, sending, send=True)
            if receiving > rcv:
                rcv = _fit_buffer(sock, receiving, send=False)
        except BaseException:
            self._give_back(entry)  # still good: only its buffers were too small
            raise
        return (sock, snd, rcv, scratch)

    def _give_back(self, entry: _Op) -> None:
        """Return an operation socket to the idle list.

        It is closed instead if this object was closed meanwhile: close() may have run while
        the operation was under way."""
        self._idle.append(entry)
        if self._tfm is None:
            self._close_idle()

    def _close_idle(self) -> None:
        while True:
            try:
                entry = self._idle.pop()
            except IndexError:
                return
            entry[0].close()

    def _operation_failed(
        self,
        exc: BaseException,
        op: int,
        sock: socket.socket,
        out: bytearray | memoryview | None,
        written: int,
    ) -> BaseException:
        """Clean up after a failed operation and return the error to raise.

        Closes its operation socket (its kernel state is unknown) and wipes what the kernel may
        have written; the error returned is an OSError as afalg's."""
        sock.close()
        if out is not None and written:
            out[:written] = bytes(written)
        if isinstance(exc, OSError) and not isinstance(exc, AlgError):
            return _alg_error(exc, self._what(op))
        return exc

    def _what(self, op: int) -> str:
        return f"{self.name} {AlgOp(op).name.lower()}"

    @property
    def closed(self) -> bool:
        return self._tfm is None

    def fileno(self) -> int:
        """The transform socket's descriptor (-1 once closed)."""
        return -1 if self._tfm is None else self._tfm.fileno()

    def detach(self) -> int:
        """Give up the transform socket's descriptor and return it, now the caller's to close.

        The operation socket is closed and this object is closed."""
        with self._lock:
            tfm = self._check_open()
            self._drop_op()
            self._tfm = None
            self._close_idle()
            return tfm.detach()

    def close(self) -> None:
        """Close both sockets; calling it again does nothing."""
        with self._lock:
            self._drop_op()
            if self._tfm is not None:
                self._tfm.close()
                self._tfm = None
            self._close_idle()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __repr__(self) -> str:
        if self._tfm is None:
            return f"<afalg.{type(self).__name__} {self.name!r} closed>"
        ops = [self._op] if self._op is not None else [entry[0] for entry in list(self._idle)]
        op = ops[0].fileno() if ops else -1
        return f"<afalg.{type(self).__name__} {self.name!r} fd={self.fileno()} op_fd={op}>"

    def __getstate__(self) -> None:
        raise TypeError(f"cannot pickle {type(self).__name__}: it owns kernel sockets")


def _no_socket_memory(what: str, size: int, detail: str = "") -> AlgError:
    limit = _buffer_limit("/proc/sys/net/core/optmem_max")
    return AlgError(
        errno.ENOMEM,
        f"{what} of {size} bytes: the kernel refused the socket memory for its scatterlists"
        f"{detail} (net.core.optmem_max={limit}); split the data or raise net.core.optmem_max",
    )


def _short_send(what: str, sent: int, total: int) -> AlgError:
    """The error for a ``sendmsg()`` the kernel took ``sent`` of ``total`` bytes of."""
    # af_alg_sendmsg() returns what it copied when it stops short; with the buffers fitted
    # that is a failed sock_kmalloc() of its scatterlist tables, charged to optmem_max
    # (Linux 7.3 with 16 MiB: 16515072 bytes taken, 126 pages per 4 KiB table)
    return _no_socket_memory(what, total, f": it took {sent} of {total} bytes")


def _short_read(what: str, got: int, total: int) -> AlgError:
    """The error for a read that returned ``got`` of the ``total`` bytes of an operation."""
    return AlgError(errno.EIO, f"{what}: the kernel returned {got} of {total} bytes")


def _output(need: int) -> memoryview:
    """Return a new buffer for the kernel to write at least ``need`` bytes into.

    It is kept with its operation socket for reuse, up to _SCRATCH_MAX bytes."""
    return memoryview(bytearray(max(need, 4096)))


def _recv_exact(op: socket.socket, size: int, what: str) -> bytes:
    """One recvmsg of ``size`` bytes (AEAD and cipher reads return all or fail)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        try:
            n = op.recv_into(view[got:], size - got)
        except OSError as exc:
            raise _alg_error(exc, what) from None
        if n == 0:
            raise _short_read(what, got, size)
        got += n
    return bytes(buf)


def _sendmsg(op: socket.socket, parts: list[Buffer], cmsgs: list, flags: int, what: str) -> None:
    total = sum(len(p) for p in parts)
    try:
        sent = op.sendmsg([p for p in parts if p], cmsgs, flags)
    except OSError as exc:
        raise _alg_error(exc, what) from None
    if sent != total:
        raise _short_send(what, sent, total)


_BLOCK_KEYS = {
    "aes": (16, 24, 32),
    "aria": (16, 24, 32),
    "camellia": (16, 24, 32),
    "sm4": (16,),
}


def _sizes(values: tuple[int, ...]) -> str:
    if len(values) > 2 and values == tuple(range(values[0], values[-1] + 1)):
        return f"{values[0]} to {values[-1]}"
    return ", ".join(map(str, values[:-1])) + (" or " if len(values) > 1 else "") + str(values[-1])


def _writable(out: Any, size: int) -> bytearray | memoryview:
    """``out`` as a writable buffer of at least ``size`` bytes (a bytearray as it is)."""
    if type(out) is not bytearray:
        try:
            view = memoryview(out)
        except TypeError:
            raise TypeError(
                f"out must be a writable bytes-like object, not {type(out).__name__}"
            ) from None
        if view.readonly:
            raise TypeError(f"out must be writable, not a read-only {type(out).__name__}")
        if view.format != "B" or view.ndim != 1:
            if not view.c_contiguous:
                raise ValueError("out must be C-contiguous")
            view = view.cast("B")
        out = view
    if len(out) < size:
        raise ValueError(f"out holds {len(out)} bytes, the output is {size}")
    return out
