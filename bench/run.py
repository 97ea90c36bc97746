"""afalg benchmarks: each kernel path as a ratio against a userspace peer measured in the same run.

    python bench/run.py [--mib N] [--out bench/RESULTS.md]

Bare times mean little here (under TCG emulation the kernel's crypto runs ~50x slower than on
hardware), so every row compares two ways of doing the same job in the same process. They are
measured round-robin (``--rounds`` rounds, each running every job for a short window), so the
drift of a shared or emulated machine hits both sides alike; a row gives the median MB/s of
each side and the median ratio with its range over the rounds.

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "tests" / "certs"
RECORD = 2**14


Job = Callable[[], int]  # does the work once, returns the bytes it moved


def throughput(job: Job, min_seconds: float) -> float:
    """MB/s of ``job``, repeated for at least ``min_seconds``."""
    moved, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        moved += job()
    return moved / elapsed / 1e6


def measure(jobs: dict[str, Job], rounds: int, seconds: float) -> dict[str, list[float]]:
    """MB/s of every job in every round; the jobs take turns within a round."""
    for job in jobs.values():
        job()  # warm up: module loading, socket setup, page cache
    speeds: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            speeds[name].append(throughput(job, seconds))
    return speeds


@dataclass
class Row:
    job: str
    mine: str
    mine_speeds: list[float]
    peer: str
    peer_speeds: list[float]

    def cells(self) -> str:
        ratios = [a / b for a, b in zip(self.mine_speeds, self.peer_speeds, strict=True)]
        return (
            f"| {self.job} | {self.mine} | {statistics.median(self.mine_speeds):.1f} "
            f"| {self.peer} | {statistics.median(self.peer_speeds):.1f} "
            f"| {statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |"
        )


def bench_aead(size: int) -> tuple[Job, Job, Callable[[], None]]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from afalg.alg import AEAD

    key, nonce, data = os.urandom(16), os.urandom(12), os.urandom(RECORD)
    n = max(1, size // RECORD)
    kernel, user = AEAD("gcm(aes)", key), AESGCM(key)

    def run(seal: Callable[[bytes, bytes, bytes], bytes]) -> int:
        for _ in range(n):
            seal(nonce, data, b"")
        return n * RECORD

    return lambda: run(kernel.encrypt), lambda: run(user.encrypt), kernel.close


def bench_hash(path: Path) -> tuple[Job, Job]:
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

    return kernel, user


def bench_record(size: int) -> tuple[Job, Job]:
    from afalg.keys import CipherSuite, TrafficKeys
    from afalg.record import ContentType, RecordLayer

    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, os.urandom(32))
    payload = os.urandom(size)

    def run(backend: str) -> Job:
        def job() -> int:
            with (RecordLayer(tx=keys, backend=backend) as tx,
                  RecordLayer(rx=keys, backend=backend) as rx):  # fmt: skip
                rx.feed(tx.seal(ContentType.application_data, payload))
                while rx.next_record() is not None:
                    pass
            return size

        return job

    return run("kernel"), run("cryptography")


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(CERTS / "ca.pem")
    return server, client


def bench_transfer(path: Path) -> dict[str, Job]:
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
    return {name: (lambda name=name: one(name)) for name in senders}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=8, help="data per transfer/hash run (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds per row")
    parser.add_argument("--seconds", type=float, default=0.5, help="window per job and round")
    parser.add_argument("--out", help="also write the results (Markdown) to this file")
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
    rounds, seconds = args.rounds, args.seconds
    rows: list[Row] = []

    def pair(job: str, mine: str, peer: str, jobs: tuple[Job, Job]) -> None:
        speeds = measure({mine: jobs[0], peer: jobs[1]}, rounds, seconds)
        rows.append(Row(job, mine, speeds[mine], peer, speeds[peer]))
        print(rows[-1].cells(), flush=True)

    with tempfile.NamedTemporaryFile() as f:
        f.write(os.urandom(size))
        f.flush()
        path = Path(f.name)
        kernel_aead, user_aead, close = bench_aead(size)
        try:
            pair("AEAD seal, 16 KiB messages", "AF_ALG gcm(aes)", "cryptography AESGCM",
                 (kernel_aead, user_aead))  # fmt: skip
        finally:
            close()
        pair(f"SHA-256 of a {args.mib} MiB file", "AF_ALG splice", "hashlib", bench_hash(path))
        pair("TLS 1.3 records seal+open, 1 MiB", "kernel AEAD", "cryptography",
             bench_record(1 << 20))  # fmt: skip
        if caps.ktls:
            speeds = measure(bench_transfer(path), rounds, 2 * seconds)
            base = speeds.pop("ssl sendall")
            for name, values in speeds.items():
                rows.append(Row(f"TLS 1.3 send {args.mib} MiB", name, values, "ssl sendall", base))
                print(rows[-1].cells(), flush=True)

    where = f"kernel {caps.kernel_release}, {os.cpu_count()} CPUs" + (
        " (virtme-ng VM, TCG emulation)" if os.environ.get("AFALG_IN_VM") else ""
    )
    lines = [
        "# Benchmark results",
        "",
        f"Reproduce: `python bench/run.py --mib {args.mib} --rounds {rounds} --seconds {seconds}`"
        " (`make bench`; under `afalg vm` when the host kernel lacks AF_ALG).",
        "Each row: median MB/s of the afalg path and of its peer, measured round-robin in the",
        "same process; ratio = afalg / peer (>1: afalg is faster), median and range over the",
        f"{rounds} rounds.",
        "",
        where,
        "",
        "| job | afalg path | MB/s | peer | MB/s | ratio | range |",
        "|---|---|---:|---|---:|---:|---:|",
        *(row.cells() for row in rows),
    ]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
