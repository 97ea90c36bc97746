"""Symmetric ciphers in the kernel: :class:`SKCipher`, its :class:`CipherStream`, PKCS#7."""

from __future__ import annotations

import errno
import hmac as _hmac
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

from afalg import cmsg
from afalg._alg.base import (
    _BLOCK_KEYS,
    _DECRYPT,
    _ENCRYPT,
    _AlgSocket,
    _bytes,
    _fit_buffer,
    _recv_exact,
    _sendmsg,
    _short_read,
    _short_send,
    _sizes,
    _view,
    _writable,
)
from afalg._alg.proc import _proc_sizes
from afalg._alg.refusal import _alg_error
from afalg._uapi import (
    AlgOp,
)
from afalg.cmsg import Buffer
from afalg.errors import AlgError, PaddingError


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
    """Return the kernel's chacha20 IV after ``n`` bytes.

    The IV is a 32-bit little-endian block counter, then the 12-byte nonce; the counter wraps
    at 2**32 as the kernel's does."""
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
    """A symmetric cipher in the kernel (``skcipher``).

    ``cbc(aes)``, ``ctr(aes)``, ``ecb(aes)``, ``xts(aes)``, ``cts(cbc(aes))``,
    ``rfc3686(ctr(aes))``, ``chacha20``, ...

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
        """Encrypt into the start of ``out`` as :meth:`encrypt` does, and return ``len(data)``.

        ``out`` is writable, at least ``len(data)`` bytes: the kernel writes there, nothing is
        allocated or copied (up to 64 KiB; longer data is copied in from :meth:`encrypt`). Not
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
        """Run one complete operation on an idle operation socket and return its output.

        No MSG_MORE: one ``sendmsg_afalg()`` with the operation and IV, one ``recv()`` of the
        output (the bytes object it fills is the result: no copy), or ``recv_into(into)`` (then
        b"" is returned). ``data`` is checked, at most _STREAM_CHUNK bytes."""
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
                raise _short_send(self._what(op), sent, n)
            if into is not None:
                got = sock.recv_into(into, n) if n else 0
                if got != n:
                    raise _short_read(self._what(op), got, n)
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
    """Run one complete skcipher operation on a stream's own socket and return the output.

    No MSG_MORE; the buffers of the operation socket ``sock`` are fitted here."""
    what = f"{name} {op.name.lower()}"
    _fit_buffer(sock, len(data), send=True)
    _fit_buffer(sock, len(data), send=False)
    _sendmsg(sock, [data], cmsg.alg_cmsgs(op, iv or None), 0, what)
    return _recv_exact(sock, len(data), what) if data else b""


class CipherStream:
    """One streaming encryption or decryption, owning its own operation socket.

    Made by :meth:`SKCipher.encryptor` / :meth:`SKCipher.decryptor`: ``update(data) ->
    bytes`` as output becomes available, ``finalize() -> bytes`` for the rest."""

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
        """Run the whole chunks buffered so far as complete operations, moving the IV past them.

        For a mode with an ``advance`` rule; up to _STREAM_CHUNK bytes each."""
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
        """Process what is left (adding or checking PKCS#7 padding) and return it.

        The stream is then closed."""
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
