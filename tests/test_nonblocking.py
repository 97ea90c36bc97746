"""afalg TLS sockets with timeouts, non-blocking I/O and selectors, as ssl's are used, and better
where ssl is loose: a send that raised took nothing (a retry never duplicates), ``pending()``
counts every byte readable without the socket, queued records go out on flush, shutdown and
close. Each test runs for kTLS and algif in the VM and algif on the cryptography backend on the
host, against a Python ssl peer in a thread, byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import select
import selectors
import socket
import ssl
from typing import Any

import pytest
from _env import WRAP_MODES, scaled
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tls_helpers import Bg, client_context, pattern, recv_all, server_context, tcp_pair

from afalg import tls
from afalg.errors import WantRead, WantWrite

ALGIF_MODES = [m for m in WRAP_MODES if m.values[0][0] == "algif"]
SMALL = 4096  # socket buffers small enough that a few records fill them


def pair(mode: tuple[str, str], *, bufsize: int | None = None) -> tuple[Any, ssl.SSLSocket]:
    """(ours, theirs): an afalg client in ``mode`` and a Python ssl server, TLS 1.3; with
    ``bufsize``, both TCP sockets get send buffers that small (records then leave, and arrive,
    in pieces; small receive buffers too would stall loopback TCP for seconds at a time: a
    window below the MSS waits for the zero-window probe timer)."""
    csock, ssock = tcp_pair()
    if bufsize:
        for s in (csock, ssock):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
    return handshake(mode, csock, ssock)


def handshake(
    mode: tuple[str, str], csock: socket.socket, ssock: socket.socket
) -> tuple[Any, ssl.SSLSocket]:
    """(ours, theirs): afalg's client on ``csock`` in ``mode``, Python ssl's server on
    ``ssock``, TLS 1.3."""
    sctx = server_context("TLSv1.3", None)
    bg = Bg(lambda: sctx.wrap_socket(ssock, server_side=True))
    ours = tls.wrap(
        csock, client_context("TLSv1.3", None), server_hostname="localhost",
        mode=mode[0], algif_backend=mode[1],
    )  # fmt: skip
    theirs = bg.result(60)
    theirs.settimeout(60)
    return ours, theirs


def relayed_pair(mode: tuple[str, str], pieces: list[int]) -> tuple[Any, ssl.SSLSocket, Bg]:
    """:func:`pair` through a relay thread that forwards the server's bytes to ours in pieces
    of the sizes ``pieces`` (cycled; TCP_NODELAY, so record headers and bodies arrive split
    anywhere, or coalesced when ours reads late) and ours to the server as they come. The
    relay ends when both sides have closed; its Bg returns the bytes it moved."""
    ours_sock, relay_a = tcp_pair()
    relay_b, theirs_sock = tcp_pair()
    relay_a.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def relay() -> int:
        moved = 0
        turn = 0
        open_ends = {relay_a: relay_b, relay_b: relay_a}
        while open_ends:
            readable, _, _ = select.select(list(open_ends), [], [], 60)
            assert readable, "relay idle for 60 s"
            for src in readable:
                data = src.recv(2**16)
                dst = open_ends[src]
                if not data:
                    del open_ends[src]
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    continue
                if src is relay_b:  # the server's bytes: in pieces
                    view = memoryview(data)
                    while view:
                        size = pieces[turn % len(pieces)]
                        turn += 1
                        dst.sendall(view[:size])
                        view = view[size:]
                else:
                    dst.sendall(data)
                moved += len(data)
        relay_a.close()
        relay_b.close()
        return moved

    mover = Bg(relay)
    ours, theirs = handshake(mode, ours_sock, theirs_sock)
    return ours, theirs, mover


def fill(ours: Any, data: memoryview) -> int:
    """Send from ``data`` until the socket (timeout or non-blocking) refuses; bytes taken."""
    taken = 0
    while taken < len(data):
        try:
            taken += ours.send(data[taken:])
        except (TimeoutError, BlockingIOError):
            return taken
    raise AssertionError("the peer read nothing, yet everything was taken")


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_a_send_that_timed_out_took_nothing(mode: tuple[str, str]) -> None:
    """The issue's reproducer: fill the connection with a timeout while the peer does not read,
    then send the rest: the peer gets the message once, byte for byte (no record twice)."""
    message = memoryview(pattern(600_000, 3))
    ours, theirs = pair(mode, bufsize=SMALL)
    with ours, theirs:
        ours.settimeout(0.3)
        taken = fill(ours, message)
        assert 0 < taken < len(message)
        reader = Bg(lambda: hashlib.sha256(_recv_n(theirs, len(message))).hexdigest())
        ours.settimeout(60)
        ours.sendall(message[taken:])
        assert reader.result() == hashlib.sha256(message).hexdigest()


def _recv_n(sock: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(2**16, n - len(out)))
        assert data, f"EOF after {len(out)} of {n}"
        out += data
    assert len(out) == n
    return bytes(out)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_want_errors_are_ssls_and_blocking_io_errors(mode: tuple[str, str]) -> None:
    ours, theirs = pair(mode, bufsize=SMALL)
    with ours, theirs:
        ours.setblocking(False)
        with pytest.raises(WantRead) as info:
            ours.recv(10)
        assert isinstance(info.value, ssl.SSLWantReadError)
        assert isinstance(info.value, BlockingIOError)
        with pytest.raises(BlockingIOError):
            ours.recv(10)  # code written for plain sockets
        with pytest.raises(ssl.SSLWantReadError):
            ours.recv(10)  # code written for ssl
        data = memoryview(pattern(400_000, 4))
        taken = 0
        with pytest.raises(WantWrite) as winfo:
            while True:  # the peer does not read: at some point nothing more is taken
                taken += ours.send(data[taken:])
        assert isinstance(winfo.value, ssl.SSLWantWriteError)
        assert taken < len(data)
        reader = Bg(lambda: _recv_n(theirs, len(data)))
        ours.settimeout(60)
        ours.sendall(data[taken:])
        assert reader.result() == bytes(data)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_pending_counts_every_buffered_record(mode: tuple[str, str]) -> None:
    """Four 1,000-byte records arrive in one burst: after a 1,000-byte recv, a select +
    pending() loop gets the other 3,000 bytes (the issue found it stopped at 1,000)."""
    ours, theirs = pair(mode)
    with ours, theirs:
        for i in range(4):
            theirs.sendall(bytes([65 + i]) * 1000)  # one record each
        if mode[0] == "algif":  # wait until all four are in our socket (kTLS cannot peek)
            probe = socket.socket(fileno=os.dup(ours.fileno()))
            try:
                while len(probe.recv(2**16, socket.MSG_PEEK)) < 4000:
                    select.select([probe], [], [], 60)
            finally:
                probe.close()
        ours.setblocking(False)
        got = bytearray()
        while len(got) < 4000:
            if not ours.pending():
                assert select.select([ours], [], [], 60)[0], "readable data never reported"
            try:
                data = ours.recv(1000)
            except WantRead:
                continue  # readable for a record that was not data (the server's tickets)
            if not got and mode[0] == "algif":
                assert data == b"A" * 1000
                assert ours.pending() == 3000  # opened already: select would say not readable
            got += data
        assert got == b"".join(bytes([65 + i]) * 1000 for i in range(4))
        assert ours.pending() == 0
        with pytest.raises(WantRead):
            ours.recv(1)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_small_reads_keep_the_rest_pending(mode: tuple[str, str]) -> None:
    ours, theirs = pair(mode)
    with ours, theirs:
        theirs.sendall(pattern(10_000, 5))
        first = ours.recv(7)
        assert ours.pending() > 0  # the rest of the record, in both modes
        rest = bytearray()
        while len(first) + len(rest) < 10_000:
            rest += ours.recv(ours.pending() or 4096)
        assert first + rest == pattern(10_000, 5)


def selectors_echo(ours: Any, theirs: ssl.SSLSocket, chunks: list[int]) -> None:
    """The peer sends ``chunks`` (as records of those sizes), then reads the echo (one thread:
    an ssl object must not be read and written at once); ours echoes with a selector on a
    non-blocking socket, reading with pending() and writing with flush(). Byte for byte."""
    total = sum(chunks)
    data = pattern(total, 6)

    def peer() -> bytes:
        offset = 0
        for size in chunks:
            theirs.sendall(data[offset : offset + size])
            offset += size
        return _recv_n(theirs, total)

    bg = Bg(peer)
    ours.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ours, selectors.EVENT_READ)
    out = bytearray()
    received = 0
    try:
        while received < total or out or ours.pending_output():
            want = selectors.EVENT_READ if received < total else 0
            if out or ours.pending_output():
                want |= selectors.EVENT_WRITE
            sel.modify(ours, want)
            if not ours.pending() and not sel.select(60):
                raise AssertionError(f"stalled: {received} of {total} bytes echoed")
            while received < total:
                try:
                    data_in = ours.recv(8192)
                except WantRead:
                    break
                assert data_in
                received += len(data_in)
                out += data_in
            try:
                ours.flush()
                while out:
                    out = out[ours.send(out) :]
            except WantWrite:
                pass
    finally:
        sel.close()
    assert bg.result() == data


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("bufsize", [None, SMALL])
def test_selectors_echo(mode: tuple[str, str], bufsize: int | None) -> None:
    ours, theirs = pair(mode, bufsize=bufsize)
    with ours, theirs:
        selectors_echo(ours, theirs, [1, 16384, 100, 70_000, 5, 200_000])


@settings(max_examples=scaled(15, 300), deadline=None)  # a handshake per example
@given(chunks=st.lists(st.integers(1, 40_000), min_size=1, max_size=12))
def test_selectors_echo_any_records(chunks: list[int]) -> None:
    ours, theirs = pair(("algif", "cryptography"), bufsize=SMALL)
    with ours, theirs:
        selectors_echo(ours, theirs, chunks)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_selectors_echo_through_a_splitting_relay(mode: tuple[str, str]) -> None:
    chunks = [3, 16_384, 20_000, 1, 50_000]
    ours, theirs, mover = relayed_pair(mode, [1, 4, 5, 3, 700, 16_000, 2])
    with ours, theirs:
        selectors_echo(ours, theirs, chunks)
    assert mover.result() > 2 * sum(chunks)  # both ways went through the relay


@settings(max_examples=scaled(10, 200), deadline=None)
@given(
    pieces=st.lists(st.integers(1, 20_000), min_size=1, max_size=8),
    chunks=st.lists(st.integers(1, 40_000), min_size=1, max_size=6),
)
def test_selectors_echo_any_split(pieces: list[int], chunks: list[int]) -> None:
    """Records split and coalesced anywhere on the way in (host: algif on cryptography)."""
    ours, theirs, mover = relayed_pair(("algif", "cryptography"), pieces)
    with ours, theirs:
        selectors_echo(ours, theirs, chunks)
    mover.result()


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_close_writes_out_what_is_queued(mode: tuple[str, str]) -> None:
    """A non-blocking sender's queued records go out on close (made blocking first), then
    close_notify: the peer reads everything and a clean EOF."""
    data = memoryview(pattern(300_000, 7))
    ours, theirs = pair(mode, bufsize=SMALL)
    ours.setblocking(False)
    taken = fill(ours, data)
    reader = Bg(lambda: recv_all(theirs))
    ours.setblocking(True)
    ours.close()
    assert reader.result() == bytes(data[:taken])
    theirs.close()


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_shutdown_waits_for_queued_records_within_the_timeout(mode: tuple[str, str]) -> None:
    data = memoryview(pattern(400_000, 8))
    ours, theirs = pair(mode, bufsize=SMALL)
    with ours, theirs:
        ours.settimeout(0.3)
        taken = fill(ours, data)
        queued = ours.pending_output()
        if mode[0] == "ktls":
            assert queued == 0  # the kernel holds what it took
        elif queued:
            with pytest.raises(TimeoutError):
                ours.shutdown(socket.SHUT_WR)  # the peer reads nothing: cannot go out
            assert ours.pending_output() <= queued  # still queued, connection still open
        reader = Bg(lambda: recv_all(theirs))
        ours.settimeout(60)
        ours.shutdown(socket.SHUT_WR)
        assert ours.pending_output() == 0
        assert reader.result() == bytes(data[:taken])  # then EOF: close_notify came last


@pytest.mark.parametrize("mode", ALGIF_MODES)  # kTLS queues in the kernel, not in afalg
def test_close_reports_records_it_could_not_write(mode: tuple[str, str]) -> None:
    data = memoryview(pattern(400_000, 9))
    ours, theirs = pair(mode, bufsize=SMALL)
    with theirs:
        ours.settimeout(0.2)
        fill(ours, data)
        if not ours.pending_output():
            ours.send(data[:50_000])  # returns having taken it, with some still queued
        assert ours.pending_output()
        with pytest.raises(TimeoutError):
            ours.close()
        assert ours.closed and ours.fileno() == -1  # closed all the same


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendall_returns_only_once_everything_is_out(mode: tuple[str, str]) -> None:
    """socket.sendall's promise (ssl's too): it returns once the socket took everything, or
    raises. In algif mode records sealed but still queued are not out: a sendall that filled
    the connection raises TimeoutError instead of returning with its last records queued."""
    chunk = pattern(65_536, 11)  # one send's worth
    ours, theirs = pair(mode, bufsize=SMALL)
    with ours, theirs:
        ours.settimeout(0.3)
        with pytest.raises(TimeoutError):
            for _ in range(1000):  # 64 MiB: far more than the peer's receive buffer holds
                ours.sendall(chunk)
                assert ours.pending_output() == 0


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_a_shutdown_that_timed_out_sends_close_notify_when_retried(mode: tuple[str, str]) -> None:
    """shutdown(SHUT_WR) raises TimeoutError while the peer reads nothing, with the connection
    still open; called again once the peer reads, it sends close_notify: the peer sees a clean
    end (kTLS queues nothing when the alert's send times out, so the retry must send it)."""
    data = memoryview(pattern(400_000, 10))
    ours, theirs = pair(mode, bufsize=SMALL)
    theirs.suppress_ragged_eofs = False  # an end without close_notify raises SSLEOFError
    with ours, theirs:
        ours.settimeout(0.3)
        taken = fill(ours, data)
        with pytest.raises(TimeoutError):
            ours.shutdown(socket.SHUT_WR)
        reader = Bg(lambda: recv_all(theirs))
        ours.settimeout(60)
        ours.shutdown(socket.SHUT_WR)
        assert reader.result() == bytes(data[:taken])


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_a_sendfile_that_timed_out_leaves_the_position_after_what_was_taken(
    mode: tuple[str, str],
) -> None:
    """A file sendfile cannot hand to the kernel (in memory) goes through send(): when it times
    out, the file position is after the last byte taken, so a second sendfile from there
    sends the rest, and the peer gets the file exactly once."""
    data = pattern(4_000_000, 12)
    file = io.BytesIO(data)
    ours, theirs = pair(mode, bufsize=SMALL)
    with ours, theirs:
        ours.settimeout(0.3)
        with pytest.raises(TimeoutError):
            ours.sendfile(file)  # the peer reads nothing
        position = file.tell()
        assert 0 < position < len(data)
        reader = Bg(lambda: recv_all(theirs))
        ours.settimeout(60)
        assert ours.sendfile(file) == len(data) - position
        ours.shutdown(socket.SHUT_WR)
        assert reader.result() == data
