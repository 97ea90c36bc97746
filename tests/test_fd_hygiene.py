"""Every file descriptor afalg opens is closed exactly once, on success and on every error path.

Each test runs a job a number of times and compares this process's open descriptors before and
after: a leak of one descriptor per run shows up as growth. Double closes show up too: closing a
number twice would close a descriptor another object owns, which the ``close()`` checks catch.
"""

from __future__ import annotations

import gc
import os
import socket
import ssl
import threading
from collections.abc import Callable

import pytest
from _env import scaled
from test_tls_helpers import client_context, server_context, tcp_pair

import afalg
from afalg import tls
from afalg.alg import AEAD, HMAC, RNG, Hash, SKCipher
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import ContentType, RecordLayer

pytestmark = [pytest.mark.kernel, pytest.mark.stress]

RUNS = scaled(3, 200)  # a soak at full size (make stress): a slow leak shows up as growth too


def open_fds() -> set[int]:
    gc.collect()
    return {int(name) for name in os.listdir("/proc/self/fd")}


def assert_no_leak(job: Callable[[], None]) -> None:
    job()  # first run: module imports, caches, lazily opened sockets
    before = open_fds()
    for _ in range(RUNS):
        job()
    leaked = open_fds() - before
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if
                        os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


def test_alg_objects_close_their_sockets() -> None:
    def job() -> None:
        with Hash("sha256", b"x") as h:
            h.copy().close()
            h.digest()
        with HMAC("sha256", b"k", b"m") as m:
            m.verify(m.digest())
        with AEAD("gcm(aes)", bytes(16)) as a:
            a.decrypt(bytes(12), a.encrypt(bytes(12), b"p"))
        with SKCipher("cbc(aes)", bytes(16), padding="pkcs7") as c:
            stream = c.encryptor(bytes(16))
            stream.update(b"abc")
            stream.finalize()
        with RNG() as r:
            r.read(8)

    assert_no_leak(job)


def test_alg_error_paths_leak_nothing() -> None:
    def job() -> None:
        with pytest.raises(afalg.AlgorithmNotAvailable):
            Hash("no-such-hash")
        with pytest.raises(ValueError):
            AEAD("gcm(aes)", bytes(15))
        with AEAD("gcm(aes)", bytes(16)) as a, pytest.raises(afalg.InvalidTag):
            a.decrypt(bytes(12), bytes(20))
        h = Hash("sha256")
        h.close()
        h.close()  # idempotent
        with pytest.raises((ValueError, OSError)):
            h.update(b"after close")

    assert_no_leak(job)


def test_record_layer_kernel_backend_closes_its_aeads() -> None:
    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))

    def job() -> None:
        with RecordLayer(tx=keys, backend="kernel") as tx, RecordLayer(rx=keys) as rx:
            wire = bytearray(tx.seal(ContentType.application_data, b"data"))
            wire[-1] ^= 1
            rx.feed(bytes(wire))
            with pytest.raises(afalg.TLSProtocolError):
                rx.next_record()
            tx.rekey_tx()

    assert_no_leak(job)


@pytest.mark.parametrize("mode", ["ktls", "algif"])
def test_tls_connections_close_everything(mode: str) -> None:
    sctx, cctx = server_context("TLSv1.3", None), client_context("TLSv1.3", None)

    def job() -> None:
        csock, ssock = tcp_pair()
        peer = sctx.wrap_socket(ssock, server_side=True, do_handshake_on_connect=False)
        thread = threading.Thread(target=peer.do_handshake)
        thread.start()
        with tls.wrap(csock, cctx, server_hostname="localhost", mode=mode) as conn:
            thread.join()
            conn.sendall(b"ping")
            assert peer.recv(4) == b"ping"
        peer.close()

    assert_no_leak(job)


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

    assert_no_leak(job)
