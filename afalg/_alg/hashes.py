"""Hashes in the kernel: :class:`Hash`, :class:`HMAC`, :func:`new` and :func:`file_digest`.

:class:`Hash` has hashlib's interface, and ``splice()`` from files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hmac as _hmac
import io
import os
import re
import socket
from typing import Any, Self

from afalg._alg.base import _AlgSocket, _bytes
from afalg._alg.proc import _proc_sizes
from afalg._alg.refusal import _alg_error
from afalg._uapi import (
    SPLICE_F_MORE,
)
from afalg.cmsg import Buffer
from afalg.errors import AlgError, AlgorithmNotAvailable, InvalidTag

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


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
    """Return the descriptor whose bytes are the ones ``file`` reads, or None.

    That is a FileIO or socket, or a buffered reader over one; None for others: a gzip file's
    or a wrapper's fileno() is not what they read."""
    raw = file.raw if isinstance(file, (io.BufferedReader, io.BufferedRandom)) else file
    if not isinstance(raw, (io.FileIO, socket.SocketIO)):
        return None
    try:
        return int(file.fileno())
    except (OSError, ValueError):
        return None


class Hash(_AlgSocket):
    """A kernel hash with :mod:`hashlib`'s interface.

    It offers ``update``, ``digest``, ``hexdigest``, ``copy``, ``digest_size``,
    ``block_size`` and ``name`` (the kernel's name, e.g. "sha3-256").

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
        """Hash a file, ``length`` bytes or to EOF, and return the number of bytes hashed.

        It goes through ``splice()`` with ``SPLICE_F_MORE``, so the bytes never enter Python.

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
                    self._read_into(fd, length)
                    if isinstance(file, int)
                    else self._read_object(file, None if length is None else length - total)
                )
            if offset is not None and not isinstance(file, int):
                file.seek(offset + n)  # past the bytes hashed; the reader's buffer stays true
            return total + n

    def _drain(self, file: Any, length: int | None) -> int:
        """Hash what a buffered, non-seekable reader holds, so its offset is its position.

        It reads no further than the reader has, or once when it holds nothing, so that the
        descriptor's offset is the reader's position."""
        held = len(file.peek())
        if length is not None:
            held = min(held, length)
        if held:
            self.update(file.read(held))
        return held

    def _splice(
        self, fd: int, op: socket.socket, length: int | None, offset: int | None
    ) -> int | None:
        """Splice ``fd`` into the hash; return None when the kernel refuses to splice this file.

        From ``offset``, leaving the descriptor's own offset alone, or from its offset when
        None."""
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
    """HMAC in the kernel, with :mod:`hmac`'s interface plus ``verify(tag)``.

    ``HMAC("sha256", key)`` and ``HMAC("hmac(sha256)", key)`` alike; ``verify`` compares in
    constant time and raises InvalidTag."""

    def __init__(self, name: str, key: Buffer, data: Buffer = b"") -> None:
        key = _bytes(key, "key")
        if not isinstance(name, str):
            raise TypeError(f"hash name must be str, not {type(name).__name__}")
        if not name.startswith("hmac("):
            name = f"hmac({_hash_spec(name)[0]})"
        super().__init__(name, data, _key=key)

    def verify(self, tag: Buffer) -> None:
        """Raise :class:`afalg.InvalidTag` unless ``tag`` is the full digest.

        The comparison is in constant time."""
        if not _hmac.compare_digest(self.digest(), _bytes(tag, "tag")):
            raise InvalidTag("HMAC verification failed")


def new(name: str, data: Buffer = b"") -> Hash:
    """A :class:`Hash`, like :func:`hashlib.new`."""
    if isinstance(name, str) and name.startswith("hmac("):
        raise ValueError(f"{name} needs a key: use afalg.alg.HMAC(name, key)")
    return Hash(name, data)


def file_digest(file: int | str | os.PathLike | Any, name: str) -> Hash:
    """Hash a file from its position to EOF in the kernel, and return the :class:`Hash`.

    Like :func:`hashlib.file_digest`, it starts at a buffered reader's position, not its
    descriptor's offset (see :meth:`Hash.update_file`); the bytes go through splice, with no
    copy through Python."""
    h = Hash(name)
    try:
        h.update_file(file)
    except BaseException:
        h.close()
        raise
    return h
