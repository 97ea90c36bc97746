"""Where a small send and recv spend their time: afalg's TLS sockets against a bare socket call
and ssl.SSLSocket, per call (issue 28).

    python bench/profile_small.py                    # here (algif on cryptography without AF_ALG)
    python -m afalg vm --kernel 6.12 --cpus 1 --env AFALG_IN_VM=1 -- \\
        python bench/profile_small.py                # kTLS, algif on the kernel AEAD

Every mode runs over a loopback TCP connection inside this process, both ends in the same mode
(TLS 1.3, AES-128-GCM; the handshake is ssl's, in a thread). A call is what the example echo
server makes: the server side ``recv(16384)`` of one 1 KiB (or 64 B) record the client has just
sent, then ``sendall`` of it back; the client reads the echo. Each server call is timed with
``perf_counter`` around it; the modes take turns, ``--rounds`` times, and each round gives the
median call, so a loaded host does not decide a figure. Two socket setups: blocking, and with
a timeout (the echo server's ``settimeout(idle_timeout)``: Python polls before each call).

Then the parts of one kTLS / algif call, each timed alone (``components``), and a cProfile of
the server side's calls (``--profile``), by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import socket
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CERTS = ROOT / "tests" / "certs"
RECV = 2**14  # the echo server's recv size: one record


def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(CERTS / "server.pem", CERTS / "server.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(CERTS / "ca.pem")
    for ctx in (server, client):
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return server, client


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return server, client


@contextlib.contextmanager
def connection(mode: str, timeout: float | None) -> Iterator[tuple[Any, Any]]:
    """(server, client) over loopback TCP in ``mode``: bare, ssl, ktls, algif (the record AEAD
    the kernel's where AF_ALG has it, else cryptography)."""
    server, client = tcp_pair()
    if mode == "bare":
        pair: tuple[Any, Any] = (server, client)
    else:
        server_ctx, client_ctx = contexts()
        box: dict[str, Any] = {}

        def handshake() -> None:
            try:
                box["server"] = wrap(mode, server, server_ctx, True)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=handshake)
        t.start()
        c = wrap(mode, client, client_ctx, False)
        t.join()
        if "error" in box:
            raise box["error"]
        pair = (box["server"], c)
        # A TLS 1.3 server's NewSessionTickets: read by the client before any timing
        pair[0].sendall(b"x")
        pair[1].recv(16)
    pair[0].settimeout(timeout)
    try:
        yield pair
    finally:
        for s in pair:
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                s.close()


def wrap(mode: str, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> Any:
    name = None if server else "localhost"
    if mode == "ssl":
        return ctx.wrap_socket(sock, server_side=server, server_hostname=name)
    from afalg import tls

    return tls.wrap(sock, ctx, server_side=server, server_hostname=name, mode=mode)  # type: ignore[arg-type]


def echo_calls(pair: tuple[Any, Any], size: int, n: int) -> tuple[list[float], list[float]]:
    """``n`` echoes of ``size`` bytes; the server's recv(16384) and sendall times (us)."""
    server, client = pair
    payload = os.urandom(size)
    buf = bytearray(size)
    view = memoryview(buf)
    recv_us, send_us = [], []
    clock = time.perf_counter
    for _ in range(n):
        client.sendall(payload)
        t0 = clock()
        data = server.recv(RECV)
        t1 = clock()
        server.sendall(data)
        t2 = clock()
        got = len(data)
        assert got == size, got
        got = 0
        while got < size:
            got += client.recv_into(view[got:])
        recv_us.append((t1 - t0) * 1e6)
        send_us.append((t2 - t1) * 1e6)
    return recv_us, send_us


def modes_here() -> list[str]:
    from afalg.probe import probe

    caps = probe()
    modes = ["bare", "ssl"]
    if caps.ktls:
        modes.append("ktls")
    modes.append("algif")
    return modes


def per_call(modes: list[str], sizes: tuple[int, ...], rounds: int, n: int) -> None:
    print("## Per call (us, median of the round medians; ratio: mode / bare, mode / ssl)\n")
    for timeout in (None, 60.0):
        setup = "blocking" if timeout is None else "timeout 60 s"
        for size in sizes:
            med: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in modes}
            with contextlib.ExitStack() as stack:
                pairs = {m: stack.enter_context(connection(m, timeout)) for m in modes}
                for m in modes:
                    echo_calls(pairs[m], size, 20)  # warm-up
                for _ in range(rounds):
                    for m in modes:
                        r, s = echo_calls(pairs[m], size, n)
                        med[m][0].append(statistics.median(r))
                        med[m][1].append(statistics.median(s))
            print(f"### {size} B, {setup}\n")
            print("| mode | recv(16384) us | sendall us | recv+send us | x bare | x ssl |")
            print("|---|---|---|---|---|---|")
            tot = {m: statistics.median(med[m][0]) + statistics.median(med[m][1]) for m in modes}
            for m in modes:
                r, s = statistics.median(med[m][0]), statistics.median(med[m][1])
                print(
                    f"| {m} | {r:.1f} | {s:.1f} | {tot[m]:.1f} | "
                    f"{tot['bare'] / tot[m]:.2f}x | {tot['ssl'] / tot[m]:.2f}x |"
                )
            print()


def timed(fn: Callable[[], object], n: int) -> float:
    """Median us per call of ``fn`` over 5 batches of ``n``."""
    out = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def components(modes: list[str], n: int) -> None:
    """The parts of one afalg call, each timed alone on this machine."""
    print("## Parts of a call (us per call, each timed alone)\n")
    rows: list[tuple[str, float]] = []
    lock = threading.RLock()

    def locked() -> None:
        with lock:
            pass

    data = os.urandom(1024)
    rows.append(("RLock acquire+release (with)", timed(locked, n)))
    kib = bytearray(1024)
    rows.append(("memoryview(data).cast('B') + release", timed(lambda: _cast(data), n)))
    rows.append(("bytearray(16384)", timed(lambda: bytearray(RECV), n)))
    rows.append(("bytes(bytearray 1 KiB)", timed(lambda: bytes(kib), n)))
    rows.append(("socket.CMSG_SPACE(1)", timed(lambda: socket.CMSG_SPACE(1), n)))
    poller_sock = socket.socket()
    rows.append(("select.poll() + register + poll(0)", timed(lambda: _poll_now(poller_sock), n)))
    poller_sock.close()
    raise_cost = timed(_raise_catch, n)
    rows.append(("raise + catch an OSError subclass", raise_cost))
    from afalg.session import Session

    session = Session(0x0304, server_side=True)
    rows.append(("Session.check_send()", timed(session.check_send, n)))
    rows.append(("Session.sending_data()", timed(session.sending_data, n)))
    payload = memoryview(bytearray(1024))
    rows.append(("Session.receive(23, 1 KiB)", timed(lambda: session.receive(23, payload), n)))
    for label, timeout in (("blocking", None), ("timeout", 60.0)):
        server, client = tcp_pair()
        server.settimeout(timeout)
        buf = bytearray(RECV)

        def bare_send(s: socket.socket = server) -> None:
            s.send(data)

        def drain(c: socket.socket = client, buf: bytearray = buf) -> None:
            c.recv_into(buf)

        rows.append((f"bare send 1 KiB ({label})", _alternate(bare_send, drain, n)[0]))
        client.settimeout(timeout)

        def bare_recv(s: socket.socket = server, buf: bytearray = buf) -> None:
            s.recv_into(buf)

        def feed(c: socket.socket = client) -> None:
            c.send(data)

        rows.append((f"bare recv_into 1 KiB ({label})", _alternate(feed, bare_recv, n)[1]))
        server.close()
        client.close()
    if "ktls" in modes:
        with connection("ktls", None) as (server, client):
            raw = server._sock
            craw = client._sock
            buf = bytearray(RECV)
            anc = socket.CMSG_SPACE(1)

            def k_send(s: socket.socket = raw) -> None:
                s.send(data)

            def k_drain(c: socket.socket = craw) -> None:
                c.recv_into(buf)

            rows.append(
                ("kTLS socket.send 1 KiB (kernel seals)", _alternate(k_send, k_drain, n)[0])
            )

            def k_feed(c: socket.socket = craw) -> None:
                c.send(data)

            def k_recv_into(s: socket.socket = raw) -> None:
                s.recv_into(buf)

            def k_recvmsg(s: socket.socket = raw) -> None:
                s.recvmsg_into([buf], anc)

            rows.append(("kTLS recv_into 1 KiB (no cmsg)", _alternate(k_feed, k_recv_into, n)[1]))
            rows.append(("kTLS recvmsg_into 1 KiB, cmsg room", _alternate(k_feed, k_recvmsg, n)[1]))
            # what the kernel puts in the control buffer for an application_data record
            craw.send(data)
            _n, ancdata, _f, _a = raw.recvmsg_into([buf], anc)
            print(f"kTLS cmsg for application data: {ancdata!r}\n")
    print("| part | us |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")
    print()


def _poll_now(sock: socket.socket) -> None:
    import select

    p = select.poll()
    p.register(sock, select.POLLIN)
    p.poll(0)


def _raise_catch() -> None:
    try:
        raise BlockingIOError(11, "x")
    except BlockingIOError:
        pass


def _cast(data: bytes) -> None:
    memoryview(data).cast("B").release()


def _alternate(
    first: Callable[[], object], second: Callable[[], object], n: int
) -> tuple[float, float]:
    """Median us of ``first`` and of ``second``, called in turns ``n`` times."""
    a, b = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return statistics.median(a) * 1e6, statistics.median(b) * 1e6


def profile(modes: list[str], size: int, n: int, timeout: float | None) -> None:
    for mode in modes:
        if mode in ("bare", "ssl"):
            continue
        with connection(mode, timeout) as pair:
            echo_calls(pair, size, 20)
            server, client = pair
            payload = os.urandom(size)
            buf = bytearray(size)
            prof = cProfile.Profile()
            for _ in range(n):
                client.sendall(payload)
                prof.enable()
                data = server.recv(RECV)
                server.sendall(data)
                prof.disable()
                client.recv_into(buf)
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(22)
        print(f"## cProfile, server side, {mode}, {size} B, timeout {timeout}, {n} echoes\n")
        print("```")
        print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))
        print("```\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=300, help="echoes per mode and round")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 64])
    p.add_argument(
        "--modes", nargs="+", help="default: bare ssl [ktls] algif (bare and ssl always run)"
    )
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args()
    modes = list(dict.fromkeys(["bare", "ssl", *args.modes])) if args.modes else modes_here()
    import platform

    import afalg
    from afalg.probe import probe

    caps = probe()
    print(f"# profile_small: {platform.release()}, Python {platform.python_version()}, "
          f"AF_ALG {caps.af_alg}, kTLS {caps.ktls}, modes {' '.join(modes)}, "
          f"afalg from {Path(afalg.__file__).parent}\n")  # fmt: skip
    t0 = time.time()
    per_call(modes, tuple(args.sizes), args.rounds, args.calls)
    components(modes, 2000)
    if not args.no_profile:
        profile(modes, 1024, 2000, 60.0)
    print(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
