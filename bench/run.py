"""afalg benchmarks: each kernel path as a ratio against a userspace peer measured in the same run.

    python bench/run.py [--mib N] [--out bench/RESULTS.md]

Bare times mean little here (under TCG emulation the kernel's crypto runs ~50x slower than on
hardware), so every row compares two ways of doing the same job, back to back, same process:

- AEAD: AF_ALG ``gcm(aes)`` (``afalg.alg.AEAD``) vs ``cryptography``'s AESGCM, 16 KiB messages.
- hash: AF_ALG ``sha256`` over a file by splice (``Hash.update_file``) vs ``hashlib.file_digest``.
- record layer: ``RecordLayer`` seal+open with the kernel AEAD vs with the ``cryptography`` one.
- TLS transfer over loopback TCP, same receiver (Python ssl) for all: kTLS ``sendfile`` and kTLS
  ``sendall``, and the algif record layer's ``sendall``, vs ``ssl.SSLSocket.sendall``.

Where the kernel lacks AF_ALG the script re-runs itself under ``afalg vm`` (Debian 6.12, TCG).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "tests" / "certs"
RECORD = 2**14


def throughput(job: Callable[[], int], min_seconds: float = 1.0) -> float:
    """MB/s of ``job`` (which returns the bytes it moved), repeated for at least min_seconds."""
    job()  # warm up: module loading, socket setup
    moved, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        moved += job()
    return moved / elapsed / 1e6


def bench_aead(size: int) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from afalg.alg import AEAD

    key, nonce, data = os.urandom(16), os.urandom(12), os.urandom(RECORD)
    n = max(1, size // RECORD)
    kernel, user = AEAD("gcm(aes)", key), AESGCM(key)

    def run(seal: Callable[[bytes, bytes, bytes], bytes]) -> int:
        for _ in range(n):
            seal(nonce, data, b"")
        return n * RECORD

    try:
        return throughput(lambda: run(kernel.encrypt)), throughput(lambda: run(user.encrypt))
    finally:
        kernel.close()


def bench_hash(path: Path) -> tuple[float, float]:
    from afalg.alg import Hash

    size = path.stat().st_size

    def kernel() -> int:
        with Hash("sha256") as h, open(path, "rb") as f:
            h.update_file(f)
            h.digest()
        return size

    def user() -> int:
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")
        return size

    return throughput(kernel), throughput(user)


def bench_record(size: int) -> tuple[float, float]:
    from afalg.keys import CipherSuite, TrafficKeys
    from afalg.record import ContentType, RecordLayer

    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, os.urandom(32))
    payload = os.urandom(size)

    def run(backend: str) -> float:
        def job() -> int:
            with (RecordLayer(tx=keys, backend=backend) as tx,
                  RecordLayer(rx=keys, backend=backend) as rx):  # fmt: skip
                rx.feed(tx.seal(ContentType.application_data, payload))
                while rx.next_record() is not None:
                    pass
            return size

        return throughput(job)

    return run("kernel"), run("cryptography")


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(CERTS / "ca.pem")
    return server, client


def bench_transfer(path: Path) -> dict[str, float]:
    """Send the file over TLS 1.3 loopback; the receiver is Python ssl in every case."""
    from afalg import tls

    size = path.stat().st_size
    server_ctx, client_ctx = _contexts()

    def one(sender: str) -> int:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            got: list[int] = []

            def receive() -> None:
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as s:
                    total = 0
                    while chunk := s.recv(1 << 20):
                        total += len(chunk)
                    got.append(total)

            thread = threading.Thread(target=receive)
            thread.start()
            raw = socket.create_connection(listener.getsockname())
            if sender == "ssl sendall":
                conn = client_ctx.wrap_socket(raw, server_hostname="localhost")
            else:
                mode = "ktls" if sender.startswith("kTLS") else "algif"
                conn = tls.wrap(raw, client_ctx, server_hostname="localhost", mode=mode)
            with conn, open(path, "rb") as f:
                if sender.endswith("sendfile"):
                    conn.sendfile(f)
                else:
                    conn.sendall(f.read())
                # Half-close and wait: closing with unread tickets in the buffer would reset.
                if isinstance(conn, ssl.SSLSocket):
                    socket.socket.shutdown(conn, socket.SHUT_WR)
                else:
                    conn.shutdown(socket.SHUT_WR)
                thread.join()
        assert got == [size], (sender, got, size)
        return size

    senders = ["ssl sendall", "kTLS sendfile", "kTLS sendall", "algif sendall"]
    return {name: throughput(lambda name=name: one(name), 2.0) for name in senders}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=8, help="data per transfer/hash run (MiB)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from afalg.probe import probe

    caps = probe()
    if not caps.af_alg:
        print("bench: no AF_ALG here; running under a Debian kernel (afalg vm)", flush=True)
        cmd = [sys.executable, "-m", "afalg", "vm", "--timeout", "1800",
               "--env", "AFALG_IN_VM=1", "--",
               sys.executable, *sys.argv]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT).returncode

    size = args.mib << 20
    rows: list[tuple[str, str, float, str, float]] = []
    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(size))
        f.flush()
        path = Path(f.name)
        k, u = bench_aead(size)
        rows.append(("AEAD seal, 16 KiB messages", "AF_ALG gcm(aes)", k, "cryptography AESGCM", u))
        k, u = bench_hash(path)
        rows.append((f"SHA-256 of a {args.mib} MiB file", "AF_ALG splice", k, "hashlib", u))
        k, u = bench_record(1 << 20)
        rows.append(("TLS 1.3 records seal+open, 1 MiB", "kernel AEAD", k, "cryptography", u))
        if caps.ktls:
            speeds = bench_transfer(path)
            base = speeds.pop("ssl sendall")
            for name, value in speeds.items():
                rows.append((f"TLS 1.3 send {args.mib} MiB", name, value, "ssl sendall", base))

    lines = [
        f"kernel {caps.kernel_release}, {os.cpu_count()} CPUs"
        + (" (virtme-ng VM, TCG emulation)" if os.environ.get("AFALG_IN_VM") else ""),
        "",
        "| job | afalg path | MB/s | peer | MB/s | ratio |",
        "|---|---|---:|---|---:|---:|",
    ]
    lines += [f"| {job} | {mine} | {a:.1f} | {peer} | {b:.1f} | {a / b:.2f} |"
              for job, mine, a, peer, b in rows]  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
