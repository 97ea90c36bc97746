"""The test harness itself: two namespaces joined by a veth pair carry TCP, the capture sees it.

The kernel-marked tests need root and veth (the VM); the reassembly tests run anywhere.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest
from _env import SLOW
from netns import Frame, NetnsPair, tcp_streams
from tls_wire import split_records


@pytest.fixture(scope="module")
def pair():
    with NetnsPair() as pair:
        yield pair


def _echo_once(listener: socket.socket, done: threading.Event) -> None:
    conn, _ = listener.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
    done.set()


@pytest.mark.kernel
def test_tcp_exchange_across_the_veth_pair(pair):
    listener = pair.a.listener()
    port = listener.getsockname()[1]
    done = threading.Event()
    payload = bytes(range(256)) * 1000  # several segments each way
    with pair.a.capture() as cap:
        pair.a.thread(_echo_once, listener, done)
        client = pair.b.socket()
        client.settimeout(10 * SLOW)
        client.connect((pair.a.address, port))
        client_ip, client_port = client.getsockname()
        assert client_ip == pair.b.address
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        echoed = bytearray()
        while data := client.recv(65536):
            echoed += data
        client.close()
        assert done.wait(10 * SLOW)
    listener.close()
    assert echoed == payload  # the byte stream itself, from the endpoints

    # The capture: lossless unless the kernel says it dropped frames (a loaded machine can
    # starve the capture thread); then every segment it did see must still be in its place.
    streams = tcp_streams(cap.frames, allow_gaps=bool(cap.drops))
    up = streams[(pair.b.address, client_port), (pair.a.address, port)]
    down = streams[(pair.a.address, port), (pair.b.address, client_port)]
    for stream in (up, down):
        assert stream.chunks, (stream, cap.drops)
        for offset, chunk in stream.chunks.items():
            assert chunk == payload[offset : offset + len(chunk)], (stream, offset)
        assert max(o + len(c) for o, c in stream.chunks.items()) <= len(payload)
        if not cap.drops:
            assert stream.data == payload and stream.fin and stream.missing == 0, stream
    assert any(f.outgoing for f in cap.frames) and any(not f.outgoing for f in cap.frames)


def test_reassembly_with_gaps_keeps_what_was_captured():
    c, s = ("10.0.0.2", 40000), ("10.0.0.1", 443)
    frames = [
        _frame(c, s, 100, 0x02),
        _frame(c, s, 101, 0x18, b"hello "),
        _frame(c, s, 112, 0x18, b"late"),  # "world" at 107 was not captured
    ]
    stream = tcp_streams(frames, allow_gaps=True)[c, s]
    assert stream.data == b"hello " and stream.missing == 5
    assert stream.chunks == {0: b"hello ", 11: b"late"}


@pytest.mark.kernel
def test_each_namespace_has_only_its_own_address(pair):
    sock = pair.a.socket()
    with sock, pytest.raises(OSError) as info:
        sock.bind((pair.b.address, 0))
    assert info.value.errno == errno.EADDRNOTAVAIL


@pytest.mark.kernel
def test_subprocess_runs_inside_the_namespace(pair):
    out = pair.b.run(
        ["ip", "-brief", "address", "show", "dev", pair.b.ifname],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{pair.b.address}/24" in out and "UP" in out


# --- reassembly, no kernel needed ----------------------------------------------------------------


def _frame(
    src: tuple[str, int], dst: tuple[str, int], seq: int, flags: int, payload: bytes = b""
) -> Frame:
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], seq, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp),
            0,
            0,
            64,
            socket.IPPROTO_TCP,
            0,
            socket.inet_aton(src[0]),
            socket.inet_aton(dst[0]),
        )
        + tcp
    )
    eth = b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", 0x0800)
    return Frame(0.0, False, eth + ip)


def test_reassembly_orders_and_deduplicates_segments():
    c, s = ("10.0.0.2", 40000), ("10.0.0.1", 443)
    isn = 0xFFFFFFF0  # the sequence space wraps inside the stream
    frames = [
        _frame(c, s, isn, 0x02),
        _frame(c, s, isn + 1 + 6, 0x18, b"world"),
        _frame(c, s, isn + 1, 0x18, b"hello "),
        _frame(c, s, isn + 1, 0x18, b"hello "),  # retransmission
        _frame(c, s, (isn + 12) & 0xFFFFFFFF, 0x11),
        _frame(s, c, 77, 0x12),
    ]
    streams = tcp_streams(frames)
    assert streams[c, s].data == b"hello world" and streams[c, s].fin
    assert streams[s, c].data == b""


def test_reassembly_refuses_a_gap():
    c, s = ("10.0.0.2", 40000), ("10.0.0.1", 443)
    frames = [_frame(c, s, 100, 0x02), _frame(c, s, 105, 0x18, b"late")]
    with pytest.raises(ValueError, match="gap"):
        tcp_streams(frames)


def test_split_records_splits_a_tls_stream():
    data = b"\x16\x03\x01\x00\x02ab" + b"\x17\x03\x03\x00\x03xyz" + b"\x15\x03\x03\x00\x02zz"
    assert list(split_records(data)) == [
        (22, 0x0301, b"ab"),
        (23, 0x0303, b"xyz"),
        (21, 0x0303, b"zz"),
    ]
    for truncated in (data[:-1], data[:-6]):  # a short fragment, a short header
        with pytest.raises(ValueError, match="truncated"):
            list(split_records(truncated))
