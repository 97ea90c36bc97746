"""Closing an afalg TLS socket with input it never read (the peer's NewSessionTickets, data it
sent): the close must not make the kernel reset the connection. Linux answers a close() that
leaves unread input with a TCP RST instead of a FIN, which also throws away what is still on its
way to the peer; the peer then gets ConnectionResetError (Python 3.13+'s ssl; 3.11's reports a
ragged EOF) instead of close_notify. The test reads the peer's TCP state, which tells the two
apart on every Python: CLOSE_WAIT after a FIN, CLOSE after a reset.

Runs for kTLS and algif in the VM and algif on the cryptography backend on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import select
import socket
import ssl
import sys
import termios
import threading
import time
from typing import Any

import pytest
from _env import WRAP_MODES
from test_tls_helpers import Bg, client_context, pattern, recv_all, server_context, tcp_pair

from afalg import aio, tls

TCP_CLOSE_WAIT = 8  # include/net/tcp_states.h: the peer's FIN came
TCP_CLOSE = 7  # ... or its RST


def _tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (``tcpi_state``, the first byte of TCP_INFO) once
    the TCP connection has ended (a FIN or a reset made it readable), after close_notify."""
    readable, _, _ = select.select([sock], [], [], 60)
    assert readable, "no FIN nor reset after close_notify"
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def _delivered(sock: socket.socket, timeout: float = 60) -> None:
    """Wait until every byte ``sock`` sent is acknowledged by the peer's TCP (``TIOCOUTQ`` 0):
    then it is in the peer's kernel, wherever kTLS or TCP keeps it."""
    deadline = time.monotonic() + timeout
    buf = bytearray(4)
    while True:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        if not int.from_bytes(buf, sys.byteorder):
            return
        assert time.monotonic() < deadline, "the peer's kernel did not take the data"
        time.sleep(0.01)


def _pair(mode: tuple[str, str]) -> tuple[Any, ssl.SSLSocket]:
    """(ours, theirs): an afalg client, a Python ssl server, TLS 1.3 (the
    server sends NewSessionTickets after the handshake)."""
    csock, ssock = tcp_pair()
    sctx = server_context("TLSv1.3", None)
    bg = Bg(lambda: sctx.wrap_socket(ssock, server_side=True))
    ours = tls.wrap(
        csock, client_context("TLSv1.3", None), server_hostname="localhost",
        mode=mode[0], algif_backend=mode[1],
    )  # fmt: skip
    theirs = bg.result(60)
    return ours, theirs


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("blocking", [False, True], ids=["nonblocking", "timeout"])
def test_close_with_unread_input_ends_with_close_notify_and_fin(
    mode: tuple[str, str], blocking: bool
) -> None:
    """The peer sends data ours never reads (after its tickets); ours queues 64 KiB and
    closes. The peer reads the 64 KiB, then close_notify (EOF), and its TCP socket saw a FIN,
    not a reset."""
    ours, theirs = _pair(mode)
    with theirs:
        theirs.sendall(b"never read")
        readable, _, _ = select.select([ours], [], [], 60)
        assert readable, "the peer's data did not arrive"
        data = pattern(65_536, 3)
        if blocking:
            ours.sendall(data)
            sent = len(data)
        else:
            ours.setblocking(False)
            sent = ours.send(data)  # what it takes now
            while ours.pending_output():  # algif: sealed, not all written yet (a busy host)
                select.select([], [ours], [], 60)
                with contextlib.suppress(BlockingIOError):
                    ours.flush()
        ours.close()
        assert recv_all(theirs) == data[:sent]  # then EOF: close_notify, no ConnectionResetError
        assert _tcp_state(theirs) == TCP_CLOSE_WAIT, "ours reset the connection"


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_aio_close_while_reading_is_paused(mode: tuple[str, str]) -> None:
    """An afalg.aio client pauses reading, the peer sends data it never reads, it writes and
    closes: the transport's close goes through the socket's, so the peer gets all of what was
    written, then close_notify, over a FIN."""
    data = pattern(65_536, 4)
    paused = threading.Event()  # the peer sends only then: the transport must not read it
    sent = threading.Event()
    unread = b"never read" * 1000
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def peer() -> tuple[bytes, int]:
            sock, _ = listener.accept()
            with server_context("TLSv1.3").wrap_socket(sock, server_side=True) as theirs:
                theirs.settimeout(60)
                assert paused.wait(60), "the client did not pause reading"
                theirs.sendall(unread)
                _delivered(theirs)
                sent.set()
                return recv_all(theirs), _tcp_state(theirs)

        bg = Bg(peer)

        async def client() -> None:
            _reader, writer = await aio.open_connection(
                *listener.getsockname(), ssl=client_context("TLSv1.3"),
                server_hostname="localhost", mode=mode[0], algif_backend=mode[1],
            )  # fmt: skip
            writer.transport.pause_reading()
            paused.set()
            # The peer's data, unread, all of it in our kernel: readable alone could be its
            # tickets, sent before, with the data still on its way (it would come after the
            # close: a reset)
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, sent.wait, 60), "the peer sent nothing"
            writer.write(data)
            writer.close()
            await writer.wait_closed()

        asyncio.run(asyncio.wait_for(client(), 60))
        got, state = bg.result(60)
    assert got == data
    assert state == TCP_CLOSE_WAIT, "ours reset the connection"
