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
import os
import re
import socket
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from afalg import cmsg
from afalg._uapi import (
    AF_ALG,
    ALG_SET_AEAD_AUTHSIZE,
    ALG_SET_KEY,
    SOL_ALG,
    AlgOp,
)
from afalg.cmsg import Buffer
from afalg.errors import AlgError, AlgorithmNotAvailable, InvalidTag

__all__ = ["AEAD"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


# --------------------------------------------------------------------------------------------
# Helpers: binding, errors, buffers
# --------------------------------------------------------------------------------------------


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes-like, not {type(value).__name__}")


def _alg_error(exc: OSError, what: str) -> AlgError:
    if exc.errno == errno.EBADMSG:
        return InvalidTag()
    return AlgError(exc.errno, f"{what}: {os.strerror(exc.errno or 0)}")


def _bind(kind: str, name: str) -> socket.socket:
    """A transform socket bound to ``(kind, name)``."""
    if not isinstance(name, str):
        raise TypeError(f"algorithm name must be str, not {type(name).__name__}")
    if not 0 < len(name.encode()) < cmsg.SALG_NAME_MAX:
        raise ValueError(f"algorithm name must be 1 to {cmsg.SALG_NAME_MAX - 1} bytes: {name!r}")
    try:
        sock = socket.socket(AF_ALG, socket.SOCK_SEQPACKET, 0)
    except OSError as exc:
        raise AlgorithmNotAvailable(
            exc.errno, f"AF_ALG sockets are not available here: {os.strerror(exc.errno or 0)}"
        ) from None
    try:
        sock.bind((kind, name))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOENT:
            raise AlgorithmNotAvailable(
                errno.ENOENT, f"the kernel has no {kind} algorithm {name!r}"
            ) from None
        raise _alg_error(exc, f"bind({kind!r}, {name!r})") from None
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


class _AlgSocket:
    """The transform socket, the reused operation socket, and their lifetime."""

    _kind: ClassVar[str] = ""

    def __init__(self, name: str) -> None:
        self._tfm: socket.socket | None = None
        self._op: socket.socket | None = None
        self._lock = threading.RLock()
        self._sndbuf = 0
        self._rcvbuf = 0
        self.name = name

    def _open(self, key: bytes | None = None) -> None:
        self._tfm = _bind(self._kind, self.name)
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
            self._sndbuf = self._rcvbuf = 0
        return self._op

    def _drop_op(self) -> None:
        """Forget the operation socket after an error: its kernel state is unknown."""
        if self._op is not None:
            self._op.close()
            self._op = None

    def _fit(self, send: int, recv: int) -> None:
        op = self._op_socket()
        if send > self._sndbuf:
            self._sndbuf = _fit_buffer(op, send, send=True)
        if recv > self._rcvbuf:
            self._rcvbuf = _fit_buffer(op, recv, send=False)

    @property
    def closed(self) -> bool:
        return self._tfm is None

    def fileno(self) -> int:
        """The transform socket's descriptor (-1 once closed)."""
        return -1 if self._tfm is None else self._tfm.fileno()

    def close(self) -> None:
        """Close both sockets; calling it again does nothing."""
        with self._lock:
            self._drop_op()
            if self._tfm is not None:
                self._tfm.close()
                self._tfm = None

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
        op = -1 if self._op is None else self._op.fileno()
        return f"<afalg.{type(self).__name__} {self.name!r} fd={self.fileno()} op_fd={op}>"

    def __getstate__(self) -> None:
        raise TypeError(f"cannot pickle {type(self).__name__}: it owns kernel sockets")


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


def _sendmsg(op: socket.socket, parts: list[bytes], cmsgs: list, flags: int, what: str) -> None:
    total = sum(len(p) for p in parts)
    try:
        sent = op.sendmsg([p for p in parts if p], cmsgs, flags)
    except OSError as exc:
        raise _alg_error(exc, what) from None
    if sent != total:
        raise AlgError(errno.EIO, f"{what}: the kernel took {sent} of {total} bytes")


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
        if not isinstance(tag_size, int):
            raise TypeError("tag_size must be an int")
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
        iv = _bytes(iv, "iv")
        aad = _bytes(aad, "aad")
        spec = self._spec
        if spec is None:
            return iv, aad
        if len(iv) not in spec.ivs:
            what = "nonce" if spec.kind == "ccm" else "iv"
            raise ValueError(f"{self.name}: {what} must be {_sizes(spec.ivs)} bytes, got {len(iv)}")
        if spec.kind == "ccm":
            # RFC 3610 counter block A_0: flags = L' = L - 1 = 14 - len(nonce), nonce, counter 0
            return bytes([14 - len(iv)]) + iv + bytes(15 - len(iv)), aad
        if spec.kind == "rfc4106":
            if len(aad) not in spec.assoclens:  # type: ignore[operator]
                raise ValueError(
                    f"{self.name}: aad must be 8 or 12 bytes (SPI || seq, or with ESN), "
                    f"got {len(aad)}"
                )
            return iv, aad + iv
        return iv, aad

    def encrypt(self, iv: Buffer, plaintext: Buffer, aad: Buffer = b"") -> bytes:
        """``ciphertext || tag`` of ``plaintext`` (``tag_size`` bytes longer)."""
        kiv, assoc = self._prepare(iv, aad)
        plaintext = _bytes(plaintext, "plaintext")
        out = len(assoc) + len(plaintext) + self.tag_size
        return self._crypt(AlgOp.ENCRYPT, kiv, assoc, plaintext, out)

    def decrypt(self, iv: Buffer, ciphertext_and_tag: Buffer, aad: Buffer = b"") -> bytes:
        """The plaintext, or :class:`afalg.InvalidTag` if the tag does not verify (or the input
        is shorter than the tag). Unauthenticated plaintext is never returned."""
        kiv, assoc = self._prepare(iv, aad)
        data = _bytes(ciphertext_and_tag, "ciphertext_and_tag")
        self._check_open()
        if len(data) < self.tag_size:
            raise InvalidTag(
                f"input of {len(data)} bytes is shorter than the {self.tag_size}-byte tag"
            )
        out = len(assoc) + len(data) - self.tag_size
        return self._crypt(AlgOp.DECRYPT, kiv, assoc, data, out)

    def _crypt(self, op: AlgOp, iv: bytes, assoc: bytes, data: bytes, out: int) -> bytes:
        what = f"{self.name} {op.name.lower()}"
        with self._lock:
            self._check_open()
            self._fit(len(assoc) + len(data), out)
            sock = self._op_socket()
            try:
                _sendmsg(sock, [assoc, data], cmsg.alg_cmsgs(op, iv, len(assoc)), 0, what)
                result = _recv_exact(sock, out, what) if out else self._recv_empty(sock, what)
            except BaseException:
                self._drop_op()
                raise
        return result[len(assoc) :]

    @staticmethod
    def _recv_empty(sock: socket.socket, what: str) -> bytes:
        # decrypting an empty message with no AAD: the kernel still checks the tag
        try:
            sock.recv(1)
        except OSError as exc:
            raise _alg_error(exc, what) from None
        return b""
