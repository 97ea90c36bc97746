"""afalg.alg.SKCipher against pyca/cryptography (kernel: run in the VM)."""

from __future__ import annotations

import itertools
import os

import pytest
from _env import FEW_EXAMPLES
from cryptography.hazmat.primitives import padding as _padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

import afalg
from afalg.alg import SKCipher

# Four ciphers x two directions per example. No deadline: FEW_EXAMPLES is built when _env is
# imported, before conftest loads the profile without one (TCG took 335 ms on 7.3 once).
_FEW = settings(FEW_EXAMPLES, deadline=None)

pytestmark = pytest.mark.kernel


def _ref(name: str, key: bytes, iv: bytes | None) -> Cipher:
    mode = {
        "cbc(aes)": lambda: modes.CBC(iv),
        "ctr(aes)": lambda: modes.CTR(iv),
        "ecb(aes)": lambda: modes.ECB(),
        "xts(aes)": lambda: modes.XTS(iv),
    }
    if name == "chacha20":
        # the kernel's IV is the 4-byte little-endian counter then the 12-byte nonce, as here
        return Cipher(algorithms.ChaCha20(key, iv), None)
    return Cipher(algorithms.AES(key), mode[name]())


CASES = [("cbc(aes)", 16, 16), ("ctr(aes)", 32, 16), ("ecb(aes)", 24, 0), ("chacha20", 32, 16)]


def _block_len(name: str, n: int) -> int:
    return n - n % 16 if name in ("cbc(aes)", "ecb(aes)") else n


@pytest.mark.parametrize(("name", "key_size", "iv_size"), CASES)
def test_one_shot(name: str, key_size: int, iv_size: int) -> None:
    key, iv = os.urandom(key_size), os.urandom(iv_size) or None
    with SKCipher(name, key) as c:
        for n in (0, 16, 64, 1000, 200_000):
            data = os.urandom(_block_len(name, n))
            enc = _ref(name, key, iv).encryptor()
            expected = enc.update(data) + enc.finalize()
            assert c.encrypt(iv, data) == expected, n
            assert c.decrypt(iv, expected) == data, n


@pytest.mark.parametrize(("name", "key_size", "iv_size"), CASES)
@_FEW
@given(data=st.data())
def test_streaming_random_chunks(name: str, key_size: int, iv_size: int, data) -> None:
    key, iv = os.urandom(key_size), os.urandom(iv_size) or None
    size = data.draw(st.integers(0, 256 * 1024), label="size")
    message = os.urandom(_block_len(name, size))
    cuts = data.draw(st.lists(st.integers(0, len(message)), max_size=8), label="cuts")
    bounds = sorted({0, len(message), *cuts})
    enc = _ref(name, key, iv).encryptor()
    expected = enc.update(message) + enc.finalize()
    with SKCipher(name, key) as c:
        for stream, source, want in (
            (c.encryptor(iv), message, expected),
            (c.decryptor(iv), expected, message),
        ):
            out = b"".join(stream.update(source[a:b]) for a, b in itertools.pairwise(bounds))
            assert out + stream.finalize() == want


@_FEW
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_pkcs7_streaming(data: bytes, cuts: list[int]) -> None:
    key, iv = os.urandom(16), os.urandom(16)
    padder = _padding.PKCS7(128).padder()
    padded = padder.update(data) + padder.finalize()
    enc = _ref("cbc(aes)", key, iv).encryptor()
    expected = enc.update(padded) + enc.finalize()
    with SKCipher("cbc(aes)", key, padding="pkcs7") as c:
        assert c.encrypt(iv, data) == expected
        assert c.decrypt(iv, expected) == data
        bounds = sorted({0, len(expected), *(x % (len(expected) + 1) for x in cuts)})
        d = c.decryptor(iv)
        out = b"".join(d.update(expected[a:b]) for a, b in itertools.pairwise(bounds))
        assert out + d.finalize() == data
        e = c.encryptor(iv)
        bounds = sorted({0, len(data), *(x % (len(data) + 1) for x in cuts)})
        out = b"".join(e.update(data[a:b]) for a, b in itertools.pairwise(bounds))
        assert out + e.finalize() == expected


def test_bad_padding() -> None:
    key, iv = os.urandom(16), os.urandom(16)
    with SKCipher("cbc(aes)", key) as raw, SKCipher("cbc(aes)", key, padding="pkcs7") as c:
        for plain in (bytes(16), b"a" * 15 + b"\x11", b"a" * 14 + b"\x01\x02", b"a" * 16):
            with pytest.raises(afalg.PaddingError):
                c.decrypt(iv, raw.encrypt(iv, plain))
        with pytest.raises(afalg.PaddingError, match="multiple"):
            c.decrypt(iv, bytes(17))
        with pytest.raises(afalg.PaddingError):
            c.decrypt(iv, b"")
    assert issubclass(afalg.PaddingError, ValueError)


def test_xts_buffered_stream() -> None:
    key, iv = os.urandom(64), os.urandom(16)
    message = os.urandom(5000)  # not a multiple of 16: ciphertext stealing
    enc = _ref("xts(aes)", key, iv).encryptor()
    expected = enc.update(message) + enc.finalize()
    with SKCipher("xts(aes)", key) as c:
        assert c.encrypt(iv, message) == expected
        s = c.encryptor(iv)
        assert s.update(message[:1000]) == b""  # xts cannot chain across reads: buffered
        assert s.update(message[1000:]) + s.finalize() == expected


def test_chacha20_streams_with_the_iv_advanced_by_afalg() -> None:
    """The kernel does not carry chacha20's counter across reads: afalg runs each whole
    64-byte-block stretch as its own operation with the counter moved on, so output comes out
    of update() and memory stays bounded. Near the 32-bit wrap the stream agrees with the
    kernel's own one-shot (the kernel's counter wraps; OpenSSL's would carry)."""
    key = os.urandom(32)
    message = os.urandom(300_000)
    with SKCipher("chacha20", key) as c:
        for counter in (7, 2**32 - 3):
            iv = counter.to_bytes(4, "little") + os.urandom(12)
            whole = c.encrypt(iv, message)
            if counter == 7:
                enc = _ref("chacha20", key, iv).encryptor()
                assert whole == enc.update(message) + enc.finalize()
            s = c.encryptor(iv)
            first = s.update(message[:100])  # one whole block ready, 36 bytes held
            assert first == whole[:64]
            rest = s.update(message[100:200_001])
            assert len(first + rest) == 200_000  # every whole block so far; one byte held
            assert first + rest + s.update(message[200_001:]) + s.finalize() == whole


def test_errors() -> None:
    with pytest.raises(ValueError, match="key must be 16, 24 or 32 bytes, got 10"):
        SKCipher("cbc(aes)", bytes(10))
    with pytest.raises(ValueError, match="not a block mode"):
        SKCipher("ctr(aes)", bytes(16), padding="pkcs7")
    with pytest.raises(afalg.AlgorithmNotAvailable):
        SKCipher("cbc(nosuchcipher)", bytes(16))
    c = SKCipher("cbc(aes)", bytes(16))
    with pytest.raises(ValueError, match="iv must be 16 bytes, got 12"):
        c.encrypt(bytes(12), bytes(16))
    with pytest.raises(ValueError, match="multiple of 16 bytes, got 15"):
        c.encrypt(bytes(16), bytes(15))
    s = c.encryptor(bytes(16))
    s.update(bytes(15))
    with pytest.raises(ValueError, match="multiple of 16"):
        s.finalize()
    with pytest.raises(afalg.AlgError):
        s.update(b"x")  # finalized
    assert "00000000" not in repr(c)
    c.close()
    c.close()
    with pytest.raises(afalg.AlgError):
        c.encrypt(bytes(16), bytes(16))


def test_encrypt_into_and_decrypt_into() -> None:
    """The no-allocation variants give encrypt()/decrypt()'s bytes in the caller's buffer (any
    writable bytes-like; longer than one 64 KiB operation too); refused with padding."""
    key, iv = os.urandom(16), os.urandom(16)
    with SKCipher("cbc(aes)", key) as cipher:
        for n in (0, 16, 4096, 200_000):
            data = os.urandom(n)
            out = bytearray(n + 5)
            assert cipher.encrypt_into(out, iv, data) == n
            assert bytes(out[:n]) == cipher.encrypt(iv, data) and out[n:] == bytes(5)
            back = memoryview(bytearray(n))
            assert cipher.decrypt_into(back, iv, bytes(out[:n])) == n
            assert back.tobytes() == data
        with pytest.raises(ValueError, match="multiple of 16"):
            cipher.encrypt_into(bytearray(32), iv, bytes(17))
        with pytest.raises(ValueError, match="holds"):
            cipher.encrypt_into(bytearray(15), iv, bytes(16))
    with SKCipher("cbc(aes)", key, padding="pkcs7") as padded, pytest.raises(ValueError):
        padded.encrypt_into(bytearray(32), iv, bytes(16))
