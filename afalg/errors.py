"""One exception tree for afalg: every afalg-specific error is an :class:`AfalgError`.

::

    AfalgError
    ├── AlgError (OSError, the kernel's errno)        AF_ALG refused or failed
    │   ├── AlgorithmNotAvailable                        no such algorithm, or policy refuses it
    │   ├── InvalidTag                                   authentication failed (EBADMSG)
    │   └── PaddingError (also ValueError)               malformed PKCS#7 padding
    ├── KTLSError (OSError, the kernel's errno)       kernel TLS could not be set up
    ├── TLSError (ssl.SSLError)                       the TLS connection failed; ``alert``
    │   ├── TLSProtocolError                             we detected it (the alert we send)
    │   │   └── KeyUpdateUnsupported                     kTLS cannot rekey on this kernel
    │   ├── TLSAlertReceived                             the peer's fatal alert
    │   ├── KeyLimitReached                              a key sealed all the records it may
    │   └── HandoffError                                 the keys could not leave ssl
    ├── WantRead, WantWrite (ssl.SSLWantReadError/SSLWantWriteError and BlockingIOError)
    │                                                  a non-blocking socket must wait
    ├── UnsupportedCipherSuite (also ValueError)      no kernel record protection for the suite
    ├── AlreadyWrapped (ssl.SSLError, also TypeError)  the socket given is already TLS
    └── ClosedError (OSError EBADF, also ValueError)  any afalg object used after close()

Argument errors stay :class:`TypeError`/:class:`ValueError`; I/O conditions stay the standard
ones (:class:`TimeoutError`, :class:`BlockingIOError`, :class:`BrokenPipeError`, ...); ssl's own
handshake exceptions (:class:`ssl.SSLCertVerificationError`, ...) pass through unwrapped.
"""

from __future__ import annotations

import errno
import ssl

from afalg.wire import AlertDescription, alert_name

__all__ = [
    "AfalgError",
    "AlertDescription",
    "AlgError",
    "AlgorithmNotAvailable",
    "AlreadyWrapped",
    "ClosedError",
    "HandoffError",
    "InvalidTag",
    "KTLSError",
    "KeyLimitReached",
    "KeyUpdateUnsupported",
    "PaddingError",
    "TLSAlertReceived",
    "TLSError",
    "TLSProtocolError",
    "UnsupportedCipherSuite",
    "WantRead",
    "WantWrite",
]


class AfalgError(Exception):
    """Base of every afalg-specific error."""


class AlgError(AfalgError, OSError):
    """An AF_ALG operation failed; ``errno`` is the kernel's."""


class AlgorithmNotAvailable(AlgError):
    """The kernel has no such algorithm, AF_ALG itself is missing, or policy refuses it.

    ``bind()`` gave ENOENT, or ``socket()`` failed. ``af_alg_restrict`` is the value of the
    sysctl ``crypto.af_alg_restrict`` (Linux 7.3+) when the refusal comes from it (1: the
    algorithm is not on AF_ALG's allowlist; 2: AF_ALG is disabled), else None; the message then
    names the remedies (the sysctl at 0, the ``cryptography`` backend, kTLS)."""

    def __init__(
        self, code: int | None, message: str, *, af_alg_restrict: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.af_alg_restrict = af_alg_restrict

    @classmethod
    def no_af_alg(
        cls, code: int | None, reason: str, *, af_alg_restrict: int | None = None
    ) -> AlgorithmNotAvailable:
        """Return the error for a process that cannot use AF_ALG at all.

        No such address family, or ``socket(AF_ALG)`` denied: the message is ``reason``, then
        what still runs here and how."""
        return cls(code, f"{reason}; {_NO_AF_ALG_WAYS_OUT}", af_alg_restrict=af_alg_restrict)


# What still runs where AF_ALG does not (AlgorithmNotAvailable.no_af_alg names it).
_NO_AF_ALG_WAYS_OUT = (
    "without AF_ALG, hashlib and pyca/cryptography do this work in userspace; afalg's record "
    'layer and TLS sockets run on the cryptography backend (RecordLayer(backend="cryptography"), '
    'tls.wrap(..., algif_backend="cryptography"); backend "auto", the default, falls back to '
    'it), kTLS (tls.wrap(..., mode="ktls")) uses no AF_ALG where the kernel has the tls module, '
    "and `afalg vm -- CMD` runs CMD under a kernel that has AF_ALG"
)


class InvalidTag(AlgError):
    """Authentication failed: EBADMSG from the kernel, a failed verify, or input too short.

    Input shorter than the tag fails too. No plaintext is ever returned with this error."""

    def __init__(self, message: str = "authentication tag mismatch") -> None:
        super().__init__(errno.EBADMSG, message)


class PaddingError(AlgError, ValueError):
    """PKCS#7 padding of a decrypted message is malformed."""

    def __init__(self, message: str = "invalid PKCS#7 padding") -> None:
        super().__init__(errno.EBADMSG, message)


class TLSError(AfalgError, ssl.SSLError):
    """Base of afalg's TLS errors. ``alert`` is the AlertDescription that describes it."""

    def __init__(self, alert: int, message: str) -> None:
        self.alert = alert_name(alert)
        name = getattr(self.alert, "name", str(int(alert)))
        super().__init__(errno.EPROTO, f"{message} ({name})")
        self.reason = name.upper()


class TLSProtocolError(TLSError):
    """We detected a protocol or integrity failure; ``alert`` is what we send the peer.

    E.g. bad_record_mac, record_overflow, decode_error, unexpected_message, ..."""


class TLSAlertReceived(TLSError):
    """The peer sent a fatal alert (``alert`` names it)."""

    def __init__(self, alert: int, level: int = 2) -> None:
        self.level = level
        super().__init__(alert, "peer sent alert")


class KTLSError(AfalgError, OSError):
    """Kernel TLS could not be set up on a socket (``TCP_ULP`` or ``TLS_TX``/``TLS_RX`` refused).

    ``errno`` is the kernel's and the message says what to do."""


class KeyUpdateUnsupported(TLSProtocolError):
    """The peer sent a TLS 1.3 KeyUpdate but this kernel cannot rekey a live kTLS socket.

    Rekeying came in Linux 6.14; the connection cannot continue in kTLS mode."""


class HandoffError(TLSError):
    """The handshake succeeded in ssl but its keys could not be handed off.

    E.g. a traffic secret missing from the key log, no ServerHello seen; ``alert`` is
    internal_error."""

    def __init__(self, message: str) -> None:
        super().__init__(AlertDescription.internal_error, message)


class UnsupportedCipherSuite(AfalgError, ValueError):
    """The negotiated cipher suite is not one afalg runs (only AES-GCM and ChaCha20-Poly1305).

    ``suite`` is the name or number given, and the message says how to restrict the context."""

    def __init__(self, suite: object) -> None:
        self.suite = suite
        shown = f"0x{suite:04X}" if isinstance(suite, int) else repr(suite)
        super().__init__(
            f"cipher suite {shown} is not supported by afalg (AES-GCM and ChaCha20-Poly1305 "
            "only); restrict the ssl context to AEAD suites, e.g. "
            "ctx.set_ciphers('ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20') for TLS 1.2 "
            "(TLS 1.3 offers only TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384 and "
            "TLS_CHACHA20_POLY1305_SHA256 by default; keep CCM suites out of OpenSSL's "
            "Ciphersuites)"
        )


class AlreadyWrapped(AfalgError, ssl.SSLError, TypeError):
    """The socket given to be wrapped is already a TLS socket; refused before a byte is sent.

    Already TLS: an :class:`ssl.SSLSocket` or an afalg one. An :class:`ssl.SSLError`, as ssl's
    own ``wrap_socket`` raises for the same mistake (after a handshake that breaks the
    connection), and a :class:`TypeError` (the wrong kind of object)."""

    def __init__(self, what: str) -> None:
        super().__init__(
            errno.EISCONN,
            f"sock is already a TLS socket ({what}): pass the plain TCP socket, before it is "
            "wrapped",
        )


class ClosedError(AfalgError, OSError, ValueError):
    """An afalg object was used after ``close()``.

    Any object: socket, hash, cipher, record layer, key log. ``errno`` EBADF, as for a closed
    socket, and a :class:`ValueError`, as for a closed file."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EBADF, f"{what} is closed")


class WantRead(AfalgError, ssl.SSLWantReadError, BlockingIOError):
    """A non-blocking afalg TLS socket has no whole record to read yet.

    Wait until the socket is readable and call again. Both an :class:`ssl.SSLWantReadError`
    (code written for ssl catches it) and a :class:`BlockingIOError` (code written for plain
    sockets does)."""


class WantWrite(AfalgError, ssl.SSLWantWriteError, BlockingIOError):
    """A non-blocking afalg TLS socket cannot take more now; nothing of the data was taken.

    Earlier records are still queued: wait until writable and call again. Both an
    :class:`ssl.SSLWantWriteError` and a :class:`BlockingIOError`."""


class KeyLimitReached(TLSError):
    """The sending key has sealed the most records it may and cannot be updated here.

    The most is ``records_per_key``; by default the AEAD usage limit of RFC 8446 section 5.5.
    It cannot be updated: TLS 1.2 has no KeyUpdate, and kTLS before Linux 6.14 cannot install
    new keys. Nothing of the data was sent; the connection can still receive and close.
    ``alert`` is internal_error."""

    def __init__(self, message: str) -> None:
        super().__init__(AlertDescription.internal_error, message)
