"""afalg.tls.SSLContext with the blocking libraries that take an ssl.SSLContext unchanged:
http.client, urllib3 (keep-alive, chunked, a connection the server closes), requests,
http.server read by Python's ssl and by curl; ALPN on both sides; mode "ssl" where afalg cannot
seal the suite; ssl's own sockets where afalg cannot take the socket; ssl's errors, with ssl's
messages, for ssl's mistakes.

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
import select
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters
import urllib3
from _env import CERTS, scaled
from test_tls_helpers import Bg, client_context, recv_exactly, server_context, tcp_pair

from afalg import ktls, tls
from afalg.errors import AlreadyWrapped

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
def http_server(
    ctx: ssl.SSLContext, directory: Path, base: type[_Handler] = _Handler
) -> Iterator[tuple[int, list[Any]]]:
    """``ThreadingHTTPServer`` serving ``directory`` over its listening socket wrapped by
    ``ctx`` (server side): yields the port and the connections accepted."""
    peers: list[Any] = []
    handler = type("Handler", (base,), {"peers": peers})
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


def _ssl_and_afalg_errors(
    server_ctx: ssl.SSLContext, *, hostname: str = "localhost"
) -> tuple[BaseException, BaseException]:
    """The errors of Python's ssl client and of afalg's (same CA) against ``server_ctx``."""
    errors = []
    for ctx in (client_context(), afalg_client("auto")):
        a, server = _server_expecting_failure(server_ctx)
        with pytest.raises(ssl.SSLError) as info:
            ctx.wrap_socket(a, server_hostname=hostname)
        server.result()
        assert a.fileno() == -1  # closed, as ssl leaves it (unusable)
        errors.append(info.value)
    return errors[0], errors[1]


def test_hostname_mismatch_is_ssl_error() -> None:
    """ssl's exception, type and message, and its verification details."""
    theirs, ours = _ssl_and_afalg_errors(server_context(), hostname="wrong.example")
    assert type(ours) is type(theirs) is ssl.SSLCertVerificationError
    assert str(ours) == str(theirs) and "mismatch" in str(ours)
    assert (ours.verify_code, ours.verify_message) == (theirs.verify_code, theirs.verify_message)  # type: ignore[attr-defined]


def test_self_signed_peer_is_ssl_error() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERTS / "rsa.pem", CERTS / "rsa.key")
    theirs, ours = _ssl_and_afalg_errors(ctx)
    assert type(ours) is type(theirs) is ssl.SSLCertVerificationError
    assert str(ours) == str(theirs) and "self-signed" in str(ours).replace(
        "self signed", "self-signed"
    )


def test_handshake_timeout_is_ssls() -> None:
    """A peer that never answers: the socket's timeout ends the handshake with ssl's
    TimeoutError ("The handshake operation timed out"), the socket closed."""
    errors = []
    for ctx in (client_context(), afalg_client("auto")):
        with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
            sock = socket.create_connection(silent.getsockname(), timeout=0.2)
            with pytest.raises(TimeoutError) as info:
                ctx.wrap_socket(sock, server_hostname="localhost")
            assert sock.fileno() == -1
            errors.append(info.value)
    theirs, ours = errors
    assert type(ours) is type(theirs)
    assert str(ours) == "The handshake operation timed out" and str(theirs).endswith(str(ours))


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
        pytest.raises(NotImplementedError, match="only stream sockets"),  # ssl's own refusal
    ):
        ctx.wrap_socket(udp, server_hostname="localhost")
    with pytest.raises(ValueError, match="mode"):
        tls.SSLContext(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="records_per_key"):
        tls.SSLContext(records_per_key=1)


@pytest.mark.parametrize("mode", MODES)
def test_already_wrapped_socket_refused_before_a_byte(mode: str) -> None:
    """ssl wraps an SSLSocket again (a second handshake over the first, which breaks the
    connection) and raises SSLError; afalg refuses it, and its own TLS sockets, before a byte
    with AlreadyWrapped (an ssl.SSLError and a TypeError): the connection goes on."""
    for first in (client_context(), afalg_client(mode)):
        a, b = tcp_pair()
        server_ctx = afalg_server(mode)
        server = Bg(lambda b=b, s=server_ctx: s.wrap_socket(b, server_side=True))
        with first.wrap_socket(a, server_hostname="localhost") as conn, server.result() as peer:
            for sock in (conn, peer):
                with pytest.raises(AlreadyWrapped, match="already a TLS socket") as info:
                    afalg_client(mode).wrap_socket(sock, server_hostname="localhost")
                assert isinstance(info.value, ssl.SSLError) and isinstance(info.value, TypeError)
            conn.sendall(b"still TLS")
            assert recv_exactly(peer, 9) == b"still TLS"


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


# Suites afalg cannot seal: TLS 1.2 CBC, and TLS 1.1 (OpenSSL allows it at security level 0).
USERSPACE_SUITES = [
    pytest.param("TLSv1.2", "ECDHE-ECDSA-AES128-SHA256", id="tls12-cbc"),
    pytest.param("TLSv1.1", "DEFAULT:@SECLEVEL=0", id="tls11"),
]


def _only(ctx: ssl.SSLContext, version: str, ciphers: str) -> ssl.SSLContext:
    """Restrict ``ctx`` to ``version`` and ``ciphers``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl deprecates TLS 1.1
        ctx.minimum_version = ctx.maximum_version = getattr(
            ssl.TLSVersion, version.replace(".", "_")
        )
    ctx.set_ciphers(ciphers)
    return ctx


@pytest.mark.parametrize(("version", "ciphers"), USERSPACE_SUITES)
@pytest.mark.parametrize("mode", MODES)
def test_suite_afalg_cannot_seal_goes_on_in_mode_ssl(
    mode: str, version: str, ciphers: str, served_file: tuple[Path, str]
) -> None:
    """Where plain ssl works, afalg's context does too: a suite that is not AEAD (or a version
    before TLS 1.2) goes on in userspace over ssl's object, ``mode == "ssl"``, on both ends:
    http.client downloads from ThreadingHTTPServer, twice over one connection."""
    path, digest = served_file
    server_ctx = _only(afalg_server(mode), version, ciphers)
    with http_server(server_ctx, path.parent) as (port, peers):
        client_ctx = _only(afalg_client(mode), version, ciphers)
        conn = http.client.HTTPSConnection("localhost", port, context=client_ctx)
        try:
            for _ in range(2):
                assert hashlib.sha256(_get(conn, "/" + path.name)).hexdigest() == digest
            sock: Any = conn.sock
            assert (sock.mode, sock.backend, sock.version()) == ("ssl", "openssl", version)
        finally:
            conn.close()
    assert len(peers) == 1 and peers[0].mode == "ssl"


def test_mode_ssl_socket_is_a_tls_socket(tmp_path: Path) -> None:
    """Mode "ssl"'s socket has what afalg's TLS sockets have: the ssl facts, sendfile,
    makefile, close_notify as EOF; and unwrap(), back to plain TCP on both ends."""
    version, ciphers = "TLSv1.2", "ECDHE-ECDSA-AES128-SHA256"
    a, b = tcp_pair()
    server_ctx = _only(afalg_server("auto"), version, ciphers)
    server = Bg(lambda: server_ctx.wrap_socket(b, server_side=True))
    client = _only(afalg_client("auto"), version, ciphers).wrap_socket(
        a, server_hostname="localhost"
    )
    peer = server.result()
    try:
        assert client.mode == peer.mode == "ssl"
        assert (client.server_side, peer.server_side) == (False, True)
        assert client.server_hostname == "localhost" and client.session_reused is False
        assert client.cipher()[0] == ciphers and client.getpeercert()["subject"]
        data = os.urandom(300_000)
        (tmp_path / "f").write_bytes(data)
        with open(tmp_path / "f", "rb") as f:
            sending = Bg(lambda: client.sendfile(f, 1000))
            assert recv_exactly(peer, len(data) - 1000) == data[1000:]
            assert sending.result() == len(data) - 1000 and f.tell() == len(data)
        with peer.makefile("wb") as w, client.makefile("rb") as r:
            w.write(b"line one\nline two\n")
            w.flush()
            assert r.readline() == b"line one\n" and r.readline() == b"line two\n"
        unwrapping = Bg(peer.unwrap)
        plain_client = client.unwrap()
        plain_peer = unwrapping.result()
        with plain_client, plain_peer:
            assert type(plain_client) is type(plain_peer) is socket.socket
            plain_client.sendall(b"plain")
            assert recv_exactly(plain_peer, 5) == b"plain"
        with pytest.raises(OSError, match="closed"):
            client.send(b"x")  # unwrapped: no longer TLS
    finally:
        client.close()
        peer.close()


def test_ssl_server_closes_a_mode_ssl_connection() -> None:
    """close_notify from the peer is EOF (recv returns b"")."""
    version, ciphers = "TLSv1.2", "ECDHE-ECDSA-AES128-SHA256"
    a, b = tcp_pair()
    server_ctx = _only(server_context(), version, ciphers)

    def serve() -> None:
        with server_ctx.wrap_socket(b, server_side=True) as conn:
            conn.sendall(b"bye")
            conn.unwrap()  # close_notify, and the client's back

    server = Bg(serve)
    with _only(afalg_client("auto"), version, ciphers).wrap_socket(
        a, server_hostname="localhost"
    ) as client:
        assert client.mode == "ssl"
        assert recv_exactly(client, 3) == b"bye"
        assert client.recv(10) == b""  # close_notify
        client.close()
    server.result()


def test_unix_socket_is_pythons_ssl_socket(tmp_path: Path) -> None:
    """A stream socket that is not TCP is ssl's own SSLSocket, decided before the handshake:
    a socketpair, and an AF_UNIX listening socket whose accept() gives ssl's sockets."""
    a, b = socket.socketpair()
    client_ctx, server_ctx = afalg_client("auto"), afalg_server("auto")
    server = Bg(lambda: server_ctx.wrap_socket(b, server_side=True))
    with client_ctx.wrap_socket(a, server_hostname="localhost") as client:
        assert type(client) is ssl.SSLSocket
        with server.result() as peer:
            assert type(peer) is ssl.SSLSocket
            client.sendall(b"unix")
            assert peer.recv(4) == b"unix"
    path = str(tmp_path / "sock")
    with socket.socket(socket.AF_UNIX) as raw_listener:
        raw_listener.bind(path)
        raw_listener.listen()
        with server_ctx.wrap_socket(raw_listener, server_side=True) as listener:
            assert type(listener) is ssl.SSLSocket
            raw = socket.socket(socket.AF_UNIX)
            raw.connect(path)
            accepting = Bg(listener.accept)
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as client:
                peer, _ = accepting.result()
                with peer:
                    assert type(client) is type(peer) is ssl.SSLSocket
                    peer.sendall(b"listen")
                    assert recv_exactly(client, 6) == b"listen"


def test_non_blocking_socket_is_pythons_ssl_socket() -> None:
    """A non-blocking TCP socket is ssl's own: its caller drives the handshake with
    do_handshake() and SSLWantReadError, which ssl offers."""
    a, b = tcp_pair()
    server_ctx = server_context()
    server = Bg(lambda: server_ctx.wrap_socket(b, server_side=True))
    a.setblocking(False)
    with afalg_client("auto").wrap_socket(
        a, server_hostname="localhost", do_handshake_on_connect=False
    ) as client:
        assert type(client) is ssl.SSLSocket
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                select.select([client], [], [], 30)
        with server.result() as peer:
            peer.sendall(b"nb")
            while True:  # TLS 1.3 tickets come first: readable, no data yet
                select.select([client], [], [], 30)
                with contextlib.suppress(ssl.SSLWantReadError):
                    assert client.recv(2) == b"nb"
                    break


class _Chunked(_Handler):
    """``/chunked``: a response in chunks (Transfer-Encoding: chunked); ``/close``: a response
    after which the server closes the connection without saying so (no Connection: close)."""

    def do_GET(self) -> None:
        if self.path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in CHUNKS:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/close":
            self.send_response(200)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"bye")
            self.close_connection = True
        else:
            super().do_GET()


CHUNKS = [b"first ", os.urandom(1 << 20), b"x" * 70_000, b" last"]  # records of all sizes


@pytest.mark.parametrize("mode", MODES)
def test_urllib3_chunked_response(mode: str, tmp_path: Path) -> None:
    with (
        http_server(afalg_server(mode), tmp_path, _Chunked) as (port, peers),
        urllib3.PoolManager(ssl_context=afalg_client(mode)) as pool,
    ):
        r = pool.request("GET", f"https://localhost:{port}/chunked")
        assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
        assert r.data == b"".join(CHUNKS)
        streamed = pool.request("GET", f"https://localhost:{port}/chunked", preload_content=False)
        assert b"".join(streamed.read_chunked()) == b"".join(CHUNKS)
        streamed.release_conn()
    assert len(peers) == 1 and peers[0].mode == mode  # both over one kept-alive connection


@pytest.mark.parametrize("mode", MODES)
def test_urllib3_connection_the_server_closes(mode: str, tmp_path: Path) -> None:
    """The server ends the connection after a response (close_notify, FIN) without a
    Connection: close header: urllib3 reads the response whole, and the next request goes
    over a new connection."""
    (tmp_path / "small").write_bytes(b"small file")
    with (
        http_server(afalg_server(mode), tmp_path, _Chunked) as (port, peers),
        urllib3.PoolManager(ssl_context=afalg_client(mode), maxsize=1) as pool,
    ):
        first = pool.request("GET", f"https://localhost:{port}/close")
        assert (first.status, first.data) == (200, b"bye")
        second = pool.request("GET", f"https://localhost:{port}/small")
        assert (second.status, second.data) == (200, b"small file")
    assert len(peers) == 2 and all(p.mode == mode for p in peers)


@pytest.mark.parametrize("mode", MODES)
def test_http_server_read_by_curl(mode: str, served_file: tuple[Path, str], tmp_path: Path) -> None:
    """ThreadingHTTPServer with afalg's context, read by curl (OpenSSL or GnuTLS underneath):
    the file twice over one kept-alive connection, byte for byte."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (a fresh Debian 12 has it)")
    path, digest = served_file
    with http_server(afalg_server(mode), path.parent) as (port, peers):
        url = f"https://localhost:{port}/{path.name}"
        outs = [tmp_path / "one", tmp_path / "two"]
        subprocess.run(
            [curl, "--silent", "--show-error", "--fail", "--http1.1", "--cacert",
             str(CERTS / "ca.pem"), "-o", str(outs[0]), url, "-o", str(outs[1]), url],
            check=True, timeout=300, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    for out in outs:
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert len(peers) == 1 and peers[0].mode == mode
