#!/usr/bin/env python3
"""The client for ``tls_echo_server.py``: send data and check the echo, or fetch a file.

::

    python examples/tls_echo_client.py --port 4433 --mode ktls --send 8M          # echo test
    python examples/tls_echo_client.py --port 4433 --get /big.bin --sha256 HEX    # file
    python examples/tls_echo_client.py --port 4433 --connections 8 --send 1M      # concurrent

Each connection's handshake is Python's ``ssl``; with ``--mode ktls|algif|auto`` the record
crypto then moves to the kernel through :func:`afalg.tls.wrap`, with ``userspace`` it stays in
``ssl``. Echo: the data goes out in chunks of at most 2^14 bytes (one record each) and each chunk
is read back before the next is sent, so neither side can block the other with full buffers;
every byte is compared. A summary is printed at the end (per connection: TLS version, suite,
mode, bytes, time, throughput; then the kernel's TLS counters). The exit status is 0 only when
every connection succeeded and every check held.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from afalg.ktls import tls_stats

MODES = ("ktls", "algif", "auto", "userspace")
CHUNK = 2**14


@dataclass
class Result:
    """What one connection did."""

    index: int
    ok: bool = False
    version: str = "-"
    suite: str = "-"
    mode: str = "-"
    sent: int = 0
    received: int = 0
    seconds: float = 0.0
    detail: str = ""
    body: bytes | None = None  # --get: the file as received
    status: int | None = None

    def line(self) -> str:
        rate = self.received / self.seconds / 1e6 if self.seconds else 0.0
        return (
            f"conn {self.index}: {'ok' if self.ok else 'FAILED'} version={self.version} "
            f"suite={self.suite} mode={self.mode} sent={self.sent} received={self.received} "
            f"time={self.seconds:.3f}s rate={rate:.2f}MB/s"
            + (f" {self.detail}" if self.detail else "")
        )


def client_context(
    *,
    cafile: str | None = None,
    tls_version: str = "any",
    ciphers: str | None = None,
    keylog: str | None = None,
) -> ssl.SSLContext:
    """A client SSLContext; without ``cafile`` the server certificate is not verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if tls_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if tls_version == "1.2" else ssl.TLSVersion.TLSv1_3
    if ciphers:
        ctx.set_ciphers(ciphers)
    if keylog:
        ctx.keylog_filename = keylog
    return ctx


def connect(
    host: str,
    port: int,
    context: ssl.SSLContext,
    *,
    mode: str = "auto",
    server_hostname: str | None = None,
    timeout: float = 30.0,
    sock: socket.socket | None = None,
) -> Any:
    """A TLS connection: ``ssl`` for mode userspace, :func:`afalg.tls.wrap` otherwise."""
    if sock is None:
        sock = socket.create_connection((host, port), timeout=timeout)
    else:
        sock.settimeout(timeout)
        sock.connect((host, port))
    name = server_hostname or (host if context.check_hostname else None)
    try:
        if mode == "userspace":
            return context.wrap_socket(sock, server_hostname=name)
        from afalg.tls import wrap

        return wrap(sock, context, server_side=False, server_hostname=name, mode=mode)
    except BaseException:
        sock.close()
        raise


def echo(tls: Any, data: bytes, result: Result, *, key_update: bool = False) -> None:
    """Send ``data`` in records of at most 2^14 bytes, reading each chunk's echo back. With
    ``key_update`` (TLS 1.3, afalg modes), a KeyUpdate asking the server for its own goes
    before every chunk, so every echo comes under new keys both ways."""
    if key_update and not hasattr(tls, "key_update"):
        raise ValueError("--key-update needs an afalg mode (ktls, algif or auto)")
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        chunk = view[start : start + CHUNK]
        if key_update:
            tls.key_update(request_peer=True)
        tls.sendall(chunk)
        result.sent += len(chunk)
        got = bytearray()
        while len(got) < len(chunk):
            more = tls.recv(CHUNK)
            if not more:
                raise ConnectionError(f"server closed after {result.received + len(got)} bytes")
            got += more
        result.received += len(got)
        if got != chunk:
            raise ValueError(f"echo differs in bytes {start}..{start + len(chunk)}")


def get(tls: Any, path: str, result: Result) -> None:
    """``GET path``: read the HTTP/1.0 response to the end (the server closes after it)."""
    request = f"GET {path}\r\n".encode()
    tls.sendall(request)
    result.sent += len(request)
    response = bytearray()
    while True:
        more = tls.recv(1 << 16)
        if not more:
            break
        response += more
    result.received = len(response)
    head, sep, body = bytes(response).partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no HTTP response header")
    status_line, *headers = head.decode("latin-1").split("\r\n")
    result.status = int(status_line.split()[1])
    length = next(
        (int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), None
    )
    if length is not None and length != len(body):
        raise ValueError(f"body is {len(body)} bytes, Content-Length says {length}")
    result.body = body


def run_one(
    index: int, args: argparse.Namespace, context: ssl.SSLContext, payload: bytes
) -> Result:
    result = Result(index)
    started = time.monotonic()
    try:
        tls = connect(
            args.host,
            args.port,
            context,
            mode=args.mode,
            server_hostname=args.server_name,
            timeout=args.timeout,
        )
        with tls:
            result.version = tls.version() or "-"
            result.suite = (tls.cipher() or ("-",))[0]
            result.mode = getattr(tls, "mode", "userspace")
            if args.get:
                get(tls, args.get, result)
                assert result.body is not None
                digest = hashlib.sha256(result.body).hexdigest()
                result.detail = f"status={result.status} sha256={digest}"
                if result.status != 200:
                    raise ValueError(f"HTTP status {result.status}")
                if args.sha256 and digest != args.sha256.lower():
                    raise ValueError(f"sha256 {digest} != expected {args.sha256}")
                if args.output:
                    with open(args.output, "wb") as f:
                        f.write(result.body)
            else:
                echo(tls, payload, result, key_update=args.key_update)
                result.detail = "echo verified"
        result.ok = True
    except Exception as exc:
        result.detail = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    return result


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4433)
    p.add_argument("--mode", choices=MODES, default="auto")
    p.add_argument("--cafile", help="verify the server against this CA (default: no check)")
    p.add_argument("--server-name", help="SNI and name to verify (default: --host)")
    p.add_argument("--tls", choices=("1.2", "1.3", "any"), default="any")
    p.add_argument("--ciphers", help="TLS 1.2 cipher list, e.g. ECDHE-ECDSA-CHACHA20-POLY1305")
    p.add_argument("--send", default="64k", help="echo this many bytes (e.g. 100, 16k, 8M)")
    p.add_argument("--get", metavar="PATH", help="fetch PATH from the server's --serve-dir")
    p.add_argument("--sha256", help="with --get: expected digest of the file")
    p.add_argument("--output", help="with --get: write the file here")
    p.add_argument("--connections", type=int, default=1, help="concurrent connections")
    p.add_argument(
        "--key-update",
        action="store_true",
        help="TLS 1.3: a KeyUpdate (update_requested) before every echoed record",
    )
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--keylog", help="append TLS secrets to this file (debugging only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = client_context(
        cafile=args.cafile, tls_version=args.tls, ciphers=args.ciphers, keylog=args.keylog
    )
    payload = os.urandom(parse_size(args.send)) if not args.get else b""
    if args.mode != "userspace":
        import afalg.tls  # noqa: F401  (import once, before the connections start their clocks)
    results: list[Result] = [Result(i) for i in range(args.connections)]

    def worker(i: int) -> None:
        results[i] = run_one(i, args, context, payload)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started

    for r in results:
        print(r.line())
    ok = sum(r.ok for r in results)
    moved = sum(r.sent + r.received for r in results)
    print(
        f"client summary: {ok}/{len(results)} connections ok, {moved} bytes moved in "
        f"{elapsed:.3f}s ({moved / elapsed / 1e6 if elapsed else 0:.2f} MB/s)"
    )
    stats = tls_stats()
    if stats:
        print("kernel TLS counters: " + " ".join(f"{k}={v}" for k, v in stats.items()))
    return 0 if ok == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
