"""Setting kTLS up: the tls ULP, the keys of each direction, and what this kernel supports.

Support is tried once per process on a throwaway loopback connection.

The public face is :mod:`afalg.ktls`.
"""

from __future__ import annotations

import errno
import functools
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from afalg import _uapi
from afalg._uapi import TLS_1_3_VERSION, has_capability
from afalg.cmsg import tls_crypto_info
from afalg.errors import KTLSError
from afalg.keys import CipherSuite, TrafficKeys


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
    """Say why ``TCP_ULP "tls"`` gave ENOENT.

    The kernel loads the tls module on demand only for a process with CAP_NET_ADMIN
    (net/ipv4/tcp_ulp.c), so an unprivileged one needs it loaded."""
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
            msg = (
                "the tls ULP needs an established TCP connection: set it after connect() or "
                "accept(), not before (ENOTCONN)"
            )
        elif code == errno.EEXIST:
            current = _ulp(sock)
            msg = (
                f"this socket already has the {current or 'a'} ULP attached; the tls ULP can "
                "be set once per socket (EEXIST)"
            )
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
    """Return whether this kernel runs kTLS for ``(version, cipher_type)`` both ways.

    Tried once per process on a throwaway loopback connection (ULP, then TLS_TX and TLS_RX with
    zero keys)."""
    suite = next(
        (
            s
            for s in CipherSuite
            if s.ktls_cipher_type == cipher_type and s.is_tls13 == (version == TLS_1_3_VERSION)
        ),
        None,
    )
    if suite is None:
        return False
    iv = bytes(12 if suite.is_chacha20 or suite.is_tls13 else 4)
    keys = TrafficKeys(version, suite, bytes(suite.key_length), iv)
    return _trial(lambda sock: enable(sock, keys, keys))


@functools.cache
def supports_rekey() -> bool:
    """Return whether this kernel replaces the keys of a live kTLS socket (Linux 6.14+).

    That is TLS 1.3's KeyUpdate. Tried once per process, setting ``TLS_TX`` twice on a
    throwaway connection (older kernels answer EBUSY)."""
    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))

    def rekey(sock: socket.socket) -> None:
        enable(sock, keys, keys)
        install_keys(sock, _uapi.TLS_TX, keys.next_generation())

    return _trial(rekey)


@contextmanager
def loopback() -> Iterator[socket.socket]:
    """Return the client end of a throwaway loopback TCP connection, ESTABLISHED.

    The tls ULP takes no other state; the peer is kept open until the end."""
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
