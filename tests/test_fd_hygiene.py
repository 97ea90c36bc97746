"""Every file descriptor afalg opens is closed exactly once, on success and on every error path.

Each test runs an open/use/close cycle of one kind of object, error paths included, a number of
times (:data:`CYCLES`: 50 in ``make test``, 10,000 in ``make stress``; the costly ones,
:data:`COSTLY_CYCLES`, 10 in the VM at smoke size; TLS jobs of two connections each,
:data:`TLS_JOBS`, 5,000 at full size) and compares this
process's open descriptors (``/proc/self/fd``) before and after: a leak of one descriptor per
cycle shows up as growth.
Double closes show up too: closing a number twice would close a descriptor another object owns,
which the ``close()`` checks catch.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from _env import IN_VM, scaled
from test_tls_helpers import client_context, server_context, tcp_pair

import afalg
from afalg import cli, handoff, tls
from afalg.alg import AEAD, HMAC, RNG, Hash, SKCipher
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import ContentType, RecordLayer

pytestmark = [pytest.mark.stress]

CYCLES = scaled(50, 10_000)
# Costly cycles (a TLS handshake, a kernel DRBG seeded, the CLI's argument parser: tenths of a
# second each under TCG): fewer in the VM at smoke size.
COSTLY_CYCLES = scaled(10 if IN_VM else 50, 10_000)
# A TLS job is two connections (an exchange, and a record that fails its tag): at full size
# 10,000 TLS socket cycles per mode.
TLS_JOBS = scaled(10 if IN_VM else 50, 5_000)


def open_fds() -> set[int]:
    gc.collect()
    return {int(name) for name in os.listdir("/proc/self/fd")}


def assert_no_leak(job: Callable[[], None], cycles: int = CYCLES) -> None:
    job()  # first run: module imports, caches, lazily opened sockets
    before = open_fds()
    for _ in range(cycles):
        job()
    leaked = open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if
                        os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


def closed_use(obj: object, *calls: Callable[[], object]) -> None:
    """Every call on a closed afalg object raises ClosedError-like errors, and close() again is
    harmless."""
    obj.close()  # type: ignore[attr-defined]
    obj.close()  # type: ignore[attr-defined]  # idempotent
    for call in calls:
        with pytest.raises((ValueError, OSError)):
            call()


# --- AF_ALG objects -------------------------------------------------------------------------


@pytest.mark.kernel
def test_hash_cycles() -> None:
    def job() -> None:
        with Hash("sha256", b"x") as h:
            c = h.copy()
            c.update(b"more")
            c.close()
            h.digest()
        closed_use(h, lambda: h.update(b"x"), h.digest, h.copy)
        with pytest.raises(TypeError):
            Hash("sha256", "text")  # type: ignore[arg-type]

    assert_no_leak(job)


@pytest.mark.kernel
def test_hmac_cycles() -> None:
    def job() -> None:
        with HMAC("sha256", b"k", b"m") as m:
            m.verify(m.digest())
            with pytest.raises(afalg.InvalidTag):
                m.verify(bytes(32))
        closed_use(m, lambda: m.update(b"x"), m.digest)

    assert_no_leak(job)


@pytest.mark.kernel
def test_skcipher_cycles() -> None:
    def job() -> None:
        with SKCipher("cbc(aes)", bytes(16), padding="pkcs7") as c:
            ct = c.encrypt(bytes(16), b"one shot")
            assert c.decrypt(bytes(16), ct) == b"one shot"
            stream = c.encryptor(bytes(16))
            ct = stream.update(b"abc") + stream.finalize()
            stream = c.decryptor(bytes(16))
            assert stream.update(ct) + stream.finalize() == b"abc"
            abandoned = c.encryptor(bytes(16))  # a stream dropped half way
            abandoned.update(b"x" * 20)
            with pytest.raises(afalg.PaddingError):
                c.decrypt(bytes(16), bytes(16))  # decrypts to bad padding
            with pytest.raises(ValueError):
                c.decrypt(bytes(16), bytes(15))  # not whole blocks
        closed_use(c, lambda: c.encrypt(bytes(16), b"x"), lambda: c.encryptor(bytes(16)))
        with pytest.raises(ValueError):
            SKCipher("cbc(aes)", bytes(15))  # bad key size
        with SKCipher("ctr(aes)", bytes(32)) as ctr:
            assert len(ctr.encrypt(bytes(16), b"stream")) == 6

    assert_no_leak(job)


@pytest.mark.kernel
def test_aead_cycles() -> None:
    def job() -> None:
        with AEAD("gcm(aes)", bytes(16)) as a:
            sealed = a.encrypt(bytes(12), b"p", b"aad")
            assert a.decrypt(bytes(12), sealed, b"aad") == b"p"
            with pytest.raises(afalg.InvalidTag):
                a.decrypt(bytes(12), sealed[:-1] + bytes([sealed[-1] ^ 1]), b"aad")
            with pytest.raises(afalg.InvalidTag):
                a.decrypt(bytes(12), bytes(5))  # shorter than the tag
        closed_use(a, lambda: a.encrypt(bytes(12), b"p"), lambda: a.decrypt(bytes(12), sealed))
        with pytest.raises(ValueError):
            AEAD("gcm(aes)", bytes(15))  # bad key size

    assert_no_leak(job)


@pytest.mark.kernel
def test_unknown_algorithms_leak_nothing() -> None:
    """bind() of an unknown algorithm: each one makes the kernel try to load a module
    (request_module), seconds under TCG, hence fewer cycles."""

    def job() -> None:
        for make in (lambda: Hash("no-such-hash"), lambda: HMAC("no-such-hash", b"k"),
                     lambda: AEAD("gcm(no-such-cipher)", bytes(16))):  # fmt: skip
            with pytest.raises(afalg.AlgorithmNotAvailable):
                make()

    assert_no_leak(job, scaled(3, 100))


@pytest.mark.kernel
def test_rng_cycles() -> None:
    def job() -> None:
        with RNG() as r:
            assert len(r.read(8)) == 8
        closed_use(r, lambda: r.read(8))

    assert_no_leak(job, COSTLY_CYCLES)


@pytest.mark.kernel
def test_record_layer_kernel_backend_cycles() -> None:
    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))

    def job() -> None:
        with (
            RecordLayer(tx=keys, backend="kernel") as tx,
            RecordLayer(rx=keys, backend="kernel") as rx,
        ):
            rx.feed(tx.seal(ContentType.application_data, b"data"))
            assert rx.next_record() == (ContentType.application_data, b"data")
            wire = bytearray(tx.seal(ContentType.application_data, b"data"))
            wire[-1] ^= 1
            rx.feed(bytes(wire))
            with pytest.raises(afalg.TLSProtocolError):  # failed tag: poisoned
                rx.next_record()
            tx.rekey_tx()
        closed_use(tx, lambda: tx.seal(ContentType.application_data, b"x"))
        with pytest.raises(TypeError):
            RecordLayer(tx=keys, rx=b"not keys", backend="kernel")  # type: ignore[arg-type]

    assert_no_leak(job)


@pytest.mark.kernel
def test_cli_hash_cycles(tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(b"abc" * 1000)
    missing = str(tmp_path / "missing")

    def job() -> None:
        out, err = io.TextIOWrapper(io.BytesIO()), io.TextIOWrapper(io.BytesIO())
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert cli.main(["hash", "sha256", str(path)]) == 0
            assert cli.main(["hash", "sha256", missing]) == 1
            assert cli.main(["hash", "sha256", "--check", str(path)]) == 1  # not a listing

    assert_no_leak(job, COSTLY_CYCLES)


# --- TLS sockets --------------------------------------------------------------------------


def _serve(ssock: socket.socket, sctx: ssl.SSLContext, garbage: bool) -> threading.Thread:
    """A Python ssl server on ``ssock``: reads 4 bytes and echoes them, or, if ``garbage``,
    sends a record that cannot authenticate (on the raw socket, after the handshake)."""

    def run() -> None:
        with sctx.wrap_socket(ssock, server_side=True) as peer:
            if garbage:
                socket.socket.sendall(peer, b"\x17\x03\x03\x00\x20" + bytes(32))
                with contextlib.suppress(OSError):
                    peer.recv(1)  # until our side closes
            else:
                peer.sendall(peer.recv(4))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["ktls", "algif"])
def test_tls_socket_cycles(mode: str) -> None:
    """KTLSSocket and AlgTLSSocket: an exchange, a record that fails its tag, use after
    close."""
    sctx, cctx = server_context("TLSv1.3", None), client_context("TLSv1.3", None)

    def job() -> None:
        for garbage in (False, True):
            csock, ssock = tcp_pair()
            thread = _serve(ssock, sctx, garbage)
            with tls.wrap(csock, cctx, server_hostname="localhost", mode=mode) as conn:
                assert conn.mode == mode
                if garbage:
                    with pytest.raises(afalg.TLSProtocolError):
                        conn.recv(10)
                else:
                    conn.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
            thread.join(60)
            with pytest.raises((ValueError, OSError)):
                conn.sendall(b"after close")

    assert_no_leak(job, TLS_JOBS)


@pytest.mark.kernel
@pytest.mark.kernel_independent  # the handshake fails before any key reaches the kernel
@pytest.mark.parametrize("mode", ["ktls", "algif"])
def test_failed_handshake_closes_the_socket(mode: str) -> None:
    cctx = client_context("TLSv1.3", None)

    def job() -> None:
        csock, ssock = tcp_pair()
        ssock.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(64))
        ssock.shutdown(socket.SHUT_WR)
        with pytest.raises((ssl.SSLError, OSError)):
            tls.wrap(csock, cctx, server_hostname="localhost", mode=mode)
        assert csock.fileno() == -1, "wrap() owns the socket and closes it on failure"
        ssock.close()

    assert_no_leak(job, COSTLY_CYCLES)


def test_algif_cryptography_socket_cycles() -> None:
    """AlgTLSSocket on the cryptography backend (no kernel), and a refused handshake."""
    sctx, cctx = server_context("TLSv1.3", None), client_context("TLSv1.3", None)
    wrong_name = client_context("TLSv1.3", None)

    def job() -> None:
        csock, ssock = tcp_pair()
        thread = _serve(ssock, sctx, garbage=False)
        with tls.wrap(
            csock, cctx, server_hostname="localhost", mode="algif", algif_backend="cryptography"
        ) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        thread.join(60)
        csock, ssock = tcp_pair()
        peer = threading.Thread(target=_refused_peer, args=(sctx, ssock), daemon=True)
        peer.start()
        with pytest.raises(ssl.SSLCertVerificationError):  # the handshake is refused
            tls.wrap(csock, wrong_name, server_hostname="not-the-name", mode="algif",
                     algif_backend="cryptography")  # fmt: skip
        peer.join(60)
        ssock.close()

    assert_no_leak(job, TLS_JOBS)


def _refused_peer(sctx: ssl.SSLContext, ssock: socket.socket) -> None:
    with contextlib.suppress(ssl.SSLError, OSError):  # the client refuses the certificate
        sctx.wrap_socket(ssock, server_side=True).close()


def test_abandoned_handshakes_leave_nothing() -> None:
    """handoff.Handshake abandoned midway (after the ClientHello, after the server's flight),
    and one that fails: no descriptor, and no pending secret, is left."""
    sctx, cctx = server_context("TLSv1.3", None), client_context("TLSv1.3", None)

    def job() -> None:
        client = handoff.Handshake(cctx, server_hostname="localhost")
        server = handoff.Handshake(sctx, server_side=True)
        hello = client.data_to_send()
        server.receive(hello[:5])
        server.receive(hello[5:])
        flight = server.data_to_send()
        client.receive(flight[:5])  # a record header, then abandoned
        client.close()
        server.close()
        failing = handoff.Handshake(sctx, server_side=True)
        with pytest.raises(ssl.SSLError):
            failing.receive(b"GET /")
        failing.close()
        assert not handoff.keylog_for(cctx)._expected and not handoff.keylog_for(sctx)._expected

    assert_no_leak(job)


def test_contexts_key_logs_are_closed_with_the_context() -> None:
    """A context's key log memfd goes with the context."""

    def job() -> None:
        ctx = client_context("TLSv1.3", None)
        handoff.Handshake(ctx, server_hostname="localhost").close()
        del ctx

    assert_no_leak(job)
