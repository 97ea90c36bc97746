"""What the kernel holds for kTLS: its counters and one connection's state.

The counters are ``/proc/net/tls_stat``; the state is read back from the kernel
(``getsockopt``, ``inet_diag``), never from afalg's memory.

The public face is :mod:`afalg.ktls`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import socket

from afalg import _uapi
from afalg._uapi import TLS_1_3_VERSION, TLSCipherType
from afalg.cmsg import CryptoInfoPublic, peek_tls_crypto_info, tls_crypto_info_struct


def tls_stats() -> dict[str, int]:
    """Return the kernel's TLS counters from ``/proc/net/tls_stat``.

    ``TlsCurrTxSw``, ``TlsTxSw``, ``TlsDecryptError``, ...; empty when the ``tls`` module is not
    loaded."""
    try:
        with open(_uapi.TLS_STAT_PATH) as f:
            text = f.read()
    except FileNotFoundError:
        return {}
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name and value.strip().isdigit():
            stats[name] = int(value)
    return stats


# --- what the kernel holds for one connection ---------------------------------------------------

TCP_ULP_NAME_MAX = 16  # include/net/tcp.h


@dataclasses.dataclass(frozen=True)
class KernelTLSState:
    """What the kernel holds for one TCP connection's TLS, as it reports it (:func:`kernel_state`).

    No key, IV or salt: only these fields exist.

    - ``ulp``: the upper layer protocol attached (``getsockopt(SOL_TCP, TCP_ULP)``): ``"tls"``
      under kTLS, None when there is none (algif mode: the kernel holds no TLS state at all, and
      every other field is False or None).
    - ``tx``, ``rx``: whether ``TLS_TX`` / ``TLS_RX`` keys are installed
      (``getsockopt(SOL_TLS, TLS_TX/TLS_RX)`` answers instead of EBUSY).
    - ``version``: ``TLS_1_2_VERSION`` (0x0303) or ``TLS_1_3_VERSION`` (0x0304); ``cipher_type``:
      ``TLS_CIPHER_*`` (the kernel holds the same in both directions). None before any keys.
    - ``tx_seq``, ``rx_seq``: the sequence number of the next record the kernel seals / opens
      (``rec_seq`` of the crypto_info; 0 again after a TLS 1.3 KeyUpdate). None where that
      direction has no keys.
    - ``tx_zerocopy_ro``: ``TLS_TX_ZEROCOPY_RO`` (sendfile may encrypt straight from the page
      cache, for files nobody modifies meanwhile; the kernel uses it with device offload only).
      None where the kernel has no such option (before 5.19).
    - ``rx_expect_no_pad``: ``TLS_RX_EXPECT_NO_PAD`` (TLS 1.3: decrypt straight into the
      caller's buffer, expecting no record padding). The kernel answers only for TLS 1.3 with
      ``TLS_RX`` set; None otherwise, and where the kernel has no such option (before 6.0).
    - ``tx_conf``, ``rx_conf``: how the kernel runs each direction, from ``inet_diag``
      (``INET_DIAG_ULP_INFO``: ``TLS_INFO_TXCONF``/``TLS_INFO_RXCONF``): ``"base"`` (no keys),
      ``"sw"`` (the kernel's software crypto), ``"hw"`` (NIC offload), ``"hw_record"`` (TOE).
      None when the kernel does not tell this process (it does only to CAP_NET_ADMIN).
    """

    ulp: str | None
    tx: bool
    rx: bool
    version: int | None
    cipher_type: TLSCipherType | None
    tx_seq: int | None
    rx_seq: int | None
    tx_zerocopy_ro: bool | None
    rx_expect_no_pad: bool | None
    tx_conf: str | None = None
    rx_conf: str | None = None

    @property
    def ktls(self) -> bool:
        """Whether the kernel seals and opens this connection's records (kTLS both ways)."""
        return self.ulp == "tls" and self.tx and self.rx

    @property
    def version_name(self) -> str | None:
        """``"TLSv1.2"`` or ``"TLSv1.3"`` (as :meth:`ssl.SSLSocket.version` spells them)."""
        return {_uapi.TLS_1_2_VERSION: "TLSv1.2", TLS_1_3_VERSION: "TLSv1.3"}.get(self.version or 0)

    def __str__(self) -> str:
        if self.ulp is None:
            return "no kernel TLS: no ULP on this socket (records are sealed in userspace)"
        if self.ulp != "tls":
            return f"no kernel TLS: the {self.ulp} ULP is attached"
        dirs = "+".join(d for d, on in (("TX", self.tx), ("RX", self.rx)) if on) or "no keys"
        if self.tx_conf is not None or self.rx_conf is not None:
            dirs += f" (tx {self.tx_conf}, rx {self.rx_conf})"
        parts = [f"kernel TLS: {dirs}"]
        if self.version is not None:
            name = self.cipher_type.name if self.cipher_type is not None else "?"
            parts.append(f"{self.version_name or hex(self.version)} {name}")
        if self.tx_seq is not None:
            parts.append(f"tx_seq={self.tx_seq}")
        if self.rx_seq is not None:
            parts.append(f"rx_seq={self.rx_seq}")
        for flag in ("tx_zerocopy_ro", "rx_expect_no_pad"):
            if getattr(self, flag):
                parts.append(flag)
        return ", ".join(parts)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [
    ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
]  # fmt: skip
_libc.getsockopt.restype = ctypes.c_int


def _getsockopt_into(fd: int, level: int, name: int, buf: bytearray) -> int:
    """Run ``getsockopt(fd, level, name)`` into ``buf``; return the length the kernel reports.

    No bytes object is made, so the caller can zero what the kernel wrote."""
    cbuf = (ctypes.c_char * len(buf)).from_buffer(buf)
    optlen = ctypes.c_uint32(len(buf))
    try:
        if _libc.getsockopt(fd, level, name, ctypes.addressof(cbuf), ctypes.byref(optlen)):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        del cbuf
    return optlen.value


def _read_crypto_info(fd: int, direction: int) -> CryptoInfoPublic | None:
    """The public part of the kernel's crypto_info for ``direction``; None if not set (EBUSY).

    First the bare 4-byte header (the kernel then copies nothing else), then the whole struct
    for ``rec_seq``: that one carries the key, so it is read into a bytearray that is zeroed
    as soon as the sequence number is taken out (:func:`afalg.cmsg.peek_tls_crypto_info`)."""
    header = bytearray(4)
    try:
        _getsockopt_into(fd, _uapi.SOL_TLS, direction, header)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return None
        raise
    try:
        size = ctypes.sizeof(tls_crypto_info_struct(int.from_bytes(header[2:4], "little")))
    except ValueError:  # a cipher newer than afalg: version and cipher, no sequence number
        return peek_tls_crypto_info(header)
    buf = bytearray(size)
    try:
        _getsockopt_into(fd, _uapi.SOL_TLS, direction, buf)
        return peek_tls_crypto_info(buf)
    finally:
        buf[:] = bytes(size)  # in place: the key bytes the kernel copied out are gone


def record_sequence(sock: socket.socket, direction: int, cipher_type: int) -> int:
    """Return the kernel's next record sequence number for ``direction`` of a kTLS socket.

    ``direction`` is ``TLS_TX``/``TLS_RX``, the keys are of ``cipher_type``: the whole
    crypto_info (key included) is read into a bytearray that is zeroed right after its
    ``rec_seq`` is taken."""
    size = ctypes.sizeof(tls_crypto_info_struct(cipher_type))
    buf = bytearray(size)
    try:
        _getsockopt_into(sock.fileno(), _uapi.SOL_TLS, direction, buf)
        seq = peek_tls_crypto_info(buf).rec_seq
    finally:
        buf[:] = bytes(size)  # in place: the key bytes the kernel copied out are gone
    assert seq is not None
    return seq


def _flag(sock: socket.socket, name: int, unsupported: tuple[int, ...]) -> bool | None:
    try:
        return bool(sock.getsockopt(_uapi.SOL_TLS, name))
    except OSError as exc:
        if exc.errno in unsupported:
            return None
        raise


def kernel_state(sock: socket.socket) -> KernelTLSState:
    """Return what the kernel holds for the TCP connection ``sock`` (:class:`KernelTLSState`).

    Asked of the kernel each time: ``getsockopt(SOL_TCP, TCP_ULP)``, then with the tls ULP
    ``getsockopt(SOL_TLS, ...)`` for ``TLS_TX``, ``TLS_RX``, ``TLS_TX_ZEROCOPY_RO`` and
    ``TLS_RX_EXPECT_NO_PAD``; and with CAP_NET_ADMIN ``inet_diag``'s ULP information
    (:func:`afalg.netlink.tls_ulp_info`) for ``tx_conf``/``rx_conf``. Without the capability
    everything but those two is still read.

    The kernel answers ``TLS_TX``/``TLS_RX`` with the whole crypto_info, key included; that
    buffer is zeroed right after the version, cipher and sequence number are read from it, and
    no key byte reaches the result. A socket that is not TCP (a Unix socketpair carrying algif
    mode, UDP) has no ULP: ``ulp=None``. Raises :class:`OSError` (EBADF) for a closed socket.
    """
    try:
        name = sock.getsockopt(_uapi.SOL_TCP, _uapi.TCP_ULP, TCP_ULP_NAME_MAX)
    except OSError as exc:
        # Only TCP knows TCP_ULP: other sockets answer EOPNOTSUPP (or ENOPROTOOPT)
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            raise
        name = b""
    ulp = name.split(b"\0", 1)[0].decode("ascii", "replace") or None
    if ulp != "tls":
        return KernelTLSState(ulp, False, False, None, None, None, None, None, None)
    fd = sock.fileno()
    tx = _read_crypto_info(fd, _uapi.TLS_TX)
    rx = _read_crypto_info(fd, _uapi.TLS_RX)
    either = tx or rx
    from afalg.netlink import tls_ulp_info  # pyroute2, only for this

    diag = tls_ulp_info(sock)
    return KernelTLSState(
        ulp=ulp,
        tx=tx is not None,
        rx=rx is not None,
        version=either.version if either else None,
        cipher_type=either.cipher_type if either else None,
        tx_seq=tx.rec_seq if tx else None,
        rx_seq=rx.rec_seq if rx else None,
        tx_zerocopy_ro=_flag(sock, _uapi.TLS_TX_ZEROCOPY_RO, (errno.ENOPROTOOPT,)),
        # EINVAL: not TLS 1.3, or no RX keys (the kernel keeps the flag for TLS 1.3 RX only)
        rx_expect_no_pad=_flag(sock, _uapi.TLS_RX_EXPECT_NO_PAD, (errno.ENOPROTOOPT, errno.EINVAL)),
        tx_conf=diag.tx_conf if diag is not None else None,
        rx_conf=diag.rx_conf if diag is not None else None,
    )
