"""Hostile load on both servers: the threaded example echo server (examples/tls_echo_server.py)
and an echo server on :func:`afalg.aio.start_server`, in each mode.

Each round interleaves :data:`HOSTILE` hostile connections of every kind in :data:`KINDS`
(garbage, half handshakes that stall, a valid ClientHello trickled and never finished, forged
tags and oversized records after a real handshake, resets at every stage) with :data:`HONEST`
clients of Python's ``ssl`` (asyncio streams, TLS 1.3 and 1.2) doing echo exchanges, on loopback
only. Asserted, for every round of :data:`ROUNDS` identical ones:

- every honest exchange completes byte for byte, and the server logs it as a clean end;
- every hostile connection is ended by the server (a stalled or trickling handshake by the
  server's handshake deadline, however the client trickles): none outlives the test's bound;
- the server raises nothing it did not expect (its error log and the loop's exception handler);
- this process's descriptors (server and clients live in it) return to the baseline, and so
  do its connection objects (transports, TLS sockets, handshakes, ssl objects, streams: see
  :func:`connection_objects`), whose leak the RSS bound would see only blurred by the allocator;
- and after the last round, the server still serves, and the resident set size grew by less
  than :data:`RSS_GROWTH` between the second and the third round.

Nothing here measures time: the server's handshake timeout is short (:data:`HANDSHAKE_TIMEOUT`)
so that stalled clients end soon, and the test waits for conditions (the server idle, the
descriptors back), each within a generous bound. Honest clients connect from their own loopback
address (:data:`HONEST_ADDRESS`) and hostile ones from :data:`HOSTILE_ADDRESSES`: the threaded
server's caps (:class:`afalg.serving.ConnectionLimits`, ``max_conns`` = every address's share)
keep the hostile ones from taking the honest ones' slots, as they would in production; the aio
echo handler applies the same caps after the handshake.

``make test`` runs the smoke size (40 hostile, 8 honest, 3 rounds); ``make stress``
(AFALG_TEST_SCALE=full) the issue's size: 1,000 hostile and 100 honest per round.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import random
import resource
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import tls_echo_server as server
from _env import CERTS, SLOW, scaled
from test_tls_helpers import client_context

from afalg import aio, tls
from afalg.handoff import Handshake
from afalg.serving import ConnectionLimits

pytestmark = [pytest.mark.stress, pytest.mark.timeout(scaled(1200, 7200))]

HOSTILE = scaled(40, 1000)  # hostile connections per round
HONEST = scaled(8, 100)  # honest clients per round
ROUNDS = 3
RSS_GROWTH = 5 * 2**20  # bytes, between the second and the third round
MESSAGES = 3  # echo exchanges per honest client, each of 1..MAX_MESSAGE bytes
MAX_MESSAGE = 20_000

# The server drops a handshake not finished by then. Short, so that stalled clients end soon;
# long enough for an honest handshake among SLOTS["handshake"] + SLOTS["honest"] others under
# TCG on a loaded machine (a Python handshake there: tenths of a second).
HANDSHAKE_TIMEOUT = scaled(2.0, 3.0) * SLOW
T = 60 * SLOW  # the bound on anything that should end: a server closing, the server going idle
# Client-side concurrency per class of job (a launcher starts the jobs in their shuffled order,
# each when its class has a free slot, so the classes interleave through the round).
SLOTS = {"stall": scaled(12, 64), "handshake": scaled(8, 16), "honest": scaled(4, 8)}

HOSTILE_ADDRESSES = ("127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4")
HONEST_ADDRESS = "127.0.2.1"
PER_ADDRESS = 48  # the servers' max_conns_per_address; max_conns is every address's share
MAX_CONNS = PER_ADDRESS * (len(HOSTILE_ADDRESSES) + 1)

# The hostile kinds, each as many times as the others (HOSTILE is spread over them in turn).
KINDS = (
    "garbage",  # random bytes, then FIN
    "fake-record",  # a handshake record header claiming more than follows, then FIN
    "http",  # plaintext HTTP to the TLS port, then FIN
    "hello-stall",  # a valid ClientHello, then silence (the server's flight is read)
    "partial-stall",  # half a ClientHello, then silence
    "trickle",  # a valid ClientHello a few bytes at a time, the last byte never sent
    "forged-tag",  # a real handshake, then an application record with one tag bit flipped
    "oversized",  # a real handshake, then a record longer than TLS allows (body sent whole)
    "rst-early",  # a few bytes of ClientHello, then a reset (SO_LINGER 0)
    "rst-handshake",  # a whole ClientHello, then a reset
    "rst-after",  # a real handshake and a valid request record, then a reset, the echo unread
)
STALLS = {"hello-stall", "partial-stall", "trickle"}
HANDSHAKES = {"forged-tag", "oversized", "rst-after"}
# What a hostile client may see from the server (the server closing, resetting, refusing).
ENDED = (OSError, ssl.SSLError, EOFError)

# (server, mode, algif backend): the plain-ssl threaded server and aio on the cryptography
# backend run on the host, the kernel modes in the VM.
TARGETS = [
    pytest.param("threaded", "userspace", "auto", id="threaded-userspace"),
    pytest.param("threaded", "ktls", "auto", id="threaded-ktls", marks=pytest.mark.kernel),
    pytest.param("threaded", "algif", "auto", id="threaded-algif", marks=pytest.mark.kernel),
    pytest.param("aio", "algif", "cryptography", id="aio-algif-host"),
    pytest.param("aio", "ktls", "kernel", id="aio-ktls", marks=pytest.mark.kernel),
    pytest.param("aio", "algif", "kernel", id="aio-algif", marks=pytest.mark.kernel),
]


def open_fds() -> dict[int, str]:
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


# What a connection is made of, at either end: none may outlive the round (a leak of Python
# objects, which the RSS bound sees only blurred by the allocator's free lists).
CONNECTION_TYPES = (
    aio.TLSTransport, tls.KTLSSocket, tls.AlgTLSSocket, Handshake, ssl.SSLObject, ssl.SSLSocket,
    asyncio.StreamReader, asyncio.StreamWriter,
)  # fmt: skip


def connection_objects() -> collections.Counter[str]:
    """The live objects of :data:`CONNECTION_TYPES` by type name, after a full collection
    (a failed connection's objects die in reference cycles: the handler's StreamReader keeps the
    error, whose traceback holds the handler's frame, which holds the reader. asyncio's own
    streams do the same: a reset connection's reader waits for the cycle collector)."""
    gc.collect()
    return collections.Counter(
        type(o).__name__ for o in gc.get_objects() if isinstance(o, CONNECTION_TYPES)
    )


def rss() -> int:
    """This process's resident set size in bytes (VmRSS of /proc/self/status)."""
    gc.collect()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- the servers ----------------------------------------------------------------------------------


class _ErrorLog(logging.Handler):
    """Collects the warnings and errors a server logs (a handler's exception, a failed accept)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        self.errors.append(self.format(record))


class ThreadedTarget:
    """The example EchoServer in a thread of this process."""

    def __init__(self, mode: str, backend: str) -> None:
        del backend  # the example server takes the default backend of its mode
        ctx = server.server_context(str(CERTS / "server.pem"), str(CERTS / "server.key"))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        self.server = server.EchoServer(
            listener, ctx, mode=mode, handshake_timeout=HANDSHAKE_TIMEOUT, idle_timeout=T,
            max_conns=MAX_CONNS, max_conns_per_address=PER_ADDRESS,
        )  # fmt: skip
        self.port = self.server.address[1]
        self.errors: list[str] = []
        self.outcomes: dict[tuple[str, int], str] = {}
        self._log = _ErrorLog(self.errors)
        server.log.addHandler(self._log)
        self.server.on_close = self._on_close
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _on_close(self, conn: server.Connection) -> None:
        self.outcomes[tuple(conn.peer[:2])] = conn.outcome  # type: ignore[index]

    def idle(self) -> bool:
        with self.server._lock:
            return not self.server.connections and not self.server.threads

    def stop(self) -> None:
        self.server.stop()
        try:
            assert self.server.wait_stopped(T), "the server did not stop"
        finally:
            server.log.removeHandler(self._log)


class AioTarget:
    """An echo server on afalg.aio.start_server, its loop in a thread of this process: the
    connection caps of :class:`ConnectionLimits` after the handshake, an idle timeout on each
    read and write, every unexpected exception recorded."""

    def __init__(self, mode: str, backend: str) -> None:
        self.errors: list[str] = []
        self.outcomes: dict[tuple[str, int], str] = {}
        self.admission = ConnectionLimits(MAX_CONNS, PER_ADDRESS)
        self.live = 0
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        ctx = server.server_context(str(CERTS / "server.pem"), str(CERTS / "server.key"))
        start = aio.start_server(
            self._echo, "127.0.0.1", 0, ssl=ctx, mode=mode, algif_backend=backend,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT, backlog=1024,
        )  # fmt: skip
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(T)
        self.port = self.server.sockets[0].getsockname()[1]

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = tuple(writer.get_extra_info("peername")[:2])
        self.live += 1
        outcome = "?"
        refused = self.admission.admit(peer[0])
        try:
            if refused is not None:
                outcome = f"refused:{refused}"
                writer.transport.abort()
                return
            try:
                while data := await asyncio.wait_for(reader.read(2**14), T):
                    writer.write(data)
                    await asyncio.wait_for(writer.drain(), T)
                outcome = "ok"
            except TimeoutError:
                outcome = "idle-timeout"
                writer.transport.abort()
            except (ConnectionError, ssl.SSLError) as exc:  # what a hostile peer causes
                outcome = f"error:{type(exc).__name__}"
            except Exception as exc:  # a bug
                outcome = f"error:{type(exc).__name__}"
                self.errors.append(f"echo handler: {exc!r}")
            finally:
                self.admission.release(peer[0])
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
        finally:
            self.outcomes[peer] = outcome
            self.live -= 1

    def idle(self) -> bool:
        return self.live == 0 and self.admission.count() == 0

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(T)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(T)
            self.loop.close()


# --- the clients ----------------------------------------------------------------------------------

CTX = {"1.3": client_context("TLSv1.3"), "1.2": client_context("TLSv1.2")}


@dataclass
class Round:
    """What one round's clients saw."""

    port: int
    rng: random.Random
    failures: list[str] = field(default_factory=list)  # honest exchanges that failed
    stuck: list[str] = field(default_factory=list)  # hostile connections the server kept
    honest_peers: list[tuple[str, int]] = field(default_factory=list)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    trickle_cut: int = 0  # trickles the server ended before the trickle was over


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a client handshake (a fresh ClientHello)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


async def raw_connect(address: str, port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        sock.setblocking(False)
        sock.bind((address, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def read_to_end(sock: socket.socket) -> None:
    """Read until the server ends the connection (EOF or reset); stuck after T."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(*ENDED):
        while await loop.sock_recv(sock, 65536):
            pass


async def tls_handshake(sock: socket.socket, ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, Any]:
    """A whole client handshake over ``sock`` with an SSLObject; returns it and its output BIO,
    so that the caller can write records (valid or not) itself."""
    loop = asyncio.get_running_loop()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        if data := outgoing.read():
            await loop.sock_sendall(sock, data)
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise EOFError("the server closed during the handshake")
        incoming.write(chunk)
    if data := outgoing.read():
        await loop.sock_sendall(sock, data)
    return obj, outgoing


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def hostile(r: Round, kind: str, address: str, seed: int) -> None:
    """One hostile connection of ``kind``; ends when the server has ended it."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    ctx = CTX[rng.choice(("1.3", "1.2"))]
    try:
        sock = await asyncio.wait_for(raw_connect(address, r.port), T)
    except ENDED:
        return  # refused at once (a full backlog): the server's right
    try:
        await asyncio.wait_for(_hostile(r, kind, sock, ctx, rng, loop), T)
    except TimeoutError:
        r.stuck.append(kind)
    except ENDED:
        pass
    finally:
        if sock.fileno() >= 0:
            sock.close()


async def _hostile(
    r: Round,
    kind: str,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    rng: random.Random,
    loop: asyncio.AbstractEventLoop,
) -> None:
    if kind in ("garbage", "fake-record", "http"):
        if kind == "garbage":
            data = rng.randbytes(rng.randint(1, 4096))
        elif kind == "fake-record":
            data = b"\x16\x03\x01" + struct.pack(">H", 2**14) + rng.randbytes(rng.randint(0, 500))
        else:
            data = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
        await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)
        await read_to_end(sock)
    elif kind in ("hello-stall", "partial-stall", "rst-early", "rst-handshake"):
        hello = client_hello(ctx)
        cut = {"hello-stall": len(hello), "rst-handshake": len(hello)}.get(
            kind, rng.randint(1, len(hello) - 1)
        )
        await loop.sock_sendall(sock, hello[:cut])
        if kind.startswith("rst-"):
            reset(sock)
        else:
            await read_to_end(sock)
    elif kind == "trickle":
        # A valid ClientHello over twice the handshake timeout, the last byte never sent: only
        # the server's absolute deadline can end it.
        hello = client_hello(ctx)[:-1]
        pieces = 20
        step = -(-len(hello) // pieces)
        for i in range(0, len(hello), step):
            try:
                await loop.sock_sendall(sock, hello[i : i + step])
            except OSError:
                r.trickle_cut += 1
                break
            await asyncio.sleep(2 * HANDSHAKE_TIMEOUT / pieces)
        await read_to_end(sock)
    else:  # after a real handshake
        try:
            obj, outgoing = await tls_handshake(sock, ctx)
        except ENDED:
            return  # refused by a cap, or dropped by the deadline on a loaded machine
        obj.write(rng.randbytes(rng.randint(1, 2000)))
        record = bytearray(outgoing.read())
        if kind == "forged-tag":
            record[-1] ^= 1 << rng.randrange(8)
        elif kind == "oversized":  # > 2^14 + 2048: too long in TLS 1.2 and 1.3
            length = rng.randint(2**14 + 2049, 2**16 - 1)
            record = bytearray(b"\x17\x03\x03" + struct.pack(">H", length))
            record += rng.randbytes(length)
        await loop.sock_sendall(sock, record)
        if kind == "rst-after":
            reset(sock)
        else:
            await read_to_end(sock)


async def honest(r: Round, index: int, seed: int) -> None:
    """An echo exchange with Python's ssl: MESSAGES messages, each echoed byte for byte."""
    rng = random.Random(seed)
    version = "1.2" if index % 4 == 3 else "1.3"
    writer = None
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", r.port, ssl=CTX[version], server_hostname="localhost",
            local_addr=(HONEST_ADDRESS, 0), ssl_handshake_timeout=T,
        )  # fmt: skip
        r.honest_peers.append(writer.get_extra_info("sockname")[:2])
        for _ in range(MESSAGES):
            message = rng.randbytes(rng.randint(1, MAX_MESSAGE))
            writer.write(message)
            await writer.drain()
            echoed = await asyncio.wait_for(reader.readexactly(len(message)), T)
            assert echoed == message, f"echo differs ({len(message)} bytes)"
    except Exception as exc:
        r.failures.append(f"honest {index} (TLS {version}): {exc!r}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), T)


async def one_round(r: Round, seed: int) -> None:
    """HOSTILE hostile and HONEST honest jobs, shuffled (the same order every round), each
    started when its class has a free slot."""
    jobs: list[tuple[str, int]] = [("honest", i) for i in range(HONEST)]
    jobs += [(KINDS[i % len(KINDS)], i) for i in range(HOSTILE)]
    random.Random(seed).shuffle(jobs)
    slots = {name: asyncio.Semaphore(n) for name, n in SLOTS.items()}
    tasks = []

    async def run(slot: asyncio.Semaphore, job: Any) -> None:
        try:
            await job
        finally:
            slot.release()

    for kind, i in jobs:
        if kind == "honest":
            name, job = "honest", honest(r, i, seed + i)
        else:
            r.kinds[kind] += 1
            name = "stall" if kind in STALLS else "handshake"
            address = HOSTILE_ADDRESSES[i % len(HOSTILE_ADDRESSES)]
            job = hostile(r, kind, address, seed + 10_000 + i)
        await slots[name].acquire()
        tasks.append(asyncio.create_task(run(slots[name], job)))
    await asyncio.gather(*tasks)


# --- the test ----------------------------------------------------------------------------------


@pytest.fixture
def many_fds():
    """Server and clients share this process: in algif mode on the kernel's AEAD a connection
    holds five descriptors at each end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16 * (MAX_CONNS + sum(SLOTS.values())) + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("kind", "mode", "backend"), TARGETS)
def test_hostile_load(kind: str, mode: str, backend: str, many_fds: None) -> None:
    target = ThreadedTarget(mode, backend) if kind == "threaded" else AioTarget(mode, backend)
    fds: list[int] = []
    rsses: list[int] = []
    seconds: list[float] = []
    try:

        def settle(what: str) -> None:
            """Wait for the server to be idle and the descriptors back to the baseline."""
            back = wait_until(lambda: target.idle() and open_fds() == baseline, T)
            now = open_fds()
            leaked = {fd: p for fd, p in now.items() if baseline.get(fd) != p}
            gone = {fd: p for fd, p in baseline.items() if now.get(fd) != p}
            assert back and target.idle(), (what, "not idle", leaked, gone)
            assert not leaked and not gone, (what, leaked, gone)
            fds.append(len(now))
            assert connection_objects() == objects, (what, connection_objects(), objects)

        def exchange(seed: int, honest_only: bool = False) -> Round:
            r = Round(target.port, random.Random(seed))
            coro = honest(r, 0, seed) if honest_only else one_round(r, seed)
            asyncio.run(asyncio.wait_for(coro, 10 * T))
            return r

        # Warm up: the first handshake creates what lives as long as the server (the server
        # context's key log, the kernel's transforms); the baseline is after it.
        first = exchange(1, honest_only=True)
        assert not first.failures, first.failures
        assert wait_until(target.idle, T)
        baseline = open_fds()
        objects = connection_objects()

        seed = 12345  # every round the same jobs, in the same order, with the same bytes
        for n in range(ROUNDS):
            started = time.monotonic()
            r = exchange(seed)
            seconds.append(time.monotonic() - started)
            assert not r.failures, (n, r.failures)
            assert not r.stuck, (n, "hostile connections the server never ended", r.stuck)
            settle(f"round {n + 1}")
            rsses.append(rss())
            honest_outcomes = [target.outcomes.get(p) for p in r.honest_peers]
            assert honest_outcomes == ["ok"] * HONEST, honest_outcomes
            assert not target.errors, target.errors
            assert sum(r.kinds.values()) == HOSTILE and set(r.kinds) == set(KINDS)

        last = exchange(2, honest_only=True)  # the server still serves
        assert not last.failures, last.failures
        settle("after the rounds")
        assert target.outcomes.get(last.honest_peers[0]) == "ok"
        assert not target.errors, target.errors
        growth = rsses[2] - rsses[1]
        summary = collections.Counter(target.outcomes.values())
        print(
            f"\nhostile load {kind}-{mode}-{backend}: {ROUNDS} rounds x ({HOSTILE} hostile + "
            f"{HONEST} honest); fds baseline {len(baseline)}, after each round {fds}; RSS MiB "
            f"{[round(x / 2**20, 1) for x in rsses]} (round 2->3: {growth / 2**20:+.2f}); "
            f"round seconds {[round(s) for s in seconds]}; trickles cut by the deadline "
            f"{r.trickle_cut}/{r.kinds['trickle']} in the last round; server outcomes "
            f"{dict(summary.most_common())}"
        )
        assert growth < RSS_GROWTH, (rsses, growth)
    finally:
        target.stop()
