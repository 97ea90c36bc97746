"""Adversarial tests where the kernel is the point (AF_ALG), run in the VM.

No object holding a key shows it (repr, str, exception messages); forged or garbage input to the
kernel AEAD is afalg.InvalidTag (EBADMSG kept) with no plaintext; the record layer on the kernel
backend maps it to bad_record_mac and poisons; a closed object says it is closed.
"""

from __future__ import annotations

import errno
import os

import pytest
from _record_helpers import ALL_SUITES, make_keys

import afalg
from afalg.aead_backend import KernelAEAD
from afalg.alg import AEAD, HMAC, SKCipher
from afalg.errors import AlertDescription as A
from afalg.keys import CipherSuite
from afalg.record import ContentType, RecordLayer

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
