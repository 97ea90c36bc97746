"""Traffic keys and the key derivations that produce them.

One :class:`TrafficKeys` value per direction crosses every boundary in afalg: the handshake
hand-off produces it, the record layer (:mod:`afalg.record`) seals and opens with it, and kernel
TLS receives the same value through ``setsockopt(SOL_TLS, TLS_TX/TLS_RX, ...)``.

TLS 1.3 (RFC 8446 section 7)::

    HKDF-Expand-Label(Secret, Label, Context, Length) =
        HKDF-Expand(Secret, HkdfLabel, Length)
    struct { uint16 length; opaque label<7..255> = "tls13 " + Label; opaque context<0..255>; }
    Derive-Secret(Secret, Label, Messages) =
        HKDF-Expand-Label(Secret, Label, Transcript-Hash(Messages), Hash.length)
    [sender]_write_key = HKDF-Expand-Label(Secret, "key", "", key_length)
    [sender]_write_iv  = HKDF-Expand-Label(Secret, "iv", "", 12)
    application_traffic_secret_N+1 = HKDF-Expand-Label(application_traffic_secret_N,
                                                       "traffic upd", "", Hash.length)

TLS 1.2 (RFC 5246 section 5 and 6.3, RFC 5288, RFC 7905)::

    P_hash(secret, seed) = HMAC_hash(secret, A(1) + seed) + HMAC_hash(secret, A(2) + seed) + ...
    key_block = PRF(master_secret, "key expansion", server_random + client_random)
              = client_write_key | server_write_key | client_write_IV | server_write_IV
    (AEAD suites have no MAC keys; write_IV is the 4-byte salt for AES-GCM, RFC 5288, and the
    12-byte IV for ChaCha20-Poly1305, RFC 7905.)

Keys are secrets: :class:`TrafficKeys` never shows them in its ``repr``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from afalg._uapi import TLS_1_2_VERSION, TLS_1_3_VERSION, TLSCipherType
from afalg.cmsg import as_bytes
from afalg.errors import UnsupportedCipherSuite

__all__ = [
    "TLS_1_2_VERSION",
    "TLS_1_3_VERSION",
    "CipherSuite",
    "SuiteParameters",
    "TrafficKeys",
    "UnsupportedCipherSuite",
    "derive_secret",
    "hkdf_expand_label",
    "hkdf_extract",
    "suite_from_openssl_name",
    "tls12_key_block",
    "tls12_prf",
    "tls12_traffic_keys",
]

MAX_SEQ = 2**64 - 1
"""The largest record sequence number; a record layer must not seal or open past it."""


class CipherSuite(IntEnum):
    """The AEAD cipher suites afalg can run, by IANA code point."""

    # TLS 1.3 (RFC 8446 appendix B.4)
    TLS_AES_128_GCM_SHA256 = 0x1301
    TLS_AES_256_GCM_SHA384 = 0x1302
    TLS_CHACHA20_POLY1305_SHA256 = 0x1303
    # TLS 1.2 AES-GCM (RFC 5288, RFC 5289)
    TLS_RSA_WITH_AES_128_GCM_SHA256 = 0x009C
    TLS_RSA_WITH_AES_256_GCM_SHA384 = 0x009D
    TLS_DHE_RSA_WITH_AES_128_GCM_SHA256 = 0x009E
    TLS_DHE_RSA_WITH_AES_256_GCM_SHA384 = 0x009F
    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 = 0xC02B
    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 = 0xC02C
    TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 = 0xC02F
    TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 = 0xC030
    # TLS 1.2 ChaCha20-Poly1305 (RFC 7905)
    TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA8
    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCA9
    TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256 = 0xCCAA

    @property
    def params(self) -> SuiteParameters:
        """Key sizes, hash, AEAD names (kernel and kTLS) of this suite."""
        return _SUITES[self][0]

    @property
    def is_tls13(self) -> bool:
        return self.value >> 8 == 0x13

    @property
    def is_chacha20(self) -> bool:
        return self.params.aead == "chacha20-poly1305"

    @property
    def key_length(self) -> int:
        return self.params.key_length

    @property
    def hash_name(self) -> str:
        return self.params.hash_name

    @property
    def kernel_aead(self) -> str:
        """The kernel crypto API name of the record AEAD (full 12-byte nonce)."""
        return self.params.kernel_aead

    @property
    def ktls_cipher_type(self) -> TLSCipherType:
        """``TLS_CIPHER_*`` of ``struct tls_crypto_info`` for this suite."""
        return self.params.ktls_cipher_type

    @property
    def openssl_name(self) -> str:
        """OpenSSL's name, as ``ssl.SSLSocket.cipher()[0]`` reports it."""
        return _SUITES[self][1]


class SuiteParameters(NamedTuple):
    aead: str  # "aes-gcm" or "chacha20-poly1305"
    key_length: int
    hash_name: str  # "sha256" or "sha384"
    kernel_aead: str  # "gcm(aes)" or "rfc7539(chacha20,poly1305)"
    ktls_cipher_type: TLSCipherType


_GCM128 = SuiteParameters("aes-gcm", 16, "sha256", "gcm(aes)", TLSCipherType.AES_GCM_128)
_GCM256 = SuiteParameters("aes-gcm", 32, "sha384", "gcm(aes)", TLSCipherType.AES_GCM_256)
_CHACHA = SuiteParameters(
    "chacha20-poly1305", 32, "sha256", "rfc7539(chacha20,poly1305)",
    TLSCipherType.CHACHA20_POLY1305,
)  # fmt: skip

_S = CipherSuite
# The suite table: each suite's parameters and OpenSSL's name for it (as
# ssl.SSLSocket.cipher()[0] reports it; TLS 1.3's are the IANA names).
_SUITES: dict[CipherSuite, tuple[SuiteParameters, str]] = {
    _S.TLS_AES_128_GCM_SHA256: (_GCM128, "TLS_AES_128_GCM_SHA256"),
    _S.TLS_AES_256_GCM_SHA384: (_GCM256, "TLS_AES_256_GCM_SHA384"),
    _S.TLS_CHACHA20_POLY1305_SHA256: (_CHACHA, "TLS_CHACHA20_POLY1305_SHA256"),
    _S.TLS_RSA_WITH_AES_128_GCM_SHA256: (_GCM128, "AES128-GCM-SHA256"),
    _S.TLS_RSA_WITH_AES_256_GCM_SHA384: (_GCM256, "AES256-GCM-SHA384"),
    _S.TLS_DHE_RSA_WITH_AES_128_GCM_SHA256: (_GCM128, "DHE-RSA-AES128-GCM-SHA256"),
    _S.TLS_DHE_RSA_WITH_AES_256_GCM_SHA384: (_GCM256, "DHE-RSA-AES256-GCM-SHA384"),
    _S.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256: (_GCM128, "ECDHE-ECDSA-AES128-GCM-SHA256"),
    _S.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384: (_GCM256, "ECDHE-ECDSA-AES256-GCM-SHA384"),
    _S.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256: (_GCM128, "ECDHE-RSA-AES128-GCM-SHA256"),
    _S.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384: (_GCM256, "ECDHE-RSA-AES256-GCM-SHA384"),
    _S.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256: (_CHACHA, "ECDHE-RSA-CHACHA20-POLY1305"),
    _S.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256: (_CHACHA, "ECDHE-ECDSA-CHACHA20-POLY1305"),
    _S.TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256: (_CHACHA, "DHE-RSA-CHACHA20-POLY1305"),
}
assert set(_SUITES) == set(CipherSuite), "every suite has a row"
_BY_NAME: dict[str, CipherSuite] = {s.name: s for s in CipherSuite}
_BY_NAME.update({openssl: s for s, (_params, openssl) in _SUITES.items()})


def suite_from_openssl_name(name: str) -> CipherSuite:
    """Return the :class:`CipherSuite` named ``name``, as OpenSSL or IANA spells it.

    OpenSSL's names are ``ssl.SSLSocket.cipher()[0]``'s: ``"TLS_AES_128_GCM_SHA256"``,
    ``"ECDHE-RSA-AES128-GCM-SHA256"``.

    Raises :class:`UnsupportedCipherSuite` for anything else (CBC, CCM, ...).
    """
    if not isinstance(name, str):
        raise TypeError(f"suite name must be str, not {type(name).__name__}")
    try:
        return _BY_NAME[name.strip()]
    except KeyError:
        raise UnsupportedCipherSuite(name) from None


def _suite(value: CipherSuite | int | str) -> CipherSuite:
    if isinstance(value, CipherSuite):
        return value
    if isinstance(value, str):
        return suite_from_openssl_name(value)
    if isinstance(value, int):
        try:
            return CipherSuite(value)
        except ValueError:
            raise UnsupportedCipherSuite(value) from None
    raise TypeError(f"cipher suite must be CipherSuite, int or str, not {type(value).__name__}")


def _hash(algorithm: str | hashes.HashAlgorithm) -> hashes.HashAlgorithm:
    if isinstance(algorithm, hashes.HashAlgorithm):
        return algorithm
    if algorithm == "sha256":
        return hashes.SHA256()
    if algorithm == "sha384":
        return hashes.SHA384()
    raise ValueError(f"unsupported hash {algorithm!r} (sha256 or sha384)")


def _label(value: object) -> bytes:
    """A label: a str (ASCII) or bytes-like."""
    if isinstance(value, str):
        return value.encode("ascii")
    return as_bytes("label", value)


def _length(value: object) -> int:
    """An output length: a positive int (TypeError for any other type, ValueError if < 1)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"length must be int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"length must be positive, got {value}")
    return value


# --- TLS 1.3 key schedule (RFC 8446 section 7.1) ------------------------------------------------


def hkdf_extract(algorithm: str | hashes.HashAlgorithm, salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract(salt, IKM) (RFC 5869): return HMAC-Hash(salt, IKM).

    An empty salt is Hash.length zero bytes."""
    salt = as_bytes("salt", salt)
    ikm = as_bytes("ikm", ikm)
    alg = _hash(algorithm)
    h = _hmac.HMAC(salt or bytes(alg.digest_size), alg)
    h.update(ikm)
    return h.finalize()


def hkdf_expand_label(
    algorithm: str | hashes.HashAlgorithm,
    secret: bytes,
    label: str | bytes,
    context: bytes,
    length: int,
) -> bytes:
    """HKDF-Expand-Label(Secret, Label, Context, Length) of RFC 8446 section 7.1.

    ``label`` is given without the ``"tls13 "`` prefix (``"key"``, ``"iv"``, ``"traffic upd"``).
    """
    secret = as_bytes("secret", secret)
    full_label = b"tls13 " + _label(label)
    context = as_bytes("context", context)
    length = _length(length)
    if length > 0xFFFF:
        raise ValueError(f"length must be at most 65535, got {length}")
    if len(full_label) > 255:
        raise ValueError(f"label must be at most 249 bytes, got {len(full_label) - 6}")
    if len(context) > 255:
        raise ValueError(f"context must be at most 255 bytes, got {len(context)}")
    info = (
        length.to_bytes(2, "big")
        + bytes([len(full_label)]) + full_label
        + bytes([len(context)]) + context
    )  # fmt: skip
    return HKDFExpand(_hash(algorithm), length, info).derive(secret)


def derive_secret(
    algorithm: str | hashes.HashAlgorithm, secret: bytes, label: str | bytes, messages: bytes
) -> bytes:
    """Derive-Secret(Secret, Label, Messages): Expand-Label with Transcript-Hash(Messages).

    ``messages`` is the concatenated handshake messages (hashed here), as in RFC 8446.
    """
    alg = _hash(algorithm)
    digest = hashes.Hash(alg)
    digest.update(as_bytes("messages", messages))
    return hkdf_expand_label(alg, secret, label, digest.finalize(), alg.digest_size)


# --- TLS 1.2 PRF (RFC 5246 section 5) -----------------------------------------------------------


def tls12_prf(
    algorithm: str | hashes.HashAlgorithm,
    secret: bytes,
    label: str | bytes,
    seed: bytes,
    length: int,
) -> bytes:
    """PRF(secret, label, seed) = P_<hash>(secret, label + seed), ``length`` bytes."""
    alg = _hash(algorithm)
    secret = as_bytes("secret", secret)
    seed = _label(label) + as_bytes("seed", seed)
    length = _length(length)

    def hmac(data: bytes) -> bytes:
        h = _hmac.HMAC(secret, alg)
        h.update(data)
        return h.finalize()

    out = bytearray()
    a = seed  # A(0)
    while len(out) < length:
        a = hmac(a)  # A(i) = HMAC_hash(secret, A(i-1))
        out += hmac(a + seed)
    return bytes(out[:length])


def tls12_key_block(
    suite: CipherSuite | int | str,
    master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
) -> tuple[bytes, bytes, bytes, bytes]:
    """Return the TLS 1.2 key block of an AEAD suite: the write keys and IVs.

    ``(client_write_key, server_write_key, client_write_IV, server_write_IV)``, no MAC keys.
    The IVs are 4 bytes (AES-GCM salt) or 12 bytes (ChaCha20)."""
    s = _suite(suite)
    if s.is_tls13:
        raise ValueError(f"{s.name} is a TLS 1.3 suite; it has no TLS 1.2 key block")
    master_secret = as_bytes("master_secret", master_secret)
    client_random = as_bytes("client_random", client_random)
    server_random = as_bytes("server_random", server_random)
    if len(master_secret) != 48:
        raise ValueError(f"master_secret must be 48 bytes, got {len(master_secret)}")
    if len(client_random) != 32 or len(server_random) != 32:
        raise ValueError("client_random and server_random must be 32 bytes each")
    klen = s.key_length
    ivlen = 12 if s.is_chacha20 else 4
    block = tls12_prf(
        s.hash_name,
        master_secret,
        b"key expansion",
        server_random + client_random,
        2 * (klen + ivlen),
    )
    return (
        block[:klen],
        block[klen : 2 * klen],
        block[2 * klen : 2 * klen + ivlen],
        block[2 * klen + ivlen :],
    )


def tls12_traffic_keys(
    suite: CipherSuite | int | str,
    master_secret: bytes,
    client_random: bytes,
    server_random: bytes,
    *,
    client_seq: int = 0,
    server_seq: int = 0,
) -> tuple[TrafficKeys, TrafficKeys]:
    """``(client_write, server_write)`` TrafficKeys of a TLS 1.2 AEAD connection.

    A client sends with the first and receives with the second; a server the other way round.
    The sequence numbers are those of the next record (1 after the Finished record of a full
    handshake, which was record 0 under these keys).
    """
    s = _suite(suite)
    ck, sk, civ, siv = tls12_key_block(s, master_secret, client_random, server_random)
    return (
        TrafficKeys(TLS_1_2_VERSION, s, ck, civ, client_seq),
        TrafficKeys(TLS_1_2_VERSION, s, sk, siv, server_seq),
    )


# --- the value that crosses boundaries ----------------------------------------------------------


@dataclass(frozen=True, repr=False)
class TrafficKeys:
    """The keys of one direction of a TLS connection, and the next record's sequence number.

    ``version`` is 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3). ``iv`` is 12 bytes for TLS 1.3 and
    for ChaCha20-Poly1305 (nonce = iv XOR seq), the 4-byte salt for TLS 1.2 AES-GCM (nonce =
    salt || 8-byte explicit nonce). ``seq`` is the sequence number of the next record, 0 to
    2**64-1. ``secret`` is the TLS 1.3 traffic secret, kept to derive the next generation.

    Never reuse one (key, seq) pair for two different records: that reuses the AEAD nonce.
    """

    version: int
    cipher_suite: CipherSuite
    key: bytes
    iv: bytes
    seq: int = 0
    secret: bytes | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.version, int)
            or isinstance(self.version, bool)
            or self.version not in (TLS_1_2_VERSION, TLS_1_3_VERSION)
        ):
            raise ValueError(f"version must be 0x0303 or 0x0304, got {self.version!r}")
        suite = _suite(self.cipher_suite)
        object.__setattr__(self, "cipher_suite", suite)
        if suite.is_tls13 != (self.version == TLS_1_3_VERSION):
            raise ValueError(f"{suite.name} cannot be used with version 0x{self.version:04x}")
        key = as_bytes("key", self.key)
        iv = as_bytes("iv", self.iv)
        if len(key) != suite.key_length:
            raise ValueError(f"{suite.name} needs a {suite.key_length}-byte key, got {len(key)}")
        want_iv = 4 if self.version == TLS_1_2_VERSION and not suite.is_chacha20 else 12
        if len(iv) != want_iv:
            raise ValueError(f"{suite.name} needs a {want_iv}-byte iv, got {len(iv)}")
        if not isinstance(self.seq, int) or isinstance(self.seq, bool):
            raise TypeError(f"seq must be int, not {type(self.seq).__name__}")
        if not 0 <= self.seq <= MAX_SEQ:
            raise ValueError(f"seq out of range 0..2**64-1: {self.seq}")
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "iv", iv)
        if self.secret is not None:
            secret = as_bytes("secret", self.secret)
            if self.version != TLS_1_3_VERSION:
                raise ValueError("secret is only meaningful for TLS 1.3")
            want = _hash(suite.hash_name).digest_size
            if len(secret) != want:
                raise ValueError(
                    f"{suite.name} traffic secret must be {want} bytes, not {len(secret)}"
                )
            object.__setattr__(self, "secret", secret)

    def __repr__(self) -> str:
        return (
            f"TrafficKeys(version=0x{self.version:04x}, cipher_suite={self.cipher_suite.name}, "
            f"seq={self.seq})"
        )

    @classmethod
    def tls13(cls, suite: CipherSuite | int | str, secret: bytes, seq: int = 0) -> TrafficKeys:
        """Keys from a TLS 1.3 traffic secret: write_key and write_iv by HKDF-Expand-Label."""
        s = _suite(suite)
        if not s.is_tls13:
            raise ValueError(f"{s.name} is not a TLS 1.3 suite")
        secret = as_bytes("secret", secret)
        alg = _hash(s.hash_name)
        if len(secret) != alg.digest_size:
            raise ValueError(f"{s.name} traffic secret must be {alg.digest_size} bytes")
        key = hkdf_expand_label(alg, secret, "key", b"", s.key_length)
        iv = hkdf_expand_label(alg, secret, "iv", b"", 12)
        return cls(TLS_1_3_VERSION, s, key, iv, seq, secret)

    def with_seq(self, seq: int) -> TrafficKeys:
        """The same keys with another next-record sequence number."""
        return dataclasses.replace(self, seq=seq)

    def next_generation(self) -> TrafficKeys:
        """TLS 1.3 KeyUpdate: keys from application_traffic_secret_N+1, sequence 0."""
        if self.version != TLS_1_3_VERSION or self.secret is None:
            raise ValueError("next_generation needs TLS 1.3 keys that carry their traffic secret")
        alg = _hash(self.cipher_suite.hash_name)
        nxt = hkdf_expand_label(alg, self.secret, "traffic upd", b"", alg.digest_size)
        return TrafficKeys.tls13(self.cipher_suite, nxt)

    @property
    def nonce_iv(self) -> bytes:
        """The IV bytes a nonce is made from.

        The 12 bytes XORed with the sequence number (TLS 1.3, ChaCha20), or for TLS 1.2 AES-GCM
        the salt followed by 8 zero bytes (the explicit nonce goes there)."""
        return self.iv if len(self.iv) == 12 else self.iv + bytes(8)

    def ktls_params(self) -> dict[str, bytes]:
        """Return ``key``, ``iv``, ``salt`` and ``rec_seq`` for ``setsockopt(SOL_TLS, TLS_TX/RX)``.

        As ``struct tls12_crypto_info_*`` wants them (see afalg.cmsg.tls_crypto_info).

        AES-GCM: salt = the first 4 bytes of the 12-byte nonce IV, iv = the other 8 (TLS 1.3),
        or salt = the TLS 1.2 salt and iv = the next explicit nonce, the sequence number, as
        OpenSSL sends it. ChaCha20: iv = all 12 bytes, salt empty.
        """
        rec_seq = self.seq.to_bytes(8, "big")
        if self.cipher_suite.is_chacha20:
            return {"key": self.key, "iv": self.iv, "salt": b"", "rec_seq": rec_seq}
        if self.version == TLS_1_3_VERSION:
            return {"key": self.key, "iv": self.iv[4:], "salt": self.iv[:4], "rec_seq": rec_seq}
        return {"key": self.key, "iv": rec_seq, "salt": self.iv, "rec_seq": rec_seq}
