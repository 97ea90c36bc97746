"""Random numbers from the kernel: :class:`RNG`."""

from __future__ import annotations

import errno

from afalg._alg.base import _AlgSocket, _bytes
from afalg._alg.refusal import RNG_NAMES, _alg_error
from afalg.cmsg import Buffer
from afalg.errors import AlgError, AlgorithmNotAvailable

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
