"""Helpers for the TLS socket tests (no tests here): contexts with the test PKI, loopback TCP
pairs, peers in threads (Python ssl, afalg itself), openssl s_server/s_client subprocesses.

Everything runs in one process over loopback so the VM part stays short: a connection costs one
handshake (~1-2 s under TCG), nothing more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _env import CERTS

from afalg import tls

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def require_openssl() -> str:
    """The openssl command, or skip the test saying it is missing."""
    if not os.access(OPENSSL, os.X_OK):
        pytest.skip("the openssl command is not installed (interop peer)")
    return OPENSSL


TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
TLS12_SUITES = ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                "ECDHE-ECDSA-CHACHA20-POLY1305"]  # fmt: skip


def server_context(
    version: str = "TLSv1.3", cipher: str | None = None, **kw: Any
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    _restrict(ctx, version, cipher)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def client_context(
    version: str = "TLSv1.3", cipher: str | None = None, **kw: Any
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(CERTS / "ca.pem")
    _restrict(ctx, version, cipher)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


def _empty_name_refused() -> bool:
    """Whether ssl's ``wrap_bio()`` refuses no name while ``check_hostname`` is on (Python
    3.14+), as ``wrap_socket()`` always did. asyncio passes None for ``server_hostname=""``,
    and so does afalg: both refuse "" then."""
    try:
        client_context().wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=None)
    except ValueError as exc:
        assert "check_hostname requires server_hostname" in str(exc)
        return True
    return False


def _restrict(ctx: ssl.SSLContext, version: str, cipher: str | None) -> None:
    if version == "TLSv1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(cipher or "ECDHE+AESGCM:ECDHE+CHACHA20")
    elif cipher:
        raise ValueError("Python ssl cannot pick TLS 1.3 suites; use openssl")


EMPTY_NAME_REFUSED = _empty_name_refused()


def tcp_pair(timeout: float = 30) -> tuple[socket.socket, socket.socket]:
    """(client, server) ends of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.settimeout(timeout)
    server.settimeout(timeout)
    return client, server


class Bg:
    """Run ``fn`` in a daemon thread; :meth:`result` joins and re-raises."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._result: list[Any] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._result.append((True, fn()))
        except BaseException as exc:
            self._result.append((False, exc))

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 120) -> Any:
        self._thread.join(timeout)
        if not self._result:
            raise TimeoutError("background thread did not finish")
        ok, value = self._result[0]
        if not ok:
            raise value
        return value


def connect(
    mode: tuple[str, str],
    role: str = "client",
    *,
    peer: str = "ssl",
    version: str = "TLSv1.3",
    cipher: str | None = None,
    suppress_ragged_eofs: bool = True,
    **server_kw: Any,
) -> tuple[Any, Any]:
    """(ours, theirs): an afalg socket in ``mode`` playing ``role`` and a peer: Python ssl
    (``peer="ssl"``) or afalg algif on the cryptography backend (``peer="afalg"``)."""
    csock, ssock = tcp_pair()
    sctx = server_context(version, cipher, **server_kw)
    cctx = client_context(version, cipher)
    ours_sock, peer_sock = (csock, ssock) if role == "client" else (ssock, csock)
    ours_ctx, peer_ctx = (cctx, sctx) if role == "client" else (sctx, cctx)
    peer_server = role == "client"
    hostname = None if peer_server else "localhost"

    def peer_side() -> Any:
        if peer == "ssl":
            return peer_ctx.wrap_socket(
                peer_sock, server_side=peer_server, server_hostname=hostname
            )
        return tls.wrap(
            peer_sock, peer_ctx, server_side=peer_server, server_hostname=hostname,
            mode="algif", algif_backend="cryptography",
        )  # fmt: skip

    bg = Bg(peer_side)
    ours = tls.wrap(
        ours_sock, ours_ctx, server_side=not peer_server,
        server_hostname=None if not peer_server else "localhost",
        mode=mode[0], algif_backend=mode[1], suppress_ragged_eofs=suppress_ragged_eofs,
    )  # fmt: skip
    theirs = bg.result(60)
    assert mode[0] == "auto" or ours.mode == mode[0]
    return ours, theirs


def recv_exactly(sock: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(n - len(out), 2**17))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def recv_all(sock: Any) -> bytes:
    out = bytearray()
    while data := sock.recv(2**17):
        out += data
    return bytes(out)


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that are not all alike (so a misplaced record shows)."""
    block = hashlib.sha256(seed.to_bytes(4, "big")).digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


# --- openssl subprocesses ------------------------------------------------------------------------


def suite_args(version: str, suite: str | None) -> list[str]:
    """openssl's options for ``version`` and ``suite`` (None: its default suites and groups)."""
    if version == "TLSv1.3":
        return ["-tls1_3", *(["-ciphersuites", suite] if suite else [])]
    return ["-tls1_2", *(["-cipher", suite] if suite else [])]


def openssl_version() -> tuple[int, int]:
    """(major, minor) of the openssl command."""
    out = subprocess.run([require_openssl(), "version"], capture_output=True, text=True, check=True)
    found = re.match(r"OpenSSL (\d+)\.(\d+)", out.stdout)
    assert found, out.stdout
    return int(found.group(1)), int(found.group(2))


HYBRID = "X25519MLKEM768"  # OpenSSL 3.5+'s first default group: X25519 + ML-KEM-768


def default_group(version: str) -> str:
    """The group ssl's OpenSSL and the openssl command agree on with their defaults: the
    hybrid X25519MLKEM768 in TLS 1.3 where both are 3.5 or later (its key share alone is
    1,216 bytes), else X25519."""
    modern = ssl.OPENSSL_VERSION_INFO >= (3, 5) and openssl_version() >= (3, 5)
    return HYBRID if version == "TLSv1.3" and modern else "X25519"


# s_client -brief prints "Negotiated TLS1.3 group: X25519MLKEM768" (3.5+) or "Server Temp Key:
# X25519, 253 bits" (3.0) or "Peer Temp Key: X25519, 253 bits" (3.5+, TLS 1.2); s_server -brief
# prints "Peer Temp Key: X25519MLKEM768" (3.5+, TLS 1.3 only)
_GROUP = re.compile(rb"(?:Negotiated TLS1\.3 group|(?:Peer|Server) Temp Key): ([\w-]+)")


def reported_group(stderr: bytes) -> str | None:
    """The key exchange group an openssl -brief run printed on stderr, if it printed one."""
    found = _GROUP.search(stderr)
    return found.group(1).decode() if found else None


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@contextlib.contextmanager
def openssl_server(
    version: str, suite: str | None, *extra: str
) -> Iterator[tuple[Any, socket.socket]]:
    """``openssl s_server -quiet -naccept 1`` (stdin: what it sends, stdout: what it got) and a
    TCP socket connected to it."""
    port = free_port()
    proc = subprocess.Popen(
        [require_openssl(), "s_server", "-quiet", "-naccept", "1", "-accept", f"127.0.0.1:{port}",
         "-cert", str(CERTS / "server.pem"), "-key", str(CERTS / "server.key"),
         *suite_args(version, suite), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except ConnectionRefusedError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"s_server did not start: {proc.stderr.read()!r}") from None
                time.sleep(0.1)
        yield proc, sock
    finally:
        with contextlib.suppress(Exception):
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def openssl_client(
    version: str, suite: str | None, *extra: str
) -> Iterator[tuple[Any, socket.socket]]:
    """``openssl s_client -brief`` connected to us (stdin: what it sends, "K" line: KeyUpdate,
    EOF: close_notify; stdout: what it got) and our accepted TCP socket."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [require_openssl(), "s_client", "-brief", "-connect", f"127.0.0.1:{port}",
             "-servername", "localhost", "-CAfile", str(CERTS / "ca.pem"), "-verify_return_error",
             *suite_args(version, suite), *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        listener.settimeout(30)
        try:
            sock, _ = listener.accept()
            sock.settimeout(30)
            yield proc, sock
        finally:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(10)


def wait_stderr(proc: Any, marker: bytes, timeout: float = 60) -> bytes:
    """Read a subprocess's stderr until ``marker`` has appeared (raises on EOF or timeout);
    returns what was read."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while marker not in out:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"no {marker!r} from openssl on stderr: {bytes(out)!r}")
        data = os.read(fd, 4096)
        if not data:
            raise EOFError(f"openssl stderr ended without {marker!r}: {bytes(out)!r}")
        out += data
    return bytes(out)


def read_stdout(proc: Any, n: int, timeout: float = 60) -> bytes:
    """n bytes of a subprocess's stdout (raises on EOF or timeout)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while len(out) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"got {len(out)} of {n} bytes from openssl")
        data = os.read(fd, n - len(out))
        if not data:
            raise EOFError(f"openssl stdout ended after {len(out)} of {n} bytes: "
                           f"{proc.stderr.read()!r}")  # fmt: skip
        out += data
    return bytes(out)
