"""The record layer's AEAD, in the kernel or in pyca/cryptography, behind one interface.

The two AEAD backends of the record layer: the kernel's (AF_ALG, :class:`afalg.alg.AEAD`)
and pyca/cryptography's, behind one interface::

    encrypt(nonce, plaintext, aad) -> ciphertext || 16-byte tag  (bytes or a fresh bytearray)
    encrypt_record(nonce, plaintext, header) -> header || ciphertext || tag  (the header is the AAD)
    decrypt(nonce, ciphertext || tag, aad) -> plaintext   (raises afalg.InvalidTag)
    close()

Both take the full 12-byte nonce: ``gcm(aes)`` and ``rfc7539(chacha20,poly1305)`` in the
kernel, ``AESGCM`` and ``ChaCha20Poly1305`` in cryptography. One object serves one direction of
one connection for as long as its key lives: the kernel socket (or the cryptography context) is
bound once and reused for every record.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Literal, Protocol

from cryptography.exceptions import InvalidTag as _CryptographyInvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from afalg.alg import AEAD
from afalg.cmsg import Buffer
from afalg.errors import AlgorithmNotAvailable, InvalidTag
from afalg.keys import CipherSuite

__all__ = [
    "TAG_SIZE",
    "Backend",
    "ChosenBackend",
    "CryptographyAEAD",
    "KernelAEAD",
    "RecordAEAD",
    "kernel_refusal",
    "new_record_aead",
]

TAG_SIZE = 16
_RECORD_ROOM = 5 + 2**14 + 256 + TAG_SIZE  # a TLS 1.3 record: header, TLSInnerPlaintext, tag

Backend = Literal["auto", "kernel", "cryptography"]
"""Where a record AEAD may run (``algif_backend=``): the kernel if it can, else cryptography."""
ChosenBackend = Literal["kernel", "cryptography"]
"""Where a connection's record AEAD runs (``conn.backend``)."""


class RecordAEAD(Protocol):
    """What the record layer needs from an AEAD."""

    name: str

    def encrypt(self, nonce: bytes, plaintext: Buffer, aad: bytes) -> bytes | bytearray: ...

    def encrypt_record(self, nonce: bytes, plaintext: Buffer, header: bytes) -> bytes: ...

    def decrypt(self, nonce: bytes, ciphertext_and_tag: Buffer, aad: bytes) -> bytes: ...

    def close(self) -> None: ...


class CryptographyAEAD:
    """pyca/cryptography's AESGCM or ChaCha20Poly1305 (OpenSSL underneath, userspace)."""

    backend = "cryptography"

    def __init__(self, suite: CipherSuite, key: bytes) -> None:
        self.name = suite.kernel_aead
        self._aead: AESGCM | ChaCha20Poly1305 | None = (
            ChaCha20Poly1305(key) if suite.is_chacha20 else AESGCM(key)
        )

    def encrypt(self, nonce: bytes, plaintext: Buffer, aad: bytes) -> bytes:
        if self._aead is None:
            raise ValueError("AEAD is closed")
        return self._aead.encrypt(nonce, plaintext, aad)

    def encrypt_record(self, nonce: bytes, plaintext: Buffer, header: bytes) -> bytes:
        return header + self.encrypt(nonce, plaintext, header)

    def decrypt(self, nonce: bytes, ciphertext_and_tag: Buffer, aad: bytes) -> bytes:
        if self._aead is None:
            raise ValueError("AEAD is closed")
        try:
            return self._aead.decrypt(nonce, ciphertext_and_tag, aad)
        except _CryptographyInvalidTag:
            raise InvalidTag() from None

    def close(self) -> None:
        self._aead = None

    def __repr__(self) -> str:
        return f"<CryptographyAEAD {self.name}{' closed' if self._aead is None else ''}>"


class KernelAEAD:
    """The kernel's AEAD through AF_ALG (afalg.alg.AEAD); one bound socket, reused."""

    backend = "kernel"
    encrypt: Callable[[bytes, Buffer, bytes], bytes | bytearray]
    decrypt: Callable[[bytes, Buffer, bytes], bytes]

    def __init__(self, suite: CipherSuite, key: bytes) -> None:
        self.name = suite.kernel_aead
        self._aead = AEAD(self.name, key, tag_size=TAG_SIZE)
        # Called once a record: the kernel AEAD's own methods, no wrapper between (they check
        # the sizes, and a short or forged input raises afalg.InvalidTag, as the protocol says).
        self.encrypt = self._aead.encrypt
        self.decrypt = self._aead.decrypt
        self._record = bytearray(_RECORD_ROOM)  # reused by encrypt_record: one direction's
        self._record_view = memoryview(self._record)  # records are sealed one at a time

    def encrypt_record(self, nonce: bytes, plaintext: Buffer, header: bytes) -> bytes:
        """The whole record as the kernel writes it, copied out once.

        AF_ALG copies the AAD (here the record's header) to the front of its output."""
        n = self._aead.encrypt_into(self._record, nonce, plaintext, header)
        return self._record_view[:n].tobytes()

    def close(self) -> None:
        self._aead.close()

    def __repr__(self) -> str:
        return f"<KernelAEAD {self._aead!r}>"


def new_record_aead(suite: CipherSuite, key: bytes, backend: Backend = "auto") -> RecordAEAD:
    """An AEAD for ``suite`` keyed with ``key``.

    ``"kernel"`` raises :class:`afalg.AlgorithmNotAvailable` when AF_ALG or the algorithm is
    missing; ``"auto"`` then falls back to ``"cryptography"``.
    """
    if backend == "cryptography":
        return CryptographyAEAD(suite, key)
    if backend == "kernel":
        return _kernel(suite, key)
    if backend == "auto":
        try:
            return _kernel(suite, key)
        except AlgorithmNotAvailable:
            return CryptographyAEAD(suite, key)
    raise ValueError(f"backend must be 'auto', 'kernel' or 'cryptography', not {backend!r}")


def _kernel(suite: CipherSuite, key: bytes) -> KernelAEAD:
    try:
        return KernelAEAD(suite, key)
    except ImportError as exc:  # afalg.alg not importable (yet): no kernel backend
        raise AlgorithmNotAvailable(errno.EAFNOSUPPORT, f"afalg.alg unavailable: {exc}") from exc


def kernel_refusal(suite: CipherSuite) -> AlgorithmNotAvailable | None:
    """Say why the kernel backend cannot run ``suite`` here, or return None when it can.

    The reason is AF_ALG missing, denied, or its AEAD refused (e.g. by
    ``crypto.af_alg_restrict``), found by a trial bind with a zero key, closed at once. Not
    cached: the answer follows the sysctl."""
    try:
        _kernel(suite, bytes(suite.key_length)).close()
    except AlgorithmNotAvailable as exc:
        return exc
    return None
