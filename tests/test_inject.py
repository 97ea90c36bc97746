"""afalg.tls.inject_into_ssl() / extract_from_ssl(): every ssl context's wrap_socket hands off
(code that builds its own contexts: ssl.create_default_context, urllib3, requests), ssl itself
keeps working (its setters, isinstance, wrap_bio and so asyncio's own TLS), and extraction
restores ssl's wrap_socket.

Host: algif mode on pyca/cryptography (``mode="algif"``); the VM runs kTLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3
from _env import CERTS
from test_sslcontext import MODES, afalg_server, http_server
from test_tls_helpers import client_context, server_context

from afalg import tls

SSL_WRAP_SOCKET = ssl.SSLContext.wrap_socket
SSL_WRAP_BIO = ssl.SSLContext.wrap_bio
MADE_AT_IMPORT = client_context()  # before any injection


@pytest.fixture
def injected(request: pytest.FixtureRequest) -> Iterator[str]:
    """inject_into_ssl(mode=the test's mode), always extracted afterwards."""
    mode = getattr(request, "param", "algif")
    tls.inject_into_ssl(mode=mode)
    try:
        yield mode
    finally:
        tls.extract_from_ssl()
    assert ssl.SSLContext.wrap_socket is SSL_WRAP_SOCKET


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[int, list[object], str]]:
    """A ThreadingHTTPServer on Python's own ssl (made before any injection) serving a file:
    (port, connections accepted, the file's sha256)."""
    data = os.urandom(1 << 20)
    (tmp_path / "blob").write_bytes(data)
    server_ctx = server_context()
    with http_server(server_ctx, tmp_path) as (port, peers):
        assert all(isinstance(p, ssl.SSLSocket) for p in peers)
        yield port, peers, hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("injected", MODES, indirect=True)
def test_contexts_code_builds_itself_hand_off(
    injected: str, site: tuple[int, list[object], str]
) -> None:
    """ssl.create_default_context(), a context made before inject_into_ssl(), urllib3's and
    requests' own contexts: their connections are afalg's, in the injected mode."""
    port, _, digest = site
    for ctx in (ssl.create_default_context(cafile=str(CERTS / "ca.pem")), MADE_AT_IMPORT):
        assert type(ctx) is ssl.SSLContext  # the class is ssl's: only wrap_socket changed
        conn = http.client.HTTPSConnection("localhost", port, context=ctx)
        try:
            conn.request("GET", "/blob")
            body = conn.getresponse().read()
            assert getattr(conn.sock, "mode", None) == injected
        finally:
            conn.close()
        assert hashlib.sha256(body).hexdigest() == digest
    with urllib3.PoolManager(ca_certs=str(CERTS / "ca.pem")) as pool:
        r = pool.request("GET", f"https://localhost:{port}/blob", preload_content=False)
        assert r.connection is not None
        assert getattr(r.connection.sock, "mode", None) == injected
        assert hashlib.sha256(r.read()).hexdigest() == digest
        r.release_conn()
    with requests.get(
        f"https://localhost:{port}/blob", verify=str(CERTS / "ca.pem"), stream=True
    ) as resp:
        assert getattr(resp.raw.connection.sock, "mode", None) == injected
        assert hashlib.sha256(resp.content).hexdigest() == digest


def test_ssl_itself_unchanged_while_injected(injected: str) -> None:
    """Replacing the class would break ssl's own setters (they recurse through the module's
    current SSLContext) and isinstance for contexts made before; only wrap_socket changes."""
    tls.inject_into_ssl(mode="algif")  # idempotent: a second call changes nothing else
    ctx = ssl.create_default_context()
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.options & ssl.OP_NO_TICKET
    assert isinstance(MADE_AT_IMPORT, ssl.SSLContext) and isinstance(ctx, ssl.SSLContext)
    assert ssl.SSLContext.wrap_bio is SSL_WRAP_BIO
    assert type(ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")) is (
        ssl.SSLObject
    )


def test_asyncio_own_tls_still_works_while_injected(injected: str) -> None:
    """asyncio builds its contexts with ssl (now with afalg's wrap_socket) and uses wrap_bio,
    which stayed ssl's: its TLS works as before, on both ends."""

    async def main() -> None:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        client_ctx = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
        async with server:
            reader, writer = await asyncio.open_connection(
                "localhost", port, ssl=client_ctx, ssl_handshake_timeout=60
            )
            assert type(writer.get_extra_info("ssl_object")) is ssl.SSLObject
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()
            await writer.wait_closed()

    asyncio.run(main())


def test_extract_restores_ssl(site: tuple[int, list[object], str]) -> None:
    """After extract_from_ssl() (twice: idempotent) connections are ssl's own again, contexts
    made while injected included; afalg's own SSLContext keeps handing off."""
    port, _, _ = site
    tls.inject_into_ssl(mode="algif")
    tls.inject_into_ssl(mode="algif")
    made_while = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
    tls.extract_from_ssl()
    tls.extract_from_ssl()
    assert ssl.SSLContext.wrap_socket is SSL_WRAP_SOCKET
    conn = http.client.HTTPSConnection("localhost", port, context=made_while)
    try:
        conn.request("GET", "/blob")
        conn.getresponse().read()
        assert type(conn.sock) is ssl.SSLSocket
    finally:
        conn.close()
    ours = tls.create_default_context(cafile=str(CERTS / "ca.pem"), mode="algif")
    conn = http.client.HTTPSConnection("localhost", port, context=ours)
    try:
        conn.request("GET", "/blob")
        conn.getresponse().read()
        assert getattr(conn.sock, "mode", None) == "algif"
    finally:
        conn.close()


def test_bad_options_inject_nothing() -> None:
    with pytest.raises(ValueError, match="mode"):
        tls.inject_into_ssl(mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="records_per_key"):
        tls.inject_into_ssl(records_per_key=2)
    assert ssl.SSLContext.wrap_socket is SSL_WRAP_SOCKET


def test_afalg_server_context_unaffected(tmp_path: Path, injected: str) -> None:
    """While injected, afalg's own SSLContext keeps its own mode (here algif on a server)."""
    (tmp_path / "f").write_bytes(b"data")
    with http_server(afalg_server("algif"), tmp_path) as (port, peers):
        conn = http.client.HTTPSConnection("localhost", port, context=client_context())
        try:
            conn.request("GET", "/f")
            assert conn.getresponse().read() == b"data"
        finally:
            conn.close()
    assert peers[0].mode == "algif"
