#!/usr/bin/env python3
"""A TLS echo and file server whose record crypto runs in the kernel.

::

    python examples/tls_echo_server.py --port 4433 --mode ktls --serve-dir /srv/files

Every connection: Python's ``ssl`` does the handshake, then :func:`afalg.tls.wrap` hands the
keys to the kernel (``--mode ktls``: kernel TLS; ``algif``: afalg's record layer sealing with the
kernel AEAD; ``auto``: kTLS where the kernel offers the suite). ``--mode userspace`` is plain
Python ``ssl`` end to end, the reference the other modes are compared against.

The protocol: each read is echoed back in one record (reads are at most 2^14 bytes, one TLS
record). With ``--serve-dir DIR``, a connection whose first bytes are ``GET /path`` (optionally
``GET /path HTTP/1.x`` followed by headers, so ``curl`` works too; split into records in any
way: while what arrived is a prefix of ``GET `` the server waits for more) gets an ``HTTP/1.0``
response with the file sent by ``sendfile()`` (kTLS: the kernel encrypts the page cache straight
into the socket) and is then closed. The file checks are :class:`afalg.serving.ServeDir`'s: no
path may leave DIR, symlinks swapped in are refused (``O_NOFOLLOW``), a FIFO or device does not
block (``O_NONBLOCK``, then a regular file is required), a file that cannot be opened gets an
HTTP error status (404, 403, 500).

Design (robust, and honest about its limits):

- One thread accepts with a ``selectors`` loop; each connection gets its own thread, and their
  number is capped, in all (``--max-conns``) and per peer address (``--max-conns-per-address``;
  beyond either, new connections are accepted and closed at once, with a log line; the counting
  is :class:`afalg.serving.ConnectionLimits`). A slow or silent client therefore ties up only
  its own thread, and one address cannot take every slot.
- The handshake has an absolute deadline (``--handshake-timeout``), and so has each file
  request, from its first byte to the last byte of the response (``--request-timeout``); the
  accept loop enforces them (it shuts the socket down when the deadline passes, however slowly
  the peer trickles bytes). After the handshake an idle timeout applies to each read and write
  besides.
- A peer that sends garbage, forged records or a failed handshake costs only its connection.
  After a fatal alert the server shuts down its write side, drains what the peer still sends
  for a moment, then closes, so the alert is not destroyed by a TCP reset.
- One log line per connection: peer, TLS version, suite, mode, bytes in/out, time, outcome.
- SIGINT/SIGTERM stop it cleanly: no new connections, running ones get ``--grace`` seconds,
  then are shut down; a summary (with the kernel's TLS counters) is printed at exit.

Without ``--cert``/``--key`` a throwaway self-signed certificate (EC P-256, made with
``cryptography``) is used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import logging
import os
import selectors
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afalg.ktls import tls_stats
from afalg.serving import (
    MAX_REQUEST,
    ConnectionLimits,
    FileRequest,
    RequestRefused,
    ServeDir,
    ServerLimits,
    response_head,
)

MODES = ("ktls", "algif", "auto", "userspace")
MAX_RECORD = 2**14  # TLS plaintext limit: one read, one record
# The kernel can carry these (AES-GCM, ChaCha20-Poly1305); TLS 1.3 suites are all of that kind.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

log = logging.getLogger("tls_echo_server")


# --- TLS setup ---------------------------------------------------------------------------------


def self_signed_cert(directory: str, hosts: list[str]) -> tuple[str, str]:
    """A throwaway EC P-256 certificate for ``hosts``; returns (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "afalg throwaway")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def server_context(
    cert: str | None,
    key: str | None,
    *,
    tls_version: str = "any",
    host: str = "localhost",
    keylog: str | None = None,
) -> ssl.SSLContext:
    """The server's SSLContext: TLS 1.2 and/or 1.3, kernel-capable suites only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if tls_version == "1.2" else ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(TLS12_CIPHERS)
    if cert is None:
        with tempfile.TemporaryDirectory(prefix="afalg-cert-") as tmp:
            cert_path, key_path = self_signed_cert(tmp, [host])
            ctx.load_cert_chain(cert_path, key_path)
    else:
        ctx.load_cert_chain(cert, key)
    if keylog:
        ctx.keylog_filename = keylog
    return ctx


# --- connections -------------------------------------------------------------------------------


@dataclass
class Connection:
    """Book-keeping for one accepted connection (read by the accept loop, written by its
    thread)."""

    sock: socket.socket
    peer: tuple[str, int]
    started: float
    deadline: float | None  # the current absolute deadline (monotonic), None: none running
    deadline_kind: str = "handshake"  # what it bounds: "handshake" or "request"
    tls: Any = None  # the TLS socket once the handshake started (it owns the fd then)
    handshake_done: bool = False
    expired: str | None = None  # the deadline_kind whose deadline passed (set by the accept loop)
    closed: bool = False
    version: str = "-"
    suite: str = "-"
    mode: str = "-"
    bytes_in: int = 0
    bytes_out: int = 0
    outcome: str = "?"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fileno(self) -> int:
        """The connection's fd as its current owner reports it (-1 once closed)."""
        owner = self.tls if self.tls is not None else self.sock
        try:
            return owner.fileno()
        except (OSError, ValueError):
            return -1

    def force_shutdown(self) -> None:
        """Shut the TCP connection down under whoever is blocked on it (any thread)."""
        with self.lock:
            fd = -1 if self.closed else self.fileno()
            if fd < 0:
                return
            with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)

    def log_line(self) -> str:
        host, port = self.peer[:2]
        return (
            f"conn peer={host}:{port} version={self.version} suite={self.suite} "
            f"mode={self.mode} in={self.bytes_in} out={self.bytes_out} "
            f"time={time.monotonic() - self.started:.3f}s outcome={self.outcome}"
        )


def _alert_name(exc: BaseException) -> str:
    alert = getattr(exc, "alert", None)
    if alert is not None:
        return getattr(alert, "name", str(alert))
    reason = getattr(exc, "reason", None) or type(exc).__name__
    return str(reason).lower()


class EchoServer:
    """The server; ``serve_forever()`` in one thread, ``stop()`` from any thread."""

    def __init__(
        self,
        listener: socket.socket,
        context: ssl.SSLContext,
        *,
        mode: str = "auto",
        serve_dir: str | None = None,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 60.0,
        max_conns: int = 256,
        max_conns_per_address: int = 64,
        request_timeout: float = 30.0,
        grace: float = 2.0,
        drain_time: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.listener = listener
        self.context = context
        self.mode = mode
        self.files = ServeDir(serve_dir) if serve_dir else None
        self.serve_dir = self.files.root if self.files else None
        self.limits = ServerLimits(
            handshake_timeout=handshake_timeout,
            request_timeout=request_timeout,
            idle_timeout=idle_timeout,
            max_conns=max_conns,
            max_conns_per_address=max_conns_per_address,
        )
        self.handshake_timeout = handshake_timeout
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_conns = max_conns
        self.admission = ConnectionLimits(max_conns, max_conns_per_address)
        self.grace = grace
        self.drain_time = drain_time
        self.connections: dict[int, Connection] = {}
        self.threads: set[threading.Thread] = set()
        self.totals = {
            "connections": 0,
            "refused": 0,
            "ok": 0,
            "failed": 0,
            "bytes_in": 0,
            "bytes_out": 0,
        }
        self.outcomes: list[str] = []  # one per finished connection, for tests and the summary
        self.on_close: Callable[[Connection], None] | None = None
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._wake_r, self._wake_w = os.pipe()  # a new deadline: the accept loop recomputes
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._wrap: Callable[..., Any] | None = None
        if mode != "userspace":
            from afalg.tls import wrap  # the public API only

            self._wrap = wrap

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    # The accept loop ---------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self.listener.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self._stop_r, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select(self._next_deadline()):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                self._expire_deadlines()
        self.listener.close()
        self._finish_connections()
        self._stopped.set()

    def stop(self) -> None:
        """Ask the server to stop (async-signal-safe: one write to a pipe)."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def _next_deadline(self) -> float | None:
        with self._lock:
            pending = [
                c.deadline
                for c in self.connections.values()
                if c.deadline is not None and c.expired is None
            ]
        return max(0.0, min(pending) - time.monotonic()) if pending else None

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        late = []
        with self._lock:
            for c in self.connections.values():
                if c.deadline is not None and c.expired is None and c.deadline <= now:
                    c.expired = c.deadline_kind
                    late.append(c)
        for conn in late:
            conn.force_shutdown()

    def _set_deadline(self, conn: Connection, kind: str | None, seconds: float = 0.0) -> None:
        """Start (``kind``: "request") or end (None) a connection's absolute deadline."""
        with self._lock:
            if kind is None:
                conn.deadline = None
            else:
                conn.deadline, conn.deadline_kind = time.monotonic() + seconds, kind
        if kind is not None:
            with contextlib.suppress(OSError):  # full pipe: the loop is awake already
                os.write(self._wake_w, b"x")

    def _accept(self) -> None:
        while True:
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving
                log.warning("accept failed: %s", exc)
                return
            # Answers go out at once, as asyncio's transports do: with Nagle a small answer
            # waits for the peer's delayed ACK of the one before (~40 ms on Linux).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            now = time.monotonic()
            conn = Connection(sock, peer, now, now + self.handshake_timeout)
            refused = self.admission.admit(peer[0])
            with self._lock:
                self.totals["connections"] += 1
                if refused is None:
                    self.connections[id(conn)] = conn
            if refused is not None:
                conn.outcome = f"refused:{refused}"
                self._record(conn, ok=False)
                sock.close()
                continue
            thread = threading.Thread(
                target=self._handle, args=(conn,), name=f"conn-{peer[0]}:{peer[1]}", daemon=True
            )
            with self._lock:
                self.threads.add(thread)
            thread.start()

    def _finish_connections(self) -> None:
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self.connections:
                    break
            time.sleep(0.05)
        with self._lock:
            remaining = list(self.connections.values())
        for conn in remaining:
            conn.force_shutdown()
        with self._lock:
            threads = list(self.threads)
        for thread in threads:
            thread.join(5.0)

    # One connection ----------------------------------------------------------------------------

    def _handle(self, conn: Connection) -> None:
        tls: Any = None
        fatal = False
        try:
            conn.sock.settimeout(self.handshake_timeout)
            try:
                tls = self._handshake(conn)
            except (OSError, ValueError) as exc:
                log.debug("handshake with %s failed", conn.peer, exc_info=True)
                conn.outcome = (
                    "handshake-timeout"
                    if conn.expired or isinstance(exc, TimeoutError)
                    else f"handshake-failed:{_alert_name(exc)}"
                )
                fatal = isinstance(exc, ssl.SSLError)
                return
            conn.handshake_done = True
            self._set_deadline(conn, None)
            if conn.expired:  # the deadline passed just as the handshake finished
                conn.outcome = "handshake-timeout"
                return
            conn.version = tls.version() or "-"
            conn.suite = (tls.cipher() or ("-",))[0]
            conn.mode = getattr(tls, "mode", "userspace")
            tls.settimeout(self.idle_timeout)
            try:
                conn.outcome = self._serve(conn, tls)
            except TimeoutError:
                conn.outcome = "idle-timeout"
            except ssl.SSLError as exc:  # afalg's TLS errors are ssl.SSLError too
                conn.outcome = f"alert:{_alert_name(exc)}"
                fatal = True
            except OSError as exc:
                conn.outcome = f"error:{exc.strerror or exc}"
            if conn.expired == "request":  # shut down under the request: whatever it raised
                conn.outcome = "request-timeout"
        except Exception as exc:  # a bug must not take the server down
            log.exception("connection handler failed")
            conn.outcome = f"error:{type(exc).__name__}"
        finally:
            self._close(conn, fatal)
            ok = conn.outcome in ("ok", "eof", "served")
            self._record(conn, ok=ok)
            with self._lock:
                self.connections.pop(id(conn), None)
                self.threads.discard(threading.current_thread())
            self.admission.release(conn.peer[0])

    def _handshake(self, conn: Connection) -> Any:
        if self._wrap is None:
            # Not ssl's handshake-on-connect: that closes the socket when the handshake fails,
            # which would reset the connection under the alert it just queued.
            tls = self.context.wrap_socket(
                conn.sock, server_side=True, do_handshake_on_connect=False
            )
            with conn.lock:
                conn.tls = tls
            tls.do_handshake()
            return tls
        # afalg's wrap() owns (and on failure closes) the socket it is given: give it a
        # duplicate, so that after a failed handshake conn.sock can still be shut down and
        # drained (closing a socket with unread bytes would send a reset).
        tls = self._wrap(conn.sock.dup(), self.context, server_side=True, mode=self.mode)
        with conn.lock:
            conn.tls = tls
        return tls

    def _serve(self, conn: Connection, tls: Any) -> str:
        # Echo or a file request: decided on the first bytes, however the peer split them into
        # records (a stream may come one byte a record). While what arrived is a prefix of
        # "GET " nothing is decided and nothing echoed; no timer: the next bytes decide.
        undecided = b"" if self.files is not None else None
        while True:
            data = tls.recv(MAX_RECORD)
            if not data:
                if undecided:  # a prefix of "GET " then the end: echoed like any bytes
                    self._echo(conn, tls, undecided)
                return "ok"
            conn.bytes_in += len(data)
            if undecided is not None:
                data, undecided = undecided + data, None
                if data.startswith(b"GET "):
                    self._set_deadline(conn, "request", self.request_timeout)
                    return self._serve_file(conn, tls, data)
                if b"GET ".startswith(data):
                    undecided = data
                    continue
            self._echo(conn, tls, data)

    def _echo(self, conn: Connection, tls: Any, data: bytes) -> None:
        tls.sendall(data)  # one read: <= 2^14 bytes, one record (+3 after a prefix of "GET ")
        conn.bytes_out += len(data)

    def _serve_file(self, conn: Connection, tls: Any, data: bytes) -> str:
        assert self.files is not None
        request = FileRequest()
        try:
            while not request.feed(data):
                data = tls.recv(MAX_REQUEST)
                if not data:
                    return "eof"
                conn.bytes_in += len(data)
            assert request.target is not None
            f = self.files.open(request.target)
        except RequestRefused as exc:
            log.debug("GET %r from %s: %s", request.target, conn.peer, exc)
            return self._send_head(conn, tls, exc.status, exc.reason)
        with f:
            size = os.fstat(f.fileno()).st_size
            self._send_head(conn, tls, 200, "OK", size)
            if size:
                sent = tls.sendfile(f)
                conn.bytes_out += sent
                if sent != size:
                    return f"error:sendfile-short:{sent}/{size}"
        return "served"

    def _send_head(
        self, conn: Connection, tls: Any, status: int, reason: str, size: int = 0
    ) -> str:
        head = response_head(status, reason, size)
        tls.sendall(head)
        conn.bytes_out += len(head)
        return f"http-{status}"

    def _close(self, conn: Connection, fatal: bool) -> None:
        """Close the connection gracefully, never by a reset that could overtake the last
        records: send close_notify (unless a fatal alert already went out), shut down the TCP
        write side (FIN), drain what the peer still sends for up to ``drain_time`` (usually it
        has closed already and this returns at once), then close. A reset can still follow the
        FIN when the kernel holds bytes nobody may read (a partial record under kTLS), but by
        then the peer has its alert or close_notify and its EOF."""
        tls = conn.tls
        if tls is not None and not fatal:
            with contextlib.suppress(OSError, ValueError):
                tls.settimeout(min(1.0, self.idle_timeout))
                if self._wrap is None:
                    tls.unwrap()  # ssl's close() sends no close_notify; unwrap() does
                else:
                    tls.shutdown(socket.SHUT_WR)  # afalg: close_notify, then FIN
        self._drain(conn.fileno(), reader=tls if tls is not None and not fatal else None)
        with conn.lock:
            conn.closed = True
            if tls is not None:
                with contextlib.suppress(OSError, ValueError):
                    tls.close()
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _drain(self, fd: int, reader: Any = None) -> None:
        """Shut down the write side of ``fd`` and read until EOF, an error, ``drain_time`` or
        1 MiB. ``reader`` (the healthy TLS socket) reads records; without one (after a fatal
        error) the raw socket is read."""
        if fd < 0:
            return
        try:
            dup = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        with dup:
            with contextlib.suppress(OSError):
                dup.shutdown(socket.SHUT_WR)
            source = reader if reader is not None else dup
            deadline = time.monotonic() + self.drain_time
            drained = 0
            while drained < 1 << 20:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    source.settimeout(left)
                    data = source.recv(65536)
                except (OSError, ValueError):
                    break
                if not data:
                    break
                drained += len(data)

    def _record(self, conn: Connection, *, ok: bool) -> None:
        refused = conn.outcome.startswith("refused:")
        with self._lock:
            self.totals["refused" if refused else "ok" if ok else "failed"] += 1
            self.totals["bytes_in"] += conn.bytes_in
            self.totals["bytes_out"] += conn.bytes_out
            self.outcomes.append(conn.outcome)
        log.info("%s", conn.log_line())
        if self.on_close is not None:
            self.on_close(conn)

    def summary(self) -> str:
        t = self.totals
        lines = [
            f"server summary: mode={self.mode} connections={t['connections']} ok={t['ok']} "
            f"failed={t['failed']} refused={t['refused']} bytes_in={t['bytes_in']} "
            f"bytes_out={t['bytes_out']}"
        ]
        stats = tls_stats()
        if stats:
            lines.append("kernel TLS counters: " + " ".join(f"{k}={v}" for k, v in stats.items()))
        return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4433, help="0: any free port (printed)")
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--cert", help="PEM certificate chain (default: throwaway self-signed)")
    p.add_argument("--key", help="PEM private key (with --cert)")
    p.add_argument("--tls", choices=("1.2", "1.3", "any"), default="any", help="TLS version")
    p.add_argument("--serve-dir", help="serve files from DIR on 'GET /path'")
    p.add_argument("--handshake-timeout", type=float, default=10.0)
    p.add_argument("--idle-timeout", type=float, default=60.0)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="absolute seconds for a file request, first byte to last",
    )
    p.add_argument("--max-conns", type=int, default=256)
    p.add_argument("--max-conns-per-address", type=int, default=64)
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="seconds running connections get to finish after SIGINT/SIGTERM",
    )
    p.add_argument("--keylog", help="append TLS secrets to this file (debugging only)")
    p.add_argument("--ready-file", help="write HOST PORT here once listening")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-connection log lines")
    args = p.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        p.error("--cert and --key go together")
    if args.serve_dir and not os.path.isdir(args.serve_dir):
        p.error(f"--serve-dir {args.serve_dir}: not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    ctx = server_context(
        args.cert, args.key, tls_version=args.tls, host=args.host, keylog=args.keylog
    )
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((args.host, args.port))
    listener.listen(128)
    server = EchoServer(
        listener,
        ctx,
        mode=args.mode,
        serve_dir=args.serve_dir,
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        max_conns=args.max_conns,
        max_conns_per_address=args.max_conns_per_address,
        request_timeout=args.request_timeout,
        grace=args.grace,
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: server.stop())
    host, port = server.address
    print(
        f"listening on {host}:{port} mode={args.mode} tls={args.tls}"
        + (f" serve-dir={args.serve_dir}" if args.serve_dir else ""),
        flush=True,
    )
    if args.ready_file:
        partial = Path(args.ready_file).with_suffix(".tmp")
        partial.write_text(f"{host} {port}\n")
        partial.replace(args.ready_file)  # whole or absent to a reader polling for it
    server.serve_forever()
    print(server.summary(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
