"""The example echo/file server (examples/tls_echo_server.py) and its client.

Every behaviour runs in each mode: ``userspace`` (plain ``ssl``, the reference; runs on the host)
and ``ktls``/``algif`` (kernel-marked, the VM). The server runs in a thread of this process on
loopback; the client is the example client's own functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import tls_echo_client as client
import tls_echo_server as server
from _env import CERTS, IN_VM, ROOT, SERVER_MODES, SLOW, scaled

# A handshake through afalg.tls.wrap takes seconds under TCG (and the CPUs are shared).
HANDSHAKE_TIMEOUT = 15.0 if IN_VM else 1.0


class Running:
    """An EchoServer in a thread; ``finished(n)`` waits for n connection log lines."""

    def __init__(self, mode: str, serve_dir: str | None = None, **kwargs) -> None:
        ctx = server.server_context(str(CERTS / "server.pem"), str(CERTS / "server.key"))
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.server = server.EchoServer(listener, ctx, mode=mode, serve_dir=serve_dir, **kwargs)
        self.port = self.server.address[1]
        self.closed: list[server.Connection] = []
        self._cond = threading.Condition()
        self.server.on_close = self._on_close
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _on_close(self, conn: server.Connection) -> None:
        with self._cond:
            self.closed.append(conn)
            self._cond.notify_all()

    def finished(self, n: int, timeout: float = 10 * SLOW) -> list[server.Connection]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.closed) >= n, timeout), self.closed
            return list(self.closed)

    def stop(self) -> None:
        self.server.stop()
        assert self.server.wait_stopped(10 * SLOW)


@pytest.fixture(params=SERVER_MODES)
def mode(request):
    return request.param


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "small.txt").write_bytes(b"hello over TLS\n")
    (root / "big.bin").write_bytes(os.urandom(3 * 2**20 + 123))
    (root / "sub").mkdir()
    (root / "sub" / "empty").write_bytes(b"")
    (tmp_path / "secret.txt").write_bytes(b"outside the served directory")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    return root


@pytest.fixture
def running(mode, files):
    srv = Running(mode, serve_dir=str(files), handshake_timeout=HANDSHAKE_TIMEOUT)
    yield srv
    srv.stop()


def ctx(**kwargs) -> ssl.SSLContext:
    return client.client_context(cafile=str(CERTS / "ca.pem"), **kwargs)


def connect(running: Running, **kwargs):
    return client.connect(
        "127.0.0.1",
        running.port,
        ctx(**kwargs),
        mode="userspace",
        server_hostname="localhost",
        timeout=20 * SLOW,
    )


@pytest.mark.parametrize("size", [1, 2**14, 100_000])
def test_echo_round_trip(running, mode, size):
    data = os.urandom(size)
    result = client.Result(0)
    with connect(running) as tls:
        client.echo(tls, data, result)
    assert result.received == size
    (conn,) = running.finished(1)
    assert (conn.outcome, conn.mode, conn.bytes_in, conn.bytes_out) == ("ok", mode, size, size)
    assert conn.version == "TLSv1.3"


@pytest.mark.parametrize(
    "suite", ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"]
)
def test_echo_tls12(running, suite):
    result = client.Result(0)
    with connect(running, tls_version="1.2", ciphers=suite) as tls:
        assert tls.cipher()[0] == suite
        client.echo(tls, b"x" * 40000, result)
    (conn,) = running.finished(1)
    assert (conn.outcome, conn.version, conn.suite) == ("ok", "TLSv1.2", suite)


def test_each_read_is_echoed_in_one_record(running):
    """Three sends, three reads, three echoed records of the same sizes."""
    with connect(running) as tls:
        for size in (1, 300, 2**14):
            tls.sendall(b"r" * size)
            got = b""
            while len(got) < size:
                got += tls.recv(2**15)
            assert got == b"r" * size
    assert running.finished(1)[0].bytes_out == 1 + 300 + 2**14


@pytest.mark.stress
def test_concurrent_clients(running):
    n = scaled(6, 64)
    results = [client.Result(i) for i in range(n)]

    def one(i: int) -> None:
        with connect(running) as tls:
            client.echo(tls, os.urandom(50_000 + i), results[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60 * SLOW)
    assert [r.received for r in results] == [50_000 + i for i in range(n)]
    assert sorted(c.outcome for c in running.finished(n)) == ["ok"] * n


@pytest.mark.parametrize("path", ["/big.bin", "/small.txt", "/sub/empty"])
def test_get_file(running, files, path):
    result = client.Result(0)
    with connect(running) as tls:
        client.get(tls, path, result)
    assert result.status == 200
    assert (
        hashlib.sha256(result.body).digest()
        == hashlib.sha256((files / path.lstrip("/")).read_bytes()).digest()
    )
    (conn,) = running.finished(1)
    assert conn.outcome == "served"


# Mode-independent (the server's own request handling): the reference mode is enough.
@pytest.mark.parametrize("mode", ["userspace"])
@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/sub/../../secret.txt",
        "/link",
        "/sub",
        "/missing",
        "//etc/passwd",
        "/%00",
    ],
)
def test_get_cannot_escape_the_directory(running, path):
    result = client.Result(0)
    with connect(running) as tls:
        client.get(tls, path, result)
    assert result.status == 404 and result.body == b""


@pytest.mark.parametrize("mode", ["userspace"])
def test_get_with_http_headers(running, files):
    """curl-style request: request line, headers, empty line."""
    with connect(running) as tls:
        tls.sendall(b"GET /small.txt HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n")
        response = b""
        while more := tls.recv(4096):
            response += more
    assert response.startswith(b"HTTP/1.0 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nhello over TLS\n")


def test_slow_client_costs_only_its_connection(running):
    """A client that never finishes its handshake (it trickles bytes) is cut off at the
    handshake deadline; an honest client is served meanwhile."""
    slow = socket.create_connection(("127.0.0.1", running.port))
    stop = threading.Event()

    def trickle() -> None:
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100
        for byte in hello:
            if stop.wait(HANDSHAKE_TIMEOUT / 10):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    result = client.Result(0)
    with connect(running) as tls:
        client.echo(tls, b"honest", result)
    conns = running.finished(2, timeout=3 * HANDSHAKE_TIMEOUT + 10 * SLOW)
    stop.set()
    slow.close()
    outcomes = sorted(c.outcome for c in conns)
    assert outcomes == ["handshake-timeout", "ok"]


# A ClientHello record whose handshake message is garbage: ssl answers with a fatal alert.
BAD_HELLO = b"\x16\x03\x01\x00\x20" + b"\x01\x00\x00\x1c" + b"\xff" * 28


@pytest.mark.parametrize(
    "garbage",
    [BAD_HELLO, b"GET / HTTP/1.0\r\n\r\n" + b"\x00" * 100],
    ids=["bad-client-hello", "not-tls"],
)
def test_garbage_instead_of_client_hello(running, mode, garbage):
    """The handshake fails (with an alert from ssl where TLS allows one: a plain-text request is
    not answered in TLS); the server closes that connection gently (alert, then EOF, no
    reset) and keeps serving."""
    raw = socket.create_connection(("127.0.0.1", running.port), timeout=10 * SLOW)
    raw.sendall(garbage)
    received = b""
    while more := raw.recv(4096):  # a reset would raise ConnectionResetError here
        received += more
    raw.close()
    if garbage is BAD_HELLO:
        assert received[:1] == b"\x15" and received[1:3] in (b"\x03\x01", b"\x03\x03")
        assert received[5] == 2  # fatal
    result = client.Result(0)
    with connect(running) as tls:
        client.echo(tls, b"still serving", result)
    outcomes = sorted(c.outcome for c in running.finished(2))
    assert outcomes[0].startswith("handshake-failed:") and outcomes[1] == "ok"


def test_connection_cap(mode):
    srv = Running(mode, max_conns=2, handshake_timeout=5.0 * HANDSHAKE_TIMEOUT)
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        deadline = time.monotonic() + 10 * SLOW
        while len(srv.server.connections) < 2:  # the server has taken both: the cap is reached
            assert time.monotonic() < deadline, srv.server.connections
            time.sleep(0.01)
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=10 * SLOW)
        assert extra.recv(1) == b""  # accepted and closed at once
        extra.close()
        (refused,) = srv.finished(1)
        assert refused.outcome == "refused:connection-cap"
        for s in held:
            s.close()
        srv.finished(3)
        result = client.Result(0)
        with connect(srv) as tls:  # slots free again
            client.echo(tls, b"after the cap", result)
        assert srv.server.totals["refused"] == 1
    finally:
        srv.stop()


def test_stop_with_idle_client(mode):
    srv = Running(mode, grace=0.2)
    tls = connect(srv)
    client.echo(tls, b"before stop", client.Result(0))
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 5 * SLOW
    print(srv.finished(1)[0].log_line())
    with contextlib.suppress(OSError):  # or a reset / ragged EOF error, depending on the mode
        assert tls.recv(100) == b""  # the server shut the connection down
    tls.close()


# --- slow clients, per-address cap, files that are not what they seemed -----------------------


@pytest.mark.parametrize("mode", ["userspace"])
def test_request_deadline_cuts_a_trickled_request(mode, files):
    """A GET whose headers trickle in, each byte well inside the idle timeout, is shut down at
    the request deadline (before: only the idle timeout applied, so it never ended); an honest
    client is served meanwhile."""
    request_timeout = 2 * HANDSHAKE_TIMEOUT
    srv = Running(
        mode,
        serve_dir=str(files),
        handshake_timeout=HANDSHAKE_TIMEOUT * 5,
        request_timeout=request_timeout,
        idle_timeout=60 * SLOW,
    )
    stop = threading.Event()
    try:
        slow = connect(srv)
        slow.sendall(b"GET /small.txt HTTP/1.1\r\nX-Slow: ")

        def trickle() -> None:
            while not stop.wait(request_timeout / 8):
                try:
                    slow.sendall(b"a")
                except (OSError, ValueError):
                    return

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        result = client.Result(0)
        with connect(srv) as tls:
            client.echo(tls, b"honest", result)
        conns = srv.finished(2, timeout=request_timeout + 30 * SLOW)
        assert sorted(c.outcome for c in conns) == ["ok", "request-timeout"]
        stop.set()
        t.join(10 * SLOW)
        slow.close()
    finally:
        stop.set()
        srv.stop()


@pytest.mark.parametrize("mode", ["userspace"])
def test_per_address_cap(mode):
    """One address holding its share of connections cannot take more; another address still
    gets in (before: only the global cap, so one address could hold every slot)."""
    srv = Running(
        mode, max_conns=10, max_conns_per_address=2, handshake_timeout=5.0 * HANDSHAKE_TIMEOUT
    )
    try:
        held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]
        deadline = time.monotonic() + 10 * SLOW
        while len(srv.server.connections) < 2:  # the server has taken both
            assert time.monotonic() < deadline, srv.server.connections
            time.sleep(0.01)
        extra = socket.create_connection(("127.0.0.1", srv.port), timeout=10 * SLOW)
        assert extra.recv(1) == b""  # accepted and closed at once
        extra.close()
        (refused,) = srv.finished(1)
        assert refused.outcome == "refused:address-cap"
        other = socket.create_connection(
            ("127.0.0.1", srv.port), timeout=20 * SLOW, source_address=("127.0.0.2", 0)
        )
        tls = client.client_context(cafile=str(CERTS / "ca.pem")).wrap_socket(
            other, server_hostname="localhost"
        )
        with tls:
            result = client.Result(0)
            client.echo(tls, b"from another address", result)
        assert srv.server.admission.count("127.0.0.2") in (0, 1)
        for s in held:
            s.close()
        srv.finished(4)
        assert srv.server.totals["refused"] == 1
        assert srv.server.admission.count() == 0  # every slot released
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", ["userspace"])
def test_fifo_in_place_of_a_checked_file_does_not_block(running, files):
    """A FIFO where a request's file is (or is swapped in after any check): the server opens
    it ``O_NONBLOCK`` (no writer: a blocking open would hang the server here), finds from the
    opened descriptor that it is not a regular file, answers 404 and goes on serving."""
    fifo = files / "fifo"
    os.mkfifo(fifo)
    try:
        result = client.Result(0)
        with connect(running) as tls:
            tls.settimeout(10 * SLOW)
            client.get(tls, "/fifo", result)
        assert result.status == 404 and result.body == b""
        result = client.Result(1)
        with connect(running) as tls:
            client.get(tls, "/small.txt", result)
        assert result.status == 200
    finally:  # a reader blocked on the FIFO (the bug) is let go
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


@pytest.mark.parametrize("mode", ["userspace"])
def test_unreadable_file_gets_an_http_error_status(running, files, monkeypatch):
    """A file the server may not open gets ``403 Forbidden`` (before: the connection was closed
    without a response). As root, permission bits do not stop the server: open() is made to
    fail with EACCES for that file instead."""
    locked = files / "locked.txt"
    locked.write_bytes(b"not for you")
    if os.geteuid() == 0:
        import builtins

        def denied(path) -> bool:
            return os.path.basename(os.fsdecode(path)) == "locked.txt"

        real_open, real_os_open = builtins.open, os.open

        def fake_open(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and denied(file):
                raise PermissionError(13, "Permission denied", os.fsdecode(file))
            return real_open(file, *args, **kwargs)

        def fake_os_open(path, *args, **kwargs):
            if denied(path):
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return real_os_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
    else:
        locked.chmod(0)
    result = client.Result(0)
    with connect(running) as tls:
        client.get(tls, "/locked.txt", result)
    assert result.status == 403 and result.body == b""
    (conn,) = running.finished(1)
    assert conn.outcome == "http-403"


def test_command_line_sigterm(tmp_path):
    """The real program: throwaway certificate, one echo, SIGTERM, summary, exit 0."""
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "tls_echo_server.py"),
            "--port",
            "0",
            "--mode",
            "userspace",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text().endswith("\n"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        port = int(ready.read_text().split()[1])
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "tls_echo_client.py"),
                "--port",
                str(port),
                "--mode",
                "userspace",
                "--send",
                "100k",
                "--connections",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "client summary: 3/3 connections ok" in out.stdout
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "server summary: mode=userspace connections=3 ok=3" in stdout
    assert stderr.count(" outcome=ok") == 3


# --- KeyUpdates from the client (TLS 1.3) ---------------------------------------------------------

KERNEL_MODES = [p for p in SERVER_MODES if p.values[0] != "userspace"]


def _algif_client(running: Running):
    """afalg's algif socket on the cryptography backend: it can send KeyUpdates (and raw
    records) that Python's ssl cannot."""
    from afalg import tls as afalg_tls

    raw = socket.create_connection(("127.0.0.1", running.port), timeout=20 * SLOW)
    return afalg_tls.wrap(raw, ctx(tls_version="1.3"), server_hostname="localhost",
                          mode="algif", algif_backend="cryptography")  # fmt: skip


def _echo(conn, data: bytes) -> None:
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        more = conn.recv(len(data) - len(got))
        assert more, f"EOF after {len(got)} of {len(data)} bytes"
        got += more
    assert got == data


def _server_can_follow(mode: str) -> bool:
    from afalg.ktls import supports_rekey

    return mode == "algif" or supports_rekey()


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_client_key_updates(mode):
    """A client sends KeyUpdates, requested and not, one at a time and ten in a row, each
    followed by an echo checked byte for byte; the server follows (and answers the requests
    before its next echo). Under kTLS the kernel counts every rekey. Where kTLS cannot rekey
    (Linux < 6.14) the server ends the connection with internal_error instead."""
    from afalg.errors import TLSAlertReceived
    from afalg.ktls import tls_stats

    running = Running(mode, handshake_timeout=HANDSHAKE_TIMEOUT)
    try:
        can = _server_can_follow(mode)
        with _algif_client(running) as conn:
            _echo(conn, b"before")
            before = tls_stats()
            if not can:
                conn.key_update()
                with pytest.raises(TLSAlertReceived, match="internal_error"):
                    conn.recv(10)
            else:
                for i in range(6):
                    conn.key_update(request_peer=bool(i % 2))
                    _echo(conn, os.urandom(1000 + i))
                for _ in range(10):
                    conn.key_update()
                _echo(conn, os.urandom(3 * 2**14))
                # data, KeyUpdate, data in one write: the server's read of the first data
                # takes the KeyUpdate along inside the kernel (the bug seen on 7.3)
                layer = conn.record_layer
                wire = layer.seal(23, b"a" * 100) + layer.seal(22, b"\x18\x00\x00\x01\x00")
                layer.rekey_tx()
                conn._sock.sendall(wire + layer.seal(23, b"b" * 100))
                got = b""
                while len(got) < 200:
                    more = conn.recv(200 - len(got))
                    assert more
                    got += more
                assert got == b"a" * 100 + b"b" * 100
        (record,) = running.finished(1)
        if not can:
            assert record.outcome == "alert:internal_error"
            return
        assert record.outcome == "ok" and record.mode == mode
        if mode == "ktls":
            after = tls_stats()
            delta = {k: after[k] - before[k] for k in ("TlsRxRekeyReceived", "TlsRxRekeyOk",
                                                       "TlsTxRekeyOk", "TlsRxRekeyError",
                                                       "TlsTxRekeyError")}  # fmt: skip
            assert delta == {"TlsRxRekeyReceived": 17, "TlsRxRekeyOk": 17, "TlsTxRekeyOk": 3,
                             "TlsRxRekeyError": 0, "TlsTxRekeyError": 0}  # fmt: skip
    finally:
        running.stop()


# (KeyUpdate records as sent, expected server outcome where it can follow, client key change)
KEY_UPDATE_CASES = {
    "fragmented": ([b"\x18", b"\x00\x00\x01\x00"], "ok", True),
    "requested-fragmented": ([b"\x18\x00\x00", b"\x01\x01"], "ok", True),
    "bad-value": ([b"\x18\x00\x00\x01\x02"], "alert:illegal_parameter", False),
    "long": ([b"\x18\x00\x00\x02\x00\x00"], "alert:decode_error", False),
    "truncated": ([b"\x18\x00\x00\x05\x00"], "alert:decode_error", False),
    "two-in-a-record": ([b"\x18\x00\x00\x01\x00" * 2], "alert:unexpected_message", False),
}


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_odd_and_malformed_key_updates(mode):
    """KeyUpdates spread over records (legal: the server follows) and malformed ones (each
    ends its connection with the right alert, never a bare OSError such as EKEYEXPIRED);
    the server keeps serving."""
    from afalg.errors import TLSAlertReceived

    running = Running(mode, handshake_timeout=HANDSHAKE_TIMEOUT)
    try:
        can = _server_can_follow(mode)
        ports = {}
        for name, (pieces, outcome, legal) in KEY_UPDATE_CASES.items():
            with _algif_client(running) as conn:
                ports[conn.getsockname()[1]] = name
                _echo(conn, b"before")
                layer = conn.record_layer
                conn._sock.sendall(b"".join(layer.seal(22, piece) for piece in pieces))
                if legal:
                    layer.rekey_tx()
                if legal and can:
                    _echo(conn, b"under the next keys")  # (after the server's answer, if asked)
                else:
                    alert = outcome.split(":")[1] if not legal else "internal_error"
                    with pytest.raises(TLSAlertReceived, match=alert):
                        while conn.recv(100):
                            pass
        with _algif_client(running) as conn:
            _echo(conn, b"still serving")
        records = running.finished(len(KEY_UPDATE_CASES) + 1)
        got = {ports[r.peer[1]]: r.outcome for r in records if r.peer[1] in ports}
        want = {
            name: "alert:internal_error" if legal and not can else outcome
            for name, (_pieces, outcome, legal) in KEY_UPDATE_CASES.items()
        }
        assert got == want
    finally:
        running.stop()


@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_example_client_key_update_against_the_server(mode):
    """Both examples in the same mode, the client with --key-update: every echoed record under
    new keys both ways. kTLS before Linux 6.14 refuses the first KeyUpdate by name."""
    from afalg.errors import KeyUpdateUnsupported

    running = Running(mode, handshake_timeout=HANDSHAKE_TIMEOUT)
    try:
        data = os.urandom(5 * 2**14 + 3)
        result = client.Result(0)
        tls = client.connect("127.0.0.1", running.port, ctx(tls_version="1.3"), mode=mode,
                             server_hostname="localhost", timeout=20 * SLOW)  # fmt: skip
        with tls:
            if not _server_can_follow(mode):
                with pytest.raises(KeyUpdateUnsupported, match=r"6\.14"):
                    client.echo(tls, data, result, key_update=True)
                client.echo(tls, data, result)  # nothing was sent: the connection goes on
            else:
                client.echo(tls, data, result, key_update=True)
        assert result.received == len(data)
        (record,) = running.finished(1)
        assert (record.outcome, record.mode) == ("ok", mode)
    finally:
        running.stop()
