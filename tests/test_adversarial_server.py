"""The example echo server (examples/tls_echo_server.py) against a string of hostile clients:
each costs only its own connection, none hangs the server, an honest client is served before
and after, and the server process holds exactly the descriptors it held before (no fd leak per
bad client, in any mode).

Modes as in test_echo_server: ``userspace`` on the host, ``ktls`` and ``algif`` in the VM. The
hostile clients are afalg's own algif socket on the cryptography backend (so they can write raw
records after a real handshake) and plain TCP sockets.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import struct

import pytest
from test_echo_server import CERTS, MODES, SLOW, Running, client, connect

from afalg import handoff, tls

BAD_HELLO = b"\x16\x03\x01\x00\x20" + b"\x01\x00\x00\x1c" + b"\xff" * 28


def open_fds() -> dict[int, str]:
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def drain(sock: socket.socket) -> None:
    """Read until the server ends the connection (EOF, reset or alert); never hang."""
    with contextlib.suppress(OSError):
        while sock.recv(4096):
            pass


def honest(srv: Running, data: bytes) -> None:
    result = client.Result(0)
    with connect(srv) as conn:
        client.echo(conn, data, result)


@pytest.mark.parametrize("mode", MODES)
def test_hostile_clients_cost_only_their_connection_and_no_fd(mode: str) -> None:
    srv = Running(mode, handshake_timeout=30.0 * SLOW)
    cctx = client.client_context(cafile=str(CERTS / "ca.pem"))
    handoff.keylog_for(cctx)  # its memfd exists before the baseline
    try:
        honest(srv, b"first")
        srv.finished(1)
        baseline = open_fds()

        def hostile_after_handshake(payload: bytes | None, *, fin: bool = False) -> None:
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=20 * SLOW)
            conn = tls.wrap(raw, cctx, server_hostname="localhost", mode="algif",
                            algif_backend="cryptography")  # fmt: skip
            with conn:
                wire = payload if payload is not None else b""
                if payload is None:  # a forged record
                    forged = bytearray(conn.record_layer.seal(23, b"forged request"))
                    forged[-1] ^= 1
                    wire = bytes(forged)
                conn._sock.sendall(wire)
                if fin:
                    conn._sock.shutdown(socket.SHUT_WR)
                drain(conn._sock)

        hostile_after_handshake(None)  # forged record
        hostile_after_handshake(b"GET / HTTP/1.0\r\n\r\n")  # plaintext after the handshake
        hostile_after_handshake(struct.pack(">BHH", 23, 0x0303, 2**14 + 300) + bytes(100))
        hostile_after_handshake(struct.pack(">BHH", 23, 0x0303, 100) + bytes(30), fin=True)
        for raw_bytes in (BAD_HELLO, BAD_HELLO[:7]):  # garbage hello; half a hello then FIN
            with socket.create_connection(("127.0.0.1", srv.port), timeout=20 * SLOW) as raw:
                raw.sendall(raw_bytes)
                raw.shutdown(socket.SHUT_WR)
                drain(raw)
        honest(srv, b"still serving")
        conns = srv.finished(8, timeout=60 * SLOW)
        outcomes = [c.outcome for c in conns]
        assert outcomes[0] == "ok" and outcomes[-1] == "ok", outcomes
        # forged, plaintext and oversized records are fatal; the truncated record then FIN
        # may count as a (ragged) EOF; the two bad hellos fail their handshake
        assert all(o.startswith(("alert:", "error:")) for o in outcomes[1:4]), outcomes
        assert all(o.startswith("handshake-") for o in outcomes[5:7]), outcomes
        after = open_fds()
        leaked = {fd: target for fd, target in after.items() if fd not in baseline}
        assert not leaked, (leaked, outcomes)
    finally:
        srv.stop()
