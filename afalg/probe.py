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
from afalg._uapi import has_capability
from afalg.alg import af_alg_restrict, not_available, privileged, socket_error
from afalg.ktls import loopback, missing_ulp_reason, supports, supports_rekey

__all__ = ["Capabilities", "af_alg_absence", "has_capability", "probe"]

# The algorithms afalg uses, by AF_ALG socket type (the record layer's AEADs, IPsec's, the
# CLI's defaults). A type is available when one of its algorithms binds.
USED_ALGORITHMS: dict[str, tuple[str, ...]] = {
    "hash": ("sha256", "hmac(sha256)", "hmac(sha384)"),
    "skcipher": ("cbc(aes)", "ctr(aes)", "chacha20"),
    "aead": ("gcm(aes)", "ccm(aes)", "rfc4106(gcm(aes))", "rfc7539(chacha20,poly1305)"),
    "rng": ("stdrng", "jitterentropy_rng"),
}
# The AEADs of the record layer (algif mode on the kernel backend needs one of them).
RECORD_AEADS = ("gcm(aes)", "rfc7539(chacha20,poly1305)")
PROBE_ALGORITHMS: dict[str, str] = {kind: names[0] for kind, names in USED_ALGORITHMS.items()}

# kTLS ciphers afalg drives, by name.
KTLS_CIPHERS: dict[str, _uapi.TLSCipherType] = {
    "AES_GCM_128": _uapi.TLSCipherType.AES_GCM_128,
    "AES_GCM_256": _uapi.TLSCipherType.AES_GCM_256,
    "CHACHA20_POLY1305": _uapi.TLSCipherType.CHACHA20_POLY1305,
}
VERSIONS = {"TLSv1.2": _uapi.TLS_1_2_VERSION, "TLSv1.3": _uapi.TLS_1_3_VERSION}


@dataclass(frozen=True)
class AlgStatus:
    """Whether ``bind((type, name))`` works, and if not why.

    ``reason`` says why in one line, and ``restricted`` is True when
    ``crypto.af_alg_restrict`` refused it."""

    type: str
    name: str
    available: bool
    reason: str | None = None
    restricted: bool = False


@dataclass(frozen=True)
class Capabilities:
    """The result of :func:`probe`. Reasons are one-line strings naming the errno."""

    kernel_release: str
    af_alg: bool
    af_alg_reason: str | None
    alg_types: dict[str, bool] = field(default_factory=dict)
    # crypto.af_alg_restrict (Linux 7.3+; None: no such sysctl) and whether this process has
    # the capabilities that give the longer allowlist (CAP_SYS_ADMIN or CAP_NET_ADMIN)
    af_alg_restrict: int | None = None
    privileged: bool = False
    algorithms: list[AlgStatus] = field(default_factory=list)
    tls_ulp: bool = False
    tls_ulp_reason: str | None = None
    # "TLSv1.3" -> ["AES_GCM_128", ...]: the ciphers TLS_TX and TLS_RX both accepted.
    ktls_ciphers: dict[str, list[str]] = field(default_factory=dict)
    ktls_rekey: bool = False  # live kTLS sockets take new keys (TLS 1.3 KeyUpdate; 6.14+)

    @property
    def refused(self) -> list[AlgStatus]:
        """The algorithms afalg uses that ``crypto.af_alg_restrict`` refuses here."""
        return [a for a in self.algorithms if a.restricted]

    @property
    def ktls(self) -> bool:
        """True when kTLS can carry at least one cipher."""
        return self.tls_ulp and any(self.ktls_ciphers.values())

    @property
    def modes(self) -> list[tuple[str, str]]:
        """Return the ``(mode, backend)`` pairs of :func:`afalg.tls.wrap` that run here.

        In the order ``mode="auto"`` tries them; algif on ``cryptography`` runs everywhere."""
        modes = [("ktls", "kernel")] if self.ktls else []
        if any(a.available for a in self.algorithms if a.name in RECORD_AEADS):
            modes.append(("algif", "kernel"))
        return [*modes, ("algif", "cryptography")]


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "?")
    return f"{name}: {exc.strerror or exc}"


def af_alg_absence() -> str | None:
    """Say in one line why this process cannot open an AF_ALG socket, or None when it can.

    The line is what ``afalg info`` shows."""
    try:
        socket.socket(_uapi.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return f"socket(AF_ALG) denied by policy (seccomp or LSM): {_reason(exc)}"
        error = socket_error(exc)
        if getattr(error, "af_alg_restrict", None):
            return f"{error.strerror} [{_reason(exc)}]"
        return f"socket(AF_ALG) failed: {_reason(exc)}"
    return None


def _probe_af_alg() -> tuple[bool, str | None, list[AlgStatus]]:
    absence = af_alg_absence()
    if absence is not None:
        return False, absence, []
    found = []
    for kind, names in USED_ALGORITHMS.items():
        for name in names:
            with closing(socket.socket(_uapi.AF_ALG, socket.SOCK_SEQPACKET, 0)) as sock:
                try:
                    sock.bind((kind, name))
                except OSError as exc:
                    if exc.errno != errno.ENOENT:
                        found.append(AlgStatus(kind, name, False, _reason(exc)))
                        continue
                    error = not_available(kind, name)
                    restricted = error.af_alg_restrict is not None
                    reason = (
                        f"refused by crypto.af_alg_restrict={error.af_alg_restrict}"
                        if restricted
                        else (error.strerror or "ENOENT")
                    )
                    found.append(AlgStatus(kind, name, False, reason, restricted))
                else:
                    found.append(AlgStatus(kind, name, True))
    return True, None, found


def _probe_tls() -> tuple[bool, str | None, dict[str, list[str]]]:

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
    af_alg, af_reason, found = _probe_af_alg()
    tls_ulp, tls_reason, ciphers = _probe_tls()

    types = {kind: any(a.available for a in found if a.type == kind) for kind in USED_ALGORITHMS}

    return Capabilities(
        kernel_release=platform.release(),
        af_alg=af_alg,
        af_alg_reason=af_reason,
        alg_types=types if af_alg else {},
        af_alg_restrict=af_alg_restrict(),
        privileged=privileged(),
        algorithms=found,
        tls_ulp=tls_ulp,
        tls_ulp_reason=tls_reason,
        ktls_ciphers=ciphers,
        ktls_rekey=tls_ulp and supports_rekey(),
    )


def _restrict_text(caps: Capabilities) -> str:
    value = caps.af_alg_restrict
    if value is None:
        return "absent (no AF_ALG allowlist before Linux 7.3)"
    if value == 0:
        return "0 (unrestricted)"
    if value == 1:
        whose = (
            "the allowlist for CAP_SYS_ADMIN or CAP_NET_ADMIN, which this process has"
            if caps.privileged
            else "the shorter allowlist: this process lacks CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )
        return f"1 ({whose})"
    return f"{value} (AF_ALG disabled)"


def format_report(caps: Capabilities) -> str:
    """The human-readable report printed by ``afalg info``."""
    yes = {True: "yes", False: "no"}

    def status(ok: bool, reason: str | None) -> str:
        return yes[ok] + (f" ({reason})" if reason else "")

    lines = [f"kernel: {caps.kernel_release} ({os.uname().machine})"]
    lines.append(f"AF_ALG: {status(caps.af_alg, caps.af_alg_reason)}")
    if caps.af_alg or caps.af_alg_restrict is not None:
        lines.append(f"  crypto.af_alg_restrict: {_restrict_text(caps)}")
    for a in caps.algorithms:
        lines.append(f"  {a.type:<9} {a.name:<27} {status(a.available, a.reason)}")
    if caps.refused:
        refused = ", ".join(f"{a.type} {a.name}" for a in caps.refused)
        lines.append(
            f"  refused by crypto.af_alg_restrict={caps.af_alg_restrict}: {refused}; "
            "as root `sysctl crypto.af_alg_restrict=0` allows them, the cryptography backend "
            "and kTLS need none of them"
        )
    lines.append(f"tls ULP: {status(caps.tls_ulp, caps.tls_ulp_reason)}")
    for version, names in caps.ktls_ciphers.items():
        lines.append(f"  kTLS {version}: {', '.join(names) or 'none'}")
    if caps.tls_ulp:
        lines.append(f"  kTLS rekey (KeyUpdate): {yes[caps.ktls_rekey]}")
    lines += _runs_here(caps)
    return "\n".join(lines)


_MODE_TEXT = {
    ("ktls", "kernel"): "kTLS",
    ("algif", "kernel"): "algif on the kernel's AEAD",
    ("algif", "cryptography"): "algif on the cryptography backend",
}


def _runs_here(caps: Capabilities) -> list[str]:
    """Return the report's last lines: the TLS modes that run on this kernel, and the rest.

    Where AF_ALG or kTLS is missing, what still works and how to get the rest."""
    modes = caps.modes
    names = [_MODE_TEXT[m] for m in modes]
    if len(modes) == 1:  # only cryptography's: say that auto comes to it
        names[0] += ' (mode="auto" picks it)'
    lines = [f"TLS modes that run here: {', '.join(names)}"]
    lacking = [what for what, ok in (("AF_ALG", caps.af_alg), ("kTLS", caps.ktls)) if not ok]
    if lacking:
        lines.append(
            f"  without {' and '.join(lacking)}: "
            + ("hashlib and pyca/cryptography replace afalg.alg; " if not caps.af_alg else "")
            + "plain ssl runs too; `afalg vm -- CMD` runs CMD under a kernel that has "
            "AF_ALG and kTLS (docs/guides/vm.md)"
        )
    return lines
