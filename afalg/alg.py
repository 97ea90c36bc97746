"""AF_ALG sockets: the kernel's hashes, ciphers, AEADs and RNGs through :mod:`socket`.

Every object owns two file descriptors: the *transform* socket (``bind()`` to the algorithm,
``setsockopt(ALG_SET_KEY)``), and an *operation* socket from its ``accept()``, reused for every
operation. Objects are context managers; ``close()`` is idempotent; ``repr()`` shows the
algorithm and the descriptors, never a key.

Sizes are checked before any system call: a key, IV or tag size the kernel would refuse raises
:class:`ValueError` naming the sizes it accepts. Kernel errors keep their errno:
:class:`afalg.AlgorithmNotAvailable` (no such algorithm, or no AF_ALG),
:class:`afalg.InvalidTag` (EBADMSG: authentication failed; no plaintext is returned), and
:class:`afalg.AlgError` for the rest.

One AEAD operation, and one streaming chunk of a cipher, must fit the socket buffers: the kernel
holds the whole AEAD input before it runs, and a ``sendmsg()`` larger than ``SO_SNDBUF`` would
wait forever. The buffers are enlarged as needed (``SO_SNDBUF``, then ``SO_SNDBUFFORCE`` when
privileged); beyond ``net.core.wmem_max`` an operation is refused with a :class:`ValueError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac as _hmac
import io
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from afalg import cmsg
from afalg._uapi import (
    AF_ALG,
    ALG_SET_AEAD_AUTHSIZE,
    ALG_SET_KEY,
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    SOL_ALG,
    SPLICE_F_MORE,
    AlgOp,
    has_capability,
)
from afalg.cmsg import Buffer
from afalg.errors import AlgError, AlgorithmNotAvailable, InvalidTag, PaddingError

__all__ = [
    "AEAD",
    "HMAC",
    "RNG",
    "AlgInfo",
    "CipherStream",
    "Hash",
    "SKCipher",
    "algorithms",
    "bind",
    "file_digest",
    "new",
    "not_available",
    "privileged",
    "socket_error",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")
# plain ints for the hot paths (module globals: no enum attribute lookup per call)
_ENCRYPT, _DECRYPT = int(AlgOp.ENCRYPT), int(AlgOp.DECRYPT)
_SCRATCH_MAX = 256 * 1024  # an object keeps an output buffer up to this size for reuse
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


# --------------------------------------------------------------------------------------------
# Helpers: binding, errors, buffers
# --------------------------------------------------------------------------------------------


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def _view(value: Any, what: str) -> bytes | memoryview:
    """``value`` as bytes for a syscall, without a copy where it is contiguous."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        try:
            return memoryview(value).cast("B")
        except TypeError:  # not C-contiguous
            return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def _alg_error(exc: OSError, what: str) -> AlgError:
    if exc.errno == errno.EBADMSG:
        return InvalidTag()
    return AlgError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}")


# --------------------------------------------------------------------------------------------
# Why a bind or socket() was refused: crypto.af_alg_restrict (Linux 7.3+), the kernel's build
# --------------------------------------------------------------------------------------------

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
    """The sysctl ``crypto.af_alg_restrict`` (Linux 7.3+): 0 every algorithm, 1 an allowlist
    (a shorter one without CAP_SYS_ADMIN or CAP_NET_ADMIN; a refused ``bind()`` gives ENOENT),
    2 AF_ALG disabled (``socket()`` gives EAFNOSUPPORT). None where the kernel has no such sysctl
    (before 7.3; or ``af_alg`` is not loaded yet: the first ``socket(AF_ALG)`` loads it)."""
    try:
        with open(AF_ALG_RESTRICT) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def privileged() -> bool:
    """True if this process holds CAP_SYS_ADMIN or CAP_NET_ADMIN (the longer allowlist of
    ``crypto.af_alg_restrict=1``, and ``SO_SNDBUFFORCE``)."""
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
    for path in (f"/boot/config-{release}", f"/usr/lib/modules/{release}/config",
                 f"/lib/modules/{release}/build/.config"):  # fmt: skip
        try:
            with open(path) as f:
                return path, f.read()
        except OSError:
            continue
    return None


def kernel_lacks(name: str) -> str | None:
    """Why the running kernel has no algorithm ``name`` (or a template in it), when its build
    configuration says so: e.g. ``"CONFIG_CRYPTO_DRBG is not set in /boot/config-..."``. None
    when it may have it, or nothing says otherwise."""
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
    """The error (returned, not raised) for a ``bind((kind, name))`` refused with ENOENT: the
    kernel lacks the algorithm, or ``crypto.af_alg_restrict`` refuses it (saying which, and
    what to do)."""
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
    """The error (returned, not raised) for ``exc`` from a refused ``socket(AF_ALG)``:
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


def bind(kind: str, name: str) -> socket.socket:
    """A new transform socket bound to ``(kind, name)`` (e.g. ``("aead", "gcm(aes)")``), the
    caller's to close. Errors as for the classes here: :class:`afalg.AlgorithmNotAvailable`
    when AF_ALG or the algorithm is missing or refused (see :func:`not_available`),
    :class:`afalg.AlgError` otherwise; TypeError/ValueError for a bad kind or name before any
    socket."""
    for what, value, limit in (
        ("kind", kind, cmsg.SALG_TYPE_MAX),
        ("name", name, cmsg.SALG_NAME_MAX),
    ):
        if not isinstance(value, str):
            raise TypeError(f"algorithm {what} must be str, not {type(value).__name__}")
        if not 0 < len(value.encode()) < limit:
            raise ValueError(f"algorithm {what} must be 1 to {limit - 1} bytes: {value!r}")
    try:
        sock = socket.socket(AF_ALG, socket.SOCK_SEQPACKET, 0)
    except OSError as exc:
        raise socket_error(exc) from None
    try:
        sock.bind((kind, name))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT:
            raise not_available(kind, name) from None
        raise _alg_error(exc, f"bind({kind!r}, {name!r})") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _buffer_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _fit_buffer(sock: socket.socket, need: int, *, send: bool) -> int:
    """Make the send (or receive) buffer of ``sock`` hold ``need`` bytes; return its usable
    size (the kernel counts whole pages). ValueError when the system limit is below ``need``."""
    opt, force = (
        (socket.SO_SNDBUF, _SO_SNDBUFFORCE) if send else (socket.SO_RCVBUF, _SO_RCVBUFFORCE)
    )
    need = max(need, _PAGE)
    usable = sock.getsockopt(socket.SOL_SOCKET, opt) & ~(_PAGE - 1)
    if usable >= need:
        return usable
    want = need + _PAGE  # the kernel doubles the request; ask for a page of slack
    for option in (opt, force):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, want)
        except PermissionError:
            continue
        usable = sock.getsockopt(socket.SOL_SOCKET, opt) & ~(_PAGE - 1)
        if usable >= need:
            return usable
    sysctl = "wmem_max" if send else "rmem_max"
    limit = _buffer_limit(f"/proc/sys/net/core/{sysctl}")
    raise ValueError(
        f"one operation needs {need} bytes of socket {'send' if send else 'receive'} buffer, "
        f"at most {usable} are available (net.core.{sysctl}={limit}); split the data or raise "
        f"net.core.{sysctl}"
    )


# An idle operation socket of a one-shot object (AEAD, SKCipher): the socket, the bytes its
# send and receive buffers hold, and its reused output buffer (or None).
_Op = tuple[socket.socket, int, int, memoryview | None]


class _AlgSocket:
    """The transform socket, the reused operation socket(s), and their lifetime.

    Hash and RNG keep one operation socket (``_op``, under the lock: a hash's running state
    lives there). AEAD and SKCipher operations are complete in one sendmsg + recv, so their
    operation sockets wait in ``_idle`` between calls: a call takes one with ``list.pop()``
    and gives it back with ``append()`` (each atomic: no lock on the hot path), and threads
    calling at once each get their own (accepted when none is idle)."""

    _kind: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self._tfm: socket.socket | None = None
        self._op: socket.socket | None = None
        self._idle: list[_Op] = []
        self._lock = threading.RLock()
        if not isinstance(name, str):  # before any regex or socket sees it
            raise TypeError(f"name must be str, not {type(name).__name__}")
        if not 0 < len(name.encode()) < cmsg.SALG_NAME_MAX:
            raise ValueError(f"name must be 1 to {cmsg.SALG_NAME_MAX - 1} bytes: {name!r}")
        self.name = name

    def _open(self, key: bytes | None = None) -> None:
        self._tfm = bind(self._kind, self.name)
        if key is not None:
            try:
                self._tfm.setsockopt(SOL_ALG, ALG_SET_KEY, key)
            except OSError as exc:
                self.close()
                if exc.errno == errno.EINVAL:
                    raise ValueError(
                        f"{self.name}: the kernel refused a {len(key)}-byte key"
                    ) from None
                raise _alg_error(exc, f"{self.name}: setting the key") from None

    # -- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> socket.socket:
        if self._tfm is None:
            raise AlgError(errno.EBADF, f"{type(self).__name__}({self.name!r}) is closed")
        return self._tfm

    def _op_socket(self) -> socket.socket:
        tfm = self._check_open()
        if self._op is None:
            try:
                self._op, _ = tfm.accept()
            except OSError as exc:
                raise _alg_error(exc, f"{self.name}: accept()") from None
        return self._op

    def _drop_op(self) -> None:
        """Forget the operation socket after an error: its kernel state is unknown."""
        if self._op is not None:
            self._op.close()
            self._op = None

    def _claim(self, sending: int, receiving: int, entry: _Op | None = None) -> _Op:
        """An operation socket whose buffers hold ``sending`` and ``receiving`` bytes: ``entry``
        refitted, or a new one (the hot paths' slow path, when none is idle)."""
        if entry is None:
            with self._lock:
                tfm = self._check_open()
                try:
                    sock = tfm.accept()[0]
                except OSError as exc:
                    raise _alg_error(exc, f"{self.name}: accept()") from None
            entry = (sock, 0, 0, None)
        sock, snd, rcv, scratch = entry
        try:
            if sending > snd:
                snd = _fit_buffer(sock, sending, send=True)
            if receiving > rcv:
                rcv = _fit_buffer(sock, receiving, send=False)
        except BaseException:
            self._give_back(entry)  # still good: only its buffers were too small
            raise
        return (sock, snd, rcv, scratch)

    def _give_back(self, entry: _Op) -> None:
        """Return an operation socket to the idle list (closed if this object was closed
        meanwhile: close() may have run while the operation was under way)."""
        self._idle.append(entry)
        if self._tfm is None:
            self._close_idle()

    def _close_idle(self) -> None:
        while True:
            try:
                entry = self._idle.pop()
            except IndexError:
                return
            entry[0].close()

    def _short_read(self, op: int, n: int, total: int) -> AlgError:
        return AlgError(errno.EIO, f"{self._what(op)}: the kernel returned {n} of {total} bytes")

    def _short_send(self, op: int, sent: int, sending: int) -> AlgError:
        # af_alg_sendmsg() returns what it copied when it stops short; with the buffers fitted
        # that is a failed sock_kmalloc() of its scatterlist tables, charged to optmem_max
        # (Linux 7.3 with 16 MiB: 16515072 bytes taken)
        return _no_socket_memory(self._what(op), sending, f": it took {sent} of {sending} bytes")

    def _operation_failed(
        self,
        exc: BaseException,
        op: int,
        sock: socket.socket,
        out: bytearray | memoryview | None,
        written: int,
    ) -> BaseException:
        """After a failed operation: close its operation socket (its kernel state is
        unknown), wipe what the kernel may have written, and return the error to raise (an
        OSError as afalg's)."""
        sock.close()
        if out is not None and written:
            out[:written] = bytes(written)
        if isinstance(exc, OSError) and not isinstance(exc, AlgError):
            return _alg_error(exc, self._what(op))
        return exc

    def _what(self, op: int) -> str:
        return f"{self.name} {AlgOp(op).name.lower()}"

    @property
    def closed(self) -> bool:
        return self._tfm is None

    def fileno(self) -> int:
        """The transform socket's descriptor (-1 once closed)."""
        return -1 if self._tfm is None else self._tfm.fileno()

    def detach(self) -> int:
        """Give up the transform socket's descriptor (returned, now the caller's to close);
        the operation socket is closed and this object is closed."""
        with self._lock:
            tfm = self._check_open()
            self._drop_op()
            self._tfm = None
            self._close_idle()
            return tfm.detach()

    def close(self) -> None:
        """Close both sockets; calling it again does nothing."""
        with self._lock:
            self._drop_op()
            if self._tfm is not None:
                self._tfm.close()
                self._tfm = None
            self._close_idle()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __repr__(self) -> str:
        if self._tfm is None:
            return f"<afalg.{type(self).__name__} {self.name!r} closed>"
        ops = [self._op] if self._op is not None else [entry[0] for entry in list(self._idle)]
        op = ops[0].fileno() if ops else -1
        return f"<afalg.{type(self).__name__} {self.name!r} fd={self.fileno()} op_fd={op}>"

    def __getstate__(self) -> None:
        raise TypeError(f"cannot pickle {type(self).__name__}: it owns kernel sockets")


def _no_socket_memory(what: str, size: int, detail: str = "") -> AlgError:
    limit = _buffer_limit("/proc/sys/net/core/optmem_max")
    return AlgError(
        errno.ENOMEM,
        f"{what} of {size} bytes: the kernel refused the socket memory for its scatterlists"
        f"{detail} (net.core.optmem_max={limit}); split the data or raise net.core.optmem_max",
    )


def _output(need: int) -> memoryview:
    """A new buffer for the kernel to write at least ``need`` bytes into (kept with its
    operation socket for reuse up to _SCRATCH_MAX bytes)."""
    return memoryview(bytearray(max(need, 4096)))


def _recv_exact(op: socket.socket, size: int, what: str) -> bytes:
    """One recvmsg of ``size`` bytes (AEAD and cipher reads return all or fail)."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        try:
            n = op.recv_into(view[got:], size - got)
        except OSError as exc:
            raise _alg_error(exc, what) from None
        if n == 0:
            raise AlgError(errno.EIO, f"{what}: the kernel returned {got} of {size} bytes")
        got += n
    return bytes(buf)


def _sendmsg(op: socket.socket, parts: list[Buffer], cmsgs: list, flags: int, what: str) -> None:
    total = sum(len(p) for p in parts)
    try:
        sent = op.sendmsg([p for p in parts if p], cmsgs, flags)
    except OSError as exc:
        raise _alg_error(exc, what) from None
    if sent != total:
        # af_alg_sendmsg() returns what it copied when it stops short; with the buffers fitted
        # that is a failed sock_kmalloc() of its scatterlist tables, charged to optmem_max
        # (Linux 7.3 with 16 MiB: 16515072 bytes taken, 126 pages per 4 KiB table)
        raise _no_socket_memory(what, total, f": it took {sent} of {total} bytes")


# --------------------------------------------------------------------------------------------
# AEAD
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _AEADSpec:
    keys: tuple[int, ...]
    ivs: tuple[int, ...]
    tags: tuple[int, ...]
    assoclens: tuple[int, ...] | None = None  # rfc4106: AAD lengths allowed (before the IV)
    kind: str = "plain"  # plain | ccm | rfc4106


_BLOCK_KEYS = {
    "aes": (16, 24, 32),
    "aria": (16, 24, 32),
    "camellia": (16, 24, 32),
    "sm4": (16,),
}
_GCM_TAGS = (4, 8, 12, 13, 14, 15, 16)  # crypto_gcm_check_authsize()
_CCM_TAGS = (4, 6, 8, 10, 12, 14, 16)  # crypto_ccm_setauthsize()
_RFC4106_TAGS = (8, 12, 16)  # crypto_rfc4106_setauthsize()


def _aead_spec(name: str) -> _AEADSpec | None:
    """Sizes for the AEADs we know; None for others (the kernel checks those)."""
    m = re.fullmatch(r"(gcm|ccm|rfc4106\(gcm|rfc4309\(ccm)\((\w+)(?:-\w+)?\)\)?", name)
    if m:
        template, cipher = m.group(1), m.group(2)
        keys = _BLOCK_KEYS.get(cipher)
        if keys is None or (template.startswith("rfc") and not name.endswith("))")):
            return None
        if template == "gcm":
            return _AEADSpec(keys, (12,), _GCM_TAGS)
        if template == "ccm":
            return _AEADSpec(keys, tuple(range(7, 14)), _CCM_TAGS, kind="ccm")
        if template == "rfc4106(gcm":
            return _AEADSpec(tuple(k + 4 for k in keys), (8,), _RFC4106_TAGS, (8, 12), "rfc4106")
        return _AEADSpec(tuple(k + 3 for k in keys), (8,), (8, 12, 16), (8, 12), "rfc4106")
    if name in ("rfc7539(chacha20,poly1305)", "rfc7539(chacha20-generic,poly1305-generic)"):
        return _AEADSpec((32,), (12,), (16,))
    return None


def _sizes(values: tuple[int, ...]) -> str:
    if len(values) > 2 and values == tuple(range(values[0], values[-1] + 1)):
        return f"{values[0]} to {values[-1]}"
    return ", ".join(map(str, values[:-1])) + (" or " if len(values) > 1 else "") + str(values[-1])


class AEAD(_AlgSocket):
    """An AEAD in the kernel: ``encrypt(iv, plaintext, aad) -> ciphertext || tag``.

    Known algorithms and their sizes (bytes):

    ===============================  ================  ==========  ===================
    name                             key               iv          tag
    ===============================  ================  ==========  ===================
    ``gcm(aes)``                     16, 24, 32        12          4, 8, 12-16
    ``rfc4106(gcm(aes))``            key || 4 salt     8           8, 12, 16
    ``ccm(aes)``                     16, 24, 32        nonce 7-13  4, 6, ..., 16
    ``rfc7539(chacha20,poly1305)``   32                12          16
    ===============================  ================  ==========  ===================

    ``rfc4106(gcm(aes))`` (IPsec ESP) takes the key followed by the 4-byte salt and an 8-byte
    IV; its AAD must be 8 or 12 bytes (the kernel sees ``AAD || IV`` with assoclen 16 or 20,
    built here). For ``ccm(aes)`` ``iv`` is the nonce; the 16-byte counter block the kernel wants
    (``L' || nonce || 0``) is built here. Other names go to the kernel unchecked.

    Never reuse an IV with the same key: GCM and ChaCha20-Poly1305 then leak the XOR of the
    plaintexts and allow forgeries.
    """

    _kind = "aead"

    def __init__(self, name: str, key: Buffer, tag_size: int = 16) -> None:
        super().__init__(name)
        key = _bytes(key, "key")
        if not isinstance(tag_size, int) or isinstance(tag_size, bool):
            raise TypeError(f"tag_size must be an int, not {type(tag_size).__name__}")
        self._spec = spec = _aead_spec(name)
        if spec is not None:
            if len(key) not in spec.keys:
                raise ValueError(f"{name}: key must be {_sizes(spec.keys)} bytes, got {len(key)}")
            if tag_size not in spec.tags:
                raise ValueError(
                    f"{name}: tag_size must be {_sizes(spec.tags)} bytes, got {tag_size}"
                )
        elif not 0 <= tag_size <= 64:
            raise ValueError(f"{name}: tag_size {tag_size} is out of range")
        self.tag_size = tag_size
        self.key_size = len(key)
        # the IV size of a plain AEAD (gcm, chacha20-poly1305), whose calls skip _prepare
        self._fastiv = -1
        if spec is not None and spec.kind == "plain" and len(spec.ivs) == 1:
            self._fastiv = spec.ivs[0]
        self._open(key)
        try:
            self._tfm.setsockopt(SOL_ALG, ALG_SET_AEAD_AUTHSIZE, None, tag_size)  # type: ignore[union-attr]
        except OSError as exc:
            self.close()
            if exc.errno == errno.EINVAL:
                raise ValueError(f"{name}: the kernel refused tag_size {tag_size}") from None
            raise _alg_error(exc, f"{name}: setting the tag size") from None

    @property
    def iv_sizes(self) -> tuple[int, ...] | None:
        """The IV (nonce) sizes accepted, None if unknown to afalg."""
        return None if self._spec is None else self._spec.ivs

    def _prepare(self, iv: Any, aad: Any) -> tuple[bytes, bytes]:
        """(kernel IV, the associated data as the kernel sees it)."""
        if type(iv) is not bytes:
            iv = _bytes(iv, "iv")
        if type(aad) is not bytes:
            aad = b"" if aad is None else _bytes(aad, "aad")  # None: none, as cryptography's
        spec = self._spec
        if spec is None:
            return iv, aad
        if len(iv) not in spec.ivs:
            what = "nonce" if spec.kind == "ccm" else "iv"
            raise ValueError(f"{self.name}: {what} must be {_sizes(spec.ivs)} bytes, got {len(iv)}")
        kind = spec.kind
        if kind == "plain":
            return iv, aad
        if kind == "ccm":
            # RFC 3610 counter block A_0: flags = L' = L - 1 = 14 - len(nonce), nonce, counter 0
            return bytes([14 - len(iv)]) + iv + bytes(15 - len(iv)), aad
        if len(aad) not in spec.assoclens:  # type: ignore[operator]  # rfc4106, rfc4309
            raise ValueError(
                f"{self.name}: aad must be 8 or 12 bytes (SPI || seq, or with ESN), got {len(aad)}"
            )
        return iv, aad + iv

    def encrypt(self, iv: Buffer, plaintext: Buffer, aad: Buffer | None = b"") -> bytes:
        """``ciphertext || tag`` of ``plaintext`` (``tag_size`` bytes longer). ``aad`` None is
        no associated data, as for cryptography's ``AESGCM``."""
        if type(iv) is bytes and type(aad) is bytes and len(iv) == self._fastiv:
            kiv, assoc = iv, aad  # the common case, checked: plain AEAD, bytes, right IV size
        else:
            kiv, assoc = self._prepare(iv, aad)
        data = plaintext if type(plaintext) is bytes else _view(plaintext, "plaintext")
        return self._crypt(_ENCRYPT, kiv, assoc, data, len(data) + self.tag_size, None)  # type: ignore[return-value]

    def decrypt(self, iv: Buffer, ciphertext_and_tag: Buffer, aad: Buffer | None = b"") -> bytes:
        """The plaintext, or :class:`afalg.InvalidTag` if the tag does not verify (or the input
        is shorter than the tag). Unauthenticated plaintext is never returned."""
        if type(iv) is bytes and type(aad) is bytes and len(iv) == self._fastiv:
            kiv, assoc = iv, aad
        else:
            kiv, assoc = self._prepare(iv, aad)
        data = self._ciphertext(ciphertext_and_tag)
        return self._crypt(_DECRYPT, kiv, assoc, data, len(data) - self.tag_size, None)  # type: ignore[return-value]

    def encrypt_into(
        self, out: Buffer, iv: Buffer, plaintext: Buffer, aad: Buffer | None = b""
    ) -> int:
        """Encrypt into ``out`` as the kernel writes its output: ``aad || ciphertext || tag``
        at the start of ``out`` (a writable bytes-like object of at least ``len(aad) +
        len(plaintext) + tag_size`` bytes); returns that length, as
        :meth:`socket.socket.recv_into` returns a count. Nothing is allocated or copied: the
        kernel writes into ``out``, and the call is the two system calls and little more.

        The AAD comes first because AF_ALG copies it through to the output; where the AAD is a
        header, as in TLS 1.3 (the 5-byte record header), ``out`` then holds the whole record.
        For ``rfc4106``/``rfc4309`` the kernel's AAD is ``aad || iv``: ``len(aad) + 8`` bytes
        precede the ciphertext."""
        if type(iv) is bytes and type(aad) is bytes and len(iv) == self._fastiv:
            kiv, assoc = iv, aad
        else:
            kiv, assoc = self._prepare(iv, aad)
        data = plaintext if type(plaintext) is bytes else _view(plaintext, "plaintext")
        size = len(data) + self.tag_size
        if type(out) is not bytearray or len(out) < len(assoc) + size:
            out = _writable(out, len(assoc) + size)
        return self._crypt(_ENCRYPT, kiv, assoc, data, size, out)  # type: ignore[return-value]

    def decrypt_into(
        self, out: Buffer, iv: Buffer, ciphertext_and_tag: Buffer, aad: Buffer | None = b""
    ) -> int:
        """Decrypt into ``out``, laid out as :meth:`encrypt_into`'s: ``aad || plaintext`` (at
        least ``len(aad) + len(ciphertext_and_tag) - tag_size`` bytes); returns that length.
        If the tag does not verify, :class:`afalg.InvalidTag` is raised and those bytes of
        ``out`` are zeroed: the kernel decrypts into ``out`` before it checks the tag."""
        if type(iv) is bytes and type(aad) is bytes and len(iv) == self._fastiv:
            kiv, assoc = iv, aad
        else:
            kiv, assoc = self._prepare(iv, aad)
        data = self._ciphertext(ciphertext_and_tag)
        size = len(data) - self.tag_size
        if type(out) is not bytearray or len(out) < len(assoc) + size:
            out = _writable(out, len(assoc) + size)
        return self._crypt(_DECRYPT, kiv, assoc, data, size, out)  # type: ignore[return-value]

    def _ciphertext(self, value: Any) -> bytes | memoryview:
        data = value if type(value) is bytes else _view(value, "ciphertext_and_tag")
        if len(data) < self.tag_size:
            self._check_open()
            raise InvalidTag(
                f"input of {len(data)} bytes is shorter than the {self.tag_size}-byte tag"
            )
        return data

    def _crypt(
        self,
        op: int,
        iv: bytes,
        assoc: bytes,
        data: bytes | memoryview,
        size: int,
        into: bytearray | memoryview | None,
    ) -> bytes | int:
        """Send ``assoc || data`` with the operation, IV and AAD length, then read the kernel's
        ``assoc || output`` (``size`` bytes of output): into ``into`` (its length returned), or
        as the output's bytes.

        The hot path of every AEAD call and of the record layer's kernel backend: the same two
        system calls as a bare loop (``socket.sendmsg_afalg``, whose control messages CPython
        builds in C, and ``recv_into``), with the checks that rarely fail done once around
        them. Without AAD the result is the bytes object recv() fills (no copy); with AAD the
        output is copied out of this object's reused buffer (the kernel writes the AAD back
        first; :meth:`encrypt_into` avoids that copy)."""
        skip = len(assoc)
        sending = skip + len(data)
        total = skip + size
        try:
            entry = self._idle.pop()
        except IndexError:
            entry = self._claim(sending, total)
        sock, snd, rcv, scratch = entry
        if sending > snd or total > rcv or not total:
            return self._crypt_slow(entry, op, iv, assoc, data, size, into)
        out = into
        try:
            sent = sock.sendmsg_afalg((assoc, data), op=op, iv=iv, assoclen=skip)
            if sent != sending:
                raise self._short_send(op, sent, sending)
            if into is not None:
                n = sock.recv_into(into, total)
            elif not skip:
                result = sock.recv(total)
                n = len(result)
            else:
                if scratch is None or len(scratch) < total:
                    out = _output(total)
                    if total <= _SCRATCH_MAX:
                        scratch = out
                        entry = (sock, snd, rcv, scratch)
                else:
                    out = scratch
                n = sock.recv_into(out, total)
            if n != total:
                raise self._short_read(op, n, total)
        except BaseException as exc:
            raise self._crypt_failed(exc, op, sock, out, total, sending) from None
        self._idle.append(entry)
        if self._tfm is None:  # closed while this ran
            self._close_idle()
        if into is not None:
            return total
        return result if not skip else out[skip:total].tobytes()  # type: ignore[index,union-attr]

    def _crypt_failed(
        self,
        exc: BaseException,
        op: int,
        sock: socket.socket,
        out: bytearray | memoryview | None,
        written: int,
        sending: int,
    ) -> BaseException:
        error = self._operation_failed(exc, op, sock, out, written)
        nomem = isinstance(error, AlgError) and error.errno == errno.ENOMEM
        if nomem and "optmem_max" not in str(error):
            error = _no_socket_memory(self._what(op), sending)
        return error

    def _crypt_slow(
        self,
        entry: _Op,
        op: int,
        iv: bytes,
        assoc: bytes,
        data: bytes | memoryview,
        size: int,
        into: bytearray | memoryview | None,
    ) -> bytes | int:
        """:meth:`_crypt` when the operation socket's buffers are too small, or there is
        nothing to read back."""
        skip = len(assoc)
        if not (skip or size):
            # no AAD and no output (decrypting a bare tag): the kernel checks the tag on a read
            entry = self._claim(len(data), 0, entry)
            sock = entry[0]
            try:
                sent = sock.sendmsg_afalg((data,), op=op, iv=iv, assoclen=0)
                if sent != len(data):
                    raise self._short_send(op, sent, len(data))
                sock.recv(1)
            except BaseException as exc:
                raise self._operation_failed(exc, op, sock, None, 0) from None
            self._give_back(entry)
            return b"" if into is None else 0
        self._give_back(self._claim(skip + len(data), skip + size, entry))
        return self._crypt(op, iv, assoc, data, size, into)  # the fast path, fitted


def _writable(out: Any, size: int) -> bytearray | memoryview:
    """``out`` as a writable buffer of at least ``size`` bytes (a bytearray as it is)."""
    if type(out) is not bytearray:
        try:
            view = memoryview(out)
        except TypeError:
            raise TypeError(
                f"out must be a writable bytes-like object, not {type(out).__name__}"
            ) from None
        if view.readonly:
            raise TypeError(f"out must be writable, not a read-only {type(out).__name__}")
        if view.format != "B" or view.ndim != 1:
            if not view.c_contiguous:
                raise ValueError("out must be C-contiguous")
            view = view.cast("B")
        out = view
    if len(out) < size:
        raise ValueError(f"out holds {len(out)} bytes, the output is {size}")
    return out


# --------------------------------------------------------------------------------------------
# /proc/crypto
# --------------------------------------------------------------------------------------------

PROC_CRYPTO = "/proc/crypto"


@dataclass(frozen=True)
class AlgInfo:
    """One entry of ``/proc/crypto`` (an algorithm implementation the kernel has registered).

    ``fields`` holds every ``key : value`` line, e.g. ``blocksize``, ``digestsize``,
    ``ivsize``, ``min keysize``, ``maxauthsize``, ``chunksize``."""

    name: str
    driver: str
    module: str
    priority: int
    type: str
    selftest: str
    internal: bool
    fields: dict[str, str]

    def size(self, key: str) -> int | None:
        """An integer field such as ``"digestsize"`` (None if absent)."""
        value = self.fields.get(key)
        return None if value is None else int(value)


def _parse_proc_crypto(text: str) -> list[AlgInfo]:
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "name" not in fields:
            continue
        out.append(
            AlgInfo(
                name=fields["name"],
                driver=fields.get("driver", ""),
                module=fields.get("module", ""),
                priority=int(fields.get("priority", "0")),
                type=fields.get("type", ""),
                selftest=fields.get("selftest", ""),
                internal=fields.get("internal") == "yes",
                fields=fields,
            )
        )
    return out


def algorithms(type: str | None = None, name: str | None = None) -> list[AlgInfo]:
    """The algorithms in ``/proc/crypto``, optionally only those of one ``type`` ("skcipher",
    "aead", "shash", "ahash", "rng", ...; "hash" matches both shash and ahash) or whose name or
    driver is ``name``. Templates such as ``cbc(aes)`` appear once something instantiated them
    (a ``bind()`` does)."""
    try:
        with open(PROC_CRYPTO) as f:
            infos = _parse_proc_crypto(f.read())
    except FileNotFoundError:
        return []
    if type is not None:
        types = {"shash", "ahash"} if type == "hash" else {type}
        infos = [i for i in infos if i.type in types]
    if name is not None:
        infos = [i for i in infos if name in (i.name, i.driver)]
    return infos


def _proc_sizes(name: str) -> AlgInfo | None:
    """The highest-priority /proc/crypto entry for ``name`` (what bind() picked)."""
    infos = [i for i in algorithms(name=name) if not i.internal]
    return max(infos, key=lambda i: i.priority) if infos else None


# --------------------------------------------------------------------------------------------
# Hash and HMAC
# --------------------------------------------------------------------------------------------

# hashlib name -> (kernel name, digest_size, block_size)
_HASHES: dict[str, tuple[str, int, int]] = {
    "md5": ("md5", 16, 64),
    "sha1": ("sha1", 20, 64),
    "sha224": ("sha224", 28, 64),
    "sha256": ("sha256", 32, 64),
    "sha384": ("sha384", 48, 128),
    "sha512": ("sha512", 64, 128),
    "sha3_224": ("sha3-224", 28, 144),
    "sha3_256": ("sha3-256", 32, 136),
    "sha3_384": ("sha3-384", 48, 104),
    "sha3_512": ("sha3-512", 64, 72),
    "blake2b": ("blake2b-512", 64, 128),
    "sm3": ("sm3", 32, 64),
    "ripemd160": ("rmd160", 20, 64),
}
_KERNEL_HASHES = {k: (k, d, b) for k, d, b in _HASHES.values()}
_KERNEL_HASHES.update(
    {
        "blake2b-256": ("blake2b-256", 32, 128),
        "blake2b-384": ("blake2b-384", 48, 128),
        "streebog256": ("streebog256", 32, 64),
        "streebog512": ("streebog512", 64, 64),
        "crc32c": ("crc32c", 4, 1),
        "crc32": ("crc32", 4, 1),
    }
)


def _hash_spec(name: str) -> tuple[str, int | None, int | None]:
    """(kernel name, digest size, block size) for a hashlib or kernel hash name."""
    if not isinstance(name, str):
        raise TypeError(f"hash name must be str, not {type(name).__name__}")
    key = name.lower().replace("-", "_") if name.lower().replace("-", "_") in _HASHES else name
    spec = _HASHES.get(key) or _KERNEL_HASHES.get(name)
    if spec:
        return spec
    m = re.fullmatch(r"hmac\((.+)\)", name)
    if m:
        inner, digest, block = _hash_spec(m.group(1))
        return f"hmac({inner})", digest, block
    return name, None, None


def _spliceable_fd(file: Any) -> int | None:
    """The descriptor whose bytes are the ones ``file`` reads (a FileIO or socket, or a buffered
    reader over one), or None: a gzip file's or a wrapper's fileno() is not what they read."""
    raw = file.raw if isinstance(file, (io.BufferedReader, io.BufferedRandom)) else file
    if not isinstance(raw, (io.FileIO, socket.SocketIO)):
        return None
    try:
        return int(file.fileno())
    except (OSError, ValueError):
        return None


class Hash(_AlgSocket):
    """A kernel hash with :mod:`hashlib`'s interface: ``update``, ``digest``, ``hexdigest``,
    ``copy``, ``digest_size``, ``block_size``, ``name`` (the kernel's name, e.g. "sha3-256").

    Takes hashlib names ("sha256", "sha3_256", "blake2b") or kernel names ("sha3-256",
    "blake2b-256", "crc32c", a driver such as "sha256-generic"). Data is sent with MSG_MORE and
    the kernel keeps the running state; ``digest()`` reads it from a clone (``accept()`` on the
    operation socket), so hashing can go on afterwards, as with hashlib. ``copy()`` clones too.
    ``update_file()`` feeds a file through splice() without copying it through Python.
    """

    _kind = "hash"

    def __init__(self, name: str, data: Buffer = b"", *, _key: bytes | None = None) -> None:
        kname, self.digest_size, self.block_size = _hash_spec(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):  # before any socket
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        super().__init__(kname)
        self._more = False  # the kernel holds a running state (data sent with MSG_MORE)
        self._failed = False  # an update failed: the kernel state is gone, refuse to go on
        self._open(_key)
        if self.digest_size is None:
            info = _proc_sizes(kname)
            self.digest_size = info.size("digestsize") if info else None
            self.block_size = info.size("blocksize") if info else None
            if not self.digest_size:
                self.close()
                raise AlgorithmNotAvailable(
                    errno.ENOENT, f"{kname}: digest size unknown (/proc/crypto has no entry)"
                )
        if data:
            self.update(data)

    def _check_state(self) -> None:
        self._check_open()
        if self._failed:
            raise AlgError(errno.EIO, f"{self.name}: an earlier update failed; the state is lost")

    def update(self, data: Buffer) -> None:
        """Hash ``data`` (any bytes-like)."""
        if type(data) is bytes:
            size = len(data)
        elif isinstance(data, (bytearray, memoryview)):
            size = memoryview(data).nbytes
        else:
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        with self._lock:
            if self._tfm is None or self._failed:
                self._check_state()
            if not size:
                return
            op = self._op or self._op_socket()
            try:
                sent = op.send(data, socket.MSG_MORE)
                if sent < size:
                    view = memoryview(data).cast("B")[sent:]
                    while view:
                        view = view[op.send(view, socket.MSG_MORE) :]
            except OSError as exc:
                self._drop_op()
                self._more = False
                self._failed = True
                raise _alg_error(exc, f"{self.name} update") from None
            self._more = True

    def update_file(self, file: int | str | os.PathLike | Any, length: int | None = None) -> int:
        """Hash a file, ``length`` bytes or to EOF, through ``splice()`` with ``SPLICE_F_MORE`` so
        the bytes never enter Python; return the number of bytes hashed.

        ``file`` is a path, a descriptor (hashed from its offset, which moves past the bytes
        hashed), or a binary file object, hashed from its position as :func:`hashlib.file_digest`
        would read it: what a buffered reader holds counts, and the object is left positioned
        after the bytes hashed (seekable files are spliced at that offset, then ``seek()``; pipes
        give up their buffer first). Other readable binary objects (``io.BytesIO``, a gzip file)
        are read through ``readinto()``. Falls back to read() where splice cannot go."""
        if length is not None:
            if not isinstance(length, int) or isinstance(length, bool):
                raise TypeError(f"length must be an int or None, not {type(length).__name__}")
            if length < 0:
                raise ValueError(f"length must be non-negative, got {length}")
        if isinstance(file, (str, os.PathLike)):
            with open(file, "rb", buffering=0) as f:
                return self.update_file(f, length)
        if length == 0:
            return 0
        readable = hasattr(file, "readinto") or hasattr(file, "read")
        if isinstance(file, bool) or not (isinstance(file, int) or readable):
            raise TypeError(f"file must be a path, a descriptor or a file object, not {file!r}")
        if isinstance(file, io.TextIOBase) or (hasattr(file, "readable") and not file.readable()):
            raise ValueError(f"{file!r} is not a file object in binary reading mode")
        fd = file if isinstance(file, int) else _spliceable_fd(file)
        if fd is None:
            return self._read_object(file, length)
        with self._lock:
            self._check_state()
            total = 0
            offset = None
            if not isinstance(file, int):
                with contextlib.suppress(OSError, ValueError):
                    file.flush()  # a BufferedRandom's pending writes
                if file.seekable():
                    offset = file.tell()
                elif hasattr(file, "peek"):  # a pipe: what the reader holds comes first
                    total = self._drain(file, length)
                    if length is not None and total == length:
                        return total
            op = self._op_socket()
            try:
                n = self._splice(fd, op, None if length is None else length - total, offset)
            except OSError as exc:
                self._drop_op()
                self._more = False
                self._failed = True
                if isinstance(exc, AlgError):
                    raise
                raise _alg_error(exc, f"{self.name} update_file") from None
            if n is None:  # splice refused this file before moving a byte
                return total + (
                    self._read_into(fd, length) if isinstance(file, int) else
                    self._read_object(file, None if length is None else length - total)
                )  # fmt: skip
            if offset is not None and not isinstance(file, int):
                file.seek(offset + n)  # past the bytes hashed; the reader's buffer stays true
            return total + n

    def _drain(self, file: Any, length: int | None) -> int:
        """Hash what a buffered, non-seekable reader holds (reading no further than it has, or
        one read when it holds nothing), so that its descriptor's offset is its position."""
        held = len(file.peek())
        if length is not None:
            held = min(held, length)
        if held:
            self.update(file.read(held))
        return held

    def _splice(
        self, fd: int, op: socket.socket, length: int | None, offset: int | None
    ) -> int | None:
        """Splice ``fd`` (from ``offset``, leaving the descriptor's own offset alone, or from its
        offset when None) into the hash; None when the kernel refuses to splice this file."""
        total = 0
        r, w = os.pipe()
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, 1 << 20)
            chunk = fcntl.fcntl(w, _F_GETPIPE_SZ)
            while length is None or total < length:
                want = chunk if length is None else min(chunk, length - total)
                try:
                    if offset is None:
                        n = os.splice(fd, w, want)
                    else:
                        n = os.splice(fd, w, want, offset_src=offset + total)
                except OSError as exc:
                    if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS) and not total:
                        return None
                    raise
                if n == 0:
                    break
                moved = 0
                while moved < n:
                    m = os.splice(r, op.fileno(), n - moved, flags=SPLICE_F_MORE)
                    if m == 0:
                        raise AlgError(errno.EIO, f"{self.name}: splice to the hash moved 0 bytes")
                    moved += m
                    self._more = True
                total += n
        finally:
            os.close(r)
            os.close(w)
        return total

    def _read_object(self, file: Any, length: int | None) -> int:
        total = 0
        buf = bytearray(1 << 16)
        with memoryview(buf) as view:
            while length is None or total < length:
                want = len(buf) if length is None else min(len(buf), length - total)
                if hasattr(file, "readinto"):
                    n = file.readinto(view[:want])
                    block = view[:n] if n else b""
                else:
                    block = file.read(want)
                if not block:
                    break
                self.update(block)
                total += len(block)
        return total

    def _read_into(self, fd: int, length: int | None) -> int:
        total = 0
        while length is None or total < length:
            block = os.read(fd, 1 << 16 if length is None else min(1 << 16, length - total))
            if not block:
                break
            self.update(block)
            total += len(block)
        return total

    def digest(self) -> bytes:
        """The digest of everything hashed so far; hashing may continue afterwards."""
        with self._lock:
            if self._tfm is None or self._failed:
                self._check_state()
            op = self._op or self._op_socket()
            try:
                clone = op.accept()[0]
            except OSError as exc:
                raise _alg_error(exc, f"{self.name} digest") from None
            try:
                return clone.recv(self.digest_size)  # type: ignore[arg-type]
            except OSError as exc:
                raise _alg_error(exc, f"{self.name} digest") from None
            finally:
                clone.close()

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> Self:
        """An independent hash object with the same state (a kernel-side clone)."""
        with self._lock:
            self._check_state()
            tfm = self._check_open()
            op = self._op_socket()
            new = object.__new__(type(self))
            _AlgSocket.__init__(new, self.name)
            new.digest_size, new.block_size = self.digest_size, self.block_size
            new._more = self._more
            new._failed = False
            new._tfm = tfm.dup()
            try:
                new._op, _ = op.accept()
            except OSError as exc:
                new.close()
                raise _alg_error(exc, f"{self.name} copy") from None
            return new


class HMAC(Hash):
    """HMAC in the kernel: ``HMAC("sha256", key)`` or ``HMAC("hmac(sha256)", key)`` alike,
    :mod:`hmac`'s interface plus ``verify(tag)`` (constant time, raises InvalidTag)."""

    def __init__(self, name: str, key: Buffer, data: Buffer = b"") -> None:
        key = _bytes(key, "key")
        if not isinstance(name, str):
            raise TypeError(f"hash name must be str, not {type(name).__name__}")
        if not name.startswith("hmac("):
            name = f"hmac({_hash_spec(name)[0]})"
        super().__init__(name, data, _key=key)

    def verify(self, tag: Buffer) -> None:
        """Raise :class:`afalg.InvalidTag` unless ``tag`` is the full digest (compared in
        constant time)."""
        if not _hmac.compare_digest(self.digest(), _bytes(tag, "tag")):
            raise InvalidTag("HMAC verification failed")


def new(name: str, data: Buffer = b"") -> Hash:
    """A :class:`Hash`, like :func:`hashlib.new`."""
    if isinstance(name, str) and name.startswith("hmac("):
        raise ValueError(f"{name} needs a key: use afalg.alg.HMAC(name, key)")
    return Hash(name, data)


def file_digest(file: int | str | os.PathLike | Any, name: str) -> Hash:
    """Hash a file from its position to EOF in the kernel (splice, no copy through Python), like
    :func:`hashlib.file_digest` (a buffered reader's position, not its descriptor's offset; see
    :meth:`Hash.update_file`); returns the :class:`Hash`."""
    h = Hash(name)
    try:
        h.update_file(file)
    except BaseException:
        h.close()
        raise
    return h


# --------------------------------------------------------------------------------------------
# Symmetric ciphers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CipherSpec:
    keys: tuple[int, ...] | None
    iv: int
    block: int  # bytes per unit of the mode: 16 for cbc/ecb/xts, 1 for stream modes
    chunk: int  # the kernel's chunksize: what a streaming read must be a multiple of
    chains: bool  # the kernel carries the IV from one read to the next (streaming works)
    min_len: int = 0
    # For modes the kernel does not chain but whose IV after n bytes (a multiple of ``chunk``)
    # userspace can compute: a stream then runs as a series of complete operations.
    advance: Callable[[bytes, int], bytes] | None = None


def _chacha20_advance(iv: bytes, n: int) -> bytes:
    """The kernel's chacha20 IV (32-bit little-endian block counter, then the 12-byte nonce)
    after ``n`` bytes; the counter wraps at 2**32 as the kernel's does."""
    counter = (int.from_bytes(iv[:4], "little") + n // 64) % 2**32
    return counter.to_bytes(4, "little") + iv[4:]


def _cipher_spec(name: str) -> _CipherSpec | None:
    m = re.fullmatch(r"(cbc|ecb|ctr|xts|cts\(cbc|rfc3686\(ctr)\((\w+)\)\)?", name)
    if m and m.group(2) in _BLOCK_KEYS:
        mode, keys = m.group(1), _BLOCK_KEYS[m.group(2)]
        if mode.startswith(("cts", "rfc3686")) != name.endswith("))"):
            return None
        if mode == "cbc":
            return _CipherSpec(keys, 16, 16, 16, True)
        if mode == "ecb":
            return _CipherSpec(keys, 0, 16, 16, True)
        if mode == "ctr":
            return _CipherSpec(keys, 16, 1, 16, True)
        if mode == "rfc3686(ctr":
            return _CipherSpec(tuple(k + 4 for k in keys), 8, 1, 16, True)
        if mode == "xts":
            return _CipherSpec(tuple(2 * k for k in keys), 16, 1, 16, False, 16)
        return _CipherSpec(keys, 16, 1, 16, False, 16)  # cts(cbc(...))
    if name == "chacha20":
        return _CipherSpec((32,), 16, 1, 64, False, advance=_chacha20_advance)
    return None


_STREAM_CHUNK = 64 * 1024


class SKCipher(_AlgSocket):
    """A symmetric cipher in the kernel (``skcipher``): ``cbc(aes)``, ``ctr(aes)``,
    ``ecb(aes)``, ``xts(aes)``, ``cts(cbc(aes))``, ``rfc3686(ctr(aes))``, ``chacha20``, ...

    One-shot ``encrypt(iv, data)`` / ``decrypt(iv, data)``, or streaming ``encryptor(iv)`` /
    ``decryptor(iv)`` with ``update()`` and ``finalize()`` for data larger than memory (sent
    with MSG_MORE; the kernel carries the IV across reads for cbc, ctr and ecb; chacha20 runs as
    a series of complete operations whose IV afalg advances; xts and cts, which cannot be cut,
    are buffered until ``finalize()``). ``padding="pkcs7"`` pads and strips PKCS#7 (block modes
    only) and raises :class:`afalg.PaddingError` on malformed padding.

    Never reuse an IV (or counter) with the same key.
    """

    _kind = "skcipher"

    def __init__(self, name: str, key: Buffer, *, padding: str | None = None) -> None:
        super().__init__(name)
        key = _bytes(key, "key")
        if padding is not None and not isinstance(padding, str):
            raise TypeError(f"padding must be None or 'pkcs7', not {type(padding).__name__}")
        if padding not in (None, "pkcs7"):
            raise ValueError(f"padding must be None or 'pkcs7', got {padding!r}")
        spec = _cipher_spec(name)
        if spec is not None and spec.keys is not None and len(key) not in spec.keys:
            raise ValueError(f"{name}: key must be {_sizes(spec.keys)} bytes, got {len(key)}")
        if padding and spec is not None and spec.block == 1:  # known before any socket
            raise ValueError(f"{name} is not a block mode: PKCS#7 padding does not apply")
        self._open(key)
        if spec is None:
            info = _proc_sizes(name)
            if info is None:
                spec = _CipherSpec(None, 0, 1, 1, False)
            else:
                spec = _CipherSpec(
                    None,
                    info.size("ivsize") or 0,
                    info.size("blocksize") or 1,
                    info.size("chunksize") or info.size("blocksize") or 1,
                    False,
                )
        self._spec = spec
        if padding and spec.block == 1:
            self.close()
            raise ValueError(f"{name} is not a block mode: PKCS#7 padding does not apply")
        self.padding = padding
        self.key_size = len(key)
        # for the fast path of encrypt()/decrypt(): no padding, an IV of the right size
        self._ivsize = -1 if padding else spec.iv
        self._block, self._min_len = spec.block, spec.min_len

    @property
    def block_size(self) -> int:
        return self._spec.block

    @property
    def iv_size(self) -> int:
        return self._spec.iv

    def _check_iv(self, iv: Any) -> bytes:
        iv = b"" if iv is None else _bytes(iv, "iv")
        if len(iv) != self._spec.iv:
            raise ValueError(f"{self.name}: iv must be {self._spec.iv} bytes, got {len(iv)}")
        return iv

    def encrypt(self, iv: Buffer | None, data: Buffer) -> bytes:
        """Encrypt ``data`` in one go (padded first when ``padding="pkcs7"``)."""
        if type(data) is bytes and type(iv) is bytes and len(iv) == self._ivsize:
            n = len(data)  # the common case, checked here once: no padding, whole blocks
            if n <= _STREAM_CHUNK and not n % self._block and n >= self._min_len:
                return self._crypt(_ENCRYPT, iv, data)
        return self._one_shot(AlgOp.ENCRYPT, iv, data)

    def decrypt(self, iv: Buffer | None, data: Buffer) -> bytes:
        """Decrypt ``data`` in one go (and strip its padding when ``padding="pkcs7"``)."""
        if type(data) is bytes and type(iv) is bytes and len(iv) == self._ivsize:
            n = len(data)
            if n <= _STREAM_CHUNK and not n % self._block and n >= self._min_len:
                return self._crypt(_DECRYPT, iv, data)
        return self._one_shot(AlgOp.DECRYPT, iv, data)

    def encrypt_into(self, out: Buffer, iv: Buffer | None, data: Buffer) -> int:
        """:meth:`encrypt` writing the ciphertext into the start of ``out`` (writable, at least
        ``len(data)`` bytes): the kernel writes there, nothing is allocated or copied (up to
        64 KiB; longer data is copied in from :meth:`encrypt`). Returns ``len(data)``. Not
        with ``padding="pkcs7"`` (the output length would differ from the input's)."""
        return self._crypt_into(_ENCRYPT, out, iv, data)

    def decrypt_into(self, out: Buffer, iv: Buffer | None, data: Buffer) -> int:
        """:meth:`decrypt` writing the plaintext into ``out``, as :meth:`encrypt_into`."""
        return self._crypt_into(_DECRYPT, out, iv, data)

    def _crypt_into(self, op: int, out: Any, iv: Any, data: Any) -> int:
        if self.padding:
            raise ValueError(f"{self.name}: *_into() is for unpadded data (padding='pkcs7')")
        if type(data) is not bytes:
            data = _view(data, "data")
        n = len(data)
        if type(out) is not bytearray or len(out) < n:
            out = _writable(out, n)
        if not (type(iv) is bytes and len(iv) == self._ivsize):
            iv = self._check_iv(iv)
        if n > _STREAM_CHUNK:
            out[:n] = self._one_shot(AlgOp(op), iv, data)
            return n
        if n % self._block or n < self._min_len:
            self._check_open()
            self._check_length(AlgOp(op), n)
        self._crypt(op, iv, data, out)
        return n

    def encryptor(self, iv: Buffer | None) -> CipherStream:
        return CipherStream(self, AlgOp.ENCRYPT, self._check_iv(iv))

    def decryptor(self, iv: Buffer | None) -> CipherStream:
        return CipherStream(self, AlgOp.DECRYPT, self._check_iv(iv))

    def _one_shot(self, op: AlgOp, iv: Any, data: Any) -> bytes:
        iv = self._check_iv(iv)
        if type(data) is not bytes:
            data = _bytes(data, "data")
        if self._tfm is None:
            self._check_open()
        if len(data) > _STREAM_CHUNK:
            stream = CipherStream(self, op, iv)
            with stream:
                return stream.update(data) + stream.finalize()
        padding = self.padding
        if padding and op == _ENCRYPT:
            data = _pkcs7_pad(data, self._spec.block)
        self._check_length(op, len(data))
        out = self._crypt(int(op), iv, data)
        if padding and op == _DECRYPT:
            out = _pkcs7_unpad(out, self._spec.block)
        return out

    def _crypt(
        self,
        op: int,
        iv: bytes,
        data: bytes | memoryview,
        into: bytearray | memoryview | None = None,
    ) -> bytes:
        """One complete operation (no MSG_MORE) on an idle operation socket: one
        ``sendmsg_afalg()`` with the operation and IV, one ``recv()`` of the output (the bytes
        object it fills is the result: no copy), or ``recv_into(into)`` (then b"" is returned).
        ``data`` is checked, at most _STREAM_CHUNK bytes."""
        n = len(data)
        try:
            entry = self._idle.pop()
        except IndexError:
            entry = self._claim(n, n)
        sock = entry[0]
        if n > entry[1] or n > entry[2]:
            entry = self._claim(n, n, entry)
        try:
            if iv:
                sent = sock.sendmsg_afalg((data,), op=op, iv=iv)
            else:
                sent = sock.sendmsg_afalg((data,), op=op)
            if sent != n:
                raise self._short_send(op, sent, n)
            if into is not None:
                got = sock.recv_into(into, n) if n else 0
                if got != n:
                    raise self._short_read(op, got, n)
                out = b""
            else:
                out = sock.recv(n) if n else b""
                if len(out) != n:  # not seen: the kernel returns a whole operation at once
                    out += _recv_exact(sock, n - len(out), self._what(op))
        except BaseException as exc:
            raise self._operation_failed(exc, op, sock, None, 0) from None
        self._idle.append(entry)
        if self._tfm is None:  # closed while this ran
            self._close_idle()
        return out

    def _check_length(self, op: AlgOp, n: int) -> None:
        spec = self._spec
        if n % spec.block:
            if self.padding and op == AlgOp.DECRYPT:
                raise PaddingError(
                    f"{self.name}: ciphertext of {n} bytes is not a multiple of {spec.block}"
                )
            raise ValueError(
                f"{self.name}: data must be a multiple of {spec.block} bytes, got {n}"
                + ("" if self.padding else " (use padding='pkcs7')")
            )
        if n < spec.min_len and n:
            raise ValueError(f"{self.name}: data must be at least {spec.min_len} bytes, got {n}")


def _crypt_once(sock: socket.socket, name: str, op: AlgOp, iv: bytes, data: Buffer) -> bytes:
    """One complete skcipher operation (no MSG_MORE) on a stream's own operation socket ``sock``,
    its buffers fitted here; the output."""
    what = f"{name} {op.name.lower()}"
    _fit_buffer(sock, len(data), send=True)
    _fit_buffer(sock, len(data), send=False)
    _sendmsg(sock, [data], cmsg.alg_cmsgs(op, iv or None), 0, what)
    return _recv_exact(sock, len(data), what) if data else b""


class CipherStream:
    """One streaming encryption or decryption (from :meth:`SKCipher.encryptor` /
    :meth:`SKCipher.decryptor`): ``update(data) -> bytes`` as output becomes available,
    ``finalize() -> bytes`` for the rest. Owns its own operation socket."""

    def __init__(self, cipher: SKCipher, op: AlgOp, iv: bytes) -> None:
        self._cipher = cipher
        self._op = op
        self._iv = iv
        self._spec = cipher._spec
        tfm = cipher._check_open()
        try:
            self._sock: socket.socket | None = tfm.accept()[0]
        except OSError as exc:
            raise _alg_error(exc, f"{cipher.name}: accept()") from None
        self._started = False
        self._pending = 0  # bytes the kernel holds, not yet read back
        self._buffer = bytearray()  # non-chaining modes: everything until finalize()
        self._held = b""  # PKCS#7 decryption: the last block, until finalize()
        self._total = 0
        if self._spec.chains:
            need = _STREAM_CHUNK + self._spec.chunk
            try:
                _fit_buffer(self._sock, need, send=True)
                _fit_buffer(self._sock, need, send=False)
            except BaseException:
                self._sock.close()
                raise

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise AlgError(errno.EBADF, f"{self._cipher.name} stream is finalized or closed")
        return self._sock

    def update(self, data: Buffer) -> bytes:
        """Feed ``data``; return the output available so far."""
        data = _view(data, "data")
        sock = self._live()
        self._total += len(data)
        if not self._spec.chains:
            self._buffer += data
            return self._advance_buffered(sock)
        what = f"{self._cipher.name} {self._op.name.lower()}"
        out = []
        try:
            for start in range(0, len(data), _STREAM_CHUNK):
                piece = data[start : start + _STREAM_CHUNK]
                cmsgs = [] if self._started else cmsg.alg_cmsgs(self._op, self._iv or None)
                _sendmsg(sock, [piece], cmsgs, socket.MSG_MORE, what)
                self._started = True
                self._pending += len(piece)
                ready = self._pending - self._pending % self._spec.chunk
                if ready:
                    out.append(_recv_exact(sock, ready, what))
                    self._pending -= ready
        except BaseException:
            self.close()
            raise
        return self._hold_back(b"".join(out))

    def _advance_buffered(self, sock: socket.socket) -> bytes:
        """For a mode with an ``advance`` rule: run the whole chunks buffered so far as complete
        operations (up to _STREAM_CHUNK bytes each), moving the IV past them."""
        advance, chunk = self._spec.advance, self._spec.chunk
        if advance is None:
            return b""
        out = []
        try:
            while len(self._buffer) >= chunk:
                n = min(len(self._buffer) - len(self._buffer) % chunk, _STREAM_CHUNK)
                with memoryview(self._buffer)[:n] as piece:  # released before the del below
                    out.append(_crypt_once(sock, self._cipher.name, self._op, self._iv, piece))
                del self._buffer[:n]
                self._iv = advance(self._iv, n)
        except BaseException:
            self.close()
            raise
        return b"".join(out)

    def _hold_back(self, out: bytes) -> bytes:
        if not (self._cipher.padding and self._op == AlgOp.DECRYPT):
            return out
        out = self._held + out
        cut = max(0, len(out) - self._spec.block)
        self._held = out[cut:]
        return out[:cut]

    def finalize(self) -> bytes:
        """Process what is left (adding or checking PKCS#7 padding); the stream is then
        closed."""
        sock = self._live()
        cipher = self._cipher
        what = f"{cipher.name} {self._op.name.lower()}"
        try:
            tail = b""
            if cipher.padding and self._op == AlgOp.ENCRYPT:
                tail = _pkcs7_pad(b"", self._spec.block, self._total)
                self._total += len(tail)
            cipher._check_length(self._op, self._total)
            if not self._spec.chains:
                out = _crypt_once(sock, cipher.name, self._op, self._iv, bytes(self._buffer) + tail)
            else:
                cmsgs = [] if self._started else cmsg.alg_cmsgs(self._op, self._iv or None)
                _sendmsg(sock, [tail], cmsgs, 0, what)
                self._pending += len(tail)
                out = _recv_exact(sock, self._pending, what) if self._pending else b""
                self._pending = 0
            out = self._hold_back(out)
            if cipher.padding and self._op == AlgOp.DECRYPT:
                out += _pkcs7_unpad(self._held, self._spec.block)
            return out
        finally:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer = bytearray()
        self._held = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<afalg.CipherStream {self._cipher.name!r} {self._op.name.lower()} {state}>"


def _pkcs7_pad(data: bytes, block: int, total: int | None = None) -> bytes:
    n = block - ((len(data) if total is None else total) % block)
    return data + bytes([n]) * n


def _pkcs7_unpad(data: bytes, block: int) -> bytes:
    if not data or len(data) % block:
        raise PaddingError(f"padded plaintext must be a non-empty multiple of {block} bytes")
    n = data[-1]
    # check every pad byte without branching on which one differs
    good = 1 <= n <= block
    pad = data[-n:] if good else data[-1:]
    if not (good and _hmac.compare_digest(pad, bytes([n]) * n)):
        raise PaddingError()
    return data[:-n]


# --------------------------------------------------------------------------------------------
# Random numbers
# --------------------------------------------------------------------------------------------

_RNG_MAX_READ = 128  # algif_rng.c MAXSIZE: one recvmsg() returns at most this much


class RNG(_AlgSocket):
    """A kernel RNG (``rng`` socket), ``read(n) -> bytes``.

    ``name=None`` takes the kernel's default: ``stdrng`` (its DRBG) where the kernel has one,
    else ``jitterentropy_rng`` (Debian's 7.3 kernels are built without the DRBG,
    ``CONFIG_CRYPTO_DRBG`` unset); ``.name`` says which. An explicit name is used as given.
    ``seed=None`` lets it seed itself from the kernel's entropy (an empty reset); for a DRBG a
    given seed is a personalization string mixed into that, not a replacement. Deterministic
    RNGs (``ansi_cprng``) take their seed from here.
    """

    _kind = "rng"

    def __init__(self, name: str | None = None, seed: Buffer | None = None) -> None:
        key = b"" if seed is None else _bytes(seed, "seed")
        if name is not None:
            super().__init__(name)
            self._open(key)
            return
        first: AlgorithmNotAvailable | None = None
        for candidate in RNG_NAMES:
            super().__init__(candidate)
            try:
                self._open(key)
                return
            except AlgorithmNotAvailable as exc:
                if exc.errno != errno.ENOENT:
                    raise
                first = first or exc
        assert first is not None
        raise first

    def read(self, n: int) -> bytes:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        out = bytearray()
        with self._lock:
            self._check_open()
            op = self._op_socket()
            while len(out) < n:
                try:
                    chunk = op.recv(min(_RNG_MAX_READ, n - len(out)))
                except OSError as exc:
                    raise _alg_error(exc, f"{self.name} read") from None
                if not chunk:
                    raise AlgError(errno.EIO, f"{self.name}: the kernel returned no bytes")
                out += chunk
        return bytes(out)
