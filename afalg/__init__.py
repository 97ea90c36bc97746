"""afalg: the Linux kernel crypto API (AF_ALG) and kernel TLS from Python."""

from __future__ import annotations

from afalg.errors import (
    AlertDescription,
    AlgError,
    AlgorithmNotAvailable,
    InvalidTag,
    PaddingError,
    TLSAlertReceived,
    TLSError,
    TLSProtocolError,
)

__version__ = "0.1.0"

__all__ = [
    "AlertDescription",
    "AlgError",
    "AlgorithmNotAvailable",
    "InvalidTag",
    "PaddingError",
    "TLSAlertReceived",
    "TLSError",
    "TLSProtocolError",
    "__version__",
]
