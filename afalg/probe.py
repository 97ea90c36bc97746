"""What this kernel offers: AF_ALG socket types, the ``tls`` ULP, and the kTLS ciphers.

Every answer comes from trying the real thing (a ``bind()``, a ``setsockopt()``) on throwaway
sockets, so module autoloading, blacklists and seccomp or LSM restrictions all show up as they
would for a real user.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
from contextlib import closing
from dataclasses import dataclass, field

from afalg import _uapi

__all__ = ["Capabilities", "has_capability", "probe"]

# One algorithm per AF_ALG socket type that every kernel with that type has.
PROBE_ALGORITHMS: dict[str, str] = {
    "hash": "sha256",
    "skcipher": "cbc(aes)",
    "aead": "gcm(aes)",
    "rng": "stdrng",
}

# kTLS ciphers afalg drives, by name.
KTLS_CIPHERS: dict[str, _uapi.TLSCipherType] = {
    "AES_GCM_128": _uapi.TLSCipherType.AES_GCM_128,
    "AES_GCM_256": _uapi.TLSCipherType.AES_GCM_256,
    "CHACHA20_POLY1305": _uapi.TLSCipherType.CHACHA20_POLY1305,
}
VERSIONS = {"TLSv1.2": _uapi.TLS_1_2_VERSION, "TLSv1.3": _uapi.TLS_1_3_VERSION}


@dataclass(frozen=True)
class Capabilities:
    """The result of :func:`probe`. Reasons are one-line strings naming the errno."""

    kernel_release: str
    af_alg: bool
    af_alg_reason: str | None
    alg_types: dict[str, bool] = field(default_factory=dict)
    tls_ulp: bool = False
    tls_ulp_reason: str | None = None
    # "TLSv1.3" -> ["AES_GCM_128", ...]: the ciphers TLS_TX and TLS_RX both accepted.
    ktls_ciphers: dict[str, list[str]] = field(default_factory=dict)
    ktls_rekey: bool = False  # live kTLS sockets take new keys (TLS 1.3 KeyUpdate; 6.14+)

    @property
    def ktls(self) -> bool:
        """True when kTLS can carry at least one cipher."""
        return self.tls_ulp and any(self.ktls_ciphers.values())


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{name}: {exc.strerror or exc}"


def _probe_af_alg() -> tuple[bool, str | None, dict[str, bool]]:
    try:
        sock = socket.socket(_uapi.AF_ALG, socket.SOCK_SEQPACKET, 0)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return False, f"socket(AF_ALG) denied by policy (seccomp or LSM): {_reason(exc)}", {}
        return False, f"socket(AF_ALG) failed: {_reason(exc)}", {}
    sock.close()
    types = {}
    for kind, name in PROBE_ALGORITHMS.items():
        with closing(socket.socket(_uapi.AF_ALG, socket.SOCK_SEQPACKET, 0)) as sock:
            try:
                sock.bind((kind, name))
                types[kind] = True
            except OSError:
                types[kind] = False
    return True, None, types


def has_capability(cap: int) -> bool:
    """Whether this process has capability ``cap`` (``_uapi.CAP_*``) in its effective set."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps >> cap & 1)


def _probe_tls() -> tuple[bool, str | None, dict[str, list[str]]]:
    from afalg.ktls import loopback, missing_ulp_reason, supports

    try:
        with loopback() as sock:
            sock.setsockopt(_uapi.SOL_TCP, _uapi.TCP_ULP, b"tls")
    except OSError as exc:
        reason = missing_ulp_reason() if exc.errno == errno.ENOENT else _reason(exc)
        return False, f"setsockopt(TCP_ULP, 'tls') failed: {reason}", {}
    ciphers = {
        vname: [cname for cname, ctype in KTLS_CIPHERS.items() if supports(version, ctype)]
        for vname, version in VERSIONS.items()
    }
    return True, None, ciphers


def probe() -> Capabilities:
    """Probe the running kernel. Never raises for a missing capability; it reports it."""
    af_alg, af_reason, types = _probe_af_alg()
    tls_ulp, tls_reason, ciphers = _probe_tls()
    from afalg.ktls import supports_rekey

    return Capabilities(
        kernel_release=platform.release(),
        af_alg=af_alg,
        af_alg_reason=af_reason,
        alg_types=types,
        tls_ulp=tls_ulp,
        tls_ulp_reason=tls_reason,
        ktls_ciphers=ciphers,
        ktls_rekey=tls_ulp and supports_rekey(),
    )


def format_report(caps: Capabilities) -> str:
    """The human-readable report printed by ``afalg info``."""
    yes = {True: "yes", False: "no"}

    def status(ok: bool, reason: str | None) -> str:
        return yes[ok] + (f" ({reason})" if reason else "")

    lines = [f"kernel: {caps.kernel_release} ({os.uname().machine})"]
    lines.append(f"AF_ALG: {status(caps.af_alg, caps.af_alg_reason)}")
    for kind, ok in caps.alg_types.items():
        lines.append(f"  {kind:<9} {PROBE_ALGORITHMS[kind]:<10} {yes[ok]}")
    lines.append(f"tls ULP: {status(caps.tls_ulp, caps.tls_ulp_reason)}")
    for version, names in caps.ktls_ciphers.items():
        lines.append(f"  kTLS {version}: {', '.join(names) or 'none'}")
    if caps.tls_ulp:
        lines.append(f"  kTLS rekey (KeyUpdate): {yes[caps.ktls_rekey]}")
    return "\n".join(lines)
