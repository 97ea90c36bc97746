"""The TLS handshake in userspace, the record keys for the kernel.

Python's :mod:`ssl` runs the handshake (either role, TLS 1.2 or 1.3, with the caller's
:class:`ssl.SSLContext`, so certificates, SNI, ALPN, verification and session resumption stay
ssl's) over a pair of :class:`ssl.MemoryBIO`. This module moves the bytes between those BIOs and
the TCP socket and, once ssl reports the handshake done, returns a :class:`Handoff`: the traffic
keys of both directions with the sequence numbers ssl reached, and the ssl object itself (for
``getpeercert()``, ``cipher()``, ``version()``, ``selected_alpn_protocol()``, ``session``).

Three properties make the hand-off safe:

- **Whole records only.** Each incoming record is read as a 5-byte header then exactly its body,
  so when the handshake ends the socket sits at a record boundary and no byte after the last
  handshake record has been consumed: the kernel (or the record layer) reads the next record.
- **Secrets in memory only, and only as long as needed.** OpenSSL writes its NSS key log to a
  memfd (``keylog_filename = /proc/self/fd/N``), one per context and process. The lines are
  parsed by the ClientHello random (every line carries it), the region of the memfd holding them
  is punched out (``fallocate(PUNCH_HOLE)``) as soon as it is read, and a connection's lines are
  dropped once its keys are built, so a long-running server does not accumulate secrets. A key
  log the caller configured on the context (``keylog_filename``) keeps receiving every line.
- **No other connection's secrets either.** The key log is the context's, so connections the
  caller makes with the same context (``ctx.wrap_socket``, ``ctx.wrap_bio``, asyncio) log there
  too. :func:`keylog_for` therefore gives the context ``sslsocket_class`` and
  ``sslobject_class`` subclasses of the ones it had whose ``do_handshake``, ``read``, ``write``
  and ``send`` empty the memfd before they return or raise (OpenSSL logs only inside those
  calls): once any connection's handshake has finished or failed, none of its secrets is left in
  the memfd. (Toggling ``keylog_filename`` around afalg's own handshakes instead would race with
  other threads' handshakes in CPython's key log callback.)
- **One key log per process.** After ``fork()`` the child gets a fresh memfd for every context
  (:func:`os.register_at_fork`); the parent's is closed in the child. Workers of a pre-fork
  server never read, or punch out, each other's lines.
- **Sequence numbers from the records that crossed the BIOs.** TLS 1.2: the records after each
  direction's ChangeCipherSpec were sealed under the new keys (the Finished used sequence 0, so
  application data starts at 1). TLS 1.3: the peer's Finished is the last record ssl opened
  (under handshake keys), so receiving starts at 0; a server has already sealed its
  NewSessionTicket records under the application keys in the call that completed the
  handshake, so sending starts after them.

Key log lines used (NSS format): ``CLIENT_RANDOM <client_random> <master_secret>`` (TLS 1.2),
``CLIENT_TRAFFIC_SECRET_0`` / ``SERVER_TRAFFIC_SECRET_0`` (TLS 1.3).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import ssl
import threading
import weakref
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from afalg.errors import ClosedError, HandoffError, UnsupportedCipherSuite
from afalg.keys import (
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    CipherSuite,
    TrafficKeys,
    suite_from_openssl_name,
    tls12_traffic_keys,
)
from afalg.record import RecordLayer
from afalg.wire import (
    HEADER,
    HEADER_SIZE,
    MAX_CIPHERTEXT_TLS12,
    ContentType,
    HandshakeType,
    handshake_message,
)

__all__ = [
    "Handoff", "Handshake", "KeyLog", "Receive", "Send", "TicketFeed", "check_arguments",
    "handshake", "keylog_for",
]  # fmt: skip

_CONTENT_TYPES = frozenset(ContentType)
_VERSIONS = {"TLSv1.2": TLS_1_2_VERSION, "TLSv1.3": TLS_1_3_VERSION}


# --- the in-memory key log ---------------------------------------------------------------------

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
        """In a forked child: close this (the parent's) memfd and forget the parent's pending
        connections, without the lock (a thread of the parent may have held it at fork)."""
        self._lock = threading.Lock()
        self._fd = -1
        self._expected.clear()
        self._finalizer()

    def collect(self) -> None:
        """Parse and punch out every whole line logged so far (see :meth:`collect_locked`);
        nothing when closed."""
        with self._lock:
            if not self.closed:
                self.collect_locked()

    def expect(self, client_random: bytes, server_side: bool) -> None:
        """Keep the lines of this connection (called when its ClientHello is seen, before ssl
        processes it). Raises :class:`ssl.SSLError` (``EPROTO``) when a handshake with the same
        client random is already pending in the same role, and ``ValueError`` when closed."""
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
    """The :class:`KeyLog` installed on ``context`` in this process (installing it the first
    time, with the socket and object classes that empty it; see the module docstring).

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
    """A fresh memfd for every context's key log: the child must neither parse nor punch out
    the lines of its parent (or of its siblings), nor log into their memfd."""
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
    """A subclass of ``cls`` (an SSLSocket or SSLObject class) whose calls that may log a
    secret empty the key log's memfd before they return or raise."""
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


# --- records crossing the BIOs ------------------------------------------------------------------


@dataclass
class _Direction:
    """The records that went one way during the handshake."""

    records: list[tuple[int, int]] = field(default_factory=list)  # (content_type, call number)
    handshake: bytearray = field(default_factory=bytearray)  # plaintext handshake stream
    encrypted: bool = False  # a ChangeCipherSpec (1.2) or an encrypted record (1.3) was seen
    pending: bytearray = field(default_factory=bytearray)

    def add(self, data: bytes, call: int) -> None:
        self.pending += data
        while len(self.pending) >= HEADER_SIZE:
            content_type, _version, length = HEADER.unpack_from(self.pending)
            if len(self.pending) < HEADER_SIZE + length:
                break
            payload = bytes(self.pending[HEADER_SIZE : HEADER_SIZE + length])
            del self.pending[: HEADER_SIZE + length]
            self.records.append((content_type, call))
            if content_type in (ContentType.change_cipher_spec, ContentType.application_data):
                self.encrypted = True
            elif content_type == ContentType.handshake and not self.encrypted:
                self.handshake += payload

    def first_message_random(self, msg_type: int) -> bytes | None:
        """The 32-byte random of the first handshake message if it is ``msg_type``
        (ClientHello or ServerHello: type(1) length(3) legacy_version(2) random(32))."""
        if len(self.handshake) < 38 or self.handshake[0] != msg_type:
            return None
        return bytes(self.handshake[6:38])

    def after_last_ccs(self) -> int:
        """Records after the last ChangeCipherSpec (TLS 1.2: sealed under the new keys)."""
        count = 0
        for content_type, _call in self.records:
            count = 0 if content_type == ContentType.change_cipher_spec else count + 1
        return count

    def in_call(self, call: int) -> int:
        return sum(1 for _t, c in self.records if c == call)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            break
        got += k
    return bytes(buf[:got])


def record_length(header: bytes | bytearray) -> int | None:
    """The body length announced by a 5-byte record header, or None if the header is not TLS:
    a content type outside 20..23, a major version other than 3, or a length over
    2^14 + 2048 (the TLS 1.2 bound, the largest either version allows)."""
    content_type, version, length = HEADER.unpack_from(header)
    if content_type not in _CONTENT_TYPES or version >> 8 != 3 or length > MAX_CIPHERTEXT_TLS12:
        return None
    return length


def read_record(sock: socket.socket) -> tuple[bytes, bool]:
    """One TLS record from ``sock`` (header and body) and not a byte more, and whether it is
    whole (False: EOF came first, or the header is not TLS, see :func:`record_length`)."""
    header = _recv_exactly(sock, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return header, False
    length = record_length(header)
    if length is None:
        return header, False  # not TLS (a plain-text request?): ssl raises a clear error at once
    body = _recv_exactly(sock, length)
    return header + body, len(body) == length


# --- the hand-off --------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Handoff:
    """The result of :func:`handshake`: ``tx`` and ``rx`` keys with the next sequence numbers,
    and the ssl object that did the handshake (for peer certificate, cipher, ALPN, session)."""

    ssl_object: ssl.SSLObject
    version: int
    cipher_suite: CipherSuite
    tx: TrafficKeys
    rx: TrafficKeys
    client_random: bytes
    server_random: bytes | None
    records_sent: int
    records_received: int
    incoming: ssl.MemoryBIO  # the BIO ssl reads from (for TicketFeed)

    def __repr__(self) -> str:
        return (
            f"Handoff(version=0x{self.version:04x}, cipher_suite={self.cipher_suite.name}, "
            f"tx_seq={self.tx.seq}, rx_seq={self.rx.seq})"
        )

    def ticket_feed(self) -> TicketFeed | None:
        """For a TLS 1.3 client, what hands the server's NewSessionTickets back to ssl (so that
        ``ssl_object.session`` becomes resumable); None otherwise."""
        if self.version != TLS_1_3_VERSION or self.ssl_object.server_side:
            return None
        return TicketFeed(self.ssl_object, self.incoming, self.rx)


class TicketFeed:
    """Gives a TLS 1.3 client's ssl object the NewSessionTickets the server sends after the
    handshake, which the kernel (or the record layer) opened in ssl's place.

    ssl keeps its own copy of the receive keys of the first generation, at sequence 0. Each
    ticket is sealed again under those keys and the next sequence number (with
    ``cryptography``, in userspace: a few hundred bytes per ticket), written to ssl's incoming
    BIO, and ``ssl_object.read()`` processes it and stores the session. KeyUpdates are not
    passed on: ssl's copy of the keys only has to agree with this feed. The feed is best
    effort: if ssl refuses a ticket, feeding stops and the connection goes on without
    resumption.
    """

    def __init__(self, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO, rx: TrafficKeys):
        self._ssl: ssl.SSLObject | None = ssl_object
        self._incoming = incoming
        self._layer = RecordLayer(tx=rx, backend="cryptography")

    def __repr__(self) -> str:
        return f"<TicketFeed {'stopped' if self._ssl is None else 'active'}>"

    def ticket(self, body: bytes) -> None:
        """Pass the body of one NewSessionTicket message to ssl."""
        if self._ssl is None:
            return
        message = handshake_message(HandshakeType.new_session_ticket, body)
        try:
            self._incoming.write(self._layer.seal(ContentType.handshake, message))
            self._ssl.read(1)
        except ssl.SSLWantReadError:
            return  # processed; there is no application data behind it
        except (ssl.SSLError, ValueError):
            pass
        self.close()  # ssl refused it (or returned data it never should): stop feeding

    def close(self) -> None:
        self._ssl = None
        self._layer.close()


@dataclass(frozen=True)
class Send:
    """A step of :meth:`Handshake.steps`: send all of ``data`` to the peer. With
    ``best_effort`` it is the alert of a failed handshake: send what the socket takes without
    waiting and ignore errors (the handshake's error follows when the driver resumes)."""

    data: bytes
    best_effort: bool = False


@dataclass(frozen=True, eq=False)
class Receive:
    """A step of :meth:`Handshake.steps`: read at most ``len(buffer)`` bytes from the peer into
    ``buffer`` and send the count back into the generator (0 at the end of the stream)."""

    buffer: memoryview


class Handshake:
    """ssl's handshake over MemoryBIOs, without I/O: the caller moves the bytes, in any event
    loop or blocking, and gets a :class:`Handoff` at the end. :meth:`steps` is the loop below
    as a generator of I/O steps, which the blocking :func:`handshake` and the asyncio driver
    (:mod:`afalg.aio`) both run.

    ::

        hs = Handshake(context, server_side=False, server_hostname="example.org")
        while True:
            transport.write(hs.data_to_send())     # ClientHello, Finished, alerts ...
            if hs.done:
                break
            data = transport.read(hs.bytes_wanted())  # at most this many bytes
            hs.receive(data) if data else hs.receive_eof()
        handoff = hs.result()

    :meth:`bytes_wanted` never asks past the record being read (first its 5-byte header, then
    its body), so a transport read with that bound stops at the end of the last handshake
    record: what follows is the kernel's (kTLS) or the record layer's to read. A handshake that
    fails raises what ssl raises from :meth:`receive`/:meth:`receive_eof`, with the alert ssl
    produced still in :meth:`data_to_send` (send it, best effort); one that is abandoned (a
    timeout, a cancelled task) must be :meth:`close`-d, which forgets its secrets.

    A client whose ``context.check_hostname`` is True needs ``server_hostname`` (else
    ``ValueError("check_hostname requires server_hostname")``, as ssl's ``wrap_socket``);
    ``server_hostname=""`` checks the chain and no name, on purpose (asyncio's convention),
    where ssl allows it: from Python 3.14 its ``wrap_bio`` refuses it too while
    ``check_hostname`` is on (the same ValueError), and so does asyncio.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        if not isinstance(context, ssl.SSLContext):
            raise TypeError(f"context must be an ssl.SSLContext, not {type(context).__name__}")
        # ssl's wrap_bio() checks no name when none is given, even with check_hostname: a
        # client would then accept any certificate the CAs signed. Refuse as wrap_socket()
        # does; "" is the caller saying so on purpose (asyncio's convention).
        if not server_side and context.check_hostname and server_hostname is None:
            raise ValueError("check_hostname requires server_hostname")
        self._keylog = keylog_for(context)
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side,
            server_hostname=server_hostname or None, session=session,
        )  # fmt: skip
        self._server_side = server_side
        self._sent, self._received = _Direction(), _Direction()
        self._hello_side = self._received if server_side else self._sent  # the ClientHello's
        self._client_random: bytes | None = None
        self._calls = 0  # do_handshake calls so far
        self._out = bytearray()  # to send
        self._record = bytearray()  # the incoming record read so far
        self._result: Handoff | None = None
        self._failed = False
        self._step()

    def __repr__(self) -> str:
        state = "done" if self.done else "failed" if self._failed else "running"
        side = "server" if self._server_side else "client"
        return f"<Handshake {side} {state}>"

    @property
    def done(self) -> bool:
        """The handshake is complete and :meth:`result` is ready (send :meth:`data_to_send`
        first: it may hold the last flight)."""
        return self._result is not None

    def data_to_send(self) -> bytes:
        """The bytes to send to the peer now (and forget); may be empty."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def bytes_wanted(self) -> int:
        """How many bytes to read next at most: the rest of the 5-byte record header, then the
        rest of the record body; 0 once done or failed."""
        if self._result is not None or self._failed:
            return 0
        if len(self._record) < HEADER_SIZE:
            return HEADER_SIZE - len(self._record)
        length = record_length(self._record)
        assert length is not None  # a bad header ended the handshake in receive()
        return HEADER_SIZE + length - len(self._record)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the peer: at most :meth:`bytes_wanted` (more would be the kernel's
        to read: ``ValueError``). Each completed record goes to ssl."""
        if len(data) > self.bytes_wanted():
            raise ValueError(
                f"{len(data)} bytes given, {self.bytes_wanted()} wanted: the handshake reads "
                "whole records and not a byte past them"
            )
        self._record += data
        if len(self._record) < HEADER_SIZE:
            return
        length = record_length(self._record)
        if length is None:  # not TLS (a plain-text request?): ssl raises a clear error at once
            self.receive_eof()
            return
        if len(self._record) == HEADER_SIZE + length:
            record = bytes(self._record)
            self._record.clear()
            self._received.add(record, self._calls)
            self._incoming.write(record)
            self._expect_client_random()  # before ssl logs the secrets of this ClientHello
            self._step()

    def receive_eof(self) -> None:
        """The peer closed (or sent something that is not TLS): ssl raises the matching error."""
        if self._result is not None or self._failed:
            return
        if self._record:
            self._incoming.write(bytes(self._record))
            self._record.clear()
        self._incoming.write_eof()
        self._step()

    def result(self) -> Handoff:
        """The keys and the ssl object, once :attr:`done`."""
        if self._result is None:
            raise ValueError("the handshake is not done")
        return self._result

    def steps(self) -> Generator[Send | Receive, int | None, Handoff]:
        """The handshake as I/O steps, for a driver that owns the socket::

            steps = hs.steps()
            n = None
            try:
                while True:
                    step = steps.send(n)              # StopIteration.value: the Handoff
                    n = None
                    if isinstance(step, Receive):
                        n = sock.recv_into(step.buffer)
                    else:                             # Send (best effort: see Send)
                        sock.sendall(step.data)
            finally:
                steps.close()                         # forgets an abandoned handshake

        Each :class:`Receive` asks :meth:`bytes_wanted` (never past the record being read).
        A failing handshake yields its alert as a best-effort :class:`Send`, then raises what
        ssl raised; closing the generator early (a timeout, a cancelled task) :meth:`close`-s
        the handshake."""
        buf = memoryview(bytearray(MAX_CIPHERTEXT_TLS12 + HEADER_SIZE))
        try:
            while True:
                data = self.data_to_send()
                if data:
                    yield Send(data)
                if self.done:
                    return self.result()
                view = buf[: self.bytes_wanted()]
                n = yield Receive(view)
                if n:
                    self.receive(view[:n])
                else:
                    self.receive_eof()
        except ssl.SSLError:
            alert = self.data_to_send()  # the alert ssl produced
            if alert:
                yield Send(alert, best_effort=True)
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Abandon an unfinished handshake: its secrets are forgotten. Idempotent."""
        if self._result is None and not self._failed:
            self._fail()

    def _fail(self) -> None:
        self._failed = True
        if self._client_random is not None:  # only a random this handshake expect()-ed
            self._keylog.discard(self._client_random, self._server_side)

    def _expect_client_random(self) -> None:
        """Register the ClientHello's random with the key log once it has gone by (the key log
        refuses a random already pending: this handshake then must not discard it)."""
        if self._client_random is None:
            random = self._hello_side.first_message_random(HandshakeType.client_hello)
            if random is not None:
                self._keylog.expect(random, self._server_side)
                self._client_random = random

    def _step(self) -> None:
        """One ``do_handshake`` call; its output is queued, and its end builds the result."""
        self._calls += 1
        try:
            self.ssl_object.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        except BaseException:
            self._out += self._outgoing.read()  # the alert ssl produced
            self._fail()
            raise
        data = self._outgoing.read()
        if data:
            self._sent.add(data, self._calls)
            self._out += data
        self._expect_client_random()
        if done:
            assert self._client_random is not None
            try:
                self._result = _finish(
                    self.ssl_object, self._incoming, self._keylog, self._client_random,
                    self._sent, self._received, self._calls, self._server_side,
                )  # fmt: skip
            except BaseException:
                self._failed = True
                raise
            finally:
                self._keylog.discard(self._client_random, self._server_side)


def check_arguments(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> None:
    """Refuse, before a byte is sent, what ``context.wrap_socket(sock, ...)`` refuses and a
    socket that cannot carry the handshake.

    ssl's rules (``ValueError``): ``server_hostname`` and ``session`` only in client mode;
    ``context.check_hostname`` requires a non-empty ``server_hostname``. ``sock`` must be a
    ``socket.socket`` not yet wrapped by ssl (``TypeError``: an :class:`ssl.SSLSocket` is
    already TLS), a stream (``ValueError``) and connected (``OSError`` ENOTCONN)."""
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if isinstance(sock, ssl.SSLSocket):
        raise TypeError(
            "sock is already a TLS socket (ssl.SSLSocket): pass the plain TCP socket, "
            "before ssl wraps it"
        )
    if not isinstance(context, ssl.SSLContext):
        raise TypeError(f"context must be an ssl.SSLContext, not {type(context).__name__}")
    if server_side:
        if server_hostname:
            raise ValueError("server_hostname can only be specified in client mode")
        if session is not None:
            raise ValueError("session can only be specified in client mode")
    if context.check_hostname and not server_hostname:
        raise ValueError("check_hostname requires server_hostname")
    if sock.type != socket.SOCK_STREAM:
        raise ValueError("the hand-off needs a SOCK_STREAM (TCP) socket")
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        raise OSError(
            errno.ENOTCONN,
            "sock is not connected: connect() it (or take it from accept()) first",
        ) from None


def handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_side: bool = False,
    server_hostname: str | None = None,
    session: ssl.SSLSession | None = None,
) -> Handoff:
    """Run :class:`Handshake` on the connected TCP socket ``sock``, blocking.

    The socket's timeout applies to each read and write, as in :mod:`ssl`; a non-blocking
    socket (timeout 0) is refused, set it non-blocking after the hand-off. Raises what ssl
    raises (:class:`ssl.SSLError`, :class:`ssl.SSLCertVerificationError`, ...), ``TimeoutError``,
    or :class:`afalg.errors.UnsupportedCipherSuite` when the negotiated suite is not AEAD.
    Nothing is read from ``sock`` past the last handshake record. Arguments are checked first
    (:func:`check_arguments`: ssl's rules, an unconnected socket, an :class:`ssl.SSLSocket`).
    """
    check_arguments(
        sock, context, server_side=server_side, server_hostname=server_hostname, session=session
    )
    if sock.gettimeout() == 0.0:
        raise ValueError(
            "the handshake needs a blocking socket or one with a timeout; "
            "make it non-blocking after wrap()"
        )
    hs = Handshake(
        context, server_side=server_side, server_hostname=server_hostname, session=session
    )
    steps = hs.steps()
    n: int | None = None
    try:
        while True:
            try:
                step = steps.send(n)
            except StopIteration as done:
                return done.value
            n = None
            if isinstance(step, Receive):
                n = sock.recv_into(step.buffer)
            elif step.best_effort:
                with contextlib.suppress(OSError):
                    sock.sendall(step.data)
            else:
                sock.sendall(step.data)
    finally:
        steps.close()


def _finish(
    obj: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    keylog: KeyLog,
    client_random: bytes,
    sent: _Direction,
    received: _Direction,
    last_call: int,
    server_side: bool,
) -> Handoff:
    version_name = obj.version()
    cipher = obj.cipher()
    if version_name not in _VERSIONS or cipher is None:
        raise UnsupportedCipherSuite(f"{version_name} {cipher and cipher[0]}")
    version = _VERSIONS[version_name]
    suite = suite_from_openssl_name(cipher[0])
    secrets = keylog.take(client_random, server_side)
    server_hello = (sent if server_side else received).first_message_random(
        HandshakeType.server_hello
    )

    if version == TLS_1_3_VERSION:
        # The peer's Finished was the last record ssl opened: nothing under the application
        # keys yet. A server sealed its NewSessionTickets in the call that completed the
        # handshake (its own Finished went out one flight earlier); a client's last record was
        # its Finished, under handshake keys.
        tx_seq = sent.in_call(last_call) if server_side else 0
        rx_seq = 0
        client_secret = _secret(secrets, "CLIENT_TRAFFIC_SECRET_0")
        server_secret = _secret(secrets, "SERVER_TRAFFIC_SECRET_0")
        client_keys = TrafficKeys.tls13(suite, client_secret)
        server_keys = TrafficKeys.tls13(suite, server_secret)
    else:
        tx_seq = sent.after_last_ccs()
        rx_seq = received.after_last_ccs()
        if server_hello is None:
            raise HandoffError("afalg: no ServerHello seen during the handshake")
        client_keys, server_keys = tls12_traffic_keys(
            suite, _secret(secrets, "CLIENT_RANDOM"), client_random, server_hello
        )
    tx, rx = (server_keys, client_keys) if server_side else (client_keys, server_keys)
    return Handoff(
        ssl_object=obj,
        version=version,
        cipher_suite=suite,
        tx=tx.with_seq(tx_seq),
        rx=rx.with_seq(rx_seq),
        client_random=client_random,
        server_random=server_hello,
        records_sent=len(sent.records),
        records_received=len(received.records),
        incoming=incoming,
    )


def _secret(secrets: dict[str, bytes], label: str) -> bytes:
    try:
        return secrets[label]
    except KeyError:
        raise HandoffError(
            f"afalg: OpenSSL did not log {label} for this connection (is another key log "
            "callback installed on the context?)",
        ) from None
