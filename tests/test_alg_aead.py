"""afalg.alg.AEAD against pyca/cryptography and published answers (kernel: run in the VM)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

import afalg
from afalg.alg import AEAD

pytestmark = pytest.mark.kernel

GCM = "gcm(aes)"
CHACHA = "rfc7539(chacha20,poly1305)"
CCM = "ccm(aes)"
RFC4106 = "rfc4106(gcm(aes))"


def test_gcm_known_answer() -> None:
    # NIST GCM spec test case 4 (McGrew & Viega, "The Galois/Counter Mode of Operation")
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
    iv = bytes.fromhex("cafebabefacedbaddecaf888")
    pt = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    ct = bytes.fromhex(
        "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
        "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"
    )
    tag = bytes.fromhex("5bc94fbc3221a5db94fae95ae7121a47")
    with AEAD(GCM, key) as aead:
        assert aead.encrypt(iv, pt, aad) == ct + tag
        assert aead.decrypt(iv, ct + tag, aad) == pt
        # the operation socket is reused: a second round gives the same answer
        assert aead.encrypt(iv, pt, aad) == ct + tag


def test_chacha20_poly1305_rfc8439() -> None:
    # RFC 8439 section 2.8.2
    key = bytes(range(0x80, 0xA0))
    iv = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    pt = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    tag = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")
    with AEAD(CHACHA, key) as aead:
        out = aead.encrypt(iv, pt, aad)
        assert out[-16:] == tag
        assert out[:16] == bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")
        assert aead.decrypt(iv, out, aad) == pt


@pytest.mark.parametrize(
    ("name", "key_size", "iv_size", "tag_size", "ref"),
    [
        (GCM, 16, 12, 16, lambda k, t: AESGCM(k)),
        (GCM, 32, 12, 16, lambda k, t: AESGCM(k)),
        (CHACHA, 32, 12, 16, lambda k, t: ChaCha20Poly1305(k)),
        (CCM, 16, 13, 16, lambda k, t: AESCCM(k, t)),
        (CCM, 24, 7, 8, lambda k, t: AESCCM(k, t)),
        (CCM, 32, 11, 4, lambda k, t: AESCCM(k, t)),
    ],
)
def test_empty_and_aad_only(name, key_size, iv_size, tag_size, ref) -> None:
    key, iv = os.urandom(key_size), os.urandom(iv_size)
    with AEAD(name, key, tag_size) as aead:
        for pt, aad in ((b"", b""), (b"", b"header"), (b"x", b"")):
            expected = ref(key, tag_size).encrypt(iv, pt, aad or None)
            assert aead.encrypt(iv, pt, aad) == expected
            assert aead.decrypt(iv, expected, aad) == pt


@pytest.mark.parametrize("tag_size", [4, 8, 12, 13, 14, 15, 16])
def test_gcm_every_tag_size(tag_size: int) -> None:
    key, iv, pt, aad = os.urandom(16), os.urandom(12), os.urandom(100), os.urandom(20)
    full = AESGCM(key).encrypt(iv, pt, aad)
    with AEAD(GCM, key, tag_size) as aead:
        out = aead.encrypt(iv, pt, aad)
        assert out == full[: 100 + tag_size]  # a GCM tag of t bytes is the full tag's prefix
        assert aead.decrypt(iv, out, aad) == pt
        with pytest.raises(afalg.InvalidTag):
            aead.decrypt(iv, out[:-1] + bytes([out[-1] ^ 1]), aad)


@pytest.mark.parametrize("tag_size", [4, 6, 8, 10, 12, 14, 16])
def test_ccm_every_tag_size(tag_size: int) -> None:
    key, nonce, pt, aad = os.urandom(16), os.urandom(12), os.urandom(50), os.urandom(9)
    with AEAD(CCM, key, tag_size) as aead:
        out = aead.encrypt(nonce, pt, aad)
        assert out == AESCCM(key, tag_size).encrypt(nonce, pt, aad)
        assert aead.decrypt(nonce, out, aad) == pt


@pytest.mark.parametrize("nonce_size", range(7, 14))
def test_ccm_every_nonce_size(nonce_size: int) -> None:
    key, nonce = os.urandom(16), os.urandom(nonce_size)
    with AEAD(CCM, key) as aead:
        out = aead.encrypt(nonce, b"payload", b"aad")
        assert out == AESCCM(key).encrypt(nonce, b"payload", b"aad")


def test_rfc4106_against_gcm() -> None:
    # rfc4106: nonce = salt || explicit IV, AAD = SPI || seq (8 or 12 bytes); same as gcm(aes)
    key, salt, iv = os.urandom(16), os.urandom(4), os.urandom(8)
    for aad in (os.urandom(8), os.urandom(12)):
        pt = os.urandom(77)
        expected = AESGCM(key).encrypt(salt + iv, pt, aad)
        with AEAD(RFC4106, key + salt) as aead:
            assert aead.encrypt(iv, pt, aad) == expected
            assert aead.decrypt(iv, expected, aad) == pt


@given(
    name=st.sampled_from([GCM, CHACHA]),
    data=st.data(),
    size=st.integers(0, 256 * 1024),
    aad_size=st.integers(0, 64),
)
def test_differential(name: str, data, size: int, aad_size: int) -> None:
    key = data.draw(st.binary(min_size=32, max_size=32), label="key")
    iv = data.draw(st.binary(min_size=12, max_size=12), label="iv")
    pt, aad = os.urandom(size), os.urandom(aad_size)
    ref = AESGCM(key) if name == GCM else ChaCha20Poly1305(key)
    expected = ref.encrypt(iv, pt, aad)
    with AEAD(name, key) as aead:
        assert aead.encrypt(iv, pt, aad) == expected
        assert aead.decrypt(iv, expected, aad) == pt


def test_tampering_raises_invalid_tag() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    with AEAD(GCM, key) as aead:
        ct = aead.encrypt(iv, b"attack at dawn", b"hdr")
        for bad_ct, bad_aad in (
            (bytes([ct[0] ^ 1]) + ct[1:], b"hdr"),  # ciphertext
            (ct[:-1] + bytes([ct[-1] ^ 0x80]), b"hdr"),  # tag
            (ct, b"hdR"),  # AAD
            (ct, b""),
        ):
            with pytest.raises(afalg.InvalidTag) as info:
                aead.decrypt(iv, bad_ct, bad_aad)
            assert info.value.errno == 74  # EBADMSG
        # still usable after a failure
        assert aead.decrypt(iv, ct, b"hdr") == b"attack at dawn"
        with pytest.raises(afalg.InvalidTag, match="shorter than the 16-byte tag"):
            aead.decrypt(iv, ct[:15], b"hdr")


def test_errors_before_any_syscall() -> None:
    with pytest.raises(ValueError, match="key must be 16, 24 or 32 bytes, got 17"):
        AEAD(GCM, bytes(17))
    with pytest.raises(
        ValueError, match="tag_size must be 4, 8, 12, 13, 14, 15 or 16 bytes, got 7"
    ):
        AEAD(GCM, bytes(16), 7)
    with pytest.raises(ValueError, match="tag_size must be 16 bytes, got 12"):
        AEAD(CHACHA, bytes(32), 12)
    with pytest.raises(ValueError, match="key must be 20, 28 or 36 bytes"):
        AEAD(RFC4106, bytes(16))
    with AEAD(GCM, bytes(16)) as aead:
        with pytest.raises(ValueError, match="iv must be 12 bytes, got 16"):
            aead.encrypt(bytes(16), b"")
        with pytest.raises(TypeError):
            aead.encrypt(bytes(12), "text")  # type: ignore[arg-type]
    with AEAD(CCM, bytes(16)) as aead, pytest.raises(ValueError, match="nonce must be 7 to 13"):
        aead.encrypt(bytes(6), b"")
    with AEAD(RFC4106, bytes(20)) as aead, pytest.raises(ValueError, match="aad must be 8 or 12"):
        aead.encrypt(bytes(8), b"", b"x" * 16)


def test_unknown_algorithm() -> None:
    with pytest.raises(afalg.AlgorithmNotAvailable) as info:
        AEAD("gcm(nosuchcipher)", bytes(16))
    assert info.value.errno == 2


def test_close_repr_and_use_after_close() -> None:
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    aead = AEAD(GCM, key)
    aead.encrypt(bytes(12), b"x")
    text = repr(aead)
    assert "gcm(aes)" in text and "fd=" in text
    assert key.hex() not in text and "00112233" not in text
    aead.close()
    aead.close()  # idempotent
    assert aead.closed and aead.fileno() == -1 and "closed" in repr(aead)
    with pytest.raises(afalg.AlgError):
        aead.encrypt(bytes(12), b"x")


def test_oversized_operation_is_refused_not_hung() -> None:
    limit = int(Path("/proc/sys/net/core/wmem_max").read_text())
    with AEAD(GCM, bytes(16)) as aead:
        # as root (the VM) SO_SNDBUFFORCE lifts the limit; an unprivileged user gets ValueError
        # the kernel may also refuse the scatterlist memory (ENOMEM, net.core.optmem_max: 20 KiB
        # on 6.1): a clear error, never a hang
        try:
            out = aead.encrypt(bytes(12), bytes(4 * limit))
        except ValueError as exc:
            assert "wmem_max" in str(exc)
        except afalg.AlgError as exc:
            assert exc.errno == 12 and "optmem_max" in str(exc)
        else:
            assert len(out) == 4 * limit + 16
        assert aead.encrypt(bytes(12), b"still usable") == AESGCM(bytes(16)).encrypt(
            bytes(12), b"still usable", None
        )


def test_unprivileged_oversized_operation_is_refused() -> None:
    # Without CAP_NET_ADMIN, SO_SNDBUFFORCE is denied: past 2 x net.core.wmem_max the operation
    # is refused up front with ValueError (never a sendmsg() that would wait forever).
    is_root = os.getuid() == 0
    limit = int(Path("/proc/sys/net/core/wmem_max").read_text())
    pid = os.fork()
    if pid == 0:  # child: drop root, try, report through the exit status
        code = 3
        try:
            if is_root:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            with AEAD(GCM, bytes(16)) as aead:
                try:
                    aead.encrypt(bytes(12), bytes(3 * limit))
                except ValueError as exc:
                    code = 0 if "wmem_max" in str(exc) else 1
                else:
                    code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("aad", [b"", b"\x17\x03\x03\x00\x21", os.urandom(13)])
def test_encrypt_into_writes_the_kernels_layout(aad: bytes) -> None:
    """encrypt_into/decrypt_into: ``aad || output`` in the caller's buffer (a TLS 1.3 header
    as AAD gives the whole record), the same bytes as encrypt()/decrypt(); any writable
    bytes-like; a short or read-only buffer refused before any system call."""
    key, iv, pt = os.urandom(16), os.urandom(12), os.urandom(17)
    with AEAD(GCM, key) as aead:
        sealed = aead.encrypt(iv, pt, aad)
        out = bytearray(len(aad) + len(sealed) + 3)
        assert aead.encrypt_into(out, iv, pt, aad) == len(aad) + len(sealed)
        assert bytes(out) == aad + sealed + bytes(3)
        view = memoryview(bytearray(len(aad) + len(pt)))
        assert aead.decrypt_into(view, iv, sealed, aad) == len(aad) + len(pt)
        assert view.tobytes() == aad + pt
        with pytest.raises(ValueError, match="holds"):
            aead.encrypt_into(bytearray(len(aad) + len(sealed) - 1), iv, pt, aad)
        with pytest.raises(TypeError, match="writable"):
            aead.encrypt_into(bytes(64), iv, pt, aad)
        # a failed tag: InvalidTag, and no plaintext left in the caller's buffer
        spoiled = bytearray(sealed)
        spoiled[-1] ^= 1
        out = bytearray(b"\xaa" * (len(aad) + len(pt)))
        with pytest.raises(afalg.InvalidTag):
            aead.decrypt_into(out, iv, bytes(spoiled), aad)
        assert out == bytes(len(out))
        assert aead.decrypt(iv, sealed, aad) == pt  # still usable


@pytest.mark.parametrize(("name", "ref"), [(GCM, AESGCM), (CHACHA, ChaCha20Poly1305)])
def test_none_is_no_associated_data(name: str, ref: type[AESGCM | ChaCha20Poly1305]) -> None:
    """``associated_data=None`` means none, as in cryptography's AEADs (the same call works on
    either): encrypt, decrypt and their ``_into`` forms."""
    key, iv, pt = os.urandom(32), os.urandom(12), b"plaintext"
    expected = ref(key).encrypt(iv, pt, None)
    with AEAD(name, key) as aead:
        assert aead.encrypt(iv, pt, None) == expected
        assert aead.decrypt(iv, expected, None) == pt
        out = bytearray(len(expected))
        assert aead.encrypt_into(out, iv, pt, None) == len(expected)
        assert out == expected
        assert aead.decrypt_into(out, iv, expected, None) == len(pt)
        assert out[: len(pt)] == pt
