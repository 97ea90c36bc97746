"""afalg.tls.SSLContext with the blocking libraries that take an ssl.SSLContext unchanged:
http.client, urllib3, http.server; ALPN on both sides; ssl's errors for ssl's mistakes.

Host: algif mode on pyca/cryptography (``mode="algif"`` picks it where AF_ALG is missing);
the VM runs the kernel modes (kTLS, algif on the kernel's AEAD).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import http.server
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters
import urllib3
from _env import CERTS, scaled
from test_tls_helpers import Bg, client_context, server_context, tcp_pair

from afalg import ktls, tls
from afalg.errors import UnsupportedCipherSuite

MODES = [
    pytest.param("ktls", id="ktls", marks=pytest.mark.kernel),
    pytest.param("algif", id="algif", marks=pytest.mark.kernel),
    pytest.param("algif", id="algif-host"),
]

FILE_SIZE = scaled(4 << 20, 64 << 20)


def afalg_client(mode: str, **kw: Any) -> tls.SSLContext:
    ctx = tls.SSLContext(mode=mode, **kw)  # type: ignore[arg-type]
    ctx.load_verify_locations(CERTS / "ca.pem")
    return ctx


def afalg_server(mode: str) -> tls.SSLContext:
    ctx = tls.SSLContext(ssl.PROTOCOL_TLS_SERVER, mode=mode)  # type: ignore[arg-type]
    ctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    return ctx


@pytest.fixture
def served_file(tmp_path: Path) -> tuple[Path, str]:
    """A file of FILE_SIZE random bytes and its sha256."""
    data = os.urandom(FILE_SIZE)
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    peers: list[Any]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.peers.append(self.connection)  # the TLS socket the server's accept() returned


@contextlib.contextmanager
def http_server(ctx: ssl.SSLContext, directory: Path) -> Iterator[tuple[int, list[Any]]]:
    """``ThreadingHTTPServer`` serving ``directory`` over its listening socket wrapped by
    ``ctx`` (server side): yields the port and the connections accepted."""
    peers: list[Any] = []
    handler = type("Handler", (_Handler,), {"peers": peers})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1], peers
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(60)


def _get(conn: http.client.HTTPSConnection, path: str) -> bytes:
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200
    return response.read()


@pytest.mark.parametrize("mode", MODES)
def test_http_client_get_from_ssl_server(mode: str, served_file: tuple[Path, str]) -> None:
    """http.client over afalg's context downloads a file from a plain-ssl ThreadingHTTPServer;
    under kTLS the client's kernel RX context is counted (/proc/net/tls_stat)."""
    path, digest = served_file
    with http_server(server_context(), path.parent) as (port, _):
        conn = http.client.HTTPSConnection("localhost", port, context=afalg_client(mode))
        try:
            conn.connect()  # the handshake and the hand-off
            during = ktls.tls_stats()
            body = _get(conn, "/" + path.name)
            assert conn.sock.mode == mode  # type: ignore[union-attr]
        finally:
            conn.close()
        after = ktls.tls_stats()
    assert hashlib.sha256(body).hexdigest() == digest
    if mode == "ktls":
        # The client's connection held one kernel TX and one RX context, released on close;
        # the kernel opened every record of the response (no decrypt error).
        names = ("TlsCurrRxSw", "TlsCurrTxSw", "TlsDecryptError")
        assert {k: during[k] - after[k] for k in names} == {
            "TlsCurrRxSw": 1,
            "TlsCurrTxSw": 1,
            "TlsDecryptError": 0,
        }


@pytest.mark.parametrize("mode", MODES)
def test_http_server_wrapped_listener_read_by_ssl(mode: str, served_file: tuple[Path, str]) -> None:
    """ThreadingHTTPServer with afalg's context on its listening socket: accept() returns afalg
    TLS sockets; Python's ssl client reads the file, twice over one connection."""
    path, digest = served_file
    with http_server(afalg_server(mode), path.parent) as (port, peers):
        conn = http.client.HTTPSConnection("localhost", port, context=client_context())
        try:
            for _ in range(2):
                assert hashlib.sha256(_get(conn, "/" + path.name)).hexdigest() == digest
            assert isinstance(conn.sock, ssl.SSLSocket)
        finally:
            conn.close()
    assert len(peers) == 1 and peers[0].mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_urllib3_keeps_one_connection_alive(mode: str, served_file: tuple[Path, str]) -> None:
    """urllib3's PoolManager(ssl_context=afalg context): several requests, one TLS connection
    (both ends afalg)."""
    path, digest = served_file
    with (
        http_server(afalg_server(mode), path.parent) as (port, peers),
        urllib3.PoolManager(ssl_context=afalg_client(mode)) as pool,
    ):
        for _ in range(3):
            r = pool.request("GET", f"https://localhost:{port}/{path.name}")
            assert r.status == 200
            assert hashlib.sha256(r.data).hexdigest() == digest
        missing = pool.request("GET", f"https://localhost:{port}/absent")
        assert missing.status == 404
    assert len(peers) == 1  # every request over the first connection


class _ContextAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter that hands urllib3 an ssl_context (requests has no option for it)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._context
        super().init_poolmanager(*args, **kwargs)


@pytest.mark.parametrize("mode", MODES)
def test_requests_with_an_adapter(mode: str, served_file: tuple[Path, str]) -> None:
    path, digest = served_file
    ctx = afalg_client(mode)
    with http_server(afalg_server(mode), path.parent) as (port, peers), requests.Session() as s:
        s.mount("https://", _ContextAdapter(ctx))
        for _ in range(2):
            r = s.get(f"https://localhost:{port}/{path.name}", verify=str(CERTS / "ca.pem"))
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == digest
    assert len(peers) == 1 and peers[0].mode == mode


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("offered", "accepted", "chosen"),
    [(["h2", "http/1.1"], ["http/1.1"], "http/1.1"), (["h2", "http/1.1"], ["h2"], "h2")],
)
def test_alpn_reported_on_both_sides(
    mode: str, offered: list[str], accepted: list[str], chosen: str
) -> None:
    client_ctx, server_ctx = afalg_client(mode), afalg_server(mode)
    client_ctx.set_alpn_protocols(offered)
    server_ctx.set_alpn_protocols(accepted)
    a, b = tcp_pair()
    server = Bg(lambda: server_ctx.wrap_socket(b, server_side=True))
    with (
        client_ctx.wrap_socket(a, server_hostname="localhost") as client,
        server.result() as peer,
    ):
        assert client.selected_alpn_protocol() == peer.selected_alpn_protocol() == chosen
        client.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        assert client.mode == peer.mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_deferred_handshake_and_connect(mode: str) -> None:
    """do_handshake_on_connect=False runs the handshake on do_handshake(); an unconnected
    socket's connect() runs it (as ssl's SSLSocket.connect)."""
    with socket.create_server(("127.0.0.1", 0)) as raw_listener:
        raw_listener.settimeout(60)
        listener = afalg_server(mode).wrap_socket(
            raw_listener, server_side=True, do_handshake_on_connect=False
        )
        address = raw_listener.getsockname()
        for deferred in (True, False):
            ctx = afalg_client(mode)
            if deferred:
                raw = socket.create_connection(address, timeout=60)
                client = ctx.wrap_socket(
                    raw, server_hostname="localhost", do_handshake_on_connect=False
                )
                assert client.version() is None  # nothing negotiated yet
                with pytest.raises(ValueError, match="handshake not done"):
                    client.getpeercert()
            else:
                client = ctx.wrap_socket(socket.socket(), server_hostname="localhost")
                connecting = Bg(lambda c=client: c.connect(address))
            peer, _ = listener.accept()
            server = Bg(lambda p=peer: p.recv(5))  # first I/O runs the server's handshake
            if deferred:
                client.do_handshake()
            else:
                connecting.result()
            with client, peer:
                client.sendall(b"hello")
                assert server.result() == b"hello"
                assert client.mode == peer.mode == mode
                assert client.version() == "TLSv1.3"


def _server_expecting_failure(ctx: ssl.SSLContext) -> tuple[socket.socket, Bg]:
    a, b = tcp_pair()

    def serve() -> None:
        with contextlib.suppress(OSError), ctx.wrap_socket(b, server_side=True):
            pass

    return a, Bg(serve)


def test_hostname_mismatch_is_ssl_error() -> None:
    a, server = _server_expecting_failure(server_context())
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        afalg_client("auto").wrap_socket(a, server_hostname="wrong.example")
    assert a.fileno() == -1  # the socket is closed, as ssl leaves it unusable
    server.result()


def test_self_signed_peer_is_ssl_error() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERTS / "rsa.pem", CERTS / "rsa.key")
    a, server = _server_expecting_failure(ctx)
    with pytest.raises(ssl.SSLCertVerificationError, match=r"self.signed"):
        afalg_client("auto").wrap_socket(a, server_hostname="localhost")
    server.result()


def test_arguments_refused_as_ssl_does() -> None:
    ctx = afalg_client("auto")
    a, b = tcp_pair()
    with a, b:
        with pytest.raises(ValueError, match="check_hostname requires server_hostname"):
            ctx.wrap_socket(a)
        with pytest.raises(ValueError, match="server_hostname can only be specified"):
            afalg_server("auto").wrap_socket(b, server_side=True, server_hostname="x")
        assert a.fileno() >= 0 and b.fileno() >= 0  # refused before a byte: still the caller's
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        pytest.raises(NotImplementedError),  # ssl's own refusal
    ):
        ctx.wrap_socket(udp, server_hostname="localhost")
    with pytest.raises(ValueError, match="mode"):
        tls.SSLContext(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="records_per_key"):
        tls.SSLContext(records_per_key=1)


def test_unix_socket_is_pythons_ssl_socket() -> None:
    """A stream socket that is not TCP is ssl's own SSLSocket, decided before the handshake."""
    a, b = socket.socketpair()
    client_ctx, server_ctx = afalg_client("auto"), afalg_server("auto")
    server = Bg(lambda: server_ctx.wrap_socket(b, server_side=True))
    with client_ctx.wrap_socket(a, server_hostname="localhost") as client:
        assert type(client) is ssl.SSLSocket
        with server.result() as peer:
            assert type(peer) is ssl.SSLSocket
            client.sendall(b"unix")
            assert peer.recv(4) == b"unix"


def test_context_attributes_and_default_context() -> None:
    ctx = tls.SSLContext(mode="ktls", records_per_key=100)
    assert isinstance(ctx, ssl.SSLContext)
    assert (ctx.mode, ctx.records_per_key, ctx.protocol) == ("ktls", 100, ssl.PROTOCOL_TLS_CLIENT)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.cert_store_stats()["x509_ca"] == 0  # a bare context loads no CA, as ssl's

    default = tls.create_default_context(cafile=str(CERTS / "ca.pem"), mode="algif")
    assert isinstance(default, tls.SSLContext) and default.mode == "algif"
    assert default.cert_store_stats()["x509_ca"] == 1
    assert default.check_hostname and default.verify_mode == ssl.CERT_REQUIRED
    server = tls.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert server.protocol == ssl.PROTOCOL_TLS_SERVER and not server.check_hostname
    with pytest.raises(TypeError):
        tls.create_default_context("server")  # type: ignore[arg-type]


def test_suite_afalg_cannot_seal_is_refused_by_name() -> None:
    """A non-AEAD suite (TLS 1.2 CBC) cannot be handed off: wrap_socket raises
    UnsupportedCipherSuite naming it (no userspace fallback for blocking sockets yet)."""
    cbc = "ECDHE-ECDSA-AES128-SHA256"
    a, server = _server_expecting_failure(server_context("TLSv1.2", cbc))
    ctx = afalg_client("auto")
    ctx.set_ciphers(cbc)
    with pytest.raises(UnsupportedCipherSuite, match="AES-GCM"):
        ctx.wrap_socket(a, server_hostname="localhost")
    assert a.fileno() == -1
    server.result()
