"""Two network namespaces joined by a veth pair, for tests that need a real wire.

::

    # namespace "afalg-PID-a" 10.0.0.1/24 <-veth-> namespace "afalg-PID-b" 10.0.0.2/24
    with NetnsPair() as pair:
        server = pair.a.socket()       # a socket that lives in namespace a
        server.bind((pair.a.address, 0))
        with pair.a.capture() as cap:  # AF_PACKET on a's veth end, both directions
            proc = pair.b.popen(["openssl", "s_client", ...])   # a process in namespace b
        streams = tcp_streams(cap.frames)

Running code inside a namespace: ``setns(CLONE_NEWNET)`` changes the namespace of the calling
*thread* only, and a socket keeps the namespace it was created in. So :meth:`Namespace.thread`
and :meth:`Namespace.call` run a callable in a fresh thread that first enters the namespace, and
:meth:`Namespace.socket` creates a socket that way; the test process itself never leaves the root
namespace and pays no fork or re-import (Python imports are slow in the TCG VM). Subprocesses go
through ``ip netns exec``. Namespaces, the veth pair and its addresses are made with pyroute2;
removing the namespaces on exit destroys the veth pair with them.

Needs root and a kernel with veth (the test VM); nothing here runs on import.
"""

from __future__ import annotations

import os
import queue
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from afalg import _uapi
from afalg.probe import has_capability

__all__ = [
    "Capture",
    "Frame",
    "Namespace",
    "NetnsPair",
    "TCPStream",
    "tcp_streams",
]

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SOL_PACKET = 263  # <linux/socket.h>
PACKET_STATISTICS = 6  # <linux/if_packet.h>: struct tpacket_stats { tp_packets; tp_drops; }
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; not in the socket module


class Namespace:
    """One named network namespace (``/run/netns/NAME``) with one end of the veth pair."""

    def __init__(
        self, name: str, ifname: str, address: str, prefixlen: int = 24, peer: str | None = None
    ) -> None:
        self.name = name
        self.ifname = ifname
        self.address = address
        self.prefixlen = prefixlen
        self.peer = peer  # the address at the veth's other end (the capture pings it)

    def __repr__(self) -> str:
        return f"<Namespace {self.name} {self.ifname} {self.address}/{self.prefixlen}>"

    def enter(self) -> None:
        """Move the calling thread into this namespace (only meant for threads we started)."""
        pyroute2_netns.setns(self.name, flags=0)

    def thread(
        self,
        target: Callable[..., Any],
        *args: Any,
        name: str | None = None,
        daemon: bool = True,
        **kwargs: Any,
    ) -> threading.Thread:
        """Start ``target(*args, **kwargs)`` in a new thread inside this namespace."""

        def run() -> None:
            self.enter()
            target(*args, **kwargs)

        thread = threading.Thread(
            target=run, name=name or f"{self.name}:{target.__name__}", daemon=daemon
        )
        thread.start()
        return thread

    def call(
        self, fn: Callable[..., Any], *args: Any, timeout: float | None = 60.0, **kwargs: Any
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` inside this namespace and return (or raise) its result."""
        box: queue.Queue[tuple[bool, Any]] = queue.Queue(1)

        def run() -> None:
            try:
                box.put((True, fn(*args, **kwargs)))
            except BaseException as exc:
                box.put((False, exc))

        self.thread(run, name=f"{self.name}:call")
        ok, value = box.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def socket(
        self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0
    ) -> socket.socket:
        """A new socket that lives in this namespace (usable from any thread)."""
        return self.call(socket.socket, family, type, proto)

    def listener(self, port: int = 0, backlog: int = 64) -> socket.socket:
        """A TCP socket listening on this namespace's address (port 0: any free port)."""
        sock = self.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, port))
        sock.listen(backlog)
        return sock

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a subprocess inside this namespace (``ip netns exec``)."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run a subprocess inside this namespace to completion (``ip netns exec``)."""
        return subprocess.run(self.argv(argv), **kwargs)

    def capture(self, ifname: str | None = None) -> Capture:
        """A packet capture on this namespace's veth end (start it with ``with``)."""
        return Capture(self, ifname or self.ifname)


def missing_capability() -> str | None:
    """Why this process cannot make namespaces and sniff a veth, or None if it can: it needs
    CAP_SYS_ADMIN (setns), CAP_NET_ADMIN (veth, addresses), CAP_NET_RAW (AF_PACKET) and the
    ``ip`` command (``ip netns exec``)."""
    needed = ("CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_NET_RAW")
    lacking = [name for name in needed if not has_capability(getattr(_uapi, name))]
    if lacking:
        return f"network namespaces and a sniffed veth need {', '.join(lacking)} (run as root)"
    if not shutil.which("ip"):
        return "the ip command (iproute2) is not installed"
    return None


class NetnsPair:
    """Namespaces ``a`` (10.0.0.1/24) and ``b`` (10.0.0.2/24) joined by a veth pair.

    A context manager: ``__enter__`` creates both namespaces, the veth pair (one end moved into
    each), the addresses, and brings the links (and loopback) up; ``__exit__``/:meth:`close`
    removes the namespaces, which destroys the veth pair. Names carry the pid, so concurrent
    test runs do not collide, and a leftover from a crashed run with the same name is removed
    first.
    """

    def __init__(
        self,
        prefix: str = "afalg",
        *,
        address_a: str = "10.0.0.1",
        address_b: str = "10.0.0.2",
        prefixlen: int = 24,
    ) -> None:
        tag = f"{prefix}-{os.getpid()}"
        self.a = Namespace(f"{tag}-a", "veth-a", address_a, prefixlen, peer=address_b)
        self.b = Namespace(f"{tag}-b", "veth-b", address_b, prefixlen, peer=address_a)
        self._up = False

    def __repr__(self) -> str:
        return f"<NetnsPair {self.a!r} <-> {self.b!r} {'up' if self._up else 'down'}>"

    def __enter__(self) -> NetnsPair:
        self.setup()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def setup(self) -> None:
        """Create the namespaces and the veth pair; idempotent once up. Skips the test, with
        the reason, where the capabilities or commands for that are missing."""
        if self._up:
            return
        missing = missing_capability()
        if missing:
            import pytest

            pytest.skip(missing)
        self.close()  # a leftover of a crashed run under the same names
        try:
            for ns in (self.a, self.b):
                pyroute2_netns.create(ns.name)
            # The pair is made in the root namespace under temporary unique names (a veth
            # named like an existing root interface would clash), then each end is moved.
            tmp_a, tmp_b = f"afa{os.getpid() % 10**8}", f"afb{os.getpid() % 10**8}"
            with IPRoute() as ipr:
                ipr.link("add", ifname=tmp_a, kind="veth", peer=tmp_b)
                for tmp, ns in ((tmp_a, self.a), (tmp_b, self.b)):
                    (index,) = ipr.link_lookup(ifname=tmp)
                    ipr.link("set", index=index, net_ns_fd=ns.name)
            for tmp, ns in ((tmp_a, self.a), (tmp_b, self.b)):
                ns.call(_configure, tmp, ns.ifname, ns.address, ns.prefixlen)
            for ns in (self.a, self.b):
                ns.call(_wait_up, ns.ifname)
            self._up = True
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove both namespaces (and with them the veth pair); idempotent."""
        self._up = False
        present = set(pyroute2_netns.listnetns())
        for ns in (self.a, self.b):
            if ns.name in present:
                pyroute2_netns.remove(ns.name)


def _configure(tmp_ifname: str, ifname: str, address: str, prefixlen: int) -> None:
    """Inside a namespace: rename the veth end, address it, bring it and loopback up."""
    with IPRoute() as ipr:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")
        (index,) = ipr.link_lookup(ifname=tmp_ifname)
        ipr.link("set", index=index, ifname=ifname)
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")


def _wait_up(ifname: str, timeout: float = 5.0) -> None:
    """Inside a namespace: wait until the link is operationally up (its peer is up too), so
    that the first SYN is not sent into a link that is still coming up."""
    deadline = time.monotonic() + timeout
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=ifname)
        while True:
            (link,) = ipr.get_links(index)
            if link.get("IFLA_OPERSTATE") == "UP" or time.monotonic() > deadline:
                return
            time.sleep(0.05)


# --- capture -----------------------------------------------------------------------------------


@dataclass
class Frame:
    """One captured Ethernet frame: monotonic timestamp, outgoing flag, raw bytes."""

    time: float
    outgoing: bool
    data: bytes


class Capture:
    """Capture every frame on one interface (both directions) with a raw ``AF_PACKET`` socket.

    ``with ns.capture() as cap: ...``; after the block (or :meth:`stop`) ``cap.frames`` holds the
    frames in order. A raw socket rather than scapy's sniffer: no scapy import on the hot path,
    no BPF compiler needed, and the socket is opened before the traffic starts.

    Lossless by construction, and checked: the socket's receive queue (``RCVBUF``, 64 MiB) holds
    far more than any test's exchange, so a capture thread starved by a loaded machine only
    reads later; a frame is read whole (``MSG_TRUNC`` tells its real length, GSO frames exceed
    64 KiB); and no fixed settle time decides what is in flight: :meth:`start` returns once an
    ICMP echo to the veth's peer has been captured both ways (the capture is live), and
    :meth:`stop` sends another and stops once both are captured (on a veth each direction
    is delivered in order, so every frame sent before is in). :meth:`check_lossless` raises
    if the kernel still dropped (``drops``) or cut (``truncated``) a frame.
    """

    RCVBUF = 64 << 20
    SNAPLEN = 256 << 10  # past the largest GSO frame a veth passes (64 KiB of IP + headers)

    def __init__(self, ns: Namespace, ifname: str, timeout: float = 120.0) -> None:
        self.ns = ns
        self.ifname = ifname
        self.timeout = timeout  # for a marker to come round (a TCG VM under load is slow)
        self.frames: list[Frame] = []
        self.drops = 0  # frames the kernel dropped for this socket (read at stop)
        self.truncated = 0  # frames longer than SNAPLEN
        self._sock: socket.socket | None = None
        self._ping: socket.socket | None = None
        self._ident = os.getpid() & 0xFFFF
        self._seq = 0
        self._seen: set[tuple[int, int]] = set()  # (ICMP type, sequence) of captured markers
        self._cond = threading.Condition()
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Capture:
        self.start()
        return self

    def __exit__(self, exc_type: object, *exc_info: object) -> None:
        self.stop(marker=exc_type is None)  # after an error, no wait that would hide it

    def start(self) -> None:
        """Open the capture and return once it has captured a marker both ways."""
        sock = self.ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:  # past net.core.rmem_max (CAP_NET_ADMIN, which the namespaces need anyway)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.RCVBUF)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        sock.bind((self.ifname, ETH_P_ALL))
        self._sock = sock
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._run, name=f"capture:{self.ifname}", daemon=True
        )
        self._thread.start()
        if self.ns.peer is not None:
            self._ping = self.ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self._marker("start")

    def _marker(self, when: str) -> None:
        """Send an ICMP echo to the peer; wait until the request and the reply are captured."""
        assert self._ping is not None and self.ns.peer is not None
        self._seq += 1
        seq = self._seq
        self._ping.sendto(_icmp_echo(self._ident, seq), (self.ns.peer, 0))
        with self._cond:
            both = self._cond.wait_for(lambda: {(8, seq), (0, seq)} <= self._seen, self.timeout)
        assert both, f"the capture on {self.ifname} did not see its {when} marker come round"

    def _run(self) -> None:
        assert self._sock is not None
        buffer = bytearray(self.SNAPLEN)
        while True:
            ready, _, _ = select.select([self._sock, self._stop_r], [], [])
            if self._sock in ready:
                self._read(buffer)
            elif self._stop_r in ready:
                # Take what is still queued, then stop.
                self._sock.setblocking(False)
                try:
                    while True:
                        self._read(buffer)
                except BlockingIOError:
                    return

    def _read(self, buffer: bytearray) -> None:
        assert self._sock is not None
        length, _flags, addr = _recvfrom_trunc(self._sock, buffer)
        if length > len(buffer):
            self.truncated += 1
        data = bytes(buffer[: min(length, len(buffer))])
        self.frames.append(Frame(time.monotonic(), addr[2] == PACKET_OUTGOING, data))
        marker = _icmp_marker(data, self._ident)
        if marker:
            with self._cond:
                self._seen.add(marker)
                self._cond.notify_all()

    def stop(self, marker: bool = True) -> list[Frame]:
        """Stop capturing once every frame sent so far is in (``marker``); return the frames."""
        if self._thread is None:
            return self.frames
        try:
            if self._ping is not None and marker:
                self._marker("end")
        finally:
            os.write(self._stop_w, b"x")
            self._thread.join()
            self._thread = None
            assert self._sock is not None
            _packets, drops = struct.unpack(
                "II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            )
            self.drops += drops
            self._sock.close()
            if self._ping is not None:
                self._ping.close()
            os.close(self._stop_r)
            os.close(self._stop_w)
        return self.frames

    def check_lossless(self) -> None:
        """Raise ``AssertionError`` if the kernel dropped or cut a frame of this capture."""
        assert not self.drops and not self.truncated, (
            f"the capture on {self.ifname} lost frames: {self.drops} dropped, "
            f"{self.truncated} truncated, {len(self.frames)} captured"
        )


def _recvfrom_trunc(sock: socket.socket, buffer: bytearray) -> tuple[int, int, Any]:
    """``recvmsg`` into ``buffer`` with ``MSG_TRUNC``: (the frame's real length, flags, address)."""
    length, _ancillary, flags, addr = sock.recvmsg_into([buffer], 0, socket.MSG_TRUNC)
    return length, flags, addr


def _icmp_echo(ident: int, seq: int) -> bytes:
    """An ICMP echo request (type 8) with its checksum (RFC 792)."""
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"afalg capture marker"
    total = sum(struct.unpack(f"!{len(body) // 2}H", body))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]


def _icmp_marker(frame: bytes, ident: int) -> tuple[int, int] | None:
    """(ICMP type, sequence) if ``frame`` is one of our echo requests or replies."""
    if len(frame) < 14 + 20 + 8 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    if ip[9] != socket.IPPROTO_ICMP:
        return None
    icmp_type, _code, _sum, got, seq = struct.unpack_from("!BBHHH", ip, (ip[0] & 0x0F) * 4)
    return (icmp_type, seq) if icmp_type in (0, 8) and got == ident else None


# --- TCP reassembly ----------------------------------------------------------------------------


@dataclass
class TCPStream:
    """The bytes one endpoint sent on one TCP connection, in sequence order."""

    src: tuple[str, int]
    dst: tuple[str, int]
    data: bytes = b""
    fin: bool = False
    rst: bool = False
    segments: int = 0
    missing: int = 0  # bytes not captured before the last captured one (allow_gaps only)
    chunks: dict[int, bytes] = field(default_factory=dict, repr=False)  # stream offset -> data
    _isn: int | None = field(default=None, repr=False)


Endpoint = tuple[str, int]


def tcp_streams(
    frames: Sequence[Frame], *, allow_gaps: bool = False
) -> dict[tuple[Endpoint, Endpoint], TCPStream]:
    """Reassemble the TCP byte streams in ``frames`` (IPv4 over Ethernet).

    Keyed by ``(src, dst)`` address pairs; each direction is its own :class:`TCPStream`.
    Retransmitted segments are deduplicated by sequence number; a gap raises ``ValueError``
    (a veth drops nothing, so a gap means the capture missed frames, see ``Capture.drops``).
    With ``allow_gaps`` a gap is not an error: ``data`` is the stream up to the first gap,
    ``chunks`` every captured segment by offset and ``missing`` how many bytes the gaps hold.
    Only the last connection per address pair is kept when a 4-tuple is reused.
    """
    streams: dict[tuple[Endpoint, Endpoint], TCPStream] = {}
    for frame in frames:
        parsed = _parse_tcp(frame.data)
        if parsed is None:
            continue
        src, dst, seq, flags, payload = parsed
        key = (src, dst)
        if flags & 0x02:  # SYN: a new connection; its sequence number is the ISN
            streams[key] = TCPStream(src, dst, _isn=(seq + 1) & 0xFFFFFFFF)
            continue
        stream = streams.get(key)
        if stream is None or stream._isn is None:
            continue
        stream.fin |= bool(flags & 0x01)
        stream.rst |= bool(flags & 0x04)
        if payload:
            offset = (seq - stream._isn) & 0xFFFFFFFF
            stream.chunks.setdefault(offset, payload)
            stream.segments += 1
    for stream in streams.values():
        data = bytearray()
        end = 0  # the furthest captured byte
        for offset in sorted(stream.chunks):
            chunk = stream.chunks[offset]
            if offset > end:
                if not allow_gaps:
                    raise ValueError(f"gap in TCP stream {stream.src}->{stream.dst} at {end}")
                stream.missing += offset - end
            if offset <= len(data) and stream.missing == 0:
                data += chunk[len(data) - offset :]
            end = max(end, offset + len(chunk))
        stream.data = bytes(data)
    return streams


def _parse_tcp(frame: bytes) -> tuple[tuple[str, int], tuple[str, int], int, int, bytes] | None:
    if len(frame) < 14 + 20 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    if ip[9] != socket.IPPROTO_TCP:
        return None
    src_ip, dst_ip = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    tcp = ip[ihl:total]
    src_port, dst_port, seq = struct.unpack_from("!HHI", tcp, 0)
    data_offset = (tcp[12] >> 4) * 4
    flags = tcp[13]
    return (src_ip, src_port), (dst_ip, dst_port), seq, flags, bytes(tcp[data_offset:])
