"""Adversarial tests where the kernel is the point (AF_ALG), run in the VM.

No object holding a key shows it (repr, str, exception messages); forged or garbage input to the
kernel AEAD is afalg.InvalidTag (EBADMSG kept) with no plaintext; the record layer on the kernel
backend maps it to bad_record_mac and poisons; a closed object says it is closed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
from collections.abc import Iterator

import pytest
from _record_helpers import ALL_SUITES, make_keys

import afalg
from afalg.aead_backend import KernelAEAD
from afalg.alg import AEAD, HMAC, SKCipher
from afalg.algif import AlgTLSSocket
from afalg.errors import AlertDescription as A
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import ContentType, RecordLayer
from afalg.wire import key_update_message

pytestmark = pytest.mark.kernel

KEY_BYTE = 0xA7


def _forms(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), repr(secret)[2:-1][:16], "167, 167, 167"]


def _assert_hidden(texts: list[str], *secrets: bytes) -> None:
    for text in texts:
        for s in secrets:
            for form in _forms(s):
                assert form not in text, f"{form!r} in {text!r}"


def test_alg_objects_never_show_their_key() -> None:
    key16, key32 = bytes([KEY_BYTE]) * 16, bytes([KEY_BYTE]) * 32
    texts: list[str] = []
    with AEAD("gcm(aes)", key16) as aead:
        texts += [repr(aead), str(aead)]
        with pytest.raises(afalg.InvalidTag) as info:
            aead.decrypt(bytes(12), os.urandom(40), b"aad")
        assert info.value.errno == errno.EBADMSG
        texts += [str(info.value), repr(info.value)]
        with pytest.raises(afalg.InvalidTag) as info:
            aead.decrypt(bytes(12), b"short")  # shorter than the tag: no syscall
        texts += [str(info.value)]
    texts.append(repr(aead))
    with HMAC("sha256", key32) as mac:
        mac.update(b"data")
        texts += [repr(mac), str(mac), repr(mac.copy())]
        with pytest.raises(afalg.InvalidTag) as info:
            mac.verify(bytes(32))
        texts += [str(info.value), repr(info.value)]
    with SKCipher("cbc(aes)", key16) as cipher:
        texts += [repr(cipher), str(cipher)]
        enc = cipher.encryptor(bytes(16))
        texts += [repr(enc)]
        enc.update(bytes(16))
        enc.finalize()
    with pytest.raises(ValueError) as err:
        AEAD("gcm(aes)", key16 + b"\xa7")
    texts.append(str(err.value))
    _assert_hidden(texts, key16)


@pytest.mark.parametrize("suite", [CipherSuite.TLS_AES_128_GCM_SHA256,
                                   CipherSuite.TLS_CHACHA20_POLY1305_SHA256,
                                   CipherSuite.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256],
                         ids=lambda s: s.name)  # fmt: skip
def test_kernel_record_layer_forged_and_garbage(suite: CipherSuite) -> None:
    keys = make_keys(suite, seed=bytes([KEY_BYTE]))
    tx = RecordLayer(tx=keys, backend="kernel")
    rx = RecordLayer(rx=keys, backend="kernel")
    with tx, rx:
        assert rx.backend == "kernel"
        texts = [repr(tx), repr(rx), repr(tx._tx.aead)]
        wire = bytearray(tx.seal(ContentType.application_data, b"attack at dawn"))
        wire[-17] ^= 1  # last ciphertext byte
        rx.feed(bytes(wire))
        with pytest.raises(afalg.TLSProtocolError) as info:
            rx.next_record()
        assert info.value.alert is A.bad_record_mac
        texts += [str(info.value), repr(rx)]
        with pytest.raises(afalg.TLSProtocolError):
            rx.next_record()
        garbage = RecordLayer(rx=keys, backend="kernel")
        with garbage:
            garbage.feed(bytes([23, 3, 3, 0, 40]) + os.urandom(40))
            with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac"):
                garbage.next_record()
        _assert_hidden(texts, keys.key, keys.iv)


def test_kernel_aead_closed_and_short_input() -> None:
    suite = ALL_SUITES[0]
    keys = make_keys(suite)
    aead = KernelAEAD(suite, keys.key)
    with pytest.raises(afalg.InvalidTag):
        aead.decrypt(bytes(12), bytes(15), b"")
    aead.close()
    aead.close()
    with pytest.raises(afalg.AlgError, match="closed") as info:
        aead.encrypt(bytes(12), b"x", b"")
    assert info.value.errno == errno.EBADF
    # a record layer whose kernel AEAD fails is poisoned, not left with a sequence gap
    layer = RecordLayer(tx=keys, backend="kernel")
    layer._tx.aead.close()
    with pytest.raises(afalg.TLSProtocolError, match="internal_error"):
        layer.seal(ContentType.application_data, b"x")
    with pytest.raises(afalg.TLSProtocolError):
        layer.seal(ContentType.application_data, b"y")
    layer.close()


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """Every descriptor number this process may open is taken (RLIMIT_NOFILE lowered, the
    rest filled with /dev/null): the next socket() or accept() fails with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    fillers = []
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _algif_pair() -> tuple[AlgTLSSocket, socket.socket, RecordLayer]:
    """(ours, the peer's TCP socket, the peer's record layer): ours in algif mode on the kernel
    AEAD, TLS 1.3, its send and receive AEADs used once (their operation sockets open)."""
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    keys = TrafficKeys.tls13(suite, bytes(32)), TrafficKeys.tls13(suite, bytes([1]) * 32)
    a, b = socket.socketpair()
    ours = AlgTLSSocket(a, keys[0], keys[1], backend="kernel")
    peer = RecordLayer(tx=keys[1], rx=keys[0], backend="cryptography")
    ours.sendall(b"hello")
    b.sendall(peer.seal(ContentType.application_data, b"hello"))
    assert ours.recv(5) == b"hello"
    return ours, b, peer


def _records(sock: socket.socket, peer: RecordLayer) -> list[tuple[int, bytes]]:
    """What the peer opens from everything ``sock`` receives until EOF."""
    sock.settimeout(60)
    while data := sock.recv(65536):
        peer.feed(data)
    out = []
    while (record := peer.next_record()) is not None:
        out.append((int(record.content_type), record.payload))
    assert peer.buffered == 0
    return out


def test_algif_peer_key_update_without_a_descriptor() -> None:
    """Each key generation is a new AF_ALG socket: when the peer's KeyUpdate needs one and
    none can be had (EMFILE), the data before the KeyUpdate is returned, then the connection
    fails with internal_error, which the peer hears; nothing is opened under the old keys."""
    ours, b, peer = _algif_pair()
    with ours, b, peer:
        wire = peer.seal(ContentType.application_data, b"before")
        wire += peer.seal(ContentType.handshake, key_update_message(False))
        peer.rekey_tx()
        b.sendall(wire + peer.seal(ContentType.application_data, b"after"))
        with no_descriptor_left():
            assert ours.recv(100) == b"before"
            with pytest.raises(afalg.TLSProtocolError, match="KeyUpdate") as info:
                ours.recv(100)
        assert info.value.alert is A.internal_error
        with pytest.raises(afalg.TLSProtocolError):
            ours.recv(100)  # poisoned: "after" is never opened
        ours.close()
        assert _records(b, peer)[-1] == (ContentType.alert, bytes([2, A.internal_error]))


def test_algif_own_key_update_without_a_descriptor() -> None:
    """Our KeyUpdate, when the next send keys cannot be had (EMFILE): it raises before the
    KeyUpdate goes out, and nothing follows it: the peer gets the records before, then the end
    of the stream (no record under keys it does not expect)."""
    ours, b, peer = _algif_pair()
    with ours, b, peer:
        with no_descriptor_left(), pytest.raises(afalg.TLSProtocolError, match="KeyUpdate"):
            ours.key_update()
        assert ours.pending_output() == 0
        with pytest.raises(afalg.TLSProtocolError):
            ours.send(b"more")
        ours.close()
        assert _records(b, peer) == [(ContentType.application_data, b"hello")]
