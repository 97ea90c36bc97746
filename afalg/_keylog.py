"""The in-memory key log of the hand-off: OpenSSL's NSS key log in a memfd.

One per context and process, emptied as it is read and after every call in which OpenSSL may
log (the properties are :mod:`afalg.handoff`'s docstring's). :class:`KeyLog` and
:func:`keylog_for` are public there."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import ssl
import threading
import weakref
from typing import Any, TypeVar

from afalg.errors import ClosedError, HandoffError

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def _punch(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset+length)`` of the memfd (it reads back as zeros); the size stays."""
    if length <= 0:
        return
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, mode, offset, length) != 0:
        # No hole punching: overwrite with zeros so the secrets are gone all the same.
        os.pwrite(fd, bytes(length), offset)


class KeyLog:
    """The NSS key log of one :class:`ssl.SSLContext`, kept in a memfd.

    OpenSSL appends lines; :meth:`collect` parses the new complete lines, punches them out of the
    memfd, keeps those whose client random was :meth:`expect`-ed (forwarding the others to the
    caller's own key log, if any), and :meth:`take` hands a connection its secrets and forgets
    them. Thread-safe: one context may run many handshakes at once.
    """

    def __init__(self, forward_to: str | None = None) -> None:
        self._fd = os.memfd_create("afalg-keylog", os.MFD_CLOEXEC)
        self.path = f"/proc/self/fd/{self._fd}"
        self.forward_to = forward_to
        self._lock = threading.Lock()
        self._pid = os.getpid()  # the process whose memfd this is (see _after_fork_in_child)
        self._offset = 0  # everything before it has been parsed and punched out
        # Pending connections by (client random, role). The client picks the random and it is
        # public, so one random is never pending twice in a role: a second ClientHello carrying
        # it is refused (it would share, or discard, the first connection's secrets). Both
        # roles of one loopback connection on one context may be pending at once.
        self._expected: dict[tuple[bytes, bool], dict[str, bytes]] = {}
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<KeyLog {state} pending={len(self._expected)}>"

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the memfd and forget every pending secret. Idempotent."""
        with self._lock:
            self._fd = -1
            self._expected.clear()
            self._finalizer()

    def _abandon(self) -> None:
        """In a forked child, close the parent's memfd and forget its pending connections.

        Done without the lock: a thread of the parent may have held it at fork."""
        self._lock = threading.Lock()
        self._fd = -1
        self._expected.clear()
        self._finalizer()

    def collect(self) -> None:
        """Parse and punch out every whole line logged so far; nothing when closed.

        See :meth:`collect_locked`."""
        with self._lock:
            if not self.closed:
                self.collect_locked()

    def expect(self, client_random: bytes, server_side: bool) -> None:
        """Keep the lines of this connection, called when its ClientHello is seen.

        Called before ssl processes the ClientHello. Raises :class:`ssl.SSLError` (``EPROTO``)
        when a handshake with the same client random is already pending in the same role, and
        ``ValueError`` when closed."""
        key = (bytes(client_random), server_side)
        with self._lock:
            self._check_open()
            if key in self._expected:
                raise HandoffError(
                    "afalg: duplicate ClientHello random (another handshake with this random "
                    "is in progress); refused",
                )
            self._expected[key] = {}

    def discard(self, client_random: bytes, server_side: bool) -> None:
        """Forget a connection's secrets (its handshake failed or its keys are built)."""
        with self._lock:
            if not self.closed:
                self.collect_locked()
            self._expected.pop((bytes(client_random), server_side), None)

    def take(self, client_random: bytes, server_side: bool) -> dict[str, bytes]:
        """The secrets logged for ``client_random``, ``{label: secret}``; they are forgotten."""
        with self._lock:
            self._check_open()
            self.collect_locked()
            return self._expected.pop((bytes(client_random), server_side), {})

    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("afalg key log")

    def collect_locked(self) -> None:
        """Parse the new whole lines into the pending entries and punch them out (lock held)."""
        self._check_open()
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        data = os.pread(self._fd, size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1  # only whole lines; a line being written waits
        if not end:
            return
        forward: list[bytes] = []
        for line in data[:end].splitlines():
            fields = line.split()
            if len(fields) != 3 or line.startswith(b"#"):
                continue
            label, random_hex, secret_hex = fields
            try:
                client_random = bytes.fromhex(random_hex.decode("ascii"))
                secret = bytes.fromhex(secret_hex.decode("ascii"))
            except ValueError:
                continue
            for role in (False, True):
                secrets = self._expected.get((client_random, role))
                if secrets is not None:
                    secrets[label.decode("ascii")] = secret
            forward.append(line + b"\n")
        _punch(self._fd, self._offset, end)
        self._offset += end
        if forward and self.forward_to:
            self._forward(b"".join(forward))

    def _forward(self, lines: bytes) -> None:
        try:
            with open(self.forward_to, "ab") as f:  # type: ignore[arg-type]
                f.write(lines)
        except OSError:
            pass  # the caller's key log is a debugging aid; never fail a connection over it


_keylogs: weakref.WeakKeyDictionary[ssl.SSLContext, KeyLog] = weakref.WeakKeyDictionary()
_keylogs_lock = threading.Lock()


def keylog_for(context: ssl.SSLContext) -> KeyLog:
    """Return the :class:`KeyLog` installed on ``context`` in this process.

    The first call installs it, with the socket and object classes that empty it; see
    :mod:`afalg.handoff`.

    A ``keylog_filename`` the caller set keeps receiving every line (forwarded by afalg).
    """
    with _keylogs_lock:
        log = _keylogs.get(context)
        current: str | None = context.keylog_filename
        if log is not None and current == log.path:
            if not log.closed and log._pid == os.getpid():
                _install_scrubbers(context)
                return log
            current = log.forward_to  # the closed (or parent's) log's path is ours
            if log._pid != os.getpid():
                log._abandon()  # forked without os.fork's hooks: never touch the parent's lines
        log = KeyLog(forward_to=current)
        context.keylog_filename = log.path
        log.collect()  # the header ssl wrote ("# TLS secrets log file...")
        _keylogs[context] = log
        _install_scrubbers(context)
        return log


def _after_fork_in_child() -> None:
    """Give every context's key log a fresh memfd in a forked child.

    The child must neither parse nor punch out the lines of its parent (or of its siblings), nor
    log into their memfd."""
    global _keylogs_lock
    _keylogs_lock = threading.Lock()  # a thread of the parent may have held it at fork
    for context, log in list(_keylogs.items()):
        if log._pid == os.getpid():
            continue
        del _keylogs[context]
        log._abandon()
        if context.keylog_filename != log.path:
            continue  # the caller replaced the key log: keylog_for installs ours when needed
        fresh = KeyLog(forward_to=log.forward_to)
        context.keylog_filename = fresh.path
        fresh.collect()
        _keylogs[context] = fresh


os.register_at_fork(after_in_child=_after_fork_in_child)


def _scrub(context: ssl.SSLContext) -> None:
    """Empty the memfd of ``context``'s key log (if afalg installed one in this process)."""
    log = _keylogs.get(context)
    if log is not None and log._pid == os.getpid():
        with contextlib.suppress(OSError, ValueError):
            log.collect()


# Every call in which OpenSSL may log a secret: the handshake, and read/write, which run (or
# resume, or renegotiate) it implicitly. SSLSocket.send calls the C object's write directly.
_SCRUBBED_METHODS = ("do_handshake", "read", "write", "send")
_C = TypeVar("_C", bound=type)
_scrubbing_classes: dict[type, type] = {}


def _scrubbing_method(method: Any) -> Any:
    @functools.wraps(method)
    def scrubbing(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            _scrub(self.context)

    return scrubbing


def _scrubbing(cls: _C) -> _C:
    """Return a subclass of ``cls`` whose calls that may log a secret empty the key log.

    ``cls`` is an SSLSocket or SSLObject class; the key log's memfd is emptied before those
    calls return or raise."""
    if getattr(cls, "_afalg_scrubs_keylog", False):
        return cls
    sub = _scrubbing_classes.get(cls)
    if sub is None:
        namespace: dict[str, Any] = {
            "_afalg_scrubs_keylog": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        }
        for name in _SCRUBBED_METHODS:
            if hasattr(cls, name):
                namespace[name] = _scrubbing_method(getattr(cls, name))
        sub = type(cls.__name__, (cls,), namespace)
        _scrubbing_classes[cls] = sub
    return sub  # type: ignore[return-value]


def _install_scrubbers(context: ssl.SSLContext) -> None:
    context.sslsocket_class = _scrubbing(context.sslsocket_class)
    context.sslobject_class = _scrubbing(context.sslobject_class)
