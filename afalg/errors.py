"""One exception tree for afalg.

``AlgError`` (an :class:`OSError`, errno kept) covers AF_ALG; ``TLSError`` (an
:class:`ssl.SSLError`, itself an ``OSError``) covers the TLS layers and carries the alert that
describes the failure.
"""

from __future__ import annotations

import errno
import ssl
from enum import IntEnum

__all__ = [
    "AlertDescription",
    "AlgError",
    "AlgorithmNotAvailable",
    "InvalidTag",
    "KTLSError",
    "KeyUpdateUnsupported",
    "PaddingError",
    "TLSAlertReceived",
    "TLSError",
    "TLSProtocolError",
]


class AlgError(OSError):
    """An AF_ALG operation failed; ``errno`` is the kernel's."""


class AlgorithmNotAvailable(AlgError):
    """The kernel has no such algorithm (``bind()`` gave ENOENT), AF_ALG itself is missing, or
    policy refuses it. ``af_alg_restrict`` is the value of the sysctl
    ``crypto.af_alg_restrict`` (Linux 7.3+) when the refusal comes from it (1: the algorithm is
    not on AF_ALG's allowlist; 2: AF_ALG is disabled), else None; the message then names the
    remedies (the sysctl at 0, the ``cryptography`` backend, kTLS)."""

    def __init__(
        self, code: int | None, message: str, *, af_alg_restrict: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.af_alg_restrict = af_alg_restrict


class InvalidTag(AlgError):
    """Authentication failed: EBADMSG from the kernel, a failed verify, or input shorter than
    the tag. No plaintext is ever returned with this error."""

    def __init__(self, message: str = "authentication tag mismatch") -> None:
        super().__init__(errno.EBADMSG, message)


class PaddingError(AlgError, ValueError):
    """PKCS#7 padding of a decrypted message is malformed."""

    def __init__(self, message: str = "invalid PKCS#7 padding") -> None:
        super().__init__(errno.EBADMSG, message)


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


def _alert(value: int) -> AlertDescription | int:
    try:
        return AlertDescription(value)
    except ValueError:
        return value


class TLSError(ssl.SSLError):
    """Base of afalg's TLS errors. ``alert`` is the AlertDescription that describes it."""

    def __init__(self, alert: int, message: str) -> None:
        self.alert = _alert(alert)
        name = getattr(self.alert, "name", str(int(alert)))
        super().__init__(errno.EPROTO, f"{message} ({name})")
        self.reason = name.upper()


class TLSProtocolError(TLSError):
    """We detected a protocol or integrity failure; ``alert`` is what we send the peer
    (bad_record_mac, record_overflow, decode_error, unexpected_message, ...)."""


class TLSAlertReceived(TLSError):
    """The peer sent a fatal alert (``alert`` names it)."""

    def __init__(self, alert: int, level: int = 2) -> None:
        self.level = level
        super().__init__(alert, "peer sent alert")


class KTLSError(OSError):
    """Kernel TLS could not be set up on a socket (``TCP_ULP`` or ``TLS_TX``/``TLS_RX`` refused);
    ``errno`` is the kernel's and the message says what to do."""


class KeyUpdateUnsupported(TLSProtocolError):
    """The peer sent a TLS 1.3 KeyUpdate but this kernel cannot install new kTLS keys on a live
    socket (rekeying came in Linux 6.14); the connection cannot continue in kTLS mode."""
