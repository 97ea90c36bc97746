"""afalg.keys: TLS 1.3 key schedule pieces and the TLS 1.2 PRF against published known answers.

Sources: RFC 8448 section 3 (Simple 1-RTT Handshake) for TLS 1.3; the TLS 1.2 PRF vectors
posted to the IETF TLS WG list (https://www.ietf.org/mail-archive/web/tls/current/msg03416.html).
"""

from __future__ import annotations

import pytest

from afalg.keys import (
    CipherSuite,
    TrafficKeys,
    UnsupportedCipherSuite,
    derive_secret,
    hkdf_expand_label,
    hkdf_extract,
    suite_from_openssl_name,
    tls12_key_block,
    tls12_prf,
    tls12_traffic_keys,
)

h = bytes.fromhex

# RFC 8448 section 3
ECDHE = h("8bd4054fb55b9d63fdfbacf9f04b9f0d35e6d63f537563efd46272900f89492d")
EARLY = h("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
DERIVED_HS = h("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba")
HANDSHAKE = h("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
DERIVED_MS = h("43de77e0c77713859a944db9db2590b53190a65b3ee2e4f12dd7a0bb7ce254b4")
MASTER = h("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
TH_CH_SF = h("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")
C_AP = h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
S_AP = h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
S_HS = h("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")


def test_rfc8448_key_schedule() -> None:
    assert hkdf_extract("sha256", b"", bytes(32)) == EARLY
    assert derive_secret("sha256", EARLY, "derived", b"") == DERIVED_HS
    assert hkdf_extract("sha256", DERIVED_HS, ECDHE) == HANDSHAKE
    assert derive_secret("sha256", HANDSHAKE, "derived", b"") == DERIVED_MS
    assert hkdf_extract("sha256", DERIVED_MS, bytes(32)) == MASTER
    assert hkdf_expand_label("sha256", MASTER, "c ap traffic", TH_CH_SF, 32) == C_AP
    assert hkdf_expand_label("sha256", MASTER, b"s ap traffic", TH_CH_SF, 32) == S_AP


def test_rfc8448_traffic_keys() -> None:
    c = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, C_AP)
    assert c.key == h("17422dda596ed5d9acd890e3c63f5051")
    assert c.iv == h("5b78923dee08579033e523d9")
    assert (c.version, c.seq, c.secret) == (0x0304, 0, C_AP)
    s = TrafficKeys.tls13(0x1301, S_AP, seq=1)
    assert s.key == h("9f02283b6c9c07efc26bb9f2ac92e356")
    assert s.iv == h("cf782b88dd83549aadf1e984")
    assert s.seq == 1
    hs = TrafficKeys.tls13("TLS_AES_128_GCM_SHA256", S_HS)
    assert hs.key == h("3fce516009c21727d0f2e4e86ee403bc")
    assert hs.iv == h("5d313eb2671276ee13000b30")


@pytest.mark.parametrize("suite", [0x1301, 0x1302, 0x1303])
def test_next_generation(suite: int) -> None:
    s = CipherSuite(suite)
    n = 48 if s == CipherSuite.TLS_AES_256_GCM_SHA384 else 32
    k0 = TrafficKeys.tls13(s, bytes(range(n)), seq=77)
    k1 = k0.next_generation()
    want = hkdf_expand_label(s.hash_name, k0.secret, "traffic upd", b"", n)
    assert k1.secret == want
    assert k1 == TrafficKeys.tls13(s, want)
    assert k1.seq == 0 and k1.key != k0.key and len(k1.key) == s.key_length
    assert k1.next_generation().secret != k1.secret


def test_tls12_prf_sha256() -> None:
    out = tls12_prf(
        "sha256",
        h("9bbe436ba940f017b17652849a71db35"),
        "test label",
        h("a0ba9f936cda311827a6f796ffd5198c"),
        100,
    )
    assert out == h(
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a"
        "6b301791e90d35c9c9a46b4e14baf9af0fa022f7077def17abfd3797c0564bab"
        "4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701"
        "87347b66"
    )


def test_tls12_prf_sha384() -> None:
    out = tls12_prf(
        "sha384",
        h("b80b733d6ceefcdc71566ea48e5567df"),
        b"test label",
        h("cd665cf6a8447dd6ff8b27555edb7465"),
        148,
    )
    assert out == h(
        "7b0c18e9ced410ed1804f2cfa34a336a1c14dffb4900bb5fd7942107e81c83cd"
        "e9ca0faa60be9fe34f82b1233c9146a0e534cb400fed2700884f9dc236f80edd"
        "8bfa961144c9e8d792eca722a7b32fc3d416d473ebc2c5fd4abfdad05d918425"
        "9b5bf8cd4d90fa0d31e2dec479e4f1a26066f2eea9a69236a3e52655c9e9aee6"
        "91c8f3a26854308d5eaa3be85e0990703d73e56f"
    )


@pytest.mark.parametrize(
    ("suite", "klen", "ivlen", "hash_name"),
    [
        (CipherSuite.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, 16, 4, "sha256"),
        (CipherSuite.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, 32, 4, "sha384"),
        (CipherSuite.TLS_RSA_WITH_AES_256_GCM_SHA384, 32, 4, "sha384"),
        (CipherSuite.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256, 32, 12, "sha256"),
    ],
)
def test_tls12_key_block_layout(suite: CipherSuite, klen: int, ivlen: int, hash_name: str) -> None:
    ms, cr, sr = bytes(range(48)), b"c" * 32, b"s" * 32
    block = tls12_prf(hash_name, ms, "key expansion", sr + cr, 2 * (klen + ivlen))
    ck, sk, civ, siv = tls12_key_block(suite, ms, cr, sr)
    assert ck + sk + civ + siv == block
    assert (len(ck), len(civ)) == (klen, ivlen)
    c, s = tls12_traffic_keys(suite, ms, cr, sr, client_seq=1, server_seq=1)
    assert (c.key, c.iv, c.seq, c.version) == (ck, civ, 1, 0x0303)
    assert (s.key, s.iv, s.seq, s.secret) == (sk, siv, 1, None)


def test_suite_names() -> None:
    assert suite_from_openssl_name("TLS_AES_128_GCM_SHA256") is CipherSuite.TLS_AES_128_GCM_SHA256
    assert suite_from_openssl_name("ECDHE-RSA-AES128-GCM-SHA256") == 0xC02F
    assert suite_from_openssl_name("ECDHE-RSA-CHACHA20-POLY1305") == 0xCCA8
    assert suite_from_openssl_name("AES256-GCM-SHA384") == 0x009D
    assert suite_from_openssl_name("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384") == 0xC02C
    for s in CipherSuite:
        assert suite_from_openssl_name(s.openssl_name) is s
        assert s.kernel_aead in ("gcm(aes)", "rfc7539(chacha20,poly1305)")
    with pytest.raises(UnsupportedCipherSuite, match=r"ECDHE-RSA-AES128-SHA.*set_ciphers"):
        suite_from_openssl_name("ECDHE-RSA-AES128-SHA")
    with pytest.raises(UnsupportedCipherSuite, match="TLS_AES_128_CCM_SHA256"):
        suite_from_openssl_name("TLS_AES_128_CCM_SHA256")
    with pytest.raises(ValueError, match="0x1304"):
        TrafficKeys(0x0304, 0x1304, bytes(16), bytes(12))


def test_traffic_keys_checks_and_repr() -> None:
    k = TrafficKeys(0x0303, 0xC02F, bytearray(b"K" * 16), memoryview(b"salt"), 5)
    assert isinstance(k.key, bytes) and isinstance(k.iv, bytes)
    assert "KKKK" not in repr(k) and "4b4b" not in repr(k) and "salt" not in repr(k)
    assert repr(k) == (
        "TrafficKeys(version=0x0303, cipher_suite=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, seq=5)"
    )
    assert k.with_seq(9).seq == 9 and k.seq == 5
    with pytest.raises(ValueError):
        k.with_seq(2**64)
    assert k.with_seq(2**64 - 1).seq == 2**64 - 1
    with pytest.raises(ValueError):
        k.with_seq(-1)
    with pytest.raises(TypeError):
        TrafficKeys(0x0303, 0xC02F, "K" * 16, b"salt")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="16-byte key"):
        TrafficKeys(0x0303, 0xC02F, bytes(32), b"salt")
    with pytest.raises(ValueError, match="4-byte iv"):
        TrafficKeys(0x0303, 0xC02F, bytes(16), bytes(12))
    with pytest.raises(ValueError, match="12-byte iv"):
        TrafficKeys(0x0303, 0xCCA8, bytes(32), bytes(4))
    with pytest.raises(ValueError, match="cannot be used"):
        TrafficKeys(0x0304, 0xC02F, bytes(16), bytes(4))
    with pytest.raises(ValueError, match="cannot be used"):
        TrafficKeys(0x0303, 0x1301, bytes(16), bytes(12))
    with pytest.raises(ValueError):
        TrafficKeys(0x0302, 0xC02F, bytes(16), bytes(4))
    with pytest.raises(ValueError, match=r"TLS 1\.3"):
        k.next_generation()
    with pytest.raises(AttributeError):
        k.seq = 3  # type: ignore[misc]


def test_ktls_params() -> None:
    t13 = TrafficKeys.tls13(0x1301, C_AP, seq=2)
    p = t13.ktls_params()
    assert p["salt"] + p["iv"] == t13.iv and p["rec_seq"] == (2).to_bytes(8, "big")
    t12 = TrafficKeys(0x0303, 0xC030, bytes(32), b"salt", 7)
    p = t12.ktls_params()
    seven = (7).to_bytes(8, "big")
    assert (p["salt"], p["iv"], p["rec_seq"]) == (b"salt", seven, seven)
    cc = TrafficKeys(0x0303, 0xCCA8, bytes(32), bytes(range(12)))
    assert cc.ktls_params()["iv"] == bytes(range(12)) and cc.ktls_params()["salt"] == b""
    assert t13.cipher_suite.ktls_cipher_type == 51 and t12.cipher_suite.ktls_cipher_type == 52
    assert cc.cipher_suite.ktls_cipher_type == 54


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: hkdf_extract("sha256", 32, ECDHE), "salt"),
        (lambda: hkdf_extract("sha256", b"", 32), "ikm"),
        (lambda: hkdf_extract("sha256", b"", "text"), "ikm"),
        (lambda: hkdf_expand_label("sha256", 32, "key", b"", 16), "secret"),
        (lambda: hkdf_expand_label("sha256", MASTER, 5, b"", 16), "label"),
        (lambda: hkdf_expand_label("sha256", MASTER, "key", 32, 16), "context"),
        (lambda: hkdf_expand_label("sha256", MASTER, "key", b"", 16.0), "length"),
        (lambda: derive_secret("sha256", 32, "derived", b""), "secret"),
        (lambda: derive_secret("sha256", MASTER, "derived", 4), "messages"),
        (lambda: tls12_prf("sha256", 48, "master secret", b"seed", 48), "secret"),
        (lambda: tls12_prf("sha256", b"k", 13, b"seed", 48), "label"),
        (lambda: tls12_prf("sha256", b"k", "master secret", 64, 48), "seed"),
        (lambda: tls12_prf("sha256", b"k", "master secret", b"seed", "48"), "length"),
        (lambda: TrafficKeys.tls13(0x1301, 32), "secret"),
    ],
)
def test_int_where_bytes_belong_is_refused_by_name(call, name: str) -> None:
    """``bytes(32)`` is 32 zero bytes: an int (or str) as key material must raise, never derive
    keys from zeros."""
    with pytest.raises(TypeError, match=name):
        call()


@pytest.mark.parametrize("length", [0, -5])
def test_nonpositive_lengths_are_refused(length: int) -> None:
    with pytest.raises(ValueError, match="length"):
        tls12_prf("sha256", b"k", "master secret", b"seed", length)
    with pytest.raises(ValueError, match="length"):
        hkdf_expand_label("sha256", MASTER, "key", b"", length)


def test_any_bytes_like_is_accepted() -> None:
    import array

    assert hkdf_extract("sha256", bytearray(), memoryview(bytes(32))) == EARLY
    as_array = array.array("B", MASTER)
    assert hkdf_expand_label("sha256", as_array, "key", b"", 16) == hkdf_expand_label(
        "sha256", MASTER, "key", b"", 16
    )
