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
import errno
import socket
import ssl
from collections.abc import Generator
from dataclasses import dataclass

from afalg._bio_records import _Direction, record_length
from afalg._bio_records import read_record as read_record
from afalg._keylog import KeyLog, keylog_for
from afalg.errors import AlreadyWrapped, HandoffError, UnsupportedCipherSuite
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
    HEADER_SIZE,
    MAX_CIPHERTEXT_TLS12,
    ContentType,
    HandshakeType,
    handshake_message,
)

__all__ = [
    "Handoff",
    "Handshake",
    "KeyLog",
    "Receive",
    "Send",
    "TicketFeed",
    "check_arguments",
    "handshake",
    "keylog_for",
]

# The key log's code is afalg._keylog's; it is documented here, where users import it from.
KeyLog.__module__ = keylog_for.__module__ = __name__

_VERSIONS = {"TLSv1.2": TLS_1_2_VERSION, "TLSv1.3": TLS_1_3_VERSION}


# --- the hand-off --------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Handoff:
    """The result of :func:`handshake`: the keys of both directions and ssl's object.

    ``tx`` and ``rx`` keys carry the next sequence numbers; ``ssl_object`` is the ssl object that
    did the handshake (for peer certificate, cipher, ALPN, session)."""

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
        """What hands the server's NewSessionTickets back to ssl, for a TLS 1.3 client; else None.

        With it ``ssl_object.session`` becomes resumable."""
        if self.version != TLS_1_3_VERSION or self.ssl_object.server_side:
            return None
        return TicketFeed(self.ssl_object, self.incoming, self.rx)


class TicketFeed:
    """Gives a TLS 1.3 client's ssl object the server's NewSessionTickets, after the handshake.

    The kernel (or the record layer) opened them in ssl's place.

    ssl keeps its own copy of the receive keys of the first generation, at sequence 0. Each ticket
    is sealed again under those keys and the next sequence number (with ``cryptography``, in
    userspace: a few hundred bytes per ticket), written to ssl's incoming BIO, and
    ``ssl_object.read()`` processes it and stores the session. KeyUpdates are not passed on: ssl's
    copy of the keys only has to agree with this feed. The feed is best effort: if ssl refuses a
    ticket, feeding stops and the connection goes on without resumption."""

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
    """A step of :meth:`Handshake.steps`: send all of ``data`` to the peer.

    With ``best_effort`` it is the alert of a failed handshake: send what the socket takes without
    waiting and ignore errors (the handshake's error follows when the driver resumes)."""

    data: bytes
    best_effort: bool = False


@dataclass(frozen=True, eq=False)
class Receive:
    """A step of :meth:`Handshake.steps`: read at most ``len(buffer)`` bytes into ``buffer``.

    The bytes come from the peer; send the count back into the generator (0 at the end of the
    stream)."""

    buffer: memoryview


class Handshake:
    """ssl's handshake over MemoryBIOs, without I/O: the caller moves the bytes, and gets a Handoff.

    The caller runs it in any event loop or blocking, and gets a :class:`Handoff` at the end.
    :meth:`steps` is the loop below as a generator of I/O steps, which the blocking
    :func:`handshake` and the asyncio driver (:mod:`afalg.aio`) both run.

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
    ``server_hostname=""`` checks the chain and no name, on purpose (asyncio's convention), where
    ssl allows it: from Python 3.14 its ``wrap_bio`` refuses it too while ``check_hostname`` is on
    (the same ValueError), and so does asyncio."""

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
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname or None,
            session=session,
        )
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
        """The handshake is complete and :meth:`result` is ready.

        Send :meth:`data_to_send` first: it may hold the last flight."""
        return self._result is not None

    def data_to_send(self) -> bytes:
        """The bytes to send to the peer now (and forget); may be empty."""
        data = bytes(self._out)
        self._out.clear()
        return data

    def bytes_wanted(self) -> int:
        """How many bytes to read next at most; 0 once done or failed.

        The rest of the 5-byte record header, then the rest of the record body."""
        if self._result is not None or self._failed:
            return 0
        if len(self._record) < HEADER_SIZE:
            return HEADER_SIZE - len(self._record)
        length = record_length(self._record)
        assert length is not None  # a bad header ended the handshake in receive()
        return HEADER_SIZE + length - len(self._record)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes read from the peer, at most :meth:`bytes_wanted`; whole records go to ssl.

        More would be the kernel's to read: ``ValueError``."""
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
        """Register the ClientHello's random with the key log once it has gone by.

        The key log refuses a random already pending: this handshake then must not discard it."""
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
                    self.ssl_object,
                    self._incoming,
                    self._keylog,
                    self._client_random,
                    self._sent,
                    self._received,
                    self._calls,
                    self._server_side,
                )
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
    """Refuse what ``context.wrap_socket(sock, ...)`` refuses, and a socket unfit for handshakes.

    Checked before a byte is sent. ssl's rules (``ValueError``): ``server_hostname``
    and ``session`` only in client mode; ``context.check_hostname`` requires a non-empty
    ``server_hostname``. ``sock`` must be a ``socket.socket`` (``TypeError``) not yet wrapped by ssl
    (an :class:`ssl.SSLSocket` is already TLS: :class:`afalg.errors.AlreadyWrapped`, a ``TypeError``
    and an :class:`ssl.SSLError`), a stream (``ValueError``) and connected (``OSError`` ENOTCONN).
    """
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if isinstance(sock, ssl.SSLSocket):
        raise AlreadyWrapped("ssl.SSLSocket")
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
    _check_blocking(sock)
    hs = Handshake(
        context, server_side=server_side, server_hostname=server_hostname, session=session
    )
    return _drive(sock, hs)


def _check_blocking(sock: socket.socket) -> None:
    """The blocking handshake refuses a non-blocking socket (``ValueError``)."""
    if sock.gettimeout() == 0.0:
        raise ValueError(
            "the handshake needs a blocking socket or one with a timeout; "
            "make it non-blocking after wrap()"
        )


def _drive(sock: socket.socket, hs: Handshake) -> Handoff:
    """Run ``hs``'s :meth:`Handshake.steps` on the connected, blocking ``sock``; return its Handoff.

    afalg's blocking driver, shared with :class:`afalg.tls.SSLContext`, which keeps ``hs`` to carry
    a suite afalg cannot seal on in userspace. A socket timeout raises ssl's ``TimeoutError("The
    handshake operation timed out")``."""
    steps = hs.steps()
    n: int | None = None
    try:
        while True:
            try:
                step = steps.send(n)
            except StopIteration as done:
                return done.value
            n = None
            try:
                if isinstance(step, Receive):
                    n = sock.recv_into(step.buffer)
                elif step.best_effort:
                    with contextlib.suppress(OSError):
                        sock.sendall(step.data)
                else:
                    sock.sendall(step.data)
            except TimeoutError:
                # ssl's words for the same event (SSLSocket.do_handshake on a socket timeout)
                raise TimeoutError("The handshake operation timed out") from None
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
