"""The main demo (``make demo``): what the kernel offers, then afalg at work on it.

Runs natively where the kernel has AF_ALG and kTLS, otherwise re-runs itself under a Debian
kernel booted with ``afalg vm`` (installing the VM first when run as root).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent


def in_kernel() -> int:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from afalg.alg import AEAD
    from afalg.probe import format_report, probe

    caps = probe()
    print(format_report(caps), flush=True)
    if not caps.af_alg:
        print(f"demo: AF_ALG is not usable: {caps.af_alg_reason}", file=sys.stderr)
        return 1

    key, nonce, aad = os.urandom(16), os.urandom(12), b"header"
    message = b"afalg: AES-GCM sealed by the kernel, checked by cryptography"
    with AEAD("gcm(aes)", key) as aead:
        sealed = aead.encrypt(nonce, message, aad)
        assert sealed == AESGCM(key).encrypt(nonce, message, aad), "kernel and cryptography differ"
        assert aead.decrypt(nonce, sealed, aad) == message
    print(f"\nAEAD round trip: gcm(aes) sealed {len(message)} bytes into {len(sealed)}; "
          "identical to cryptography's AESGCM, and opened again")  # fmt: skip

    return echo_demo() | aiohttp_demo()


def aiohttp_demo() -> int:
    """aiohttp serving a file with web.FileResponse on afalg's event loop (kTLS): the file goes
    through loop.sendfile, the kernel's sendfile; a blocking ssl client checks its sha256; the
    kernel's TLS counters (/proc/net/tls_stat) before and after."""
    import asyncio
    import http.client
    import ssl

    from aiohttp import web

    from afalg import aio, ktls

    print("\n--- aiohttp: web.FileResponse over kTLS through afalg's event loop", flush=True)
    certs = HERE.parent / "tests" / "certs"
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "blob.bin")
        blob = os.urandom(4 << 20)
        path.write_bytes(blob)
        modes: list[str] = []

        async def blob_file(request: web.Request) -> web.FileResponse:
            if request.transport is not None:
                modes.append(request.transport.get_extra_info("mode"))
            return web.FileResponse(path)

        def fetch(port: int) -> bytes:
            conn = http.client.HTTPSConnection("localhost", port, context=client_ctx, timeout=600)
            conn.request("GET", "/blob.bin")
            body = conn.getresponse().read()
            conn.close()
            return body

        async def serve_and_fetch() -> bytes:
            app = web.Application()
            app.router.add_get("/blob.bin", blob_file)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
            try:
                port = runner.addresses[0][1]
                return await asyncio.get_running_loop().run_in_executor(None, fetch, port)
            finally:
                await runner.cleanup()

        before = ktls.tls_stats()
        with asyncio.Runner(loop_factory=aio.loop_factory(mode="ktls")) as runner:
            body = runner.run(serve_and_fetch())
        after = ktls.tls_stats()
    ok = hashlib.sha256(body).digest() == hashlib.sha256(blob).digest()
    print(f"aiohttp served {len(body)} bytes in mode {modes}; sha256 "
          f"{'matches' if ok else 'DIFFERS'}")  # fmt: skip
    print("/proc/net/tls_stat, before -> after:")
    for name in sorted(after):
        if after[name] != before.get(name, 0):
            print(f"  {name:<24} {before.get(name, 0):>6} -> {after[name]}")
    return 0 if ok and modes == ["ktls"] else 1


def echo_demo() -> int:
    """The threaded TLS echo/file server and the asyncio file server, both in kTLS mode, with
    clients in kTLS and algif modes. Clients and servers print summaries with the kernel's TLS
    counters."""
    with tempfile.TemporaryDirectory() as tmp:
        served = Path(tmp, "www")
        served.mkdir()
        blob = os.urandom(4 << 20)
        Path(served, "blob.bin").write_bytes(blob)
        get_blob = [
            "--mode",
            "ktls",
            "--get",
            "/blob.bin",
            "--sha256",
            hashlib.sha256(blob).hexdigest(),
        ]
        runs = {
            "tls_echo_server.py": [
                ("TLS 1.3 echo, client in kTLS", ["--mode", "ktls", "--send", "1M"]),
                ("TLS 1.2 ChaCha20-Poly1305 echo, client on the algif record layer",
                 ["--mode", "algif", "--tls", "1.2", "--ciphers", "ECDHE+CHACHA20",
                  "--send", "256k"]),
                ("4 concurrent kTLS clients", ["--mode", "ktls", "--connections", "4",
                                               "--send", "256k"]),
                ("sendfile: GET /blob.bin (4 MiB) from the kTLS server", get_blob),
            ],
            "aio_file_server.py": [
                ("asyncio: GET /blob.bin from examples/aio_file_server.py (aio.sendfile, kTLS)",
                 get_blob),
            ],
        }  # fmt: skip
        total = sum(len(clients) for clients in runs.values())
        failed = 0
        for script, clients in runs.items():
            try:
                with server(script, served, Path(tmp, f"{script}.ready")) as port:
                    for title, extra in clients:
                        print(f"\n--- {title}", flush=True)
                        failed += client(port, extra) != 0
            except RuntimeError as exc:
                print(f"demo: {exc}", file=sys.stderr)
                failed += len(clients)
    print(f"\ndemo: {total - failed} of {total} client runs succeeded")
    return 1 if failed else 0


@contextlib.contextmanager
def server(script: str, served: Path, ready: Path) -> Iterator[str]:
    """``examples/<script>`` in kTLS mode serving ``served``: its port while it runs."""
    proc = subprocess.Popen([
        sys.executable, str(HERE / script), "--mode", "ktls", "--port", "0",
        "--serve-dir", str(served), "--ready-file", str(ready),
    ])  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() or not ready.read_text().strip():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{script} did not start")
            time.sleep(0.2)
        yield ready.read_text().split()[1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def client(port: str, args: list[str]) -> int:
    """``examples/tls_echo_client.py`` against ``port``: its exit status."""
    command = [sys.executable, str(HERE / "tls_echo_client.py"), "--port", port, *args]
    return subprocess.run(command).returncode


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    from afalg.probe import probe

    if os.environ.get("AFALG_IN_VM") or probe().af_alg:
        return in_kernel()
    print("demo: this kernel has no AF_ALG; running the demo under a Debian kernel (afalg vm)",
          flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "afalg", "vm", "--timeout", "900", "--env", "AFALG_IN_VM=1"]
    if os.geteuid() == 0:
        cmd.append("--install")
    return subprocess.run([*cmd, "--", sys.executable, __file__], cwd=HERE.parent).returncode


if __name__ == "__main__":
    raise SystemExit(main())
