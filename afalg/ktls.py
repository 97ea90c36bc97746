"""Kernel TLS sockets: the kernel seals and opens the records, Python sees plaintext.

After the userspace handshake (:mod:`afalg.handoff`), :func:`enable` attaches the ``tls`` upper
layer protocol to the TCP socket and installs the keys of both directions::

    setsockopt(SOL_TCP, TCP_ULP, "tls")
    setsockopt(SOL_TLS, TLS_TX, struct tls12_crypto_info_*)   # key, iv/salt, rec_seq
    setsockopt(SOL_TLS, TLS_RX, struct tls12_crypto_info_*)

From then on ``send()`` writes application_data records and ``recv()`` returns the plaintext of
application_data records. Every other record stops a read and comes back with a
``TLS_GET_RECORD_TYPE`` control message; :class:`KTLSSocket` always passes a control buffer to
``recvmsg()`` (without one the kernel answers such a record with a bare EIO) and gives them to
its :class:`afalg.session.Session`, acting on the events: close_notify is EOF, a fatal alert
raises :class:`afalg.TLSAlertReceived`, a NewSessionTicket is consumed, a KeyUpdate installs
the next receive keys where the kernel can rekey (Linux 6.14+) and otherwise raises
:class:`afalg.errors.KeyUpdateUnsupported`. Control records are sent with
a ``TLS_SET_RECORD_TYPE`` control message (close_notify on close, fatal alerts on errors).

Rekeying (TLS 1.3 KeyUpdate, Documentation/networking/tls.rst): the kernel pauses reading after a
handshake record that starts with a KeyUpdate (msg_type 24; ``TlsRxRekeyReceived``) until
``TLS_RX`` is set again (meanwhile reads fail with EKEYEXPIRED or, on 7.3, a blocking one just
waits); :class:`KTLSSocket` installs the next generation as soon as it has read the KeyUpdate
(``TlsRxRekeyOk``). The kernel only looks at a record's first byte, so it also pauses where
there is no complete KeyUpdate yet (a KeyUpdate fragmented over records, or a fragment of
another message that starts with the byte 24): there the current keys are installed again at
the kernel's sequence number (``getsockopt(TLS_RX)``) to read on. On
the send side there is no pause: our KeyUpdate goes out under the old keys, then ``TLS_TX`` gets
the new ones (``TlsTxRekeyOk``). A peer's update_requested is answered with one KeyUpdate as soon as
the records read so far are handled and no other thread is sending (the receiving side sends it),
else before our next application data (RFC 8446 4.6.3), however many requests came meanwhile.

A record that fails authentication makes the kernel set the socket error (EBADMSG); until it is
read with ``SO_ERROR`` every send fails. :class:`KTLSSocket` reads it, sends the bad_record_mac
alert and raises :class:`afalg.TLSProtocolError` (bad_record_mac); the connection is then dead.

The kernel's TLS counters (``/proc/net/tls_stat``) are :func:`tls_stats`; what the kernel holds
for one connection (ULP, version, cipher, which directions are set up, the record sequence
numbers, the zero-copy and no-pad flags) is :func:`kernel_state` (``conn.kernel_state()`` on
either afalg socket), read back from the kernel and never from afalg's memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import io
import os
import select
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from afalg import _uapi
from afalg._socket import TLSSocketBase
from afalg._uapi import TLS_1_3_VERSION, TLSCipherType, has_capability
from afalg.cmsg import (
    CryptoInfoPublic,
    parse_record_type,
    peek_tls_crypto_info,
    record_type_cmsg,
    tls_crypto_info,
    tls_crypto_info_struct,
)
from afalg.errors import (
    KeyUpdateUnsupported,
    KTLSError,
    WantRead,
    WantWrite,
)
from afalg.handoff import TicketFeed
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import default_records_per_key
from afalg.wire import MAX_PLAINTEXT, AlertDescription, ContentType

__all__ = [
    "KTLSSocket",
    "KernelTLSState",
    "enable",
    "kernel_state",
    "record_sequence",
    "supports",
    "supports_rekey",
    "tls_stats",
]

_ANCBUFSIZE = socket.CMSG_SPACE(1)
_SENDFILE_CHUNK = 2**24  # bytes per os.sendfile loop (checked against the key usage limit)
# os.sendfile's errors for an input it cannot read from (a pipe, a socket, a character device)
_NOT_A_FILE = (errno.EINVAL, errno.ESPIPE)
_RECORD_BUF = 2**14 + 1024  # one whole record's plaintext fits
_APPLICATION_DATA = int(ContentType.application_data)
_DONTWAIT = int(socket.MSG_DONTWAIT)  # an int: | on the IntFlag runs enum's Python code


def _record_type(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The record type kTLS reports (TLS_GET_RECORD_TYPE) in ``recvmsg``'s control messages;
    application_data when there is none (a bare end of file)."""
    for level, kind, data in ancdata:
        if level == _uapi.SOL_TLS and kind == _uapi.TLS_GET_RECORD_TYPE:
            return parse_record_type(data)
    return _APPLICATION_DATA


def tls_stats() -> dict[str, int]:
    """The kernel's TLS counters from ``/proc/net/tls_stat`` (``TlsCurrTxSw``, ``TlsTxSw``,
    ``TlsDecryptError``, ...); empty when the ``tls`` module is not loaded."""
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
    """What the kernel holds for one TCP connection's TLS, as the kernel reports it
    (:func:`kernel_state`). No key, IV or salt: only these fields exist.

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
    """``getsockopt(fd, level, name)`` into ``buf`` (no bytes object is made, so the caller
    can zero what the kernel wrote); the length the kernel reports."""
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
    """The kernel's next record sequence number for ``direction`` (``TLS_TX``/``TLS_RX``) of a
    kTLS socket whose keys are of ``cipher_type``: the whole crypto_info (key included) is read
    into a bytearray that is zeroed right after its ``rec_seq`` is taken."""
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
    """What the kernel holds for the TCP connection ``sock`` (:class:`KernelTLSState`), asked
    of the kernel each time: ``getsockopt(SOL_TCP, TCP_ULP)``, then with the tls ULP
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


# --- setting kTLS up ----------------------------------------------------------------------------


def _crypto_info(keys: TrafficKeys) -> bytes:
    return tls_crypto_info(keys.version, keys.cipher_suite.ktls_cipher_type, **keys.ktls_params())


def _ulp(sock: socket.socket) -> str:
    try:
        name = sock.getsockopt(_uapi.SOL_TCP, _uapi.TCP_ULP, 16)
    except OSError:
        return ""
    return name.rstrip(b"\0").decode("ascii", "replace")


def _check_tcp(sock: socket.socket) -> None:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"sock must be a socket.socket, not {type(sock).__name__}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise KTLSError(errno.EOPNOTSUPP, "kTLS needs a TCP socket (AF_INET/AF_INET6 stream)")


def missing_ulp_reason() -> str:
    """Why ``TCP_ULP "tls"`` gave ENOENT. The kernel loads the tls module on demand only for a
    process with CAP_NET_ADMIN (net/ipv4/tcp_ulp.c), so an unprivileged one needs it loaded."""
    if os.path.exists("/sys/module/tls"):
        return "the kernel has no tls ULP although the tls module is loaded (ENOENT)"
    if not has_capability(_uapi.CAP_NET_ADMIN):
        return (
            "the tls module is not loaded, and only a process with CAP_NET_ADMIN may load it "
            "on demand: run 'modprobe tls' as root once (ENOENT)"
        )
    return "the kernel has no tls ULP (CONFIG_TLS missing or the tls module not loadable)"


def attach_ulp(sock: socket.socket) -> None:
    """``setsockopt(SOL_TCP, TCP_ULP, "tls")``, with errors that say what went wrong."""
    _check_tcp(sock)
    try:
        sock.setsockopt(_uapi.SOL_TCP, _uapi.TCP_ULP, b"tls")
    except OSError as exc:
        code = exc.errno or 0
        if code == errno.ENOTCONN:
            msg = ("the tls ULP needs an established TCP connection: set it after connect() or "
                   "accept(), not before (ENOTCONN)")  # fmt: skip
        elif code == errno.EEXIST:
            current = _ulp(sock)
            msg = (f"this socket already has the {current or 'a'} ULP attached; the tls ULP can "
                   "be set once per socket (EEXIST)")  # fmt: skip
        elif code == errno.ENOENT:
            msg = missing_ulp_reason()
        else:
            msg = f"setsockopt(TCP_ULP, 'tls') failed: {exc.strerror}"
        raise KTLSError(code, msg) from exc


def install_keys(sock: socket.socket, direction: int, keys: TrafficKeys) -> None:
    """``setsockopt(SOL_TLS, TLS_TX or TLS_RX, crypto_info)`` for ``keys``."""
    name = "TLS_TX" if direction == _uapi.TLS_TX else "TLS_RX"
    try:
        sock.setsockopt(_uapi.SOL_TLS, direction, _crypto_info(keys))
    except OSError as exc:
        code = exc.errno or 0
        what = f"{keys.cipher_suite.name} (TLS {'1.3' if keys.version == 0x0304 else '1.2'})"
        if code == errno.ENOPROTOOPT:
            msg = f"setsockopt(SOL_TLS, {name}) needs the tls ULP on the socket first"
        elif code == errno.EBUSY:
            msg = f"{name} keys are already installed on this socket (EBUSY)"
        elif code in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOENT, errno.ENOSYS):
            msg = f"the kernel refused {name} for {what}: {exc.strerror}"
        else:
            msg = f"setsockopt(SOL_TLS, {name}) for {what} failed: {exc.strerror}"
        raise KTLSError(code, msg) from exc


@functools.cache
def supports(version: int, cipher_type: int) -> bool:
    """Whether this kernel runs kTLS for ``(version, cipher_type)`` both ways: tried once per
    process on a throwaway loopback connection (ULP, then TLS_TX and TLS_RX with zero keys)."""
    suite = next(
        (s for s in CipherSuite
         if s.ktls_cipher_type == cipher_type and s.is_tls13 == (version == TLS_1_3_VERSION)),
        None,
    )  # fmt: skip
    if suite is None:
        return False
    iv = bytes(12 if suite.is_chacha20 or suite.is_tls13 else 4)
    keys = TrafficKeys(version, suite, bytes(suite.key_length), iv)
    return _trial(lambda sock: enable(sock, keys, keys))


@functools.cache
def supports_rekey() -> bool:
    """Whether this kernel replaces the keys of a live kTLS socket (TLS 1.3 KeyUpdate; Linux
    6.14+): tried once per process, setting ``TLS_TX`` twice on a throwaway connection (older
    kernels answer EBUSY)."""
    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))

    def rekey(sock: socket.socket) -> None:
        enable(sock, keys, keys)
        install_keys(sock, _uapi.TLS_TX, keys.next_generation())

    return _trial(rekey)


@contextmanager
def loopback() -> Iterator[socket.socket]:
    """The client end of a throwaway loopback TCP connection, ESTABLISHED (the tls ULP takes
    no other state), its peer kept open until the end."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        peer, _ = listener.accept()
    with client, peer:
        yield client


def _trial(setup: Callable[[socket.socket], object]) -> bool:
    """Whether ``setup`` succeeds on a :func:`loopback` connection."""
    try:
        with loopback() as sock:
            setup(sock)
    except OSError:  # KTLSError included
        return False
    return True


def enable(sock: socket.socket, tx: TrafficKeys, rx: TrafficKeys) -> None:
    """Turn the connected TCP socket ``sock`` into a kTLS socket with these keys.

    ``tx.seq`` and ``rx.seq`` are the next records' sequence numbers. Raises
    :class:`afalg.errors.KTLSError` naming the cause (socket not connected, ULP already set,
    no tls module, cipher refused).
    """
    if not isinstance(tx, TrafficKeys) or not isinstance(rx, TrafficKeys):
        raise TypeError("tx and rx must be afalg.keys.TrafficKeys")
    attach_ulp(sock)
    install_keys(sock, _uapi.TLS_TX, tx)
    install_keys(sock, _uapi.TLS_RX, rx)


# --- kTLS ----------------------------------------------------------------------------------------

_RECV_ERRORS = {
    errno.EBADMSG: (AlertDescription.bad_record_mac, "record failed authentication"),
    errno.EMSGSIZE: (AlertDescription.record_overflow, "record too long"),
    errno.EINVAL: (AlertDescription.decode_error, "malformed record header"),
    errno.EIO: (AlertDescription.unexpected_message, "kernel refused a record (EIO)"),
    errno.EKEYEXPIRED: (
        AlertDescription.internal_error,
        "the kernel paused reading for a KeyUpdate and could not be resumed (EKEYEXPIRED)",
    ),
}


def _wait_writable(fd: int, timeout: float | None) -> None:
    """Wait until ``fd`` takes more, at most ``timeout`` seconds (TimeoutError after)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(None if timeout is None else timeout * 1000):
        raise TimeoutError("timed out")


class KTLSSocket(TLSSocketBase):
    """A TCP socket whose records the kernel seals and opens (kernel TLS).

    Construct it with :func:`afalg.tls.wrap` (which runs the handshake), or from a connected
    TCP socket and the keys of both directions: ``KTLSSocket(sock, tx, rx)``. The object owns
    ``sock``. ``recv`` returns application data only; see the module docstring for the rest.
    """

    mode: Literal["ktls"] = "ktls"
    backend: Literal["kernel"] = "kernel"  # the kernel's TLS does the crypto

    def __init__(
        self,
        sock: socket.socket,
        tx: TrafficKeys,
        rx: TrafficKeys,
        *,
        ssl_object: ssl.SSLObject | None = None,
        suppress_ragged_eofs: bool = True,
        tickets: TicketFeed | None = None,
        records_per_key: int | None = None,
        server_side: bool | None = None,
    ) -> None:
        if records_per_key is not None and records_per_key < 3:
            raise ValueError("records_per_key must be at least 3 under kTLS")
        enable(sock, tx, rx)
        super().__init__(
            sock, version=tx.version, ssl_object=ssl_object,
            suppress_ragged_eofs=suppress_ragged_eofs, tickets=tickets, server_side=server_side,
        )  # fmt: skip
        self._tx_keys = tx.with_seq(0) if tx.secret is not None else None  # for KeyUpdate only
        self._rx_keys = rx.with_seq(0) if rx.secret is not None else None
        self._scratch: memoryview | None = None  # one record's room, for small reads
        self._rx_paused = False  # EKEYEXPIRED seen and the current keys installed again
        self._cipher_type = tx.cipher_suite.ktls_cipher_type
        self._records_per_key = records_per_key or default_records_per_key(tx.cipher_suite)
        self._tx_budget = 0  # records surely left to the send key (re-read from the kernel)

    def kernel_state(self) -> KernelTLSState:
        """What the kernel holds for this connection, read from the kernel now
        (:func:`afalg.ktls.kernel_state`): under kTLS the ULP, version, cipher, TX/RX set up,
        record sequence numbers and the zero-copy/no-pad flags; in algif mode
        ``ulp=None`` (the kernel holds no TLS state). Never a key.
        Raises :class:`afalg.errors.ClosedError` once closed."""
        self._check_open()
        return kernel_state(self._sock)

    # -- sending --
    def send(self, data: Any, flags: int = 0) -> int:
        self._check_open()
        with memoryview(data).cast("B") as view, self._tx_lock:
            # The session's one check, under the lock: another thread may have failed the
            # connection (its fatal alert sent) or sent close_notify while this one waited.
            self._session.sending_data()
            try:
                if self._session.key_update_due:
                    self._answer_key_update()
                n = len(view)
                cost = -(-n // MAX_PLAINTEXT) + 1
                if cost > self._tx_budget:
                    n = self._tx_allowance(n)
                else:
                    self._tx_budget -= cost
                if n < len(view):
                    with view[:n] as part:  # released even if an error keeps this frame
                        return self._send_view(part, flags)
                return self._send_view(view, flags)
            except BlockingIOError:
                raise WantWrite(errno.EAGAIN, "the socket takes no more now") from None
            except OSError as exc:
                raise self._translate(exc) from exc

    def _send_view(self, view: memoryview, flags: int) -> int:
        """One ``send``. With a timeout Python would poll before it: the twin (:meth:`_twin`)
        sends at once, and polls only while the socket has no room, within the timeout
        (:class:`TimeoutError` after)."""
        timeout = self._sock.gettimeout()
        if not timeout:
            return self._sock.send(view, flags)
        twin = self._twin()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return twin.send(view, flags | _DONTWAIT)
            except BlockingIOError:
                _wait_writable(twin.fileno(), max(0.0, deadline - time.monotonic()))

    def _send_alert(self, level: int, description: int, *, wait: bool) -> None:
        self._send_record(ContentType.alert, bytes([level, description]), wait=wait)

    def _send_record(self, content_type: int, payload: bytes, *, wait: bool = True) -> None:
        flags = 0 if wait else socket.MSG_DONTWAIT
        # Best effort without waiting (a fatal alert from the receiving thread): never behind a
        # send in another thread, which holds the kernel's TLS TX mutex while it waits for
        # room (MSG_DONTWAIT would not help): the alert is skipped then, the error is what counts.
        if not self._tx_lock.acquire(blocking=wait):
            return
        try:
            self._sock.sendmsg([payload], [record_type_cmsg(content_type)], flags)
        finally:
            self._tx_lock.release()

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file with ``os.sendfile`` (the kernel encrypts the pages it reads), as
        :meth:`socket.socket.sendfile`: honours the timeout (per wait); what ``os.sendfile``
        cannot read (an in-memory file, a pipe) goes through :meth:`send`; the file position
        ends after the last byte sent. One ``os.sendfile`` per chunk of up to 16 MiB, and no
        other system call but the final ``lseek``."""
        self._check_send()
        timeout = self._sock.gettimeout()
        if timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported: use sendfile_nowait()")
        try:
            fd = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            return self._sendfile_by_send(file, offset, count, _SENDFILE_CHUNK)
        sock_fd = self._sock.fileno()
        total = 0
        with self._tx_lock:
            try:
                self._answer_key_update()
                while count is None or total < count:
                    self._session.sending_data()  # under the lock, before each chunk
                    want = _SENDFILE_CHUNK if count is None else min(_SENDFILE_CHUNK, count - total)
                    try:
                        sent = os.sendfile(sock_fd, fd, offset + total, self._tx_allowance(want))
                    except BlockingIOError:  # a socket with a timeout is non-blocking inside
                        _wait_writable(sock_fd, timeout)
                        continue
                    except OSError as exc:
                        if total or exc.errno not in _NOT_A_FILE:
                            raise
                        break  # not a regular file (nothing was sent): through send below
                    if not sent:
                        return total  # end of file
                    total += sent
                else:
                    return total
            except OSError as exc:
                raise self._translate(exc) from exc
            finally:
                if total and hasattr(file, "seek"):
                    file.seek(offset + total)
        return self._sendfile_by_send(file, offset, count, _SENDFILE_CHUNK)

    def sendfile_nowait(self, fd: int, offset: int, count: int) -> int:
        """One non-blocking ``os.sendfile`` step from the file descriptor ``fd`` (at ``offset``,
        at most ``count`` bytes; the file position is not used): the kernel encrypts the pages
        it reads. Returns the bytes sent (0 at the end of the file), or raises
        :class:`~afalg.errors.WantWrite` having sent nothing. As with :meth:`send`, a KeyUpdate
        the peer asked for goes out first, and the step is cut where the send key reaches
        ``records_per_key`` (our KeyUpdate goes first where it can;
        :class:`~afalg.errors.KeyLimitReached`, having sent nothing, where it cannot). For
        event loops (:func:`afalg.aio.sendfile`)."""
        self._check_send()
        with self._tx_lock:
            self._session.sending_data()  # again under the lock (another thread may have failed)
            try:
                self._answer_key_update()
                return os.sendfile(self._sock.fileno(), fd, offset, self._tx_allowance(count))
            except BlockingIOError:
                raise WantWrite(errno.EAGAIN, "the socket takes no more now") from None
            except OSError as exc:
                raise self._translate(exc) from exc

    # -- receiving --
    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        # The view is released however this ends: a poisoning error keeps this frame (its
        # traceback), which must not keep the caller's buffer exported (unresizable).
        with self._recv_view(buffer, nbytes, flags) as view:
            return self._recv_into(view)

    def _recv_into(self, view: memoryview) -> int:
        if self._plain:
            n = min(len(view), len(self._plain))
            view[:n] = self._plain[:n]
            del self._plain[:n]
            return n
        session = self._session
        if session.error is not None:
            raise session.error
        if session.eof or not view:
            return 0
        while True:
            if session.key_update_due and not self._readable_now():
                self._answer_key_update(wait=False)  # before waiting: the peer may wait for it
            # A read of at least a record's plaintext goes straight into the caller's buffer;
            # a shorter one reads whole records (a control record must come whole) and keeps
            # the rest for the next calls (pending()).
            small = len(view) < MAX_PLAINTEXT
            target = view
            if small:
                if self._scratch is None:
                    self._scratch = memoryview(bytearray(_RECORD_BUF))
                target = self._scratch
            try:
                n, content_type = self._read(target)
            except BlockingIOError:
                raise WantRead(errno.EAGAIN, "no whole record yet: wait until readable") from None
            except OSError as exc:
                if exc.errno == errno.EKEYEXPIRED and self._resume_rx():
                    continue
                raise self._translate(exc) from exc
            self._rx_paused = False
            if content_type == ContentType.application_data:
                if not n:
                    return self._ragged_eof()  # the kernel never returns an empty record
                self._data_record(n)  # n > 0: True, or it raises
                if session.key_update_due:
                    self._answer_key_update(wait=False)  # after the records read: one answer
                if small:
                    k = min(n, len(view))
                    view[:k] = target[:k]
                    self._plain += target[k:n]
                    return k
                return n
            payload = bytes(target[:n])
            rx_generation = self._rx_keys
            if self._control_record(content_type, payload):
                return 0  # close_notify
            if content_type == ContentType.handshake and payload[:1] == b"\x18":
                self._follow_kernel_pause(rx_generation)

    def _read(self, target: memoryview) -> tuple[int, int]:
        """One read into ``target``: (bytes, record type). The kernel hands application data to
        a plain ``recv`` and refuses any other record with EIO when no control buffer is given
        (Documentation/networking/tls.rst; the record stays queued), so a plain ``recv_into``
        comes first and ``recvmsg`` with room for the record type (TLS_GET_RECORD_TYPE) only
        after EIO. With a timeout, Python would poll before reading; but poll() does not report
        a socket that the kernel paused for a KeyUpdate, even when that KeyUpdate waits
        decrypted in the kernel (read together with the data before it). So with a timeout the
        read comes first (non-blocking, on the twin, whose own timeout is 0) and poll() only
        when there was nothing to read."""
        timeout = self._sock.gettimeout()
        if not timeout:  # blocking (the kernel hands out decrypted records first) or 0
            try:
                return self._sock.recv_into(target), _APPLICATION_DATA
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
            n, ancdata, _flags, _addr = self._sock.recvmsg_into([target], _ANCBUFSIZE)
            return n, _record_type(ancdata)
        twin = self._twin()
        deadline = time.monotonic() + timeout
        while True:
            try:
                try:
                    return twin.recv_into(target, 0, socket.MSG_DONTWAIT), _APPLICATION_DATA
                except OSError as exc:
                    if exc.errno != errno.EIO:
                        raise
                n, ancdata, _flags, _addr = twin.recvmsg_into(
                    [target], _ANCBUFSIZE, socket.MSG_DONTWAIT
                )
                return n, _record_type(ancdata)
            except BlockingIOError:
                pass
            left = deadline - time.monotonic()
            poller = select.poll()
            poller.register(twin, select.POLLIN | select.POLLPRI)
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                raise TimeoutError("timed out")

    def _release(self) -> None:
        super()._release()
        self._scratch = None

    def _cannot_rekey(self, what: str) -> str:
        return (
            f"{what}, but this kernel ({os.uname().release}) cannot install new kTLS keys on a "
            "live socket: kTLS rekeying needs Linux 6.14+; use mode='algif' with peers that "
            "update keys"
        )

    def _key_update(self, *, update_requested: bool) -> None:
        """The peer moved to its next traffic secret: install the next receive keys at once (the
        kernel reads nothing more until then). If it asked for ours, the session has our
        KeyUpdate due: sent by the receiving side where it can, else before our next
        application data (one for any number of requests read together)."""
        if self._rx_keys is None:
            raise self._fatal(
                AlertDescription.internal_error,
                KeyUpdateUnsupported(AlertDescription.internal_error, "no traffic secret kept"),
            )
        if not supports_rekey():
            raise self._fatal(
                AlertDescription.internal_error,
                KeyUpdateUnsupported(
                    AlertDescription.internal_error,
                    self._cannot_rekey("peer sent a TLS 1.3 KeyUpdate"),
                ),
            )
        nxt = self._rx_keys.next_generation()
        try:
            install_keys(self._sock, _uapi.TLS_RX, nxt)
        except KTLSError as exc:
            raise self._fatal(
                AlertDescription.internal_error,
                KeyUpdateUnsupported(
                    AlertDescription.internal_error,
                    f"installing the next kTLS receive keys after the peer's KeyUpdate failed: "
                    f"{exc}",
                ),
            ) from exc
        self._rx_keys = nxt

    def _follow_kernel_pause(self, before: TrafficKeys | None) -> None:
        """The kernel paused reading after this handshake record: it starts with the byte 24
        (KeyUpdate's msg_type), which is all the kernel looks at. Unless it was a complete
        KeyUpdate (the next keys are in already), read on under the current keys: a KeyUpdate
        fragmented over records, or another message's fragment that starts with 24. (A blocking
        read would otherwise wait for ever: 7.3 reports EKEYEXPIRED only to some reads.)"""
        if self._rx_keys is not before or self._version != TLS_1_3_VERSION:
            return  # a new generation is installed (or TLS 1.2: no pause)
        if not supports_rekey():
            return  # no pause either
        if not self._resume_rx():
            raise self._protocol_error(
                AlertDescription.internal_error,
                "the kernel paused reading on a fragment starting with the byte 24 and "
                "could not be resumed",
            )

    def _resume_rx(self) -> bool:
        """The kernel paused on a record that starts with the byte 24 but was no complete
        KeyUpdate (a fragment), or a read failed with EKEYEXPIRED: install the current receive
        keys again at the kernel's next sequence number (``getsockopt(TLS_RX)``) so that reading
        goes on. False if that is not possible, or was just done (the error then stands)."""
        if self._rx_paused or self._rx_keys is None or self._session.error is not None:
            return False
        try:
            seq = record_sequence(self._sock, _uapi.TLS_RX, self._cipher_type)
            install_keys(self._sock, _uapi.TLS_RX, self._rx_keys.with_seq(seq))
        except (OSError, ValueError):
            return False
        self._rx_paused = True  # a second EKEYEXPIRED before any record read is an error
        return True

    def _tx_allowance(self, nbytes: int) -> int:
        """How much of ``nbytes`` one send may take without the send key sealing more than
        ``records_per_key`` records (the session's rule, :meth:`_tx_room`). A send of n bytes
        closes at most ceil(n / 2**14) + 1 records (one may be open from before); our
        KeyUpdate goes first when nothing else fits. Called with the TX lock."""
        cost = -(-nbytes // MAX_PLAINTEXT) + 1
        if cost > self._tx_budget:
            self._tx_budget = self._tx_room()
            if self._tx_budget == 0:
                self._send_key_update(request_peer=False)
                self._tx_budget = self._tx_room()
            nbytes = min(nbytes, (self._tx_budget - 1) * MAX_PLAINTEXT)
            cost = -(-nbytes // MAX_PLAINTEXT) + 1
        self._tx_budget -= cost
        return nbytes

    def _tx_room(self) -> int:
        """Records the send key may surely still seal, from the kernel's TX sequence number
        (:meth:`afalg.session.Session.records_to_seal`, at least 2: a send may close a record
        left open); 0: our KeyUpdate first. :class:`~afalg.errors.KeyLimitReached` where none
        can go: TLS 1.2, keys without their secret, a kernel without kTLS rekeying."""
        cannot = None
        if self._tx_keys is None:
            cannot = (
                f"the kTLS send key has sealed its {self._records_per_key} records and its "
                "traffic secret was not kept to update it: open a new connection"
            )
        elif not supports_rekey():
            cannot = self._cannot_rekey(
                f"the kTLS send key has sealed its {self._records_per_key} records"
            )
        return self._session.records_to_seal(
            self._tx_left(), self._records_per_key, at_least=2, cannot_update=cannot
        )

    def _tx_left(self) -> int:
        """Records the send key may still seal, from the kernel's TX sequence number (TLS 1.3
        keys start at 0; the first TLS 1.2 record, the Finished, was ssl's)."""
        seq = record_sequence(self._sock, _uapi.TLS_TX, self._cipher_type)
        return max(0, self._records_per_key - seq)

    def _send_key_update_message(self, message: bytes, *, wait: bool) -> None:
        # MSG_DONTWAIT without waiting: the base class checked the socket is writable.
        self._send_key_update(message=message, wait=wait)

    def _send_key_update(
        self, *, request_peer: bool = False, message: bytes | None = None, wait: bool = True
    ) -> None:
        """Send our KeyUpdate (``message``, else a new one) under the current keys, then install
        the next send keys: one step under the TX lock (no application data of another thread
        may come between them: it would go out under the old keys)."""
        assert self._tx_keys is not None
        nxt = self._tx_keys.next_generation()
        with self._tx_lock:
            if message is None:
                message = self._session.key_update(request_peer=request_peer)
            try:
                self._send_record(ContentType.handshake, message, wait=wait)
            except OSError as exc:
                raise self._translate(exc) from exc
            try:
                install_keys(self._sock, _uapi.TLS_TX, nxt)
            except KTLSError as exc:  # the KeyUpdate is out: the old keys may not be used again
                raise self._fatal(
                    AlertDescription.internal_error,
                    KeyUpdateUnsupported(
                        AlertDescription.internal_error,
                        f"installing the next kTLS send keys after our KeyUpdate failed "
                        f"({os.uname().release}): {exc.strerror}",
                    ),
                ) from exc
            self._tx_keys = nxt
            self._session.key_update_sent()  # any KeyUpdate of ours answers a request

    def key_update(self, *, request_peer: bool = False) -> None:
        """Send a TLS 1.3 KeyUpdate and move to the next send keys (Linux 6.14+);
        ``request_peer`` asks the peer to update its keys too (update_requested). Where the
        kernel cannot rekey, :class:`afalg.errors.KeyUpdateUnsupported` is raised before
        anything is sent and the connection carries on under its current keys."""
        self._check_send()
        if self._tx_keys is None:
            raise ValueError("KeyUpdate needs TLS 1.3 keys with their traffic secret")
        if not supports_rekey():
            raise KeyUpdateUnsupported(
                AlertDescription.internal_error,
                f"this kernel ({os.uname().release}) cannot rekey kTLS (Linux 6.14+ can); "
                "nothing was sent, the connection goes on under its current keys",
            )
        self._send_key_update(request_peer=request_peer)

    def _translate(self, exc: OSError) -> BaseException:
        """Map a kernel TLS error to a TLS error (never a bare EIO), reading SO_ERROR so later
        sends work, and sending the matching alert."""
        if self._session.error is not None:
            return self._session.error
        if isinstance(exc, (TimeoutError, BlockingIOError, InterruptedError)):
            return exc
        if exc.errno not in _RECV_ERRORS:
            return exc
        with contextlib.suppress(OSError):
            self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # clears sk_err
        alert, what = _RECV_ERRORS[exc.errno]
        return self._protocol_error(alert, f"kTLS: {what} ({exc.strerror})")
