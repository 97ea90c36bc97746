"""No key in any repr, str, log record or exception message; what afalg keeps of a key.

Every object is built with distinctive key bytes and the text of everything it shows (repr,
str, format, the exceptions of its error paths, every log record) is searched for them, in hex
(either case), as Python shows bytes, and raw. What afalg holds in memory: the AF_ALG objects
keep no copy of their key (the kernel has it, and frees it with the socket); the key buffers
afalg can zero are zeroed (the kernel's crypto_info read back, tests/test_kernel_state.py; the
key log memfd, tests/test_handoff.py). What cannot be zeroed in Python is listed in SECURITY.md.
"""

from __future__ import annotations

import gc
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from _record_helpers import ALL_SUITES
from test_handshake import contexts, pump
from test_tls_helpers import Bg, client_context, connect, server_context, tcp_pair

import afalg
from afalg import cmsg, handoff, tls
from afalg.alg import AEAD, HMAC, SKCipher
from afalg.keys import CipherSuite, TrafficKeys
from afalg.record import ContentType, RecordLayer

KEY = bytes(range(0xA0, 0xD0))  # 48 distinctive bytes; keys and secrets are slices of it
IV = bytes(range(0x30, 0x3C))


def keys_for(suite: CipherSuite) -> TrafficKeys:
    if suite.is_tls13:
        return TrafficKeys.tls13(suite, KEY[: 48 if suite.hash_name == "sha384" else 32])
    return TrafficKeys(0x0303, suite, KEY[: suite.key_length], IV[: 12 if suite.is_chacha20 else 4])


def forms(secret: bytes) -> list[str]:
    """How ``secret`` (or its first 8 bytes) could show up in text."""
    head = secret[:8]
    return [
        secret.hex(),
        head.hex(),
        head.hex().upper(),
        head.hex(" "),
        repr(head)[2:-1],
        head.decode("latin-1"),
        str(list(head))[1:-1],
    ]


def assert_clean(texts: Iterable[str], *secrets: bytes | None) -> None:
    texts = list(texts)
    for secret in secrets:
        if not secret:
            continue
        for form in forms(secret):
            for text in texts:
                assert form not in text, f"{form!r} in {text!r}"


def shown(*objects: object) -> list[str]:
    """repr, str and format of each object."""
    return [t for o in objects for t in (repr(o), str(o), f"{o}", f"{o!r}")]


def raised(call: Callable[[], object], *expected: type[BaseException]) -> list[str]:
    """The text of the exception ``call`` raises (one of ``expected``), its causes included."""
    with pytest.raises(expected) as info:
        call()
    texts = []
    chain: list[BaseException] = []
    exc: BaseException | None = info.value
    while exc is not None and exc not in chain:  # a re-raised error may be its own context
        chain.append(exc)
        texts += [str(exc), repr(exc), *map(str, exc.args)]
        exc = exc.__cause__ or exc.__context__
    return texts


def reachable_bytes(root: object, depth: int = 4) -> list[bytes]:
    """bytes-like values reachable from ``root`` through its attributes (gc referents)."""
    out: list[bytes] = []
    seen: set[int] = set()
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            for ref in gc.get_referents(obj):
                if id(ref) in seen or isinstance(ref, type) or callable(ref):
                    continue
                seen.add(id(ref))
                if isinstance(ref, (bytes, bytearray)):
                    out.append(bytes(ref))
                elif not isinstance(ref, (str, int, float)):
                    nxt.append(ref)
        frontier = nxt
    return out


@pytest.fixture(autouse=True)
def _no_secret_logged(caplog: pytest.LogCaptureFixture) -> Any:
    """Whatever afalg logs (nothing, today) carries no key."""
    caplog.set_level(logging.DEBUG)
    yield
    assert_clean([r.getMessage() for r in caplog.records], KEY, IV)


# --- host ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suite", ALL_SUITES, ids=lambda s: s.name)
def test_keys_and_record_layer(suite: CipherSuite) -> None:
    keys = keys_for(suite)
    texts = shown(keys)
    with RecordLayer(tx=keys, rx=keys, backend="cryptography") as layer:
        texts += shown(layer, layer.tx_keys, layer._tx.aead)  # type: ignore[union-attr]
        wire = bytearray(layer.seal(ContentType.application_data, b"x"))
        wire[-1] ^= 1
        layer.feed(bytes(wire))
        texts += raised(layer.next_record, afalg.TLSProtocolError)  # failed tag
        texts += raised(layer.next_record, afalg.TLSProtocolError)  # poisoned
        texts += shown(layer)
    texts += shown(layer)
    if keys.secret is not None:
        texts += shown(keys.next_generation())
        texts += raised(lambda: TrafficKeys.tls13(suite, KEY[:31]), ValueError)
    texts += raised(
        lambda: TrafficKeys(keys.version, suite, KEY[: suite.key_length - 1], keys.iv), ValueError
    )
    texts += raised(lambda: TrafficKeys(keys.version, suite, keys.key, KEY[:5]), ValueError)
    assert_clean(texts, keys.key, keys.iv, keys.secret, KEY)


@pytest.mark.parametrize("cipher", list(cmsg.TLSCipherType), ids=lambda c: c.name)
def test_crypto_info(cipher: cmsg.TLSCipherType) -> None:
    layout = cmsg.cipher_layout(cipher)
    key, iv, salt = KEY[: layout.key], IV[: layout.iv], IV[-layout.salt :] if layout.salt else b""
    raw = cmsg.tls_crypto_info(0x0304, cipher, key=key, iv=iv, salt=salt, rec_seq=7)
    info = cmsg.unpack_tls_crypto_info(raw)
    public = cmsg.peek_tls_crypto_info(raw)
    assert info.key == key and public.rec_seq == 7
    texts = shown(info, public)
    texts += raised(lambda: cmsg.unpack_tls_crypto_info(raw[:-1]), ValueError)
    texts += raised(lambda: cmsg.peek_tls_crypto_info(raw + b"\0"), ValueError)
    texts += raised(
        lambda: cmsg.tls_crypto_info(0x0304, cipher, key=key + b"\xaa", iv=iv, salt=salt),
        ValueError,
    )
    assert_clean(texts, key)
    # peek reads no byte but the header and rec_seq: the caller can zero its buffer after.
    buf = bytearray(raw)
    public = cmsg.peek_tls_crypto_info(buf)
    buf[:] = bytes(len(buf))
    assert public.rec_seq == 7 and key not in b"".join(reachable_bytes(public))


@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_handshake_and_handoff(version: str) -> None:
    sctx, cctx = contexts(version)
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    pump(client, server)
    result = client.result()
    feed = result.ticket_feed()
    texts = shown(client, server, result, server.result(), handoff.keylog_for(cctx), feed)
    if feed is not None:
        feed.close()
    refused = handoff.Handshake(sctx, server_side=True)
    texts += raised(lambda: refused.receive(b"GET /"), ssl.SSLError)
    secrets = [k for keys in (result.tx, result.rx) for k in (keys.key, keys.iv, keys.secret)]
    assert_clean(texts, *secrets)


def test_algif_socket_on_the_cryptography_backend() -> None:
    ours, theirs = connect(("algif", "cryptography"), "client")
    layer = ours.record_layer
    assert layer.tx_keys is not None and layer.rx_keys is not None
    secrets = [k for ks in (layer.tx_keys, layer.rx_keys) for k in (ks.key, ks.iv, ks.secret)]
    with ours, theirs:
        texts = shown(ours, theirs, layer)
        socket.socket.sendall(theirs, b"\x17\x03\x03\x00\x20" + bytes(32))  # fails its tag
        texts += raised(lambda: ours.recv(10), afalg.TLSProtocolError)
        texts += raised(lambda: ours.sendall(b"x"), afalg.TLSProtocolError, OSError)
    texts += shown(ours)
    assert_clean(texts, *secrets)


# --- kernel --------------------------------------------------------------------------------------


@pytest.mark.kernel
def test_alg_objects_show_and_keep_no_key() -> None:
    """AEAD, HMAC and SKCipher: no key in their text, and no copy of it in the object (the
    kernel holds it; ``close()`` frees it with the socket)."""
    texts: list[str] = []
    with AEAD("gcm(aes)", KEY[:16]) as aead:
        sealed = aead.encrypt(IV, b"plain")
        texts += shown(aead)
        texts += raised(lambda: aead.decrypt(IV, bytes(len(sealed))), afalg.InvalidTag)
        held = reachable_bytes(aead)
    with HMAC("sha256", KEY) as mac:
        mac.update(b"m")
        texts += shown(mac)
        texts += raised(lambda: mac.verify(bytes(32)), afalg.InvalidTag)
        held += reachable_bytes(mac) + reachable_bytes(mac.copy())
    with SKCipher("cbc(aes)", KEY[:32], padding="pkcs7") as cipher:
        texts += shown(cipher, cipher.encryptor(IV[:12] + bytes(4)))
        texts += raised(lambda: cipher.decrypt(bytes(16), bytes(16)), afalg.PaddingError)
        held += reachable_bytes(cipher)
    texts += raised(lambda: AEAD("gcm(aes)", KEY[:15]), ValueError)
    texts += raised(lambda: SKCipher("cbc(aes)", KEY[:17]), ValueError)
    texts += shown(aead, mac, cipher)  # closed
    assert_clean(texts, KEY, KEY[:16])
    assert not any(KEY[:16] in value for value in held)


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["ktls", "algif"])
def test_kernel_tls_sockets(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """KTLSSocket and AlgTLSSocket (kernel AEAD) and what they show, the kernel's state
    included, through a record that fails its tag; searched for the keys they were given."""
    handoffs: list[handoff.Handoff] = []
    real = handoff.handshake

    def spy(*args: Any, **kwargs: Any) -> handoff.Handoff:
        handoffs.append(real(*args, **kwargs))
        return handoffs[-1]

    monkeypatch.setattr(handoff, "handshake", spy)
    sctx, cctx = server_context("TLSv1.3", None), client_context("TLSv1.3", None)
    csock, ssock = tcp_pair()
    peer = Bg(lambda: sctx.wrap_socket(ssock, server_side=True))
    conn = tls.wrap(csock, cctx, server_hostname="localhost", mode=mode)
    with conn, peer.result(60) as theirs:
        texts = shown(conn, conn.kernel_state())
        if mode == "algif":
            texts += shown(conn.record_layer)  # type: ignore[union-attr]
        socket.socket.sendall(theirs, b"\x17\x03\x03\x00\x20" + bytes(32))  # fails its tag
        texts += raised(lambda: conn.recv(10), afalg.TLSProtocolError)
    texts += shown(conn)
    (result,) = handoffs
    assert_clean(texts, *[k for ks in (result.tx, result.rx) for k in (ks.key, ks.iv, ks.secret)])
