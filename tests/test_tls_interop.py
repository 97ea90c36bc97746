"""afalg TLS sockets against ``openssl s_server`` / ``s_client`` (an independent TLS stack in
another process): the three TLS 1.3 suites and TLS 1.2 AES-GCM and ChaCha20-Poly1305, both
roles, data both ways right after the handshake, NewSessionTickets after the handshake (OpenSSL
servers send two), close_notify, and a KeyUpdate from OpenSSL (``K`` on s_client's stdin).

And both ends with their default suites and groups, the negotiated group checked in openssl's
output: with OpenSSL 3.5 or later on both sides (Debian sid's 3.6, under its Python 3.14/3.15:
tests/_sid.py) the hybrid X25519MLKEM768 in TLS 1.3, whose ClientHello carries a 1.2 KB key
share; X25519 otherwise."""

from __future__ import annotations

import os
import socket

import pytest
from _env import WRAP_MODES
from test_tls_helpers import (
    HYBRID,
    TLS12_SUITES,
    TLS13_SUITES,
    client_context,
    default_group,
    openssl_client,
    openssl_server,
    read_stdout,
    recv_all,
    recv_exactly,
    reported_group,
    server_context,
    wait_stderr,
)

from afalg import tls
from afalg.errors import KeyUpdateUnsupported

SUITES = [("TLSv1.3", s) for s in TLS13_SUITES] + [
    ("TLSv1.2", TLS12_SUITES[0]),
    ("TLSv1.2", TLS12_SUITES[2]),
]


def _combos(algif_suites: list[tuple[str, str]]) -> list[object]:
    """kTLS and algif-host with every suite; algif in the VM with ``algif_suites`` (the record
    layer's suites are covered byte for byte by its own tests; this keeps the VM part short)."""
    out = []
    for param in WRAP_MODES:
        mode = param.values[0]
        suites = algif_suites if mode == ("algif", "kernel") else SUITES
        for version, suite in suites:
            sid = suite.replace("TLS_", "").replace("ECDHE-ECDSA-", "12-")
            out.append(pytest.param(mode, version, suite, id=f"{sid}-{param.id}",
                                    marks=param.marks))  # fmt: skip
    return out


CLIENT_COMBOS = _combos(SUITES)
SERVER_COMBOS = _combos([SUITES[2], SUITES[3]])

# Digits and newlines only: s_client treats some leading letters on its stdin as commands.
FROM_OPENSSL = b"0123456789" * 2000 + b"\n"
FROM_US = b"9876543210" * 1000 + b"\n"


def _check_suite(conn: object, version: str, suite: str) -> None:
    assert conn.version() == version  # type: ignore[attr-defined]
    assert conn.cipher()[0] == suite  # type: ignore[attr-defined]


@pytest.mark.parametrize(("mode", "version", "suite"), CLIENT_COMBOS)
def test_client_against_s_server(mode: tuple[str, str], version: str, suite: str) -> None:
    with openssl_server(version, suite) as (proc, sock):
        proc.stdin.write(FROM_OPENSSL)
        proc.stdin.flush()
        conn = tls.wrap(
            sock, client_context(version), server_hostname="localhost", mode=mode[0],
            algif_backend=mode[1],
        )  # fmt: skip
        with conn:
            _check_suite(conn, version, suite)
            conn.sendall(FROM_US)  # right after the handshake
            # In TLS 1.3 the NewSessionTickets come first: consumed, never returned as data.
            assert recv_exactly(conn, len(FROM_OPENSSL)) == FROM_OPENSSL
            assert read_stdout(proc, len(FROM_US)) == FROM_US
        assert proc.wait(30) == 0  # our close_notify ended its session


@pytest.mark.parametrize(("mode", "version", "suite"), SERVER_COMBOS)
def test_server_against_s_client(mode: tuple[str, str], version: str, suite: str) -> None:
    with openssl_client(version, suite) as (proc, sock):
        conn = tls.wrap(
            sock, server_context(version), server_side=True, mode=mode[0], algif_backend=mode[1]
        )
        with conn:
            _check_suite(conn, version, suite)
            conn.sendall(FROM_US)  # right after the handshake
            proc.stdin.write(FROM_OPENSSL)
            proc.stdin.flush()
            assert read_stdout(proc, len(FROM_US)) == FROM_US
            assert recv_exactly(conn, len(FROM_OPENSSL)) == FROM_OPENSSL
            proc.stdin.close()  # s_client sends close_notify
            assert recv_all(conn) == b""
        proc.wait(30)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_key_update_from_openssl(mode: tuple[str, str]) -> None:
    """s_client sends KeyUpdate(update_requested): algif moves both directions; kTLS on Linux
    before 6.14 raises KeyUpdateUnsupported naming the limit."""
    suite = "TLS_AES_128_GCM_SHA256"
    with openssl_client("TLSv1.3", suite) as (proc, sock):
        conn = tls.wrap(
            sock, server_context(), server_side=True, mode=mode[0], algif_backend=mode[1]
        )
        with conn:
            proc.stdin.write(b"1111\n")
            proc.stdin.flush()
            assert recv_exactly(conn, 5) == b"1111\n"
            proc.stdin.write(b"K\n")  # KeyUpdate, update_requested
            proc.stdin.flush()
            # s_client drops the rest of a stdin read that held a command: send the next
            # line only once it has taken this one
            wait_stderr(proc, b"KEYUPDATE\n")
            proc.stdin.write(b"2222\n")
            proc.stdin.flush()
            major, minor = os.uname().release.split("-")[0].split(".")[:2]
            if mode[0] == "ktls" and (int(major), int(minor)) < (6, 14):
                with pytest.raises(KeyUpdateUnsupported, match=r"6\.14"):
                    conn.recv(10)
                return
            assert recv_exactly(conn, 5) == b"2222\n"
            conn.sendall(b"3333\n")  # under our next keys: OpenSSL must have our KeyUpdate
            assert read_stdout(proc, 5) == b"3333\n"


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_tls13_client_resumes_against_s_server(mode: tuple[str, str]) -> None:
    """s_server's NewSessionTickets arrive after the hand-off (the kernel or the record layer
    opens them); afalg gives them back to ssl, so the session resumes: a PSK handshake that
    s_server reports as reused, then data both ways."""
    ctx = client_context("TLSv1.3")
    with openssl_server("TLSv1.3", TLS13_SUITES[0], "-naccept", "2") as (proc, sock):
        port = sock.getpeername()[1]
        proc.stdin.write(b"1\n")
        proc.stdin.flush()
        with tls.wrap(sock, ctx, server_hostname="localhost", mode=mode[0],
                      algif_backend=mode[1]) as conn:  # fmt: skip
            assert not conn.session_reused
            assert recv_exactly(conn, 2) == b"1\n"  # the tickets came before it
            session = conn.session
            assert session is not None and session.has_ticket
        again = socket.create_connection(("127.0.0.1", port), timeout=30)
        with tls.wrap(again, ctx, server_hostname="localhost", mode=mode[0],
                      algif_backend=mode[1], session=session) as conn:  # fmt: skip
            assert conn.session_reused and conn.mode == mode[0]
            conn.sendall(FROM_US)
            assert read_stdout(proc, len(FROM_US)) == FROM_US
            proc.stdin.write(b"2\n")
            proc.stdin.flush()
            assert recv_exactly(conn, 2) == b"2\n"


def _peek(sock: socket.socket, n: int) -> bytes:
    """The first ``n`` bytes waiting on ``sock``, left there."""
    data = b""
    while len(data) < n:
        data = sock.recv(n, socket.MSG_PEEK)
        if not data:
            raise EOFError("the peer closed before sending anything")
    return data


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_server_against_s_client_defaults(mode: tuple[str, str], version: str) -> None:
    """s_client with its default suites and groups: OpenSSL 3.5+ opens TLS 1.3 with an
    X25519MLKEM768 key share, a ClientHello record of over 1,200 bytes, which the hand-off
    takes whole; the group both sides agree on is the one s_client reports."""
    group = default_group(version)
    with openssl_client(version, None) as (proc, sock):
        header = _peek(sock, 5)
        length = int.from_bytes(header[3:5], "big")
        assert header[0] == 22 and (length > 1200) == (group == HYBRID), (header, length)
        conn = tls.wrap(
            sock, server_context(version), server_side=True, mode=mode[0], algif_backend=mode[1]
        )
        with conn:
            assert conn.version() == version
            conn.sendall(FROM_US)
            proc.stdin.write(FROM_OPENSSL)
            proc.stdin.flush()
            assert read_stdout(proc, len(FROM_US)) == FROM_US
            assert recv_exactly(conn, len(FROM_OPENSSL)) == FROM_OPENSSL
            proc.stdin.close()  # s_client sends close_notify
            assert recv_all(conn) == b""
        proc.wait(30)
        assert reported_group(proc.stderr.read()) == group


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
@pytest.mark.parametrize("mode", WRAP_MODES)
def test_client_against_s_server_defaults(mode: tuple[str, str], version: str) -> None:
    """ssl's default groups against s_server's: with OpenSSL 3.5+ on both sides our ClientHello
    carries the hybrid key share and s_server reports X25519MLKEM768 (it names the group in
    TLS 1.3 only, and before 3.5 not at all)."""
    group = default_group(version)
    with openssl_server(version, None, "-brief") as (proc, sock):
        conn = tls.wrap(
            sock, client_context(version), server_hostname="localhost", mode=mode[0],
            algif_backend=mode[1],
        )  # fmt: skip
        with conn:
            assert conn.version() == version
            # s_server prints the summary only when the handshake ends on a read from us: its
            # stdin stays empty until it has our data (a write would finish it silently)
            conn.sendall(FROM_US)
            assert read_stdout(proc, len(FROM_US)) == FROM_US
            proc.stdin.write(FROM_OPENSSL)
            proc.stdin.flush()
            assert recv_exactly(conn, len(FROM_OPENSSL)) == FROM_OPENSSL
        assert proc.wait(30) == 0  # our close_notify ended its session
        shown = reported_group(proc.stderr.read())
    if group == HYBRID:
        assert shown == HYBRID
    else:
        assert shown in (None, group)
