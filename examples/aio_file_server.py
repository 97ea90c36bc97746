"""An asyncio TLS file server on afalg.aio: ``GET /path`` (or ``GET /path HTTP/1.x`` and headers,
so ``curl`` works) gets an ``HTTP/1.0`` response with the file, sent by
:func:`afalg.aio.sendfile` (under kTLS the kernel reads and encrypts the pages: Python never
reads the file), and the connection is closed. ::

    python examples/aio_file_server.py --serve-dir DIR --port 8443 --mode ktls
    curl -k https://localhost:8443/some/file

The limits and path checks are the threaded example server's (examples/tls_echo_server.py), from
:mod:`afalg.serving`: :class:`~afalg.serving.ServeDir` resolves and opens the file (nothing
outside DIR, no symlink swapped in, regular files only), :class:`~afalg.serving.ServerLimits`
gives the handshake and request deadlines (absolute: a peer trickling bytes does not outlive
them) and :class:`~afalg.serving.ConnectionLimits` the caps on connections, in all and per
address. Same flags as that server where they apply; ``--ready-file`` gets ``HOST PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from tls_echo_server import server_context

from afalg import aio
from afalg.serving import (
    MAX_REQUEST,
    ConnectionLimits,
    FileRequest,
    RequestRefused,
    ServeDir,
    ServerLimits,
    response_head,
)

log = logging.getLogger("aio_file_server")


class FileServer:
    """Serves the files of one directory to each connection's first request."""

    def __init__(self, serve_dir: str, limits: ServerLimits | None = None) -> None:
        self.files = ServeDir(serve_dir)
        self.limits = limits or ServerLimits()
        self.admission = ConnectionLimits(self.limits.max_conns, self.limits.max_conns_per_address)
        self.served = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: admitted or closed at once; one request, then the close, within the
        request's deadline (past it, the connection is aborted); the slot is freed after."""
        peer = writer.get_extra_info("peername")
        address = peer[0] if peer else "?"
        refused = self.admission.admit(address)
        if refused is not None:
            log.info("%s refused: %s", address, refused)
            writer.transport.abort()
            return
        try:
            outcome = await asyncio.wait_for(
                self._request_and_close(reader, writer), self.limits.request_timeout
            )
        except TimeoutError:
            outcome = "request-timeout"
        except (ConnectionError, ssl.SSLError) as exc:
            outcome = f"error:{type(exc).__name__}"
        finally:
            # A close that did not finish (a peer that never reads keeps the response and the
            # close_notify queued) ends here, before the slot is freed.
            writer.transport.abort()
            self.admission.release(address)
        log.info("%s %s", address, outcome)

    async def _request_and_close(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str:
        outcome = await self._request(reader, writer)
        writer.close()  # what is queued, then close_notify: still inside the deadline
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
        return outcome

    async def _request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        request = FileRequest()
        try:
            while True:
                data = await reader.read(MAX_REQUEST)
                if not data:
                    return "eof"
                if request.feed(data):
                    break
            assert request.target is not None
            f = self.files.open(request.target)
        except RequestRefused as exc:
            return await self._respond(writer, exc.status, exc.reason)
        except (ConnectionError, ssl.SSLError):
            raise
        except Exception:  # a bug: the client still gets a status, the log the traceback
            log.exception("request from %s failed", writer.get_extra_info("peername"))
            return await self._respond(writer, 500, "Internal Server Error")
        with f:
            size = os.fstat(f.fileno()).st_size
            writer.write(response_head(200, "OK", size))
            sent = await aio.sendfile(writer, f) if size else 0
        await writer.drain()
        self.served += 1
        return "served" if sent == size else f"error:sendfile-short:{sent}/{size}"

    async def _respond(self, writer: asyncio.StreamWriter, status: int, reason: str) -> str:
        writer.write(response_head(status, reason))
        await writer.drain()
        return f"http-{status}"

    async def start(
        self, context: ssl.SSLContext, host: str, port: int, *, mode: str = "auto"
    ) -> asyncio.Server:
        """Listen on ``host``:``port`` (0: any free port)."""
        return await aio.start_server(
            self.handle, host, port, ssl=context, mode=mode,
            ssl_handshake_timeout=self.limits.handshake_timeout,
            max_handshakes=self.limits.max_conns, limit=MAX_REQUEST,
        )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443, help="0: any free port (printed)")
    p.add_argument("--mode", choices=("ktls", "algif", "auto"), default="auto")
    p.add_argument("--serve-dir", required=True, help="serve files from DIR")
    p.add_argument("--cert", help="PEM certificate chain (default: throwaway self-signed)")
    p.add_argument("--key", help="PEM private key (with --cert)")
    p.add_argument("--tls", choices=("1.2", "1.3", "any"), default="any", help="TLS version")
    p.add_argument("--handshake-timeout", type=float, default=10.0)
    p.add_argument("--request-timeout", type=float, default=30.0)
    p.add_argument("--max-conns", type=int, default=256)
    p.add_argument("--max-conns-per-address", type=int, default=64)
    p.add_argument("--ready-file", help="write HOST PORT here once listening")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-connection log lines")
    args = p.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        p.error("--cert and --key go together")
    if not os.path.isdir(args.serve_dir):
        p.error(f"--serve-dir {args.serve_dir}: not a directory")
    return args


async def serve(args: argparse.Namespace) -> None:
    limits = ServerLimits(
        handshake_timeout=args.handshake_timeout, request_timeout=args.request_timeout,
        max_conns=args.max_conns, max_conns_per_address=args.max_conns_per_address,
    )  # fmt: skip
    server = FileServer(args.serve_dir, limits)
    ctx = server_context(args.cert, args.key, tls_version=args.tls, host=args.host)
    listening = await server.start(ctx, args.host, args.port, mode=args.mode)
    host, port = listening.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port} mode={args.mode} serve-dir={args.serve_dir}", flush=True)
    if args.ready_file:
        Path(args.ready_file).write_text(f"{host} {port}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with listening:
        await stop.wait()
    print(f"served {server.served} files", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
