"""Why AF_ALG refused, the errors that say so and what to do, and errnos as afalg's errors.

The causes: ``crypto.af_alg_restrict`` (Linux 7.3+), the kernel's build, a security policy."""

from __future__ import annotations

import errno
import os
import re

from afalg._alg.proc import algorithms
from afalg._uapi import (
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    has_capability,
)
from afalg.errors import AlgError, AlgorithmNotAvailable, InvalidTag


def _alg_error(exc: OSError, what: str) -> AlgError:
    if exc.errno == errno.EBADMSG:
        return InvalidTag()
    return AlgError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}")


AF_ALG_RESTRICT = "/proc/sys/crypto/af_alg_restrict"
RESTRICT_REMEDY = (
    "as root `sysctl crypto.af_alg_restrict=0` lifts it; or use the cryptography backend "
    '(RecordLayer(backend="cryptography"), tls.wrap(..., algif_backend="cryptography")), '
    'or kTLS (tls.wrap(..., mode="ktls")), which does not use AF_ALG'
)

# The kernel option that builds an algorithm (or a template in its name), where afalg knows it.
_CONFIG_OPTIONS = {
    "stdrng": "CONFIG_CRYPTO_DRBG",
    "jitterentropy_rng": "CONFIG_CRYPTO_JITTERENTROPY",
    "ansi_cprng": "CONFIG_CRYPTO_ANSI_CPRNG",
    "gcm": "CONFIG_CRYPTO_GCM",
    "ccm": "CONFIG_CRYPTO_CCM",
    "chacha20": "CONFIG_CRYPTO_CHACHA20",
    "rfc7539": "CONFIG_CRYPTO_CHACHA20POLY1305",
}
# The rng names a kernel may offer, the default first (the DRBG), then the entropy source
# Debian's 7.3 kernels are built with instead (CONFIG_CRYPTO_DRBG is not set there).
RNG_NAMES = ("stdrng", "jitterentropy_rng")


def af_alg_restrict() -> int | None:
    """Return the sysctl ``crypto.af_alg_restrict`` (Linux 7.3+), or None where absent.

    0 every algorithm, 1 an allowlist (a shorter one without CAP_SYS_ADMIN or CAP_NET_ADMIN; a
    refused ``bind()`` gives ENOENT), 2 AF_ALG disabled (``socket()`` gives EAFNOSUPPORT).
    None where the kernel has no such sysctl (before 7.3; or ``af_alg`` is not loaded yet: the
    first ``socket(AF_ALG)`` loads it)."""
    try:
        with open(AF_ALG_RESTRICT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def privileged() -> bool:
    """Return True if this process holds CAP_SYS_ADMIN or CAP_NET_ADMIN.

    Either gives the longer allowlist of ``crypto.af_alg_restrict=1``, and ``SO_SNDBUFFORCE``."""
    return has_capability(CAP_SYS_ADMIN) or has_capability(CAP_NET_ADMIN)


def _kernel_config() -> tuple[str, str] | None:
    """(path, text) of the running kernel's build configuration, where it can be found."""
    import gzip

    release = os.uname().release
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "/proc/config.gz", f.read()
    except OSError:
        pass
    for path in (
        f"/boot/config-{release}",
        f"/usr/lib/modules/{release}/config",
        f"/lib/modules/{release}/build/.config",
    ):
        try:
            with open(path) as f:
                return path, f.read()
        except OSError:
            continue
    return None


def kernel_lacks(name: str) -> str | None:
    """Say why the running kernel has no algorithm ``name``, when its build configuration says so.

    E.g. ``"CONFIG_CRYPTO_DRBG is not set in /boot/config-..."`` (for ``name`` or a template in
    it). None when it may have it, or nothing says otherwise."""
    names = ["stdrng"] if name.startswith("drbg_") else []  # drbg_* are the DRBG's drivers
    names += re.findall(r"\w+", name)  # "rfc7539(chacha20,poly1305)": each template, each cipher
    options = list(dict.fromkeys(_CONFIG_OPTIONS[n] for n in names if n in _CONFIG_OPTIONS))
    if not options:
        return None
    config = _kernel_config()
    if config is None:
        return None
    path, text = config
    for option in options:
        if f"# {option} is not set" in text:
            return f"{option} is not set in {path}"
    return None


def _in_proc_crypto(name: str) -> bool:
    return any(name in (info.name, info.driver) for info in algorithms())


def not_available(kind: str, name: str) -> AlgorithmNotAvailable:
    """Return the error (not raised) for a ``bind((kind, name))`` refused with ENOENT.

    The kernel lacks the algorithm, or ``crypto.af_alg_restrict`` refuses it; the error says
    which, and what to do."""
    restrict = af_alg_restrict()
    lacks = kernel_lacks(name)
    if lacks is not None or not restrict:
        message = f"the kernel has no {kind} algorithm {name!r}"
        if lacks is not None:
            message += f" ({lacks})"
        if kind == "rng":
            others = [n for n in RNG_NAMES if n != name and kernel_lacks(n) is None]
            if others:
                message += f"; rng names it may offer: {', '.join(others)}"
        if restrict:
            message += f"; AF_ALG is also restricted here (crypto.af_alg_restrict={restrict})"
        return AlgorithmNotAvailable(errno.ENOENT, message)
    who = "the allowlist"
    if not privileged():
        who = "the shorter allowlist of a process without CAP_SYS_ADMIN or CAP_NET_ADMIN (this one)"
    has = " (the kernel has it: /proc/crypto lists it)" if _in_proc_crypto(name) else ""
    return AlgorithmNotAvailable(
        errno.ENOENT,
        f"AF_ALG refused {kind} {name!r}{has}: the sysctl crypto.af_alg_restrict={restrict} "
        f"limits AF_ALG to {who}, and {name!r} is not on it; {RESTRICT_REMEDY}",
        af_alg_restrict=restrict,
    )


def socket_error(exc: OSError) -> AlgError:
    """Return the error (not raised) for ``exc`` from a refused ``socket(AF_ALG)``.

    :class:`afalg.AlgorithmNotAvailable` saying why (no AF_ALG, ``crypto.af_alg_restrict=2``,
    a seccomp filter or security module), else :class:`afalg.AlgError` with its errno."""
    code = exc.errno or 0
    if code in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.ESOCKTNOSUPPORT):
        restrict = af_alg_restrict()
        if restrict is not None and restrict >= 2:
            return AlgorithmNotAvailable(
                code,
                f"AF_ALG is disabled by the sysctl crypto.af_alg_restrict={restrict} "
                f"({os.strerror(code)}); as root `sysctl crypto.af_alg_restrict=0` enables it "
                "(1: an allowlist); or use the cryptography backend, or kTLS, which does not "
                "use AF_ALG",
                af_alg_restrict=restrict,
            )
        return AlgorithmNotAvailable.no_af_alg(
            code, f"AF_ALG sockets are not available here: {os.strerror(code)}"
        )
    if code in (errno.EPERM, errno.EACCES):
        return AlgorithmNotAvailable.no_af_alg(
            code,
            f"AF_ALG is restricted here: socket(AF_ALG) was denied ({os.strerror(code)}; "
            "a seccomp filter or a security module, as some systems do since "
            "CVE-2026-31431)",
        )
    return _alg_error(exc, "socket(AF_ALG)")
