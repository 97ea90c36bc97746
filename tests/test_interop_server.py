"""Interop: third-party TLS clients against the example server in each kernel mode.

``openssl s_client`` (TLS 1.2 AES-GCM and ChaCha20-Poly1305, each TLS 1.3 suite), tlslite-ng (a
pure-Python TLS stack: TLS 1.3 and 1.2) and Python's ssl (echo, and a file served by sendfile)
talk to ``examples/tls_echo_server.py`` whose records run through afalg.tls.wrap in mode ktls or
algif. One server per mode, on loopback.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

import pytest
import tls_echo_client as echo_client
import tls_echo_server as echo_server
from _env import CAFILE, CERTS, CONFORMANCE_MODES, SLOW
from tls_wire import BY_OPENSSL, marker_payload, run_s_client_echo, s_client_argv

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.filterwarnings("ignore:The asyncore module:DeprecationWarning"),
]


class Server:
    def __init__(self, mode: str, serve_dir: str) -> None:
        ctx = echo_server.server_context(str(CERTS / "server.pem"), str(CERTS / "server.key"))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(32)
        self.port = listener.getsockname()[1]
        self.mode = mode
        self.server = echo_server.EchoServer(
            listener, ctx, mode=mode, serve_dir=serve_dir, handshake_timeout=60 * SLOW
        )
        self.closed: dict[int, echo_server.Connection] = {}
        self._cond = threading.Condition()
        self.server.on_close = self._on_close
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _on_close(self, conn: echo_server.Connection) -> None:
        with self._cond:
            self.closed[conn.peer[1]] = conn
            self._cond.notify_all()

    def connection(self, port: int) -> echo_server.Connection:
        with self._cond:
            assert self._cond.wait_for(lambda: port in self.closed, 20 * SLOW)
            return self.closed[port]

    def count(self) -> int:
        with self._cond:
            return len(self.closed)

    def nth(self, n: int) -> echo_server.Connection:
        """The n-th connection (from 0) to close on this server, once it has."""
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.closed) > n, 20 * SLOW)
            return list(self.closed.values())[n]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "blob.bin").write_bytes(os.urandom(2 * 2**20 + 77))
    return root


@pytest.fixture(scope="module", params=CONFORMANCE_MODES)
def server(request, files):
    srv = Server(request.param, str(files))
    yield srv
    srv.server.stop()
    srv.server.wait_stopped(20 * SLOW)


@pytest.mark.parametrize(
    "suite_name",
    [
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ],
)
def test_openssl_s_client(server, suite_name, tmp_path):
    suite = BY_OPENSSL[suite_name]
    chunks = [marker_payload(n) for n in (1, 4000, 2**14, 3)]
    argv = s_client_argv(
        "127.0.0.1", server.port, suite=suite, keylog=str(tmp_path / "keylog"), cafile=CAFILE
    )
    before = server.count()
    assert run_s_client_echo(argv, chunks, timeout=60 * SLOW) == b"".join(chunks)
    conn = server.nth(before)
    assert (conn.outcome, conn.mode, conn.suite) == ("ok", server.mode, suite_name)


@pytest.mark.parametrize(
    ("version", "cipher", "expected"),
    [
        ((3, 4), "aes128gcm", "TLS_AES_128_GCM_SHA256"),
        ((3, 4), "chacha20-poly1305", "TLS_CHACHA20_POLY1305_SHA256"),
        ((3, 3), "aes128gcm", "ECDHE-ECDSA-AES128-GCM-SHA256"),
    ],
    ids=["tls13-aes128gcm", "tls13-chacha20", "tls12-aes128gcm"],
)
def test_tlslite_ng_client(server, version, cipher, expected):
    from tlslite.handshakesettings import HandshakeSettings
    from tlslite.tlsconnection import TLSConnection

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60 * SLOW)
    port = sock.getsockname()[1]
    conn = TLSConnection(sock)
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = version
    settings.cipherNames = [cipher]
    if version == (3, 3):
        settings.keyExchangeNames = ["ecdhe_ecdsa"]
    conn.handshakeClientCert(settings=settings, serverName="localhost")
    data = os.urandom(40_000)
    got = b""
    for start in range(0, len(data), 2**14):
        chunk = data[start : start + 2**14]
        conn.write(chunk)
        want = len(got) + len(chunk)
        while len(got) < want:
            got += conn.read()
    conn.close()
    assert got == data
    record = server.connection(port)
    assert (record.outcome, record.mode, record.suite) == ("ok", server.mode, expected)


def _ssl_client(server, tls_version="any"):
    """The example client in mode userspace (Python ssl), connected to ``server``."""
    ctx = echo_client.client_context(cafile=CAFILE, tls_version=tls_version)
    return echo_client.connect(
        "127.0.0.1",
        server.port,
        ctx,
        mode="userspace",
        server_hostname="localhost",
        timeout=60 * SLOW,
    )


@pytest.mark.parametrize("tls_version", ["1.3", "1.2"])
def test_python_ssl_client_echo(server, tls_version):
    tls = _ssl_client(server, tls_version=tls_version)
    port = tls.getsockname()[1]
    result = echo_client.Result(0)
    with tls:
        echo_client.echo(tls, os.urandom(100_000), result)
        tls.unwrap()  # close_notify, as afalg's peer expects
    assert result.received == 100_000
    record = server.connection(port)
    assert (record.outcome, record.mode, record.version) == (
        "ok",
        server.mode,
        f"TLSv{tls_version}",
    )


def test_python_ssl_client_get_sendfile(server, files):
    tls = _ssl_client(server)
    port = tls.getsockname()[1]
    result = echo_client.Result(0)
    with tls:
        echo_client.get(tls, "/blob.bin", result)
    assert result.status == 200
    assert (
        hashlib.sha256(result.body).digest()
        == hashlib.sha256((files / "blob.bin").read_bytes()).digest()
    )
    assert server.connection(port).outcome == "served"
