"""afalg benchmarks: every figure a ratio against a peer measured round-robin in the same run.

    python bench/run.py                      # make bench: each kernel of make test, in the VM
    python bench/run.py --kernel 6.12 --quick
    python bench/run.py --native             # on a kernel with AF_ALG and kTLS, no VM

Under TCG emulation the kernel's crypto runs ~50x slower than on hardware (and memory copies
slower still), so bare times mean little: each row compares two ways of doing the same job,
measured in turns (the jobs of a row alternate, ``--rounds`` times), so the drift of a shared
or emulated machine hits both alike; a row gives the median of each side and the median ratio
with its range over the rounds. The sections (issue 14):

1. the seed's question: serve a 64 MiB file over TLS 1.3 and 1.2 on loopback, handshake
   excluded, receiver (Python ssl) in another process: kTLS ``sendfile``, kTLS ``send`` of
   128 KiB reads, algif ``sendfile``, Python ssl read + ``sendall`` (128 KiB). MB/s, and CPU
   seconds per GB for the whole guest (``/proc/stat``: kernel crypto may run outside the sender);
2. the receive side: the same file received by kTLS ``recv_into``, algif ``recv_into`` and ssl;
3. afalg's own overhead: each afalg call against a bare loop of the same system calls (and
   against ssl.SSLSocket's), at 16 KiB, 1 KiB and 64 B per call; a receive step delivers the
   same bytes on both sides, and what afalg's 17 KiB read-ahead saves is a row of its own;
4. system calls per 16 KiB record on every path (``strace -c -f``), and an io_submit batch;
5. echo servers with 1, 10, 100 clients per mode: the threaded one (examples/tls_echo_server.py)
   against itself on Python ssl, and one on ``afalg.aio.start_server`` against asyncio's TLS;
6. AF_ALG hash, skcipher and AEAD against hashlib and cryptography (each keyed once per row);
   file hashing by splice;
7. frameworks: aiohttp's ``FileResponse`` and a uvicorn ASGI app on afalg's event loop against
   asyncio's TLS and aiofastnet 1.2's loop (a 16 MiB file; a 1 KiB response at 1, 10, 100
   clients), and urllib3 downloading 64 MiB over ``afalg.tls.SSLContext`` against ssl's.

``make bench`` is one run at one commit, five rounds per figure; RESULTS.md states the commit,
the time and the host's load before and after each VM, and refuses to merge runs.

Speed targets live here (PASS/MISS per row), never in timed tests. Where this kernel lacks
AF_ALG or kTLS the script re-runs itself under ``afalg vm`` once per ``--kernel`` (7.3 with
``crypto.af_alg_restrict=0``), then writes bench/RESULTS.md and bench/results.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CERTS = ROOT / "tests" / "certs"
OUT_DIR = ROOT / ".vmtmp" / "bench"
RECORD = 2**14
CHUNK = 128 * 1024  # the seed's buffer size: reads of 128 KiB
KERNELS = ("6.1", "6.12", "7.3")
SOL_ALG = 279


# ==============================================================================================
# Rows, rounds, and the machine
# ==============================================================================================


@dataclass
class Row:
    """One comparison: afalg's way (``mine``) against a peer, both measured every round.

    ``unit`` says what the values are; ``better`` whether a higher value is better ("high") or
    a lower one ("low"). ``ratio`` is always "how much better afalg is" (>1 better): mine/peer
    for "high", peer/mine for "low". ``target`` is the ratio afalg must reach, if any."""

    section: str
    job: str
    mine: str
    peer: str
    unit: str
    mine_values: list[float]
    peer_values: list[float]
    better: str = "high"
    target: float | None = None
    note: str = ""

    @property
    def ratios(self) -> list[float]:
        pairs = zip(self.mine_values, self.peer_values, strict=True)
        if self.better == "high":
            return [a / b if b else 0.0 for a, b in pairs]
        return [b / a if a else 0.0 for a, b in pairs]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        return "PASS" if self.ratio >= self.target else "MISS"


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def paired(
    mine: Callable[[], object],
    peer_call: Callable[[], object],
    rounds: int,
    seconds: float,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Microseconds per call of ``mine`` and of ``peer_call``, per round: the two alternate
    call by call (in both orders) for ``seconds`` of wall time, each call timed by ``clock``,
    and a round gives the median call of each. Interleaving call by call, and medians, keep
    a busy host (other VMs stealing the CPU for milliseconds at a time) from deciding a row."""
    mine_us: list[float] = []
    peer_us: list[float] = []
    mine(), peer_call()  # warm up: sockets, buffers, caches
    for _ in range(rounds):
        a: list[float] = []
        b: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or not a:
            t0 = clock()
            mine()
            t1 = clock()
            peer_call()
            t2 = clock()
            peer_call()
            t3 = clock()
            mine()
            t4 = clock()
            a += (t1 - t0, t4 - t3)
            b += (t2 - t1, t3 - t2)
        mine_us.append(statistics.median(a) * 1e6)
        peer_us.append(statistics.median(b) * 1e6)
    return mine_us, peer_us


def busy_seconds() -> float:
    """CPU seconds the whole machine (guest) has been busy: /proc/stat's first line, all but
    idle and iowait (the kernel's crypto in softirq or a kworker counts too)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return (total - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "vm": "virtme-ng VM, QEMU TCG" if os.environ.get("AFALG_IN_VM") else "native",
        "af_alg_restrict": _read("/proc/sys/crypto/af_alg_restrict") or "no such sysctl",
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


# ==============================================================================================
# TLS plumbing: contexts, a peer in another process, handshake excluded
# ==============================================================================================


def contexts(version: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(CERTS / "ca.pem")
    tls = ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = tls
    if version == "1.2":
        server.set_ciphers("ECDHE+AESGCM")
    return server, client


def wrap(mode: str, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> Any:
    """A TLS socket over connected ``sock``: ``ssl`` or afalg's ``ktls``/``algif`` mode."""
    name = None if server else "localhost"
    if mode == "ssl":
        return ctx.wrap_socket(sock, server_side=server, server_hostname=name)
    from afalg import tls

    return tls.wrap(sock, ctx, server_side=server, server_hostname=name, mode=mode)


def raw_drain(sock: Any) -> int:
    """Read the TCP stream under a TLS socket until EOF without decrypting (a sink that is
    never the bottleneck); the bytes read."""
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    buf, total = bytearray(1 << 20), 0
    with raw:
        while n := raw.recv_into(buf):
            total += n
    return total


@contextlib.contextmanager
def peer(body: Callable[[socket.socket], None]) -> Iterator[socket.socket]:
    """A forked process that accepts one TCP connection and runs ``body`` on it; yields the
    connected socket of this side. The child exits with ``body``; it is reaped at exit."""
    listener = socket.create_server(("127.0.0.1", 0))
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 0
        try:
            conn, _ = listener.accept()
            listener.close()
            body(conn)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    listener_addr = listener.getsockname()
    sock = socket.create_connection(listener_addr)
    listener.close()
    try:
        yield sock
    finally:
        with contextlib.suppress(OSError):
            sock.close()
        _, status = os.waitpid(pid, 0)
        if status:
            print(f"bench: the peer process exited with status {status}", file=sys.stderr)


def shut(conn: Any) -> None:
    """Close a TLS socket after a transfer, quietly (the peer may be gone already)."""
    with contextlib.suppress(OSError, ssl.SSLError, ValueError):
        conn.close()


# ==============================================================================================
# 1. The seed's question: serve a 64 MiB file
# ==============================================================================================

SENDERS = ("kTLS sendfile", "kTLS send 128 KiB reads", "algif sendfile", "ssl read + sendall")


def send_file(sender: str, version: str, path: Path) -> tuple[float, float]:
    """Serve ``path`` once as the TLS server to a receiver in another process, which reads the
    TCP stream to EOF without decrypting (a sink that is never the bottleneck: the sender is
    what is measured). Returns (MB/s, guest CPU s/GB), timed from the end of the handshake
    until the receiver has read the last byte (it says so on a pipe)."""
    size = path.stat().st_size
    server_ctx, client_ctx = contexts(version)
    done_r, done_w = os.pipe()

    def receiver(sock: socket.socket) -> None:
        conn = client_ctx.wrap_socket(sock, server_hostname="localhost")
        os.write(done_w, struct.pack("=q", raw_drain(conn)))
        shut(conn)

    mode = "ssl" if sender.startswith("ssl") else sender.split()[0].lower()
    with peer(receiver) as sock:
        conn = wrap(mode, sock, server_ctx, server=True)
        with open(path, "rb", buffering=0) as f:
            cpu0, t0 = busy_seconds(), time.perf_counter()
            if sender.endswith("sendfile"):
                conn.sendfile(f)
            else:
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                while n := f.readinto(buf):
                    conn.sendall(view[:n])
            if isinstance(conn, ssl.SSLSocket):
                socket.socket.shutdown(conn, socket.SHUT_WR)
            else:
                conn.shutdown(socket.SHUT_WR)
            (got,) = struct.unpack("=q", os.read(done_r, 8))
            elapsed, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
        shut(conn)
    os.close(done_r)
    os.close(done_w)
    assert got >= size, (sender, got, size)  # ciphertext: the records' headers and tags too
    return size / elapsed / 1e6, cpu / (size / 1e9)


RECEIVERS = ("kTLS recv_into", "algif recv_into", "ssl recv_into")


def receive_file(receiver: str, version: str, path: Path) -> tuple[float, float]:
    """Receive ``path`` as the TLS server into a 128 KiB buffer. The sender, in another
    process, seals the whole file into records before it starts (pyca/cryptography, with the
    keys of afalg.handoff's handshake) and then only writes them to TCP: a source that is
    never the bottleneck. (MB/s, guest CPU s/GB) from the end of the handshake (the sender
    waits for it) to the last byte."""
    size = path.stat().st_size
    server_ctx, client_ctx = contexts(version)
    go_r, go_w = os.pipe()

    def sender(sock: socket.socket) -> None:
        from afalg import handoff
        from afalg.record import ContentType, RecordLayer

        h = handoff.handshake(sock, client_ctx, server_hostname="localhost")
        wire = []
        with RecordLayer(tx=h.tx, backend="cryptography") as layer, open(path, "rb") as f:
            while block := f.read(1 << 20):
                wire.append(layer.seal(ContentType.application_data, block))
        os.read(go_r, 1)
        for piece in wire:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            while sock.recv(65536):  # the receiver's tickets and close_notify
                pass

    mode = "ssl" if receiver.startswith("ssl") else receiver.split()[0].lower()
    with peer(sender) as sock:
        conn = wrap(mode, sock, server_ctx, server=True)
        buf, total = bytearray(CHUNK), 0
        cpu0, t0 = busy_seconds(), time.perf_counter()
        os.write(go_w, b"g")
        while total < size and (n := conn.recv_into(buf)):
            total += n
        elapsed, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
        shut(conn)
    os.close(go_r)
    os.close(go_w)
    assert total == size, (receiver, total, size)
    return size / elapsed / 1e6, cpu / (size / 1e9)


def bench_transfers(path: Path, rounds: int, versions: tuple[str, ...]) -> list[Row]:
    rows: list[Row] = []
    mib = path.stat().st_size >> 20
    for version in versions:
        for kind, names, run, peer_name in (
            ("send", SENDERS, send_file, "ssl read + sendall"),
            ("receive", RECEIVERS, receive_file, "ssl recv_into"),
        ):
            speeds: dict[str, list[float]] = {n: [] for n in names}
            cpus: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(rounds):
                for name in names:
                    mbs, cpu = run(name, version, path)
                    speeds[name].append(mbs)
                    cpus[name].append(cpu)
            section = "1. serve a file" if kind == "send" else "2. receive a file"
            for name in names:
                if name == peer_name:
                    continue
                target = 1.07 if name == "kTLS sendfile" else None
                job = f"TLS {version}, {mib} MiB, {kind}"
                rows.append(Row(section, job, name, peer_name, "MB/s", speeds[name],
                                speeds[peer_name], target=target))  # fmt: skip
                rows.append(Row(section, job, name, peer_name, "guest CPU s/GB", cpus[name],
                                cpus[peer_name], better="low",
                                target=1.0 if name == "kTLS sendfile" else None))  # fmt: skip
                print(_line(rows[-2]), _line(rows[-1]), sep="\n", flush=True)
    return rows


# ==============================================================================================
# 3. afalg's own overhead against a bare loop of the same system calls
# ==============================================================================================


def alg_socket(kind: str, name: str, key: bytes | None = None, tag: int = 0) -> socket.socket:
    """A bare operation socket (no afalg): bind, key, accept."""
    tfm = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    tfm.bind((kind, name))
    if key is not None:
        tfm.setsockopt(SOL_ALG, socket.ALG_SET_KEY, key)
    if tag:
        tfm.setsockopt(SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, tag)
    op, _ = tfm.accept()
    tfm.close()
    return op


def overhead_pairs(size: int) -> dict[str, tuple[Callable[[], object], Callable[[], object]]]:
    """afalg call -> (afalg, bare loop) making the same system calls on ``size`` bytes."""
    from afalg.alg import AEAD, Hash, SKCipher

    key, iv, iv16, aad = os.urandom(16), os.urandom(12), os.urandom(16), os.urandom(13)
    data = os.urandom(size)
    enc, dec = socket.ALG_OP_ENCRYPT, socket.ALG_OP_DECRYPT
    aead = AEAD("gcm(aes)", key)
    sealed = aead.encrypt(iv, data, aad)
    out = bytearray(len(aad) + len(sealed))
    a_op = alg_socket("aead", "gcm(aes)", key, 16)

    def bare_seal() -> None:
        a_op.sendmsg_afalg([aad, data], op=enc, iv=iv, assoclen=len(aad))
        a_op.recv_into(out)

    def bare_open() -> None:
        a_op.sendmsg_afalg([aad, sealed], op=dec, iv=iv, assoclen=len(aad))
        a_op.recv_into(out, len(aad) + size)

    cipher = SKCipher("cbc(aes)", key)
    s_op = alg_socket("skcipher", "cbc(aes)", key)
    sout = bytearray(size)

    def bare_skcipher() -> None:
        s_op.sendmsg_afalg([data], op=enc, iv=iv16)
        s_op.recv_into(sout)

    h = Hash("sha256")
    h_op = alg_socket("hash", "sha256")

    def bare_hash() -> None:
        h_op.send(data, socket.MSG_MORE)
        clone, _ = h_op.accept()
        clone.recv(32)
        clone.close()

    def hash_call() -> None:
        h.update(data)
        h.digest()

    return {
        "AEAD.encrypt_into (gcm(aes), 13 B AAD)": (
            lambda: aead.encrypt_into(out, iv, data, aad), bare_seal),
        "AEAD.decrypt_into": (lambda: aead.decrypt_into(out, iv, sealed, aad), bare_open),
        "AEAD.encrypt (returns bytes)": (lambda: aead.encrypt(iv, data, aad), bare_seal),
        "AEAD.decrypt (returns bytes)": (lambda: aead.decrypt(iv, sealed, aad), bare_open),
        "SKCipher.encrypt_into (cbc(aes))": (
            lambda: cipher.encrypt_into(sout, iv16, data), bare_skcipher),
        "SKCipher.encrypt (returns bytes)": (lambda: cipher.encrypt(iv16, data), bare_skcipher),
        "Hash.update + digest (sha256)": (hash_call, bare_hash),
    }  # fmt: skip


# (bytes per call, afalg's call, the peer's label, afalg, the peer)
Pair = tuple[int, str, str, Callable[[], object], Callable[[], object]]
SEEK_LABEL = "bare loop + lseek"
READ_AHEAD = 2**14 + 1024  # afalg.ktls._RECORD_BUF: one whole record's plaintext
AHEAD_LABEL = "bare loop + 17 KiB read-ahead"


def ktls_pairs(size: int, path: Path) -> Iterator[Pair]:
    """kTLS sendfile, recv_into and (below 16 KiB) sendall against os.sendfile /
    socket.recv_into / socket.sendall on the same socket, and recv_into and sendall against
    ssl.SSLSocket's; the peer drains raw bytes or keeps sending in another process.

    A receive step delivers exactly ``size`` bytes on both sides, in as many calls as it
    takes: afalg reads up to 17 KiB ahead into a scratch buffer when asked for less and serves
    the next calls from memory, a bare ``recv_into`` returns what one record holds. What that
    read-ahead saves by itself is its own row: a bare loop with the same 17 KiB read-ahead
    against the bare loop.

    ``KTLSSocket.sendfile`` keeps :meth:`socket.socket.sendfile`'s promise that the file
    position ends after the bytes sent: one ``lseek`` per call, which a bare ``os.sendfile``
    loop does not make. So it is measured against both bare loops, and the cost of that
    ``lseek`` alone is a row of its own; at 16 KiB it is also measured at 256 KiB per call."""
    server_ctx, client_ctx = contexts("1.3")

    def drain(sock: socket.socket) -> None:
        conn = client_ctx.wrap_socket(sock, server_hostname="localhost")
        raw_drain(conn)

    file_size = path.stat().st_size
    with peer(drain) as sock, open(path, "rb", buffering=0) as f:
        conn = wrap("ktls", sock, server_ctx, server=True)
        fd, ffd = conn.fileno(), f.fileno()
        offset = [0]

        def next_offset() -> int:
            offset[0] = (offset[0] + size) % (file_size - size)
            return offset[0]

        def sender(n: int) -> tuple[Callable[[], object], ...]:
            def mine() -> None:
                conn.sendfile(f, next_offset(), n)

            def bare() -> None:
                os.sendfile(fd, ffd, next_offset(), n)

            def bare_seek() -> None:
                start = next_offset()
                os.sendfile(fd, ffd, start, n)
                os.lseek(ffd, start + n, os.SEEK_SET)

            return mine, bare, bare_seek

        mine, bare, bare_seek = sender(size)
        yield size, "KTLSSocket.sendfile", "bare loop", mine, bare
        yield size, "KTLSSocket.sendfile", SEEK_LABEL, mine, bare_seek
        yield size, SEEK_LABEL, "bare loop", bare_seek, bare
        if size == RECORD:
            mine, bare, _ = sender(16 * RECORD)
            yield 16 * RECORD, "KTLSSocket.sendfile", "bare loop", mine, bare
        shut(conn)

    def source(sock: socket.socket) -> None:
        conn = client_ctx.wrap_socket(sock, server_hostname="localhost")
        blob = memoryview(os.urandom(1 << 20))
        with contextlib.suppress(OSError, ssl.SSLError):
            while True:
                conn.sendall(blob)

    with peer(source) as sock, peer(source) as ssl_sock:
        conn = wrap("ktls", sock, server_ctx, server=True)
        ssl_conn = wrap("ssl", ssl_sock, server_ctx, server=True)
        buf = bytearray(size)
        view = memoryview(buf)
        raw = socket.socket(fileno=os.dup(conn.fileno()))

        def exactly(recv_into: Callable[[memoryview, int], int]) -> Callable[[], object]:
            """A step that delivers exactly ``size`` bytes, in as many calls as it takes: each
            side of a receive row hands the caller the same bytes per step."""

            def step() -> None:
                got = 0
                while got < size:
                    got += recv_into(view[got:], size - got)

            return step

        # afalg reads up to READ_AHEAD bytes into a scratch buffer when the caller asks for less
        # (ktls._RECORD_BUF) and serves the next calls from memory: the same in a bare loop, so
        # that what read-ahead itself saves is a row of its own
        pending = bytearray()
        scratch = memoryview(bytearray(READ_AHEAD))

        def ahead_into(target: memoryview, want: int) -> int:
            if not pending:
                pending.extend(scratch[: raw.recv_into(scratch)])
            k = min(want, len(pending))
            target[:k] = pending[:k]
            del pending[:k]
            return k

        mine_rx, bare_rx = exactly(conn.recv_into), exactly(raw.recv_into)
        yield size, "KTLSSocket.recv_into", "bare loop", mine_rx, bare_rx
        yield (
            size,
            "KTLSSocket.recv_into",
            "SSLSocket.recv_into",
            mine_rx,
            exactly(ssl_conn.recv_into),
        )
        yield size, AHEAD_LABEL, "bare loop", exactly(ahead_into), bare_rx
        raw.close()
        for s in (sock, ssl_sock):
            with contextlib.suppress(OSError):
                socket.socket.shutdown(s, socket.SHUT_RDWR)
        shut(conn)
        shut(ssl_conn)

    if size >= RECORD:
        return  # the send rows below are the small-message path (issue 28); 16 KiB: sendfile
    with peer(drain) as sock, peer(drain) as ssl_sock:
        conn = wrap("ktls", sock, server_ctx, server=True)
        ssl_conn = wrap("ssl", ssl_sock, server_ctx, server=True)
        raw = socket.socket(fileno=os.dup(conn.fileno()))
        data = os.urandom(size)
        mine_tx = lambda: conn.sendall(data)  # noqa: E731
        yield size, "KTLSSocket.sendall", "bare loop", mine_tx, lambda: raw.sendall(data)
        yield (
            size,
            "KTLSSocket.sendall",
            "SSLSocket.sendall",
            mine_tx,
            lambda: ssl_conn.sendall(data),
        )
        raw.close()
        shut(conn)
        shut(ssl_conn)


def bench_overhead(path: Path, rounds: int, seconds: float) -> list[Row]:
    rows: list[Row] = []
    for size in (RECORD, 1024, 64):
        label = size_label(size)
        pairs = overhead_pairs(size)
        for name, (mine, bare) in pairs.items():
            mine_us, bare_us = paired(mine, bare, rounds, seconds)
            target = 0.95 if size == RECORD and "returns bytes" not in name else None
            rows.append(Row("3. afalg vs bare system calls", f"{label} per call", name,
                            "bare loop", "us/call (wall)", mine_us, bare_us,
                            better="low", target=target))  # fmt: skip
            print(_line(rows[-1]), flush=True)
        for n, name, peer_name, mine, bare in ktls_pairs(size, path):
            mine_us, bare_us = paired(mine, bare, rounds, seconds, time.process_time)
            job = f"{label} per call" if n == size else f"{n // 1024} KiB per call"
            # the targeted rows: afalg against the bare loop
            afalg_vs_bare = name not in (SEEK_LABEL, AHEAD_LABEL) and peer_name == "bare loop"
            rows.append(Row("3. afalg vs bare system calls", job, name,
                            peer_name, "us/call (process CPU)", mine_us, bare_us,
                            better="low",
                            target=0.98 if n >= RECORD and afalg_vs_bare else None))  # fmt: skip
            print(_line(rows[-1]), flush=True)
    return rows


# ==============================================================================================
# 4. System calls per record (strace -c -f) and an io_submit batch
# ==============================================================================================

STRACE_JOBS = (
    "kTLS sendfile", "kTLS send 128 KiB reads", "algif sendfile", "ssl read + sendall",
    "kTLS recv_into", "algif recv_into", "ssl recv_into", "RecordLayer.seal+open (kernel AEAD)",
    "AF_ALG seal, io_submit batch of 8",
)  # fmt: skip


def strace_job(job: str, records: int, port: int) -> None:
    """The traced process: connect to the peer on ``port`` (TLS client), then move
    ``records`` full records one way (or seal them without a socket)."""
    size = records * RECORD
    if job.startswith("RecordLayer"):
        from afalg.keys import CipherSuite, TrafficKeys
        from afalg.record import ContentType, RecordLayer

        keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))
        payload = os.urandom(RECORD)
        with RecordLayer(tx=keys, backend="kernel") as tx, \
             RecordLayer(rx=keys, backend="kernel") as rx:  # fmt: skip
            for _ in range(records):
                wire = tx.seal(ContentType.application_data, payload)
                if "open" in job:
                    rx.feed(wire)
                    rx.next_record()
        return
    if job.startswith("AF_ALG seal, io_submit"):
        aio_seal(records, 8)
        return
    _, client_ctx = contexts("1.3")
    sock = socket.create_connection(("127.0.0.1", port))
    mode = "ssl" if job.startswith("ssl") else job.split()[0].lower()
    conn = wrap(mode, sock, client_ctx, server=False)
    buf = bytearray(CHUNK)
    if "recv_into" in job:
        total = 0
        while total < size and (n := conn.recv_into(buf)):
            total += n
    else:
        # the same file, opened the same way, in the run that moves nothing
        with open(STRACE_FILE, "rb", buffering=0) as f:
            if records and job.endswith("sendfile"):
                conn.sendfile(f, 0, size)
            elif records:
                view, total = memoryview(buf), 0
                while total < size and (n := f.readinto(buf)):
                    conn.sendall(view[:n])
                    total += n
    shut(conn)


STRACE_FILE = Path(tempfile.gettempdir()) / "afalg-bench-strace"


def strace_peer(job: str, records: int) -> tuple[int, Callable[[], None]]:
    """The untraced TLS server for a strace job, in another process: (port, wait)."""
    server_ctx, _ = contexts("1.3")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if not job.startswith(("RecordLayer", "AF_ALG")):
                conn = server_ctx.wrap_socket(listener.accept()[0], server_side=True)
                if "recv_into" in job:
                    conn.sendall(os.urandom(records * RECORD) if records else b"")
                    with contextlib.suppress(OSError, ssl.SSLError):
                        conn.recv(1)
                else:
                    buf = bytearray(1 << 20)
                    with contextlib.suppress(OSError, ssl.SSLError):
                        while conn.recv_into(buf):
                            pass
                shut(conn)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    listener.close()
    return port, lambda: os.waitpid(pid, 0) and None


def strace_counts(job: str, records: int) -> dict[str, int]:
    """Calls per system call of one traced run (strace -c -f over the whole process)."""
    port, wait = strace_peer(job, records)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = OUT_DIR / "strace.txt"
    cmd = ["strace", "-c", "-f", "-o", str(out), sys.executable, __file__,
           "--strace-job", job, "--records", str(records), "--port", str(port)]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wait()
    counts: dict[str, int] = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] = int(parts[3])
    return counts


def bench_syscalls(records: int) -> list[dict[str, Any]]:
    """Per path: system calls per 16 KiB record, the difference between a run moving
    ``records`` records and one moving none (so start-up and handshake cancel out)."""
    if not shutil.which("strace"):
        print("bench: no strace here (make bench installs it); section 4 skipped", flush=True)
        return []
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    STRACE_FILE.write_bytes(os.urandom(records * RECORD))
    results = []
    for job in STRACE_JOBS:
        try:
            full, empty = strace_counts(job, records), strace_counts(job, 0)
        except (subprocess.CalledProcessError, OSError) as exc:
            results.append({"path": job, "error": str(exc)})
            continue
        delta = {k: full.get(k, 0) - empty.get(k, 0) for k in set(full) | set(empty)}
        per = {k: v / records for k, v in delta.items() if v / records >= 0.05}
        total = sum(v for v in delta.values()) / records
        ordered = sorted(per.items(), key=lambda kv: -kv[1])
        calls = {k: round(v, 2) for k, v in ordered}
        results.append({"path": job, "per_record": round(total, 2), "calls": calls})
        print(f"syscalls/record {job}: {total:.2f} {results[-1]['calls']}", flush=True)
    return results


# -- io_submit on AF_ALG operation sockets (libkcapi's AIO mode), through ctypes ---------------


class IOCB(ctypes.Structure):
    """struct iocb (include/uapi/linux/aio_abi.h, little-endian)."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32),
    ]  # fmt: skip


class IOEvent(ctypes.Structure):
    """struct io_event."""

    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]  # fmt: skip


_NR = {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209}  # x86_64
IOCB_CMD_PREAD = 0


def _syscall(name: str, *args: Any) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ret = libc.syscall(ctypes.c_long(_NR[name]), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")
    return int(ret)


def aio_seal(records: int, batch: int) -> list[bytes]:
    """Seal ``records`` TLS 1.3-sized records (16 KiB + 5-byte AAD, gcm(aes)), ``batch`` at a
    time: one sendmsg() per record on its own operation socket (each record needs its own IV:
    one nonce per record), then one io_submit() of ``batch`` reads and one io_getevents().
    Record ``i`` uses the nonce ``i`` (key zero); returns the first batch's outputs."""
    key = bytes(16)
    tfm = socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0)
    tfm.bind(("aead", "gcm(aes)"))
    tfm.setsockopt(SOL_ALG, socket.ALG_SET_KEY, key)
    tfm.setsockopt(SOL_ALG, socket.ALG_SET_AEAD_AUTHSIZE, None, 16)
    ops = [tfm.accept()[0] for _ in range(batch)]
    payload, aad = os.urandom(RECORD), b"\x17\x03\x03\x40\x11"
    bufs = [ctypes.create_string_buffer(len(aad) + RECORD + 16) for _ in range(batch)]
    iocbs = (IOCB * batch)()
    ptrs = (ctypes.POINTER(IOCB) * batch)(*[ctypes.pointer(iocbs[i]) for i in range(batch)])
    events = (IOEvent * batch)()
    ctx = ctypes.c_ulong(0)
    _syscall("io_setup", ctypes.c_uint(batch), ctypes.byref(ctx))
    first: list[bytes] = []
    try:
        done, seq = 0, 0
        while done < records:
            n = min(batch, records - done)
            for i in range(n):
                nonce = seq.to_bytes(12, "big")
                seq += 1
                ops[i].sendmsg_afalg([aad, payload], op=socket.ALG_OP_ENCRYPT, iv=nonce,
                                     assoclen=len(aad))  # fmt: skip
                cb = iocbs[i]
                cb.aio_data, cb.aio_lio_opcode, cb.aio_fildes = i, IOCB_CMD_PREAD, ops[i].fileno()
                cb.aio_buf = ctypes.addressof(bufs[i])
                cb.aio_nbytes = len(bufs[i])
            submitted = _syscall("io_submit", ctx, ctypes.c_long(n), ptrs)
            got = 0
            while got < submitted:
                got += _syscall("io_getevents", ctx, ctypes.c_long(submitted - got),
                                ctypes.c_long(submitted - got), events, None)  # fmt: skip
            for i in range(got):
                if events[i].res != len(aad) + RECORD + 16:
                    raise OSError(-events[i].res if events[i].res < 0 else 5,
                                  f"io_submit read returned {events[i].res}")  # fmt: skip
            if not first:
                first = [bufs[i].raw[len(aad) :] for i in range(n)]
            done += n
    finally:
        _syscall("io_destroy", ctx)
        for op in ops:
            op.close()
        tfm.close()
    return first


def check_aio_matches() -> str:
    """That the io_submit batch gives the same records as AEAD.encrypt (it is not a toy)."""
    from afalg.alg import AEAD

    try:
        sealed = aio_seal(8, 8)
    except OSError as exc:
        return f"io_submit on AF_ALG failed here: {exc}"
    whole = sealed and len(sealed[0]) == RECORD + 16
    with AEAD("gcm(aes)", bytes(16)) as aead:
        # the payload is random per call: check the batch by decrypting what it sealed
        aad = b"\x17\x03\x03\x40\x11"
        opened = [aead.decrypt(i.to_bytes(12, "big"), c, aad) for i, c in enumerate(sealed)]
    ok = whole and len({bytes(p) for p in opened}) == 1
    return ("io_submit batch of 8 on AF_ALG operation sockets: each record opens with "
            f"AEAD.decrypt under its own nonce: {'yes' if ok else 'NO'}")  # fmt: skip


# ==============================================================================================
# 5. The echo servers under load: the threaded example server, and an asyncio one
# ==============================================================================================

# The servers of section 5, each in its modes; the last mode of each is the peer of the others:
# examples/tls_echo_server.py in each --mode ("userspace" is Python ssl), and aio_echo() on
# afalg.aio.start_server ("ssl": the same server on asyncio.start_server(ssl=ctx)).
SERVERS = {"threaded": ("ktls", "algif", "userspace"), "asyncio": ("ktls", "algif", "ssl")}
SERVER_LABELS = {
    "threaded": ("server --mode {mode}", "server --mode userspace (ssl)"),
    "asyncio": ("afalg.aio.start_server mode={mode}", "asyncio.start_server(ssl=ctx)"),
}


def child_env() -> dict[str, str]:
    """The environment of a child Python: afalg imported from this tree (the venv may hold an
    editable install of another checkout)."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))


def _ready_port(ready: Path) -> int | None:
    """The port a server wrote to its ready file, or None while the file is not complete.

    The file is read while the server may be writing it: on the VM's shared file system a
    read then fails (ENODATA) or sees part of the line."""
    try:
        text = ready.read_text()
    except OSError:
        return None
    fields = text.split()
    if not text.endswith("\n") or len(fields) != 2 or not fields[1].isdigit():
        return None
    return int(fields[1])


@contextlib.contextmanager
def echo_server(server: str, mode: str, version: str) -> Iterator[int]:
    """Runs one echo server of ``SERVERS`` in its own process; yields its port."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    ready = OUT_DIR / f"ready-{server}-{mode}"
    ready.unlink(missing_ok=True)
    if server == "threaded":
        cmd = [sys.executable, str(ROOT / "examples" / "tls_echo_server.py"), "--port", "0",
               "--mode", mode, "--tls", version, "--cert", str(CERTS / "server.pem"),
               "--key", str(CERTS / "server.key"), "--ready-file", str(ready), "-q",
               "--max-conns", "512", "--max-conns-per-address", "512"]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--aio-echo", mode, version, str(ready)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, env=child_env())
    try:
        deadline = time.monotonic() + 120
        while (port := _ready_port(ready)) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"echo server ({server}, {mode}) did not start")
            time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def aio_echo(mode: str, version: str, ready: Path) -> None:
    """The asyncio echo server: as examples/tls_echo_server.py, each read (at most a record,
    16 KiB) is written back; on ``afalg.aio.start_server`` in ``mode`` (ktls, algif), or for
    ``mode`` "ssl" on ``asyncio.start_server(ssl=ctx)``. Writes ``HOST PORT`` to ``ready``,
    then serves until SIGTERM."""
    from afalg import aio

    server_ctx, _ = contexts(version)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while data := await reader.read(RECORD):
                writer.write(data)
                await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    if mode == "ssl":
        start = asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx, backlog=512)
    else:
        start = aio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx, mode=mode, backlog=512)
    server = await start
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    host, port = server.sockets[0].getsockname()[:2]
    partial = ready.with_suffix(".tmp")
    partial.write_text(f"{host} {port}\n")
    partial.rename(ready)  # whole or absent: echo_server() reads it as soon as it exists
    await stop.wait()
    server.close()  # the clients have gone (load() closes them); asyncio.run ends the rest


def in_child(
    job: Callable[[], dict[str, float]], failed: dict[str, float] | None = None
) -> dict[str, float]:
    """``job()`` in a forked process (the client of a server row); its result.

    If the process fails (its traceback printed): ``failed``, or RuntimeError if None."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            os.write(w, json.dumps(job()).encode())
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if not data and failed is not None:
        return failed
    if not data:
        raise RuntimeError("the client process failed (its traceback is above)")
    return dict(json.loads(data))


def load(port: int, clients: int, seconds: float, version: str, size: int) -> dict[str, float]:
    """``clients`` ssl connections in another process, each a thread sending ``size`` bytes and
    reading the echo back, for ``seconds`` after every handshake is done. Requests/s, p50 and
    p99 latency (ms)."""

    def job() -> dict[str, float]:
        _, client_ctx = contexts(version)
        payload = os.urandom(size)
        conns = []
        for _ in range(clients):
            raw = socket.create_connection(("127.0.0.1", port))
            conns.append(client_ctx.wrap_socket(raw, server_hostname="localhost"))
        latencies: list[list[float]] = [[] for _ in conns]
        start = threading.Barrier(clients + 1)
        end = [0.0]

        def client(i: int) -> None:
            conn, lat, buf = conns[i], latencies[i], bytearray(size)
            view = memoryview(buf)
            start.wait()
            while (t := time.perf_counter()) < end[0]:
                conn.sendall(payload)
                got = 0
                while got < size:
                    got += conn.recv_into(view[got:])
                lat.append(time.perf_counter() - t)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        end[0] = time.perf_counter() + seconds
        start.wait()
        for t in threads:
            t.join()
        for conn in conns:
            shut(conn)
        all_lat = sorted(x for lat in latencies for x in lat)
        result = {
            "rps": len(all_lat) / seconds,
            "p50": 1e3 * all_lat[len(all_lat) // 2],
            "p99": 1e3 * all_lat[min(len(all_lat) - 1, int(len(all_lat) * 0.99))],
        }
        return result

    return in_child(job, failed={"rps": 0.0, "p50": 0.0, "p99": 0.0})


def bench_servers(rounds: int, seconds: float, counts: tuple[int, ...]) -> list[Row]:
    """Every server of ``SERVERS`` in each of its modes, loaded in turns by ``load()`` (1 KiB
    requests, TLS 1.3) with each count of clients, after a warm-up; rows per server, mode
    against its peer."""
    version = "1.3"
    servers = [(server, mode) for server, modes in SERVERS.items() for mode in modes]
    rows: dict[str, list[Row]] = {server: [] for server in SERVERS}
    with contextlib.ExitStack() as stack:
        ports = {s: stack.enter_context(echo_server(*s, version)) for s in servers}
        # a warm-up, not counted: a server's first connection pays one-time costs (the threaded
        # one imports afalg.tls then, seconds under a loaded TCG: one request in the window)
        for s in servers:
            load(ports[s], 1, 0.5, version, 1024)
        for clients in counts:
            res: dict[tuple[str, str], list[dict[str, float]]] = {s: [] for s in servers}
            for _ in range(rounds):
                for s in servers:
                    res[s].append(load(ports[s], clients, seconds, version, 1024))
            job = f"echo 1 KiB, {clients} client{'s' if clients > 1 else ''}"
            for server, (*modes, peer_mode) in SERVERS.items():
                label, peer_label = SERVER_LABELS[server]
                for mode in modes:
                    for metric, unit, better in (("rps", "requests/s", "high"),
                                                 ("p50", "p50 ms", "low"),
                                                 ("p99", "p99 ms", "low")):  # fmt: skip
                        mine = [r[metric] for r in res[server, mode]]
                        base = [r[metric] for r in res[server, peer_mode]]
                        rows[server].append(Row(f"5. echo server ({server})", job,
                                                label.format(mode=mode), peer_label, unit,
                                                mine, base, better=better))  # fmt: skip
                        print(_line(rows[server][-1]), flush=True)
    # one table per server in the report: its rows together
    return [row for server in SERVERS for row in rows[server]]


# ==============================================================================================
# 6. AF_ALG against hashlib and cryptography
# ==============================================================================================

SIZES = (64, 1024, RECORD, 1 << 20)


def size_label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1024 else f"{n} B"


def bench_primitives(path: Path, rounds: int, seconds: float) -> list[Row]:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from afalg.alg import AEAD, Hash, SKCipher, file_digest
    from afalg.errors import AlgError
    from afalg.keys import CipherSuite, TrafficKeys
    from afalg.record import ContentType, RecordLayer

    rows: list[Row] = []
    refused: list[str] = []
    key, iv, iv16 = os.urandom(16), os.urandom(12), os.urandom(16)
    aead, aesgcm, cipher = AEAD("gcm(aes)", key), AESGCM(key), SKCipher("cbc(aes)", key)
    kept = Hash("sha256")

    def pair(job: str, mine_name: str, peer_name: str, mine: Callable[[], object],
             peer_call: Callable[[], object], n: int, note: str = "") -> None:  # fmt: skip
        try:
            mine_us, peer_us = paired(mine, peer_call, rounds, seconds)
        except AlgError as exc:  # e.g. 1 MiB AEAD on 6.1: optmem_max=20480 refuses it
            print(f"bench: {job}, {mine_name}: {exc}", flush=True)
            refused.append(f"{job}, {mine_name}: refused here: {exc}")
            return
        rows.append(Row("6. AF_ALG vs userspace", job, mine_name, peer_name, "MB/s",
                        [n / t for t in mine_us], [n / t for t in peer_us], note=note))  # fmt: skip
        print(_line(rows[-1]), flush=True)

    # the peer keyed once, as afalg's SKCipher (one keyed socket for the row): one encryptor
    # for the whole row, whose CBC chain runs on (each call's IV is the last ciphertext
    # block; cryptography cannot set a new IV on a live CBC context), no key schedule per call
    cbc_encryptor = Cipher(algorithms.AES(key), modes.CBC(iv16)).encryptor()
    cbc = cbc_encryptor.update

    for n in SIZES:
        data = os.urandom(n)
        label = size_label(n)
        pair(f"SHA-256, {label}", "Hash(name, data).digest()", "hashlib.sha256(data).digest()",
             lambda d=data: Hash("sha256", d).digest(), lambda d=data: hashlib.sha256(d).digest(),
             n, "afalg opens its sockets each time (bind, accept)")  # fmt: skip
        pair(f"SHA-256, {label}", "one Hash: update + digest", "hashlib.sha256(data).digest()",
             lambda d=data: (kept.update(d), kept.digest()),
             lambda d=data: hashlib.sha256(d).digest(), n)  # fmt: skip
        pair(f"AES-128-CBC encrypt, {label}", "SKCipher.encrypt",
             "cryptography: one encryptor, update()",
             lambda d=data: cipher.encrypt(iv16, d), lambda d=data: cbc(d), n,
             "both keyed once for the row")  # fmt: skip
        pair(f"AES-128-GCM seal, {label}", "AEAD.encrypt", "cryptography AESGCM",
             lambda d=data: aead.encrypt(iv, d),
             lambda d=data: aesgcm.encrypt(iv, d, None), n)  # fmt: skip
    size = path.stat().st_size

    def spliced() -> None:
        file_digest(path, "sha256").close()

    def hashed() -> None:
        with open(path, "rb") as f:
            hashlib.file_digest(f, "sha256")

    pair(f"SHA-256 of a {size >> 20} MiB file", "afalg.alg.file_digest (splice)",
         "hashlib.file_digest", spliced, hashed, size)  # fmt: skip

    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, os.urandom(32))
    payload = os.urandom(1 << 20)

    def record(backend: str) -> Callable[[], None]:
        tx = RecordLayer(tx=keys, backend=backend)  # type: ignore[arg-type]
        rx = RecordLayer(rx=keys, backend=backend)  # type: ignore[arg-type]

        def job() -> None:
            rx.feed(tx.seal(ContentType.application_data, payload))
            while rx.next_record() is not None:
                pass

        return job

    pair("TLS 1.3 records seal+open, 1 MiB", "RecordLayer kernel AEAD",
         "RecordLayer cryptography", record("kernel"), record("cryptography"), 1 << 20)  # fmt: skip
    for obj in (aead, cipher, kept):
        obj.close()
    REFUSED.extend(refused)
    return rows


REFUSED: list[str] = []  # section 6 rows the kernel refused, for the report's notes


# ==============================================================================================
# 7. Frameworks on afalg's event loop, and urllib3 over afalg.tls.SSLContext
# ==============================================================================================

# The loops of section 7: afalg's, and its two peers (aiofastnet 1.2's, asyncio's own TLS).
LOOPS = ("afalg", "aiofastnet", "asyncio")
LOOP_LABELS = {
    "afalg": "afalg.aio.new_event_loop",
    "aiofastnet": "aiofastnet.loop_factory()",
    "asyncio": "asyncio's TLS",
}
FRAMEWORKS = ("aiohttp", "uvicorn")
SMALL = 1024  # the small response's body


def aiofastnet_loop() -> asyncio.AbstractEventLoop:
    """A loop of aiofastnet's (uvicorn's ``--loop`` wants a zero-argument callable)."""
    import aiofastnet

    return aiofastnet.loop_factory()()


def new_loop(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "afalg":
        from afalg import aio

        return aio.new_event_loop
    return aiofastnet_loop if name == "aiofastnet" else asyncio.new_event_loop


def asgi_app(path: str) -> Callable[..., Any]:
    """The uvicorn app: ``/file`` reads ``path`` in 128 KiB blocks into the response body
    (ASGI has no sendfile in uvicorn), anything else a 1 KiB body."""
    small, size = b"x" * SMALL, os.path.getsize(path)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = scope["path"] == "/file"
        length = str(size if body else SMALL).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", length)]})  # fmt: skip
        if not body:
            await send({"type": "http.response.body", "body": small})
            return
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                await send({"type": "http.response.body", "body": block, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def web_server(framework: str, loop: str, path: str, ready: str) -> None:
    """Serves ``/file`` (``path``) and a 1 KiB ``/small`` over TLS with ``framework`` on
    ``loop`` (:data:`LOOPS`) until SIGTERM; writes ``HOST PORT`` to ``ready`` first (the
    socket listens already: a client waits in the backlog until the loop accepts)."""
    server_ctx, _ = contexts("1.3")
    sock = socket.create_server(("127.0.0.1", 0), backlog=512)
    # accepted sockets inherit TCP_NODELAY: a response written as two records (head, body)
    # must not wait for the client's delayed ACK (40 ms) on any loop
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    partial = Path(ready).with_suffix(".tmp")
    partial.write_text(f"127.0.0.1 {sock.getsockname()[1]}\n")
    if framework == "uvicorn":
        import uvicorn

        loops = {"afalg": "afalg.aio:new_event_loop", "aiofastnet": "__main__:aiofastnet_loop"}
        config = uvicorn.Config(asgi_app(path), loop=loops.get(loop, "asyncio"),
                                ssl_certfile=str(CERTS / "server.pem"),
                                ssl_keyfile=str(CERTS / "server.key"), log_level="warning",
                                access_log=False, lifespan="off")  # fmt: skip
        partial.rename(ready)
        uvicorn.Server(config).run(sockets=[sock])
        return
    from aiohttp import web

    async def main() -> None:
        small = b"x" * SMALL

        async def file(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(path)

        async def tiny(request: web.Request) -> web.StreamResponse:
            return web.Response(body=small)

        app = web.Application()
        app.router.add_get("/file", file)
        app.router.add_get("/small", tiny)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=server_ctx).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        partial.rename(ready)
        await stop.wait()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=new_loop(loop)) as runner:
        runner.run(main())


@contextlib.contextmanager
def web_process(framework: str, loop: str, path: Path) -> Iterator[int]:
    """:func:`web_server` in its own process; yields its port."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    ready = OUT_DIR / f"ready-{framework}-{loop}"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--web-server", framework, loop, str(path), str(ready)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, env=child_env())
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{framework} on {loop}'s loop did not start")
            time.sleep(0.1)
        yield int(ready.read_text().split()[1])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class HTTPClient:
    """HTTP/1.1 GETs, kept alive, over one blocking TLS socket (Python's ssl)."""

    def __init__(self, port: int) -> None:
        _, client_ctx = contexts("1.3")
        raw = socket.create_connection(("127.0.0.1", port))
        self.conn = client_ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = bytearray()
        self.block = bytearray(CHUNK)

    def get(self, path: str) -> int:
        """GET ``path``; the body's length (read whole, not kept)."""
        self.conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._more()
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        if not head.startswith("http/1.1 200"):
            raise RuntimeError(f"GET {path}: {head.splitlines()[0]}")
        length = int(head.split("content-length:")[1].split("\r\n")[0])
        del self.buf[: end + 4]
        got = min(length, len(self.buf))
        del self.buf[:got]
        while got < length:
            n = self.conn.recv_into(self.block, min(CHUNK, length - got))
            if not n:
                raise ConnectionError(f"GET {path}: {got} of {length} bytes")
            got += n
        return length

    def _more(self) -> None:
        data = self.conn.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def close(self) -> None:
        shut(self.conn)


def web_file(port: int) -> dict[str, float]:
    """One GET of ``/file`` by a client in another process, timed from the end of its
    handshake (and of a first small GET) to the last byte: MB/s, guest CPU s/GB."""

    def job() -> dict[str, float]:
        client = HTTPClient(port)
        client.get("/small")
        cpu0, t0 = busy_seconds(), time.perf_counter()
        size = client.get("/file")
        elapsed, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
        client.close()
        return {"mbs": size / elapsed / 1e6, "cpu": cpu / (size / 1e9)}

    return in_child(job)


def web_load(port: int, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` kept-alive connections in another process, a thread each, GETting the 1 KiB
    ``/small`` for ``seconds`` after every handshake: requests/s, p50 and p99 (ms)."""

    def job() -> dict[str, float]:
        conns = [HTTPClient(port) for _ in range(clients)]
        latencies: list[list[float]] = [[] for _ in conns]
        start = threading.Barrier(clients + 1)
        end = [0.0]

        def client(i: int) -> None:
            start.wait()
            while (t := time.perf_counter()) < end[0]:
                conns[i].get("/small")
                latencies[i].append(time.perf_counter() - t)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        end[0] = time.perf_counter() + seconds
        start.wait()
        for t in threads:
            t.join()
        for c in conns:
            c.close()
        lat = sorted(x for each in latencies for x in each)
        return {"rps": len(lat) / seconds, "p50": 1e3 * lat[len(lat) // 2],
                "p99": 1e3 * lat[min(len(lat) - 1, int(len(lat) * 0.99))]}  # fmt: skip

    return in_child(job)


def tls_stat() -> dict[str, int]:
    """The kernel's kTLS counters (/proc/net/tls_stat), empty where there are none."""
    counters = {}
    for line in (_read("/proc/net/tls_stat") or "").splitlines():
        name, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            counters[name] = int(value.strip())
    return counters


def ktls_note(loop: str, opened: dict[str, int]) -> str:
    """Whether ``loop``'s rows ran kTLS: the kTLS sockets the kernel counted while they ran."""
    tx, rx = opened.get("TlsTxSw", 0) + opened.get("TlsTxDevice", 0), opened.get("TlsRxSw", 0)
    seen = f"kTLS contexts opened during its rounds: {tx} TX, {rx} RX"
    if loop != "aiofastnet":
        return seen
    why = ""
    if not hasattr(ssl, "OP_ENABLE_KTLS"):
        why = (f"no kTLS: it needs ssl.OP_ENABLE_KTLS (Python 3.12+; this is "
               f"{platform.python_version()}) and an OpenSSL built with kTLS (Debian 12's "
               f"{ssl.OPENSSL_VERSION.split()[1]} is not); ")  # fmt: skip
    return why + seen


def bench_frameworks(
    rounds: int, seconds: float, counts: tuple[int, ...], mib: int
) -> tuple[list[Row], list[str]]:
    """aiohttp's FileResponse and a uvicorn ASGI app on each loop of :data:`LOOPS`, loaded in
    turns by clients in another process: a ``mib`` MiB file (MB/s, guest CPU s/GB) and a
    1 KiB response at each count of clients (requests/s, p99); then urllib3 downloading
    64 MiB over afalg.tls.SSLContext and over ssl. Rows afalg against each peer."""
    rows: list[Row] = []
    notes: list[str] = []
    section = "7. frameworks and libraries"
    with tempfile.NamedTemporaryFile(prefix="afalg-bench-web-") as f:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(block)
        f.flush()
        path = Path(f.name)
        for framework in FRAMEWORKS:
            with contextlib.ExitStack() as stack:
                ports = {lp: stack.enter_context(web_process(framework, lp, path)) for lp in LOOPS}
                for lp in LOOPS:  # warm-up, not counted: imports, first connections
                    web_load(ports[lp], 1, 0.2)
                files: dict[str, list[dict[str, float]]] = {lp: [] for lp in LOOPS}
                opened: dict[str, dict[str, int]] = {lp: {} for lp in LOOPS}
                for _ in range(rounds):
                    for lp in LOOPS:
                        before = tls_stat()
                        files[lp].append(web_file(ports[lp]))
                        for k, v in tls_stat().items():
                            opened[lp][k] = opened[lp].get(k, 0) + v - before.get(k, 0)
                notes += [f"7. {framework} on {LOOP_LABELS[lp]}: {ktls_note(lp, opened[lp])}"
                          for lp in LOOPS]  # fmt: skip
                job = f"{framework} {'FileResponse' if framework == 'aiohttp' else 'ASGI app'}"
                mine = LOOP_LABELS["afalg"]
                for peer_loop, mbs_target in (("asyncio", 1.3), ("aiofastnet", 1.0)):
                    peer_label = LOOP_LABELS[peer_loop]
                    note = (f"afalg's loop: {ktls_note('afalg', opened['afalg'])}; the peer: "
                            f"{ktls_note(peer_loop, opened[peer_loop])}")  # fmt: skip
                    for metric, unit, better, target in (
                        ("mbs", "MB/s", "high", mbs_target),
                        ("cpu", "guest CPU s/GB", "low", 1.0),
                    ):
                        rows.append(Row(section, f"{job}, {mib} MiB file", mine, peer_label,
                                        unit, [r[metric] for r in files["afalg"]],
                                        [r[metric] for r in files[peer_loop]], better=better,
                                        target=target, note=note))  # fmt: skip
                        print(_line(rows[-1]), flush=True)
                for clients in counts:
                    small: dict[str, list[dict[str, float]]] = {lp: [] for lp in LOOPS}
                    for _ in range(rounds):
                        for lp in LOOPS:
                            small[lp].append(web_load(ports[lp], clients, seconds))
                    what = f"{framework}, 1 KiB response, {clients} client{'s' * (clients > 1)}"
                    for peer_loop in ("asyncio", "aiofastnet"):
                        for metric, unit, better in (("rps", "requests/s", "high"),
                                                     ("p99", "p99 ms", "low")):  # fmt: skip
                            target = 0.9 if peer_loop == "asyncio" else None
                            rows.append(Row(section, what, LOOP_LABELS["afalg"],
                                            LOOP_LABELS[peer_loop], unit,
                                            [r[metric] for r in small["afalg"]],
                                            [r[metric] for r in small[peer_loop]],
                                            better=better, target=target))  # fmt: skip
                            print(_line(rows[-1]), flush=True)
    rows += bench_urllib3(rounds)
    rows += bench_http_server(rounds, mib)
    return rows, notes


def bench_urllib3(rounds: int, mib: int = 64) -> list[Row]:
    """urllib3 (``PoolManager(ssl_context=...)``) downloading a ``mib`` MiB file, over
    ``afalg.tls.SSLContext`` against ``ssl.SSLContext``, in turns; the server (aiohttp's
    FileResponse on afalg's loop, in another process) is the same for both. Client MB/s from
    the request to the last byte (the connection's handshake excluded: a first small GET),
    guest CPU s/GB."""
    import urllib3

    from afalg import tls

    def context(kind: str) -> ssl.SSLContext:
        maker = tls.create_default_context if kind == "afalg" else ssl.create_default_context
        ctx = maker(cafile=str(CERTS / "ca.pem"))
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        return ctx

    def download(kind: str, port: int) -> tuple[float, float]:
        pool = urllib3.PoolManager(ssl_context=context(kind), server_hostname="localhost")
        url = f"https://127.0.0.1:{port}"
        try:
            pool.request("GET", f"{url}/small")
            cpu0, t0 = busy_seconds(), time.perf_counter()
            resp = pool.request("GET", f"{url}/file", preload_content=False)
            total = sum(len(chunk) for chunk in resp.stream(CHUNK))
            elapsed, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
            resp.release_conn()
        finally:
            pool.clear()
        assert total == mib << 20, total
        return total / elapsed / 1e6, cpu / (total / 1e9)

    rows: list[Row] = []
    with tempfile.NamedTemporaryFile(prefix="afalg-bench-urllib3-") as f:
        block = os.urandom(1 << 20)
        for _ in range(mib):
            f.write(block)
        f.flush()
        with web_process("aiohttp", "afalg", Path(f.name)) as port:
            for kind in ("afalg", "ssl"):  # warm-up: imports, the server's first connection
                pool = urllib3.PoolManager(ssl_context=context(kind), server_hostname="localhost")
                pool.request("GET", f"https://127.0.0.1:{port}/small")
                pool.clear()
            got: dict[str, list[tuple[float, float]]] = {"afalg": [], "ssl": []}
            rx0 = tls_stat().get("TlsRxSw", 0)
            for _ in range(rounds):
                for kind in got:
                    got[kind].append(download(kind, port))
            rx = tls_stat().get("TlsRxSw", 0) - rx0
        job = f"urllib3 GET, {mib} MiB file (client)"
        note = f"kTLS RX contexts opened in its rounds: {rx}"
        for i, (unit, better) in enumerate((("MB/s", "high"), ("guest CPU s/GB", "low"))):
            rows.append(Row("7. frameworks and libraries", job, "afalg.tls.SSLContext",
                            "ssl.SSLContext", unit, [g[i] for g in got["afalg"]],
                            [g[i] for g in got["ssl"]], better=better, note=note))  # fmt: skip
            print(_line(rows[-1]), flush=True)
    return rows


def bench_http_server(rounds: int, mib: int) -> list[Row]:
    """``http.server.ThreadingHTTPServer`` with ``SimpleHTTPRequestHandler`` serving a ``mib``
    MiB file, its listening socket wrapped by ``afalg.tls.SSLContext`` against
    ``ssl.SSLContext``, in turns; the client is the same for both (urllib3 on Python's ssl, in
    this process). Server-side figures: the download's MB/s and the guest's CPU s/GB.

    SimpleHTTPRequestHandler reads the file and writes it (``shutil.copyfileobj``, 64 KiB at a
    time): under kTLS the kernel seals what Python writes; a handler that calls the socket's
    ``sendfile()`` (afalg.serving's) would not read the file into Python at all, which section 1
    measures (kTLS sendfile against ssl read + sendall)."""
    import functools
    import http.server

    import urllib3

    from afalg import tls

    def server_context(kind: str) -> ssl.SSLContext:
        maker = tls.SSLContext if kind == "afalg" else ssl.SSLContext
        ctx = maker(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        return ctx

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    client = ssl.create_default_context(cafile=str(CERTS / "ca.pem"))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="afalg-bench-httpd-") as root:
        block = os.urandom(1 << 20)
        with open(Path(root) / "file", "wb") as f:
            for _ in range(mib):
                f.write(block)
        servers = {}
        for kind in ("afalg", "ssl"):
            handler = functools.partial(Quiet, directory=root)
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            httpd.daemon_threads = True
            httpd.socket = server_context(kind).wrap_socket(httpd.socket, server_side=True)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            servers[kind] = httpd

        def download(kind: str) -> tuple[float, float]:
            port = servers[kind].server_address[1]
            pool = urllib3.PoolManager(ssl_context=client, server_hostname="localhost")
            try:
                pool.request("GET", f"https://127.0.0.1:{port}/")  # the handshake, not timed
                cpu0, t0 = busy_seconds(), time.perf_counter()
                resp = pool.request("GET", f"https://127.0.0.1:{port}/file", preload_content=False)
                total = sum(len(chunk) for chunk in resp.stream(CHUNK))
                elapsed, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
                resp.release_conn()
            finally:
                pool.clear()
            assert total == mib << 20, total
            return total / elapsed / 1e6, cpu / (total / 1e9)

        try:
            for kind in servers:  # warm-up: imports, the first connections
                download(kind)
            tx0 = tls_stat().get("TlsTxSw", 0)
            got: dict[str, list[tuple[float, float]]] = {"afalg": [], "ssl": []}
            for _ in range(rounds):
                for kind in got:
                    got[kind].append(download(kind))
            tx = tls_stat().get("TlsTxSw", 0) - tx0
        finally:
            for httpd in servers.values():
                httpd.shutdown()
                httpd.server_close()
    job = f"ThreadingHTTPServer, {mib} MiB file (server)"
    note = (f"kTLS TX contexts opened in its rounds: {tx}; SimpleHTTPRequestHandler reads and "
            "writes the file (no sendfile: section 1 shows what sendfile changes)")  # fmt: skip
    for i, (unit, better) in enumerate((("MB/s", "high"), ("guest CPU s/GB", "low"))):
        rows.append(Row("7. frameworks and libraries", job, "afalg.tls.SSLContext",
                        "ssl.SSLContext", unit, [g[i] for g in got["afalg"]],
                        [g[i] for g in got["ssl"]], better=better, note=note))  # fmt: skip
        print(_line(rows[-1]), flush=True)
    return rows


# ==============================================================================================
# Running it all (in the VM), and the report (on the host)
# ==============================================================================================


def _line(row: Row) -> str:
    r = row.ratios
    return (f"{row.section} | {row.job} | {row.mine} {fmt(statistics.median(row.mine_values))} "
            f"vs {row.peer} {fmt(statistics.median(row.peer_values))} {row.unit}: "
            f"{row.ratio:.2f}x ({min(r):.2f}-{max(r):.2f}) {row.verdict}")  # fmt: skip


def run_here(args: argparse.Namespace) -> dict[str, Any]:
    """Every section on this kernel; the results as a JSON-able dict."""
    sys.path.insert(0, str(ROOT))
    started = time.time()
    result: dict[str, Any] = {"machine": machine(), "rows": [], "syscalls": [], "notes": []}
    result["rounds"] = {
        "per-call rows (3, 6)": args.rounds,
        "transfers (1, 2)": args.transfer_rounds,
        "servers and frameworks (5, 7)": args.server_rounds,
    }
    rows: list[Row] = []
    with tempfile.NamedTemporaryFile(prefix="afalg-bench-") as f:
        size = args.mib << 20
        block = os.urandom(1 << 20)
        for _ in range(args.mib):
            f.write(block)
        f.flush()
        path = Path(f.name)
        with open(path, "rb") as g:  # in the page cache before any timing
            while g.read(1 << 20):
                pass

        def save() -> None:  # after every section: a VM timeout keeps what was measured
            result["rows"] = [asdict(r) for r in rows]
            result["seconds"] = round(time.time() - started)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))

        # the cheap, the headline and the new sections first: a VM timeout cuts the last ones
        result["sections_asked"] = sorted(args.sections, key="316745".index)
        result["sections_done"] = []
        for section in result["sections_asked"]:
            if section == "3":
                rows += bench_overhead(path, args.rounds, args.seconds)
            elif section == "6":
                rows += bench_primitives(path, args.rounds, args.seconds)
                result["notes"] += REFUSED
            elif section == "1":
                rows += bench_transfers(path, args.transfer_rounds, ("1.3", "1.2"))
            elif section == "4":
                result["notes"].append(check_aio_matches())
                result["syscalls"] = bench_syscalls(args.records)
            elif section == "5":
                counts = (1, 10) if args.quick else (1, 10, 100)
                rows += bench_servers(args.server_rounds, args.server_seconds, counts)
            elif section == "7":
                counts = (1, 10) if args.quick else (1, 10, 100)
                web_rows, web_notes = bench_frameworks(args.server_rounds, args.web_seconds,
                                                       counts, args.web_mib)  # fmt: skip
                rows += web_rows
                result["notes"] += web_notes
            result["sections_done"].append(section)
            save()
        assert size
    result["rows"] = [asdict(r) for r in rows]
    result["seconds"] = round(time.time() - started)
    return result


def vm_command(kernel: str, args: argparse.Namespace, out: Path) -> list[str]:
    sysctl = ["--sysctl", "crypto.af_alg_restrict=0"] if kernel == "7.3" else []
    inner = [sys.executable, str(Path(__file__).resolve()), "--here", "--json", str(out),
             *_pass_on(args)]  # fmt: skip
    return [sys.executable, "-m", "afalg", "vm", "--kernel", kernel, "--cpus", str(args.cpus),
            "--memory", "2G", "--timeout", str(args.timeout), *sysctl,
            "--env", "AFALG_IN_VM=1", "--env", f"PYTHONPATH={ROOT}", "--", *inner]  # fmt: skip


def _pass_on(args: argparse.Namespace) -> list[str]:
    out = ["--mib", str(args.mib), "--rounds", str(args.rounds), "--seconds", str(args.seconds),
           "--transfer-rounds", str(args.transfer_rounds), "--records", str(args.records),
           "--server-seconds", str(args.server_seconds), "--server-rounds",
           str(args.server_rounds), "--web-seconds", str(args.web_seconds),
           "--web-mib", str(args.web_mib), "--sections", *args.sections]  # fmt: skip
    return out + (["--quick"] if args.quick else [])


def ensure_tools() -> None:
    """strace for section 4: installed with apt as root (as ``afalg vm --install`` does for the
    VM's pieces); otherwise the section says how."""
    if shutil.which("strace"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("bench: installing strace (apt-get)", flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "strace"],
                       check=False, env=env)  # fmt: skip
    if not shutil.which("strace"):
        print("bench: strace is missing (apt-get install strace); section 4 will be skipped")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", choices=KERNELS,
                        help="VM kernel (repeatable; default: all of make test)")  # fmt: skip
    parser.add_argument("--native", action="store_true", help="run on this kernel, no VM")
    parser.add_argument("--mib", type=int, default=64, help="file size for sections 1, 2, 6")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the per-call rows")
    parser.add_argument("--seconds", type=float, default=0.25, help="window per job and round")
    parser.add_argument("--transfer-rounds", type=int, default=5, help="rounds of 1 and 2")
    parser.add_argument("--server-seconds", type=float, default=2.5, help="load per window")
    parser.add_argument("--server-rounds", type=int, default=5, help="rounds of 5 and 7")
    parser.add_argument("--records", type=int, default=64, help="records per strace run")
    parser.add_argument("--sections", nargs="+", default=["3", "1", "4", "5", "6", "7"],
                        choices=["1", "3", "4", "5", "6", "7"], help="2 runs with 1")  # fmt: skip
    parser.add_argument("--web-seconds", type=float, default=1.5,
                        help="load per window of section 7's small responses")  # fmt: skip
    parser.add_argument("--web-mib", type=int, default=16, help="section 7's file (MiB)")
    parser.add_argument("--quick", action="store_true", help="1 and 10 clients only")
    parser.add_argument("--cpus", type=int, default=2, help="VM vCPUs")
    parser.add_argument("--timeout", type=int, default=3000, help="per VM run (s)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--chart", default=str(ROOT / "bench" / "results.png"))
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--strace-job", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--aio-echo", nargs=3, help=argparse.SUPPRESS)  # MODE TLS READY_FILE
    parser.add_argument("--web-server", nargs=4, help=argparse.SUPPRESS)  # FW LOOP FILE READY
    parser.add_argument("--report", nargs="*",
                        help="only write the report again from the JSONs of one run")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    if args.strace_job:
        strace_job(args.strace_job, args.records, args.port)
        return 0
    if args.aio_echo:
        mode, version, ready = args.aio_echo
        asyncio.run(aio_echo(mode, version, Path(ready)))
        return 0
    if args.web_server:
        web_server(*args.web_server)
        return 0
    if args.here:
        run_here(args)
        return 0
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.report is not None:
        return report([Path(p) for p in args.report], args)

    ensure_tools()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    from afalg.probe import probe

    caps = probe()
    if args.native or (caps.af_alg and caps.ktls and not args.kernel):
        out = OUT_DIR / "native.json"
        args.json = str(out)
        host = host_state(command)
        run_here(args)
        stamp(out, host)
        return report([out], args)
    from afalg import _vm as vm

    outputs = []
    for kernel in args.kernel or KERNELS:
        if vm.missing(kernel):
            print(f"bench: installing the VM for kernel {kernel}", flush=True)
            vm.install(kernel)
        out = OUT_DIR / f"kernel-{kernel}.json"
        out.unlink(missing_ok=True)
        cmd = vm_command(kernel, args, out)
        print(f"bench: kernel {kernel}: {shlex.join(cmd)}", flush=True)
        host = host_state(command)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        print(f"bench: kernel {kernel} done in {time.time() - host['started']:.0f} s (exit {rc})")
        if out.exists():
            stamp(out, host, rc)
            outputs.append(out)
    return report(outputs, args) if outputs else 1


def commit() -> str:
    """The commit measured: HEAD, and whether tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or "unknown"  # fmt: skip
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    return f"{head} plus uncommitted changes" if dirty else head


def host_load() -> str:
    """The host's load now: /proc/loadavg, and the QEMU VMs running (other than this run's,
    when called between its VMs)."""
    load = " ".join((_read("/proc/loadavg") or "?").split()[:3])
    vms = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().startswith("qemu-system"):
                    vms += 1
    return f"load average {load} (1, 5, 15 min); {vms} QEMU VM{'s' * (vms != 1)} running"


def host_state(command: str) -> dict[str, Any]:
    return {"command": command, "commit": commit(), "started": time.time(),
            "load_before": host_load()}  # fmt: skip


def stamp(out: Path, host: dict[str, Any], rc: int = 0) -> None:
    """Adds to a kernel's JSON what the host saw around its run: commit, times, load."""
    run = json.loads(out.read_text())
    run["host"] = dict(host, ended=time.time(), load_after=host_load(), exit=rc)
    out.write_text(json.dumps(run, indent=1))


# ==============================================================================================
# The report: bench/RESULTS.md and a chart
# ==============================================================================================


def report(paths: list[Path], args: argparse.Namespace) -> int:
    """RESULTS.md and the chart from the JSONs of one run: one per kernel, all of one command
    at one commit (never merged runs: a kernel twice, or two commits, is refused)."""
    runs: list[dict[str, Any]] = []
    for p in paths:
        run = json.loads(p.read_text())
        run["rows"] = [Row(**r) for r in run["rows"]]
        if "host" not in run:
            print(f"bench: {p} has no record of its run (commit, load)", file=sys.stderr)
            return 1
        runs.append(run)
    kernels = [r["machine"]["kernel"] for r in runs]
    commits = {r["host"]["commit"] for r in runs}
    commands = {r["host"]["command"] for r in runs}
    if len(set(kernels)) != len(kernels) or len(commits) != 1 or len(commands) != 1:
        print(f"bench: not one run: kernels {kernels}, commits {sorted(commits)}, commands "
              f"{sorted(commands)}", file=sys.stderr)  # fmt: skip
        return 1
    write_markdown(runs, Path(args.out))
    try:
        write_chart(runs, Path(args.chart))
    except ImportError:
        print("bench: matplotlib missing (pip install -e '.[bench]'); no chart", flush=True)
    print(f"bench: wrote {args.out}", flush=True)
    return 0


def _utc(t: float) -> str:
    return f"{datetime.datetime.fromtimestamp(t, datetime.UTC):%Y-%m-%d %H:%M} UTC"


def write_markdown(runs: list[dict[str, Any]], out: Path) -> None:
    lines = ["# Benchmark results", ""]
    first, last = runs[0]["host"], runs[-1]["host"]
    rounds = runs[0].get("rounds", {})
    lines += [
        f"One run of `{first['command']}` at commit {first['commit']}, "
        f"{_utc(first['started'])} to {_utc(last['ended'])}; every figure below comes from it",
        "(no merged runs, no rows added by hand). Rounds per figure: "
        + (", ".join(f"{k} {v}" for k, v in rounds.items()) or "unknown")
        + ".",
        "The host's load around each kernel's VM: "
        + "; ".join(
            f"{r['machine']['kernel']}: before, {r['host']['load_before']}; after, "
            f"{r['host']['load_after']} (this run's VM counted)"
            for r in runs
        )
        + ".",
        "`make bench` runs every kernel of `make test` (`python bench/run.py --kernel 6.12",
        "--kernel 7.3 --kernel 6.1`, 7.3 with `crypto.af_alg_restrict=0`), installing what it",
        "needs (the bench extra, strace); `make bench K=6.12` one kernel.",
        "",
        "Every figure is a ratio against a peer measured round-robin in the same run: the jobs",
        "of a row take turns, every round; a row gives the median of each side, and the",
        "median ratio with its range (min-max) over the rounds. **ratio > 1: afalg is better**",
        "(faster, or less CPU or latency). Under QEMU TCG every instruction is emulated (the",
        "kernel's AES-GCM runs ~1/50 of hardware speed, a 16 KiB memcpy ~1/150), so the",
        "ratios are this machine's; the same command runs natively on a kernel with AF_ALG and",
        "kTLS (`python bench/run.py --native`).",
        "",
    ]
    for run in runs:
        m = run["machine"]
        lines += [f"## Kernel {m['kernel']}", "",
                  f"{m['vm']}; {m['cpus']} vCPUs of {m['cpu']}; Python {m['python']}, "
                  f"{m['openssl']}; crypto.af_alg_restrict: {m['af_alg_restrict']}; "
                  f"{run['seconds']} s in all.", ""]  # fmt: skip
        missing = [
            x for x in run.get("sections_asked", []) if x not in run.get("sections_done", [])
        ]
        if missing:
            lines += [f"**Incomplete: sections {', '.join(missing)} did not run or finish (the "
                      f"VM exited with status {run['host']['exit']}).**", ""]  # fmt: skip
        targets = [row for row in run["rows"] if row.target is not None]
        if targets:
            lines += ["Targets:", ""]
            for row in targets:
                lines.append(f"- **{row.verdict}** {row.mine} vs {row.peer}, {row.job} "
                             f"({row.unit}): {row.ratio:.3f}x, target {row.target:g}x")  # fmt: skip
        section = None
        for row in sorted(run["rows"], key=lambda r: r.section[:1]):  # stable: runs' order
            if row.section != section:
                section = row.section
                lines += ["", f"### {section}", "",
                          "| job | afalg | value | peer | value | unit | ratio | range | target |",
                          "|---|---|---:|---|---:|---|---:|---:|---|"]  # fmt: skip
            r = row.ratios
            target = f"{row.target:g}x {row.verdict}" if row.target is not None else ""
            note = f" ({row.note})" if row.note else ""
            lines.append(
                f"| {row.job} | {row.mine}{note} | {fmt(statistics.median(row.mine_values))} "
                f"| {row.peer} | {fmt(statistics.median(row.peer_values))} | {row.unit} "
                f"| {row.ratio:.2f} | {min(r):.2f}-{max(r):.2f} | {target} |"
            )
        if run["syscalls"]:
            lines += ["", "### 4. system calls per 16 KiB record (strace -c -f)", "",
                      "| path | calls per record | the calls (per record) |",
                      "|---|---:|---|"]  # fmt: skip
            for s in run["syscalls"]:
                if "error" in s:
                    lines.append(f"| {s['path']} | failed | {s['error']} |")
                    continue
                calls = ", ".join(f"{k} {v:g}" for k, v in s["calls"].items())
                lines.append(f"| {s['path']} | {s['per_record']:g} | {calls} |")
        for note in run["notes"]:
            lines += ["", f"- {note}"]
        lines.append("")
    NOTES = ROOT / "bench" / "NOTES.md"
    if NOTES.exists():
        lines += [NOTES.read_text()]
    out.write_text("\n".join(lines) + "\n")


def write_chart(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def chart_label(row: Row) -> str:
        against = f" vs {row.peer}" if row.peer == SEEK_LABEL else ""
        return f"{row.job}: {row.mine}{against} ({row.unit})"

    labels = []
    for run in runs:
        for row in run["rows"]:
            label = chart_label(row)
            wanted = not row.section.startswith("6.") or "16 KiB" in row.job or "MiB" in row.job
            if label not in labels and "ms" not in row.unit and wanted:
                labels.append(label)
    fig, ax = plt.subplots(figsize=(13, 0.28 * len(labels) + 2))
    height = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        by_label = {chart_label(r): r for r in run["rows"]}
        ys, xs, lo, hi = [], [], [], []
        for i, label in enumerate(labels):
            row = by_label.get(label)
            if row is None:
                continue
            ys.append(i + k * height)
            xs.append(row.ratio)
            lo.append(row.ratio - min(row.ratios))
            hi.append(max(row.ratios) - row.ratio)
        ax.barh(ys, xs, height=height, xerr=[lo, hi], label=run["machine"]["kernel"],
                capsize=2)  # fmt: skip
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + height * (len(runs) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("ratio, afalg / peer (>1: afalg better); median and range over rounds")
    ax.set_title("afalg vs its peers, round-robin in one run per kernel (QEMU TCG)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the long labels whole


if __name__ == "__main__":
    raise SystemExit(main())
