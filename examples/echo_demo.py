#!/usr/bin/env python3
"""Demo: the TLS echo/file server with kernel TLS, its client, and the kernel's TLS counters.

Starts ``tls_echo_server.py --mode auto`` on a free loopback port with a throwaway certificate
and a served directory holding a 1 MiB file, then runs ``tls_echo_client.py`` twice (4
concurrent echo connections of 64 KiB each; a GET of the file, sent with sendfile and checked
by SHA-256), stops the server with SIGTERM and prints both summaries. Needs a kernel with kTLS
(``make demo`` runs it under a Debian kernel when this one has none).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p
        ),
    )
    with tempfile.TemporaryDirectory(prefix="afalg-demo-") as tmp:
        www = Path(tmp) / "www"
        www.mkdir()
        blob = os.urandom(2**20)
        (www / "file.bin").write_bytes(blob)
        ready = Path(tmp) / "ready"
        server = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "tls_echo_server.py"),
                "--port",
                "0",
                "--mode",
                "auto",
                "--serve-dir",
                str(www),
                "--ready-file",
                str(ready),
                "--handshake-timeout",
                "60",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while not (ready.exists() and ready.read_text().endswith("\n")):
                if server.poll() is not None or time.monotonic() > deadline:
                    print(server.communicate()[0], file=sys.stderr)
                    return 1
                time.sleep(0.1)
            port = ready.read_text().split()[1]
            client = [
                sys.executable,
                str(HERE / "tls_echo_client.py"),
                "--port",
                port,
                "--mode",
                "auto",
            ]
            print(
                f"== echo: 4 connections x 64 KiB (server and client in mode auto) "
                f"on 127.0.0.1:{port}",
                flush=True,
            )
            echo = subprocess.run([*client, "--connections", "4", "--send", "64k"], env=env)
            print("== GET /file.bin (1 MiB, sent by the server with sendfile)", flush=True)
            get = subprocess.run(
                [*client, "--get", "/file.bin", "--sha256", hashlib.sha256(blob).hexdigest()],
                env=env,
            )
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                out, _ = server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                out, _ = server.communicate()
        print("== server log", flush=True)
        print(out, end="", flush=True)
    return 0 if echo.returncode == 0 and get.returncode == 0 and server.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
