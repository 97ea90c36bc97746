"""afalg: the Linux kernel crypto API (AF_ALG) and kernel TLS from Python.

The submodules: :mod:`afalg.alg` (AF_ALG sockets), :mod:`afalg.record` and :mod:`afalg.keys`
(the TLS record layer), :mod:`afalg.tls` (kernel TLS sockets: :func:`afalg.tls.wrap`). Here:
the exception tree, :func:`new` (like :func:`hashlib.new`) and :func:`probe` (what this kernel
offers).
"""

from __future__ import annotations

from afalg.alg import new
from afalg.errors import (
    AfalgError,
    AlertDescription,
    AlgError,
    AlgorithmNotAvailable,
    AlreadyWrapped,
    ClosedError,
    HandoffError,
    InvalidTag,
    KeyLimitReached,
    KeyUpdateUnsupported,
    KTLSError,
    PaddingError,
    TLSAlertReceived,
    TLSError,
    TLSProtocolError,
    UnsupportedCipherSuite,
    WantRead,
    WantWrite,
)
from afalg.probe import Capabilities, probe

__version__ = "0.2.0.dev0"  # the one version source (setup.cfg reads it); .devN: unreleased

__all__ = [
    "AfalgError",
    "AlertDescription",
    "AlgError",
    "AlgorithmNotAvailable",
    "AlreadyWrapped",
    "Capabilities",
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
    "__version__",
    "new",
    "probe",
]
