"""TLS wire facts, pure: content types, handshake types, alerts, record header, size limits.

Their one home, used by the hand-off, the record layer and the session.

Record header (RFC 8446 section 5.1, RFC 5246 section 6.2.1), 5 bytes, big-endian::

    content_type(1) || legacy_record_version(2) || length(2)

Handshake message (RFC 8446 section 4)::

    msg_type(1) || length(3) || body(length)

Alert (RFC 8446 section 6): ``level(1) || description(1)``.
"""

from __future__ import annotations

import struct
from enum import IntEnum

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "MAX_CIPHERTEXT_TLS12",
    "MAX_CIPHERTEXT_TLS13",
    "MAX_PLAINTEXT",
    "AlertDescription",
    "AlertLevel",
    "ContentType",
    "HandshakeType",
    "alert_name",
    "handshake_message",
    "key_update_message",
]

HEADER = struct.Struct("!BHH")
"""The record header: content_type, legacy_record_version, length."""
HEADER_SIZE = HEADER.size
MAX_PLAINTEXT = 2**14
"""Largest plaintext fragment of one record (RFC 8446 5.1, RFC 5246 6.2.1)."""
MAX_CIPHERTEXT_TLS13 = 2**14 + 256
"""Largest TLSCiphertext.length in TLS 1.3 (RFC 8446 5.2)."""
MAX_CIPHERTEXT_TLS12 = 2**14 + 2048
"""Largest TLSCiphertext.length in TLS 1.2 (RFC 5246 6.2.3), the bound for either version
before the version is known."""


class ContentType(IntEnum):
    """TLS ContentType (RFC 8446 section 5.1)."""

    change_cipher_spec = 20
    alert = 21
    handshake = 22
    application_data = 23


class HandshakeType(IntEnum):
    """The HandshakeType values afalg looks at (RFC 8446 section 4, RFC 5246 section 7.4)."""

    hello_request = 0
    client_hello = 1
    server_hello = 2
    new_session_ticket = 4
    certificate_request = 13
    key_update = 24


class AlertLevel(IntEnum):
    """AlertLevel (RFC 8446 section 6)."""

    warning = 1
    fatal = 2


class AlertDescription(IntEnum):
    """TLS AlertDescription (RFC 8446 section 6, RFC 5246 section 7.2)."""

    close_notify = 0
    unexpected_message = 10
    bad_record_mac = 20
    decryption_failed_RESERVED = 21
    record_overflow = 22
    decompression_failure_RESERVED = 30
    handshake_failure = 40
    no_certificate_RESERVED = 41
    bad_certificate = 42
    unsupported_certificate = 43
    certificate_revoked = 44
    certificate_expired = 45
    certificate_unknown = 46
    illegal_parameter = 47
    unknown_ca = 48
    access_denied = 49
    decode_error = 50
    decrypt_error = 51
    export_restriction_RESERVED = 60
    protocol_version = 70
    insufficient_security = 71
    internal_error = 80
    inappropriate_fallback = 86
    user_canceled = 90
    no_renegotiation_RESERVED = 100
    missing_extension = 109
    unsupported_extension = 110
    certificate_unobtainable_RESERVED = 111
    unrecognized_name = 112
    bad_certificate_status_response = 113
    bad_certificate_hash_value_RESERVED = 114
    unknown_psk_identity = 115
    certificate_required = 116
    no_application_protocol = 120


def alert_name(value: int) -> AlertDescription | int:
    """``value`` as an :class:`AlertDescription` where it names one, else the int."""
    try:
        return AlertDescription(value)
    except ValueError:
        return value


def handshake_message(msg_type: int, body: bytes) -> bytes:
    """A handshake message: msg_type (1 byte), length (3 bytes, big-endian), body."""
    return bytes([msg_type]) + len(body).to_bytes(3, "big") + body


def key_update_message(update_requested: bool) -> bytes:
    """Return a KeyUpdate handshake message (RFC 8446 section 4.6.3).

    Its body is request_update: 1 (update_requested) or 0."""
    return handshake_message(HandshakeType.key_update, bytes([1 if update_requested else 0]))
