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
from _env import CAFILE, SERVER_MODES, SLOW
from test_echo_server import Running, client, connect

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


def honest(srv: Running, data: bytes) -> int:
    """One echo; returns the client's port (the server logs it as the peer)."""
    result = client.Result(0)
    with connect(srv) as conn:
        port = conn.getsockname()[1]
        client.echo(conn, data, result)
    return port


@pytest.mark.parametrize("mode", SERVER_MODES)
def test_hostile_clients_cost_only_their_connection_and_no_fd(mode: str) -> None:
    srv = Running(mode, handshake_timeout=30.0 * SLOW)
    cctx = client.client_context(cafile=CAFILE)
    handoff.keylog_for(cctx)  # its memfd exists before the baseline
    try:
        first = honest(srv, b"first")
        srv.finished(1)
        baseline = open_fds()

        def hostile_after_handshake(payload: bytes | None, *, fin: bool = False) -> int:
            raw = socket.create_connection(("127.0.0.1", srv.port), timeout=20 * SLOW)
            port = raw.getsockname()[1]
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
            return port

        def hostile_hello(raw_bytes: bytes) -> int:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=20 * SLOW) as raw:
                port = raw.getsockname()[1]
                raw.sendall(raw_bytes)
                raw.shutdown(socket.SHUT_WR)
                drain(raw)
            return port

        # Each client's outcome is found by its port: the server logs connections as they
        # finish, and a slow teardown (a loaded machine) can finish one after the next.
        fatal = [
            hostile_after_handshake(None),  # forged record
            hostile_after_handshake(b"GET / HTTP/1.0\r\n\r\n"),  # plaintext after handshake
            hostile_after_handshake(struct.pack(">BHH", 23, 0x0303, 2**14 + 300) + bytes(100)),
        ]
        # a truncated record then FIN: may count as a (ragged) EOF
        truncated = hostile_after_handshake(
            struct.pack(">BHH", 23, 0x0303, 100) + bytes(30), fin=True
        )
        bad_hellos = [hostile_hello(BAD_HELLO), hostile_hello(BAD_HELLO[:7])]  # then FIN
        last = honest(srv, b"still serving")
        conns = srv.finished(8, timeout=60 * SLOW)
        outcome = {c.peer[1]: c.outcome for c in conns}
        ports = [first, *fatal, truncated, *bad_hellos, last]
        assert sorted(outcome) == sorted(ports), (outcome, ports)
        assert outcome[first] == "ok" and outcome[last] == "ok", outcome
        # forged, plaintext and oversized records are fatal; the bad hellos fail the handshake
        assert all(outcome[p].startswith(("alert:", "error:")) for p in fatal), outcome
        assert all(outcome[p].startswith("handshake-") for p in bad_hellos), outcome
        outcomes = [outcome[p] for p in ports]
        after = open_fds()
        leaked = {fd: target for fd, target in after.items() if fd not in baseline}
        assert not leaked, (leaked, outcomes)
    finally:
        srv.stop()
