"""AEADs in the kernel: :class:`AEAD` and the sizes of the ones afalg knows."""

from __future__ import annotations

import errno
import re
import socket
from dataclasses import dataclass
from typing import Any

from afalg._alg.base import (
    _BLOCK_KEYS,
    _DECRYPT,
    _ENCRYPT,
    _SCRATCH_MAX,
    _AlgSocket,
    _bytes,
    _no_socket_memory,
    _Op,
    _output,
    _short_read,
    _short_send,
    _sizes,
    _view,
    _writable,
)
from afalg._alg.refusal import _alg_error
from afalg._uapi import (
    ALG_SET_AEAD_AUTHSIZE,
    SOL_ALG,
)
from afalg.cmsg import Buffer
from afalg.errors import AlgError, InvalidTag


@dataclass(frozen=True)
class _AEADSpec:
    keys: tuple[int, ...]
    ivs: tuple[int, ...]
    tags: tuple[int, ...]
    assoclens: tuple[int, ...] | None = None  # rfc4106: AAD lengths allowed (before the IV)
    kind: str = "plain"  # plain | ccm | rfc4106


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
        """Encrypt ``plaintext`` and return ``ciphertext || tag`` (``tag_size`` bytes longer).

        ``aad`` None is no associated data, as for cryptography's ``AESGCM``."""
        if type(iv) is bytes and type(aad) is bytes and len(iv) == self._fastiv:
            kiv, assoc = iv, aad  # the common case, checked: plain AEAD, bytes, right IV size
        else:
            kiv, assoc = self._prepare(iv, aad)
        data = plaintext if type(plaintext) is bytes else _view(plaintext, "plaintext")
        return self._crypt(_ENCRYPT, kiv, assoc, data, len(data) + self.tag_size, None)  # type: ignore[return-value]

    def decrypt(self, iv: Buffer, ciphertext_and_tag: Buffer, aad: Buffer | None = b"") -> bytes:
        """Decrypt ``ciphertext || tag`` and return the plaintext once the tag verifies.

        Raises :class:`afalg.InvalidTag` if the tag does not verify (or the input is shorter
        than the tag). Unauthenticated plaintext is never returned."""
        if type(iv) is bytes and type(aad) is bytes and len(iv) == self._fastiv:
            kiv, assoc = iv, aad
        else:
            kiv, assoc = self._prepare(iv, aad)
        data = self._ciphertext(ciphertext_and_tag)
        return self._crypt(_DECRYPT, kiv, assoc, data, len(data) - self.tag_size, None)  # type: ignore[return-value]

    def encrypt_into(
        self, out: Buffer, iv: Buffer, plaintext: Buffer, aad: Buffer | None = b""
    ) -> int:
        """Encrypt into ``out`` as the kernel writes its output, and return the length written.

        The output is ``aad || ciphertext || tag`` at the start of ``out`` (a writable
        bytes-like object of at least ``len(aad) + len(plaintext) + tag_size`` bytes); the
        length is returned as :meth:`socket.socket.recv_into` returns a count. Nothing is
        allocated or copied: the kernel writes into ``out``, and the call is the two system
        calls and little more.

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
        """Decrypt into ``out``, laid out as :meth:`encrypt_into`'s, and return the length.

        The output is ``aad || plaintext`` (at least ``len(aad) + len(ciphertext_and_tag) -
        tag_size`` bytes). If the tag does not verify, :class:`afalg.InvalidTag` is raised and
        those bytes of ``out`` are zeroed: the kernel decrypts into ``out`` before it checks the
        tag."""
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
        """Run one AEAD operation and return its output (or its length, with ``into``).

        Sends ``assoc || data`` with the operation, IV and AAD length, then reads the kernel's
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
                raise _short_send(self._what(op), sent, sending)
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
                raise _short_read(self._what(op), n, total)
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
        """Run :meth:`_crypt` the slow way, with its own buffers.

        Used when the operation socket's buffers are too small, or there is nothing to read
        back."""
        skip = len(assoc)
        if not (skip or size):
            # no AAD and no output (decrypting a bare tag): the kernel checks the tag on a read
            entry = self._claim(len(data), 0, entry)
            sock = entry[0]
            try:
                sent = sock.sendmsg_afalg((data,), op=op, iv=iv, assoclen=0)
                if sent != len(data):
                    raise _short_send(self._what(op), sent, len(data))
                sock.recv(1)
            except BaseException as exc:
                raise self._operation_failed(exc, op, sock, None, 0) from None
            self._give_back(entry)
            return b"" if into is None else 0
        self._give_back(self._claim(skip + len(data), skip + size, entry))
        return self._crypt(op, iv, assoc, data, size, into)  # the fast path, fitted
