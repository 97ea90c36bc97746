"""The TLS session after the handshake, without I/O: what each opened record means, what to send.

Both afalg TLS sockets open records in a different place (the kernel under kTLS, the record layer
of :mod:`afalg.record` in algif mode) and give each one, as a content type and its plaintext,
to a :class:`Session`. The session answers with events and keeps the protocol state; the socket
does the I/O (and installs keys)::

    session = Session(TLS_1_3_VERSION)
    for event in session.receive(content_type, plaintext):
        ApplicationData      -> hand event.data to the caller
        CloseNotify          -> end of file
        AlertReceived        -> a warning alert (informational; fatal alerts raise)
        NewSessionTicket     -> give event.body to ssl (afalg.handoff.TicketFeed)
        HelloRequest         -> nothing (TLS 1.2; renegotiation is not offered)
        KeyUpdate            -> install the peer's next traffic keys before reading on
    session.receive_eof(suppress_ragged_eofs=...)    # the transport ended without close_notify

    # once the records read so far are handled (if no other thread is sending), and before each
    # application data write (RFC 8446 4.6.3, one reply for any number of requests):
    if session.key_update_due:
        send(handshake, session.key_update()); session.key_update_sent(); next send keys
    send(alert, session.close_notify())                # unless it returns None

What the session enforces on what it receives (every failure is a :class:`TLSProtocolError`
carrying the alert to send):

- RFC 8446 section 5.1: no other record between the records of one handshake message, no empty
  handshake record, a KeyUpdate ends its record (unexpected_message); a KeyUpdate announcing a
  length other than 1 is refused at its header (decode_error: a kTLS kernel that rekeys reads
  nothing more until new keys are installed, so the rest would never come).
- Post-handshake messages longer than :data:`MAX_POST_HANDSHAKE_MESSAGE` (OpenSSL's bound for a
  NewSessionTicket) are refused at their header (illegal_parameter), not buffered.
- Roles: a server (``server_side=True``) refuses the messages only a server sends, a
  NewSessionTicket or a HelloRequest (unexpected_message).
- TLS 1.3: NewSessionTicket and KeyUpdate (request_update 0 or 1, else illegal_parameter; a body
  of another length, decode_error) are taken; a CertificateRequest (post-handshake client
  authentication) cannot be answered once the keys left ssl (unexpected_message). TLS 1.2: a
  HelloRequest is ignored (RFC 5246 7.4.1.1; one with a body is a decode_error). Any other
  message or content type: unexpected_message.
- Alerts: close_notify is end of file; a TLS 1.2 warning or a user_canceled is reported and
  the connection goes on, but at most :data:`MAX_WARNING_ALERTS` - 1 of them in a row: the
  :data:`MAX_WARNING_ALERTS`-th is refused (unexpected_message), as OpenSSL does
  (``MAX_WARN_ALERT_COUNT``, ``SSL_R_TOO_MANY_WARN_ALERTS``); a non-empty record of another type
  starts the count again. Any other alert is fatal: :class:`TLSAlertReceived`. An alert
  record of another length than 2 is a decode_error.
- Floods: at most :data:`MAX_KEY_UPDATES` KeyUpdates (BoringSSL's bound) and at most
  :data:`MAX_EMPTY_RECORDS` empty application_data records (OpenSSL's) in a row; the next one
  is refused (unexpected_message). A non-empty application_data record starts both counts
  again.

The first error poisons the session, in one place (:meth:`Session.fail`, which
:meth:`~Session.receive` also goes through): from then on every call raises that same error, and
:meth:`~Session.fatal_alert` gives, once, the fatal alert the peer is owed (none after the
peer's own fatal alert, or after a ragged EOF).
"""

from __future__ import annotations

import errno
import functools
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from afalg._uapi import TLS_1_3_VERSION
from afalg.errors import KeyLimitReached, TLSAlertReceived, TLSError, TLSProtocolError
from afalg.wire import (
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeType,
    key_update_message,
)

__all__ = [
    "MAX_EMPTY_RECORDS",
    "MAX_KEY_UPDATES",
    "MAX_POST_HANDSHAKE_MESSAGE",
    "MAX_WARNING_ALERTS",
    "AlertReceived",
    "ApplicationData",
    "CloseNotify",
    "Event",
    "HelloRequest",
    "KeyUpdate",
    "NewSessionTicket",
    "Session",
]

# The longest post-handshake message accepted (OpenSSL's bound for a NewSessionTicket); a longer
# announced length is refused at its header instead of being buffered.
MAX_POST_HANDSHAKE_MESSAGE = 131338
# Warning alerts in a row that end the connection (OpenSSL's MAX_WARN_ALERT_COUNT): the
# MAX_WARNING_ALERTS-th consecutive one is refused with unexpected_message.
MAX_WARNING_ALERTS = 5
# KeyUpdates in a row accepted (BoringSSL's kMaxKeyUpdates): each costs new keys (a new AF_ALG
# socket with the kernel backend), so the next one, with no application data between, is refused
# with unexpected_message.
MAX_KEY_UPDATES = 32
# Empty application_data records in a row accepted (OpenSSL's MAX_EMPTY_RECORDS): they carry
# nothing, and a stream of them would keep recv() from returning; the next one is refused with
# unexpected_message.
MAX_EMPTY_RECORDS = 32


# --- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ApplicationData:
    """The plaintext of an application_data record, never empty.

    ``data`` is the object given to :meth:`Session.receive`, not a copy."""

    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class CloseNotify:
    """The peer's close_notify: end of file (it may still read what we send)."""


@dataclass(frozen=True, slots=True)
class AlertReceived:
    """A non-fatal alert (a TLS 1.2 warning, or user_canceled); the connection goes on."""

    level: int
    description: AlertDescription | int


@dataclass(frozen=True, slots=True)
class NewSessionTicket:
    """A TLS 1.3 NewSessionTicket; ``body`` is the message without its 4-byte header."""

    body: bytes


@dataclass(frozen=True, slots=True)
class HelloRequest:
    """A TLS 1.2 HelloRequest: ignored (renegotiation is not offered; RFC 5246 7.4.1.1)."""


@dataclass(frozen=True, slots=True)
class KeyUpdate:
    """The peer moved to its next traffic secret: the records after this one are under it.

    ``update_requested``: it asked for ours too; :attr:`Session.key_update_due` is then set until
    our KeyUpdate is out."""

    update_requested: bool


Event = ApplicationData | CloseNotify | AlertReceived | NewSessionTicket | HelloRequest | KeyUpdate

_F = TypeVar("_F", bound=Callable[..., Any])


def _poisoning(method: _F) -> _F:
    """Run ``method`` unless the session is poisoned (then raise its error).

    Any exception it raises poisons the session (:meth:`Session.fail`) and is raised. h11's pattern:
    one place for the error state instead of a check at every ``raise``."""

    @functools.wraps(method)
    def guarded(self: Session, *args: Any, **kwargs: Any) -> Any:
        if self._error is not None:
            raise self._error
        try:
            return method(self, *args, **kwargs)
        except TLSProtocolError as exc:  # ours: the peer is owed the alert
            self.fail(exc, exc.alert)
            raise
        except (TLSError, ssl.SSLEOFError) as exc:  # the peer's fatal alert, a ragged EOF
            self.fail(exc)
            raise
        except Exception as exc:  # a bug: the state is unknown, the connection cannot go on
            self.fail(exc, AlertDescription.internal_error)
            raise

    return cast(_F, guarded)


class Session:
    """The post-handshake protocol state of one TLS connection (TLS 1.2 or 1.3), no I/O.

    ``version`` is ``0x0303`` or ``0x0304``; ``server_side`` our role (True: server, False:
    client, None: unknown, and the messages only one side may send are taken from either). See
    the module docstring for the events, the rules and what to send. One thread may receive
    while another sends (the sending side only reads what the receiving side sets, and each
    attribute change is atomic; failing and the alerts are under a lock).
    """

    def __init__(self, version: int, *, server_side: bool | None = None) -> None:
        if not isinstance(version, int) or version not in (0x0303, TLS_1_3_VERSION):
            raise ValueError(f"version must be 0x0303 or 0x0304, not {version!r}")
        if server_side is not None and not isinstance(server_side, bool):
            raise TypeError(f"server_side must be a bool or None, not {server_side!r}")
        self._version = version
        self._server_side = server_side
        self._tls13 = version == TLS_1_3_VERSION
        self._hs_buf = bytearray()  # a post-handshake message spread over records
        self._warnings = 0  # warning alerts in a row
        self._key_updates = 0  # KeyUpdates since the last non-empty application_data record
        self._empty_records = 0  # empty application_data records since the last non-empty one
        self._eof = False  # close_notify received (or a suppressed ragged EOF)
        self._sending_closed = False  # close_notify (or a fatal alert) sent or due
        self._key_update_due = False  # the peer asked for our KeyUpdate
        # Our send key came from our own KeyUpdate and has sealed no application data since:
        # a request read now is answered by that update already (RFC 8446 4.6.3: a silent
        # receiver of several requests answers with a single update).
        self._tx_key_unused = False
        self._error: BaseException | None = None
        self._alert_owed: int | None = None  # the fatal alert the peer is owed
        # fail(), fatal_alert() and close_notify() may run in two threads at once (a receiver
        # failing while a sender fails or shuts down): each test-and-set is one step, so the
        # first error stays and one alert at most goes out.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "poisoned" if self._error is not None else "eof" if self._eof else "open"
        return f"<Session TLS {'1.3' if self._tls13 else '1.2'} {state}>"

    # -- state --
    @property
    def version(self) -> int:
        return self._version

    @property
    def server_side(self) -> bool | None:
        """Our role: True (server), False (client) or None (not known: no role rule applies)."""
        return self._server_side

    @property
    def error(self) -> BaseException | None:
        """The error that poisoned the session, or None."""
        return self._error

    @property
    def eof(self) -> bool:
        """close_notify received, or the transport ended (ragged EOF, suppressed)."""
        return self._eof

    @property
    def sending_closed(self) -> bool:
        """Nothing more is to be sent.

        Our close_notify (or a fatal alert) went out, or the peer sent a fatal alert."""
        return self._sending_closed or self._error is not None

    @property
    def key_update_due(self) -> bool:
        """The peer asked for our KeyUpdate (update_requested), not sent yet.

        Send :meth:`key_update` before the next application data record (RFC 8446 4.6.3). However
        many requests come while we are silent, one KeyUpdate answers them all."""
        return self._key_update_due

    @property
    def quiet(self) -> bool:
        """Whether only application data is going on, nothing else to attend to.

        Not poisoned, not ended, no KeyUpdate of ours due, no handshake message half received.
        A socket's one-read path asks this once before a read; what the read brings still goes
        through :meth:`application_data` (or :meth:`receive`)."""
        return (
            self._error is None and not self._eof and not self._key_update_due and not self._hs_buf
        )

    @property
    def buffered_handshake_bytes(self) -> int:
        """Bytes of a post-handshake message whose remaining records have not come yet."""
        return len(self._hs_buf)

    # -- receiving --
    @_poisoning
    def receive(self, content_type: int, payload: bytes | bytearray | memoryview) -> list[Event]:
        """The events of one opened record.

        Raises :class:`TLSProtocolError` (the session is then poisoned and :meth:`fatal_alert` says
        what to send) or :class:`TLSAlertReceived` (the peer's fatal alert)."""
        if content_type != ContentType.alert and len(payload):
            self._warnings = 0  # a non-empty record of another type: a new run of warnings
        if self._hs_buf and content_type != ContentType.handshake:
            raise TLSProtocolError(
                AlertDescription.unexpected_message,
                f"record of content type {content_type} inside a fragmented handshake message",
            )
        if content_type == ContentType.application_data:
            return self._application_data(payload)
        if content_type == ContentType.alert:
            return self._alert(bytes(payload))
        if content_type == ContentType.handshake:
            return self._handshake_record(bytes(payload))
        raise TLSProtocolError(
            AlertDescription.unexpected_message,
            f"unexpected record of content type {content_type} after the handshake",
        )

    def application_data(self, length: int) -> bool:
        """:meth:`receive` of an application_data record of ``length`` bytes, without an event.

        For a socket that has the plaintext where the caller wants it already: True when it carries
        data, False for an empty record (read on). The same rules, errors and poisoning as
        :meth:`receive`; the common case (data, no handshake message pending) is one test."""
        if length and self._error is None and not self._hs_buf:
            self._warnings = self._key_updates = self._empty_records = 0
            return True
        return self._application_data_checked(length)

    @_poisoning
    def _application_data_checked(self, length: int) -> bool:
        """:meth:`application_data` where the one test failed.

        That is: poisoned, a handshake message pending, or an empty record."""
        if self._hs_buf:
            raise TLSProtocolError(
                AlertDescription.unexpected_message,
                f"record of content type {ContentType.application_data} inside a fragmented "
                "handshake message",
            )
        if length:  # not reached: the fast path takes it
            self._warnings = self._key_updates = self._empty_records = 0
            return True
        return bool(self._application_data(b""))

    def _application_data(self, payload: bytes | bytearray | memoryview) -> list[Event]:
        if len(payload):
            self._key_updates = self._empty_records = 0  # data: the peer is not just flooding
            return [ApplicationData(payload)]
        self._empty_records += 1
        if self._empty_records > MAX_EMPTY_RECORDS:
            raise TLSProtocolError(
                AlertDescription.unexpected_message,
                f"{self._empty_records} empty application_data records in a row",
            )
        return []

    @_poisoning
    def receive_eof(self, *, suppress_ragged_eofs: bool = True) -> None:
        """The transport ended without close_notify.

        End of file if ``suppress_ragged_eofs`` (as ssl), else :class:`ssl.SSLEOFError` (and the
        session is poisoned, no alert owed)."""
        self._eof = True
        if not suppress_ragged_eofs:
            raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, "EOF occurred in violation of protocol")

    def _alert(self, payload: bytes) -> list[Event]:
        if len(payload) != 2:
            raise TLSProtocolError(AlertDescription.decode_error, "alert record of bad length")
        level, description = payload
        if description == AlertDescription.close_notify:
            self._eof = True
            return [CloseNotify()]
        if description == AlertDescription.user_canceled or (
            level == AlertLevel.warning and not self._tls13
        ):
            self._warnings += 1  # a warning: carry on (a close_notify follows user_canceled)
            if self._warnings >= MAX_WARNING_ALERTS:
                raise TLSProtocolError(
                    AlertDescription.unexpected_message,
                    f"{self._warnings} warning alerts in a row",
                )
            return [AlertReceived(level, _description(description))]
        raise TLSAlertReceived(description, level)

    def _handshake_record(self, payload: bytes) -> list[Event]:
        """The complete post-handshake messages of the buffered handshake bytes, as events."""
        if not payload:
            raise TLSProtocolError(AlertDescription.unexpected_message, "empty handshake record")
        self._hs_buf += payload
        messages = _take_messages(self._hs_buf)
        if len(self._hs_buf) >= 4:
            length = int.from_bytes(self._hs_buf[1:4], "big")
            if self._hs_buf[0] == HandshakeType.key_update and length != 1 and self._tls13:
                raise TLSProtocolError(
                    AlertDescription.decode_error, f"KeyUpdate of {length} bytes (not 1)"
                )
            if length > MAX_POST_HANDSHAKE_MESSAGE:
                raise TLSProtocolError(
                    AlertDescription.illegal_parameter,
                    f"post-handshake message of {length} bytes is too long",
                )
        events: list[Event] = []
        for i, (msg_type, body) in enumerate(messages):
            if msg_type == HandshakeType.key_update and (i < len(messages) - 1 or self._hs_buf):
                raise TLSProtocolError(
                    AlertDescription.unexpected_message, "data after a KeyUpdate in its record"
                )
            events.append(self._handshake_message(msg_type, body))
        return events

    def _handshake_message(self, msg_type: int, body: bytes) -> Event:
        if self._server_side and msg_type in _SERVER_ONLY:
            raise TLSProtocolError(
                AlertDescription.unexpected_message,
                f"a {_SERVER_ONLY[msg_type]} from the client (only a server sends one)",
            )
        if msg_type == HandshakeType.new_session_ticket and self._tls13:
            return NewSessionTicket(body)
        if msg_type == HandshakeType.hello_request and not self._tls13:
            if body:  # struct {} HelloRequest (RFC 5246 7.4.1.1); OpenSSL: LENGTH_MISMATCH
                raise TLSProtocolError(AlertDescription.decode_error, "HelloRequest with a body")
            return HelloRequest()
        if msg_type == HandshakeType.key_update and self._tls13:
            if len(body) != 1 or body[0] > 1:  # RFC 8446 4.6.3: update_not_requested(0) or 1
                alert = (
                    AlertDescription.decode_error
                    if len(body) != 1
                    else AlertDescription.illegal_parameter
                )
                raise TLSProtocolError(alert, "malformed KeyUpdate")
            self._key_updates += 1
            if self._key_updates > MAX_KEY_UPDATES:
                raise TLSProtocolError(
                    AlertDescription.unexpected_message,
                    f"{self._key_updates} KeyUpdates without application data between",
                )
            requested = body[0] == 1
            if requested and not self.sending_closed and not self._tx_key_unused:
                self._key_update_due = True
            return KeyUpdate(requested)
        if msg_type == HandshakeType.certificate_request and self._tls13:
            raise TLSProtocolError(
                AlertDescription.unexpected_message,
                "post-handshake client authentication (a CertificateRequest after the "
                "handshake) cannot be answered once the keys left ssl; leave "
                "post_handshake_auth off on the client context",
            )
        raise TLSProtocolError(
            AlertDescription.unexpected_message,
            f"unexpected post-handshake message (HandshakeType {msg_type})",
        )

    # -- sending --
    def check_send(self) -> None:
        """Raise unless application data may be sent.

        Raises the poisoning error, or :class:`BrokenPipeError` after our close_notify."""
        if self._error is not None:
            raise self._error
        if self._sending_closed:
            raise BrokenPipeError(
                errno.EPIPE,
                "this connection's sending side is shut down (close_notify sent or due)",
            )

    def sending_data(self) -> None:
        """:meth:`check_send`, called under the send lock just before application data is sealed.

        From then on the send key counts as used, so the peer's next KeyUpdate request is owed an
        answer of its own."""
        if self._error is not None or self._sending_closed:
            self.check_send()  # raises
        self._tx_key_unused = False

    def records_to_seal(
        self,
        records_left: int,
        records_per_key: int,
        *,
        at_least: int = 1,
        cannot_update: str | None = None,
    ) -> int:
        """How many application_data records the current send key may still seal.

        ``records_left`` is what is left of the key's ``records_per_key``, counted by whoever
        seals (the record layer in algif mode, the kernel's TX sequence number under kTLS). The
        key's last record is kept: for our KeyUpdate (TLS 1.3) or for close_notify (TLS 1.2).
        Returns that room when it is at least ``at_least`` (a socket that may close a record
        left open asks for more), else 0: send :meth:`key_update` first, then ask again. Raises
        :class:`~afalg.errors.KeyLimitReached`, nothing changed, where no KeyUpdate can go:
        TLS 1.2, or ``cannot_update`` (the socket's reason it cannot send one)."""
        room = records_left - 1
        if room >= at_least:
            return room
        if not self._tls13:
            raise KeyLimitReached(
                f"the TLS 1.2 send key may seal {records_per_key} records and has "
                f"{max(records_left, 0)} left, kept for close_notify; TLS 1.2 cannot update "
                "keys: nothing was sent, close this connection and open a new one"
            )
        if cannot_update is not None:
            raise KeyLimitReached(f"{cannot_update}; nothing was sent")
        return 0

    def key_update(self, *, request_peer: bool = False) -> bytes:
        """The KeyUpdate message to send now, in a handshake record under the current send keys.

        ``request_peer``: update_requested. Nothing changes until :meth:`key_update_sent`. Raises
        :class:`ValueError` in TLS 1.2."""
        if not self._tls13:
            raise ValueError("KeyUpdate exists in TLS 1.3 only")
        self.check_send()
        return key_update_message(request_peer)

    def key_update_answer(self) -> bytes | None:
        """The KeyUpdate (update_not_requested) that answers the peer's requests, if due; else None.

        None too when it may no longer be sent. Send it under the current keys, then call
        :meth:`key_update_sent`: before the next application data record at the latest, or as soon
        as the records read so far are handled if no other thread is sending (one answer for all the
        requests read meanwhile, RFC 8446 4.6.3). A request read while our send key is one our
        KeyUpdate installed and no data was sealed since owes no answer: that update answers it (the
        silent receiver's single update)."""
        if not self._key_update_due or self.sending_closed:
            return None
        return key_update_message(False)

    def key_update_sent(self) -> None:
        """Our KeyUpdate is out (the next send keys take over): it answers any request."""
        self._key_update_due = False
        self._tx_key_unused = True

    def close_notify(self) -> bytes | None:
        """The close_notify alert to send (its two bytes), once.

        None when it was sent already or the session is poisoned. From now on no application data
        may be sent."""
        with self._lock:
            if self._sending_closed or self._error is not None:
                return None
            self._sending_closed = True
        return bytes([AlertLevel.warning, AlertDescription.close_notify])

    # -- errors --
    def fail(self, exc: BaseException, alert: int | None = None) -> BaseException:
        """Poison the session with ``exc``, owing the peer the fatal ``alert`` if one is given.

        ``exc`` is an error found by the socket: a record that failed authentication, a kernel
        refusal... The first error stays: it is what this returns, and what every later call raises.
        Thread-safe: of two threads failing at once, one error and one alert win."""
        with self._lock:
            if self._error is None:
                self._error = exc
                self._key_update_due = False
                if alert is not None:
                    self._alert_owed = int(alert)
                if alert is not None or isinstance(exc, TLSAlertReceived):
                    self._sending_closed = True  # a fatal alert ends our side too
            return self._error

    def fatal_alert(self) -> bytes | None:
        """The fatal alert the peer is owed (its two bytes) once; None if there is none.

        One caller of any number of threads gets it."""
        with self._lock:
            alert, self._alert_owed = self._alert_owed, None
        return None if alert is None else bytes([AlertLevel.fatal, alert])


# Post-handshake messages that only a server sends (RFC 8446 4.6.1, RFC 5246 7.4.1.1); a server
# that receives one answers unexpected_message.
_SERVER_ONLY: dict[int, str] = {
    HandshakeType.new_session_ticket: "NewSessionTicket",
    HandshakeType.hello_request: "HelloRequest",
}


def _description(value: int) -> AlertDescription | int:
    try:
        return AlertDescription(value)
    except ValueError:
        return value


def _take_messages(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take the complete handshake messages out of ``buffer``: (msg_type, body)."""
    out = []
    while len(buffer) >= 4:
        msg_type = buffer[0]
        length = int.from_bytes(buffer[1:4], "big")
        if len(buffer) < 4 + length:
            break
        out.append((msg_type, bytes(buffer[4 : 4 + length])))
        del buffer[: 4 + length]
    return out
