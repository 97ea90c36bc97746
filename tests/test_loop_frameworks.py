"""Real frameworks on afalg's event loop, unchanged: aiohttp (FileResponse through
``loop.sendfile``, the kernel's sendfile under kTLS; its client too), uvicorn (``--loop
afalg.aio:new_event_loop`` and ``uvicorn.Config(loop=...)``), websockets (wss, both roles).
Clients that check the bytes run in a separate process with Python's blocking ssl. Host tests
run algif on the cryptography backend; the VM runs kTLS and algif on the kernel.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _env import CAFILE, CERTS, IN_VM, SLOW, WRAP_MODES
from test_loop import factory_for, run_on
from test_tls_helpers import client_context, free_port, server_context

from afalg import aio, ktls
from afalg._transport import TLSTransport

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

Mode = tuple[str, str]
T = 60 * SLOW
SIZE = 8 * 1024 * 1024 + 4321  # large enough for many sendfile steps, quick under TCG

# A separate client: blocking ssl (http.client) with the test CA; one connection, the given
# requests; prints per request the status, a few headers, the body's length and sha256.
CLIENT = textwrap.dedent(
    """
    import hashlib, http.client, json, ssl, sys
    port, cafile, requests = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    ctx = ssl.create_default_context(cafile=cafile)
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=600)
    out = []
    for path, headers in requests:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        body = r.read()
        digest = hashlib.sha256(body).hexdigest()
        short = body.decode("latin-1") if len(body) < 200 else ""
        out.append({"status": r.status, "len": len(body), "sha256": digest, "body": short})
    print(json.dumps(out))
    """
)


async def fetch(port: int, *requests: tuple[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Run the separate client against ``port``; what it printed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CLIENT, str(port), CAFILE, json.dumps(requests),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    result: list[dict[str, Any]] = json.loads(out)
    return result


def fetch_blocking(port: int, *requests: tuple[str, dict[str, str]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), CAFILE, json.dumps(requests)],
        capture_output=True, timeout=3 * T,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: Any) -> Iterator[tuple[Path, bytes]]:
    path = tmp_path_factory.mktemp("files") / "big.bin"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    yield path, data


def counting_sendfile(monkeypatch: Any) -> list[int]:
    """Count the bytes os.sendfile moves in this process (the server's)."""
    moved: list[int] = []
    real = os.sendfile

    def sendfile(out_fd: int, in_fd: int, offset: Any, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        moved.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", sendfile)
    return moved


def transports_made(monkeypatch: Any) -> list[tuple[str, bool]]:
    """Record (mode, server_side) of each TLSTransport made in this process."""
    made: list[tuple[str, bool]] = []
    real = TLSTransport.__init__

    def recording(self: TLSTransport, loop: Any, tls_sock: Any, *a: Any, **k: Any) -> None:
        made.append((tls_sock.mode, tls_sock.ssl_object.server_side))
        real(self, loop, tls_sock, *a, **k)

    monkeypatch.setattr(TLSTransport, "__init__", recording)
    return made


# --- aiohttp ---


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_aiohttp_file_response(mode: Mode, big_file: tuple[Path, bytes], monkeypatch: Any) -> None:
    """web.FileResponse of a large file: sha256 checked by a separate client; under kTLS the
    kernel's sendfile moved every byte; a range request; request.secure; the transport is
    afalg's in the mode chosen."""
    path, data = big_file
    moved = counting_sendfile(monkeypatch)
    seen: dict[str, Any] = {}

    async def file(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)

    async def facts(request: web.Request) -> web.Response:
        t = request.transport
        seen.update(secure=request.secure, transport=type(t).__name__,
                    mode=t.get_extra_info("mode") if t else None)  # fmt: skip
        return web.Response(text="ok")

    async def main() -> list[dict[str, Any]]:
        app = web.Application()
        app.router.add_get("/big", file)
        app.router.add_get("/facts", facts)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context())
        await site.start()
        try:
            return await fetch(
                port, ("/facts", {}), ("/big", {}), ("/big", {"Range": "bytes=1000-1999"})
            )
        finally:
            await runner.cleanup()

    before = ktls.tls_stats()
    facts_r, whole, part = run_on(factory_for(mode), main())
    assert facts_r["status"] == 200
    assert seen == {"secure": True, "transport": "TLSTransport", "mode": mode[0]}
    assert whole["status"] == 200 and whole["len"] == SIZE
    assert whole["sha256"] == hashlib.sha256(data).hexdigest()
    assert part["status"] == 206 and part["sha256"] == hashlib.sha256(data[1000:2000]).hexdigest()
    if mode[0] == "ktls":
        assert sum(moved) == SIZE + 1000  # every byte of both responses, by the kernel
        assert ktls.tls_stats()["TlsTxSw"] > before.get("TlsTxSw", 0)
    else:
        assert sum(moved) == 0  # sealed in chunks by the record layer


def test_aiohttp_cbc_suite_runs_mode_ssl(big_file: tuple[Path, bytes], monkeypatch: Any) -> None:
    """A server that allows only a TLS 1.2 CBC suite (afalg cannot seal it): aiohttp serves
    on, in mode "ssl" (the file sealed in userspace by ssl), byte for byte."""
    path, data = big_file
    made = transports_made(monkeypatch)

    async def file(request: web.Request) -> web.StreamResponse:
        assert request.secure
        return web.FileResponse(path)

    async def main() -> list[dict[str, Any]]:
        app = web.Application()
        app.router.add_get("/big", file)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        ctx = server_context("TLSv1.2", "ECDHE-ECDSA-AES128-SHA256")
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
        try:
            return await fetch(port, ("/big", {}))
        finally:
            await runner.cleanup()

    (whole,) = run_on(aio.new_event_loop, main())
    assert whole["status"] == 200 and whole["sha256"] == hashlib.sha256(data).hexdigest()
    assert made == [("ssl", True)]


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_aiohttp_client_session(mode: Mode, monkeypatch: Any) -> None:
    """aiohttp's ClientSession on afalg's loop against an aiohttp server on it: both roles."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secure={request.secure}")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context()).start()
        try:
            async with aiohttp.ClientSession() as session:
                url = f"https://localhost:{port}/"
                async with session.get(url, ssl=client_context()) as r:
                    assert await r.text() == "secure=True"
        finally:
            await runner.cleanup()

    made = transports_made(monkeypatch)
    run_on(factory_for(mode), main())
    assert sorted(made) == [(mode[0], False), (mode[0], True)]  # client and server: afalg's


@pytest.fixture(scope="module")
def file_64mib(tmp_path_factory: Any) -> Iterator[tuple[Path, str]]:
    path = tmp_path_factory.mktemp("files64") / "64mib.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(64):
            chunk = os.urandom(2**20)
            digest.update(chunk)
            f.write(chunk)
    yield path, digest.hexdigest()


@pytest.mark.kernel
def test_aiohttp_file_response_64mib(file_64mib: tuple[Path, str], monkeypatch: Any) -> None:
    """web.FileResponse of 64 MiB under kTLS: the sha256 checked by a separate client, every
    byte moved by the kernel's sendfile in the server (os.sendfile counted), then a range."""
    path, digest = file_64mib
    moved = counting_sendfile(monkeypatch)
    made = transports_made(monkeypatch)

    async def file(request: web.Request) -> web.StreamResponse:
        assert request.secure
        return web.FileResponse(path)

    async def main() -> list[dict[str, Any]]:
        app = web.Application()
        app.router.add_get("/big", file)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context()).start()
        try:
            return await fetch(port, ("/big", {}), ("/big", {"Range": "bytes=-100"}))
        finally:
            await runner.cleanup()

    before = ktls.tls_stats()
    whole, tail = run_on(aio.loop_factory(mode="ktls"), main())
    assert made == [("ktls", True)]
    assert whole["status"] == 200 and whole["len"] == 64 * 2**20
    assert whole["sha256"] == digest
    assert tail["status"] == 206 and tail["len"] == 100
    assert sum(moved) == 64 * 2**20 + 100
    assert ktls.tls_stats()["TlsTxSw"] > before.get("TlsTxSw", 0)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_aiohttp_client_session_against_the_example_server(mode: Mode, tmp_path: Path) -> None:
    """aiohttp's ClientSession on afalg's loop, against examples/aio_file_server.py (afalg.aio
    on the same loop): the file byte for byte, a 404; the client's transport is afalg's."""
    from aio_file_server import FileServer

    from afalg.serving import ServerLimits

    served = tmp_path / "www"
    served.mkdir()
    blob = os.urandom(1_000_003)
    (served / "blob.bin").write_bytes(blob)

    async def main() -> None:
        server = FileServer(str(served), ServerLimits())
        listening = await server.start(server_context(), "127.0.0.1", 0, mode=mode[0])
        async with listening:
            port = listening.sockets[0].getsockname()[1]
            async with aiohttp.ClientSession() as session:
                url = f"https://localhost:{port}"
                async with session.get(f"{url}/blob.bin", ssl=client_context()) as r:
                    assert r.status == 200
                    assert r.connection is not None and r.connection.transport is not None
                    t = r.connection.transport
                    assert isinstance(t, TLSTransport) and t.get_extra_info("mode") == mode[0]
                    assert await r.read() == blob
                async with session.get(f"{url}/missing", ssl=client_context()) as r:
                    assert r.status == 404

    run_on(factory_for(mode), main())


# --- uvicorn ---

APP = textwrap.dedent(
    """
    import asyncio

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        loop = asyncio.get_running_loop()
        body = f"{scope['scheme']} {type(loop.create_server.__self__).__name__}".encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
    """
)

UVICORN_MODES = [pytest.param("host"), pytest.param("kernel", marks=pytest.mark.kernel)]


@pytest.mark.parametrize("where", UVICORN_MODES)
def test_uvicorn_loop_import_string(where: str, tmp_path: Path) -> None:
    """``uvicorn app:app --loop afalg.aio:new_event_loop`` (a separate process): the scope says
    https, the app runs on afalg's loop; in the VM the kernel's TLS counters moved."""
    (tmp_path / "asgi_app.py").write_text(APP)
    port = free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", "asgi_app:app", "--app-dir", str(tmp_path),
        "--host", "127.0.0.1", "--port", str(port), "--loop", "afalg.aio:new_event_loop",
        "--ssl-keyfile", str(CERTS / "server.key"), "--ssl-certfile", str(CERTS / "server.pem"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(aio.__file__).parent.parent)}
    server = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, server)
        before = ktls.tls_stats()
        (r,) = fetch_blocking(port, ("/", {}))
    finally:
        server.terminate()
        _, err = server.communicate(timeout=T)
    assert r["status"] == 200, err
    assert r["body"] == "https _LoopTLS"
    if IN_VM:
        assert ktls.tls_stats()["TlsRxSw"] > before.get("TlsRxSw", 0)


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    """Until something accepts on ``port`` (the server process started)."""
    for _ in range(int(600 * SLOW)):
        assert proc.poll() is None, proc.communicate()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            threading.Event().wait(0.1)
    raise AssertionError("the server did not start")


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_uvicorn_config_loop(mode: Mode, tmp_path: Path, monkeypatch: Any) -> None:
    """``uvicorn.Config(loop="module:factory")`` in this process: https in the scope, the
    transport afalg's in the mode asked for."""
    uvicorn = pytest.importorskip("uvicorn")
    (tmp_path / "asgi_app.py").write_text(APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"afalg_loops_{mode[0]}_{mode[1]}"  # one module per mode: imports are cached
    factory_module = tmp_path / f"{name}.py"
    factory_module.write_text(
        f"from afalg import aio\nfactory = aio.loop_factory(mode={mode[0]!r}, "
        f"algif_backend={mode[1]!r})\n"
    )
    port = free_port()
    config = uvicorn.Config(
        "asgi_app:app", host="127.0.0.1", port=port, loop=f"{name}:factory",
        ssl_keyfile=str(CERTS / "server.key"), ssl_certfile=str(CERTS / "server.pem"),
        log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    made = transports_made(monkeypatch)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        for _ in range(int(600 * SLOW)):
            if server.started:
                break
            threading.Event().wait(0.1)
        (r,) = fetch_blocking(port, ("/", {}))
    finally:
        server.should_exit = True
        thread.join(3 * T)
    assert r["body"] == "https _LoopTLS"
    assert made == [(mode[0], True)]


# --- websockets ---


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_websockets_wss_echo_both_roles(mode: Mode) -> None:
    """websockets' asyncio server and client, wss, both on afalg's loop."""
    ws_server = pytest.importorskip("websockets.asyncio.server")
    ws_client = pytest.importorskip("websockets.asyncio.client")

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with ws_server.serve(echo, "127.0.0.1", 0, ssl=server_context()) as server:
            port = server.sockets[0].getsockname()[1]
            uri = f"wss://localhost:{port}"
            async with ws_client.connect(uri, ssl=client_context()) as ws:
                for message in ("hello", b"\x00" * 100_000, "done"):
                    await ws.send(message)
                    assert await ws.recv() == message
                assert isinstance(ws.transport, TLSTransport)
                assert ws.transport.get_extra_info("mode") == mode[0]

    run_on(factory_for(mode), main())
