"""The thread and fork() claims of README.md ("Threads and fork()") and SECURITY.md, one test
each. The key log's memfd per process after fork() is tested in tests/test_handoff.py
(test_pre_fork_server_works_in_every_worker) and not again here."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import pytest
from _env import scaled
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from test_tls_helpers import Bg, connect, recv_exactly

from afalg.alg import AEAD, RNG, Hash, SKCipher

THREADS = 8
ROUNDS = scaled(20, 2_000)


def in_threads(work: Callable[[int], None]) -> None:
    """``work(i)`` in THREADS threads started together; re-raises the first failure."""
    start = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            start.wait(60)
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


def in_child(work: Callable[[], bytes]) -> bytes:
    """What ``work()`` returns in a forked child (through a pipe); the child exits at once."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.write(w, work())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        out = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out


# --- threads ------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_one_aead_shared_by_8_threads() -> None:
    """AEAD (and SKCipher) calls may run at once from many threads on one object."""
    key = bytes(range(16))
    reference = AESGCM(key)
    with AEAD("gcm(aes)", key) as aead:

        def work(i: int) -> None:
            for n in range(ROUNDS):
                nonce = i.to_bytes(4, "big") + n.to_bytes(8, "big")
                data = bytes([i]) * (n * 37 % 3000)
                sealed = aead.encrypt(nonce, data, b"aad")
                assert sealed == reference.encrypt(nonce, data, b"aad")
                assert aead.decrypt(nonce, sealed, b"aad") == data

        in_threads(work)


@pytest.mark.kernel
def test_one_skcipher_shared_by_8_threads() -> None:
    with SKCipher("cbc(aes)", bytes(32), padding="pkcs7") as cipher:

        def work(i: int) -> None:
            for n in range(ROUNDS):
                data = bytes([i]) * (n % 100)
                assert cipher.decrypt(bytes(16), cipher.encrypt(bytes(16), data)) == data

        in_threads(work)


@pytest.mark.kernel
def test_one_rng_shared_by_8_threads() -> None:
    """RNG reads are serialized; no two threads get the same bytes."""
    seen: list[bytes] = []
    with RNG() as rng:
        in_threads(lambda i: seen.extend(rng.read(32) for _ in range(ROUNDS)))
    assert len(set(seen)) == len(seen) == THREADS * ROUNDS


@pytest.mark.kernel
def test_hash_copies_per_thread() -> None:
    """A Hash is one running state: each thread takes its own copy()."""
    with Hash("sha256", b"prefix") as base:

        def work(i: int) -> None:
            with base.copy() as h:
                for _ in range(ROUNDS):
                    h.update(bytes([i]) * 100)
                assert h.digest() == hashlib.sha256(b"prefix" + bytes([i]) * 100 * ROUNDS).digest()

        in_threads(work)
        assert base.digest() == hashlib.sha256(b"prefix").digest()


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(("ktls", "kernel"), marks=pytest.mark.kernel, id="ktls"),
        pytest.param(("algif", "kernel"), marks=pytest.mark.kernel, id="algif"),
        pytest.param(("algif", "cryptography"), id="algif-host"),
    ],
)
def test_tls_socket_sends_in_one_thread_while_another_receives(mode: tuple[str, str]) -> None:
    """One thread may send while another receives on one afalg TLS socket (as with ssl)."""
    ours, theirs = connect(mode, "client")
    count, size = ROUNDS, 3000
    with ours, theirs:
        echo = Bg(lambda: [theirs.sendall(recv_exactly(theirs, size)) for _ in range(count)])
        received = Bg(lambda: [recv_exactly(ours, size) for _ in range(count)])
        for n in range(count):
            ours.sendall(bytes([n % 256]) * size)
        assert received.result() == [bytes([n % 256]) * size for n in range(count)]
        echo.result()


# --- fork() ------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_hash_continues_in_the_child() -> None:
    """A Hash made before fork() goes on in the child; the parent's is left alone as long as
    only one process uses it (the kernel state behind the descriptor is shared): the child
    works on a copy()."""
    with Hash("sha256", b"ab") as h:

        def child() -> bytes:
            with h.copy() as mine:
                mine.update(b"c")
                return mine.digest()

        assert in_child(child) == hashlib.sha256(b"abc").digest()
        h.update(b"d")
        assert h.digest() == hashlib.sha256(b"abd").digest()


@pytest.mark.kernel
def test_aead_made_before_fork_works_in_the_child() -> None:
    key = bytes(range(16))
    with AEAD("gcm(aes)", key) as aead:
        sealed = aead.encrypt(bytes(12), b"before fork")
        assert in_child(lambda: aead.decrypt(bytes(12), sealed)) == b"before fork"
        assert aead.decrypt(bytes(12), sealed) == b"before fork"


@pytest.mark.kernel
def test_rng_parent_and_child_never_share_bytes() -> None:
    """The RNG's state is the kernel's: after fork() parent and child draw different bytes
    (unlike a userspace generator copied by fork)."""
    with RNG() as rng:
        rng.read(16)
        child = in_child(lambda: rng.read(64))
        parent = rng.read(64)
    assert len(child) == len(parent) == 64 and child != parent
