"""afalg: the Linux kernel crypto API (AF_ALG) and kernel TLS from Python.

The submodules: :mod:`afalg.alg` (AF_ALG sockets), :mod:`afalg.record` and :mod:`afalg.keys`
(the TLS record layer), :mod:`afalg.tls` (kernel TLS sockets: :func:`afalg.tls.wrap`). Here:
the exception tree, :func:`new` (like :func:`hashlib.new`) and :func:`probe` (what this kernel
offers).
"""

from __future__ import annotations

from afalg.alg import new
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
from afalg.probe import Capabilities, probe

__version__ = "0.1.0"  # the one version source: setup.cfg reads it (attr:)

__all__ = [
    "AlertDescription",
    "AlgError",
    "AlgorithmNotAvailable",
    "Capabilities",
    "InvalidTag",
    "PaddingError",
    "TLSAlertReceived",
    "TLSError",
    "TLSProtocolError",
    "__version__",
    "new",
    "probe",
]
