"""afalg.cmsg: struct sizes equal the C sizeof, byte layouts, round trips. No kernel needed."""

from __future__ import annotations

import ctypes
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from afalg import cmsg
from afalg._uapi import (
    ALG_SET_AEAD_ASSOCLEN,
    ALG_SET_IV,
    ALG_SET_OP,
    SOL_ALG,
    SOL_TLS,
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    TLS_SET_RECORD_TYPE,
    AlgOp,
    TLSCipherType,
)

# sizeof() from include/uapi/linux/tls.h and if_alg.h (checked against the C compiler below).
EXPECTED_SIZES = {
    "tls12_crypto_info_aes_gcm_128": 40,
    "tls12_crypto_info_aes_gcm_256": 56,
    "tls12_crypto_info_aes_ccm_128": 40,
    "tls12_crypto_info_chacha20_poly1305": 56,
    "tls12_crypto_info_sm4_gcm": 40,
    "tls12_crypto_info_sm4_ccm": 40,
    "tls12_crypto_info_aria_gcm_128": 40,
    "tls12_crypto_info_aria_gcm_256": 56,
    "sockaddr_alg": 88,
    "af_alg_iv": 4,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_struct_sizes(name: str) -> None:
    assert ctypes.sizeof(getattr(cmsg, name)) == EXPECTED_SIZES[name]


def _c_layout(tmp_path: Path) -> dict[str, int]:
    """sizeof and offsetof of every struct, as the C compiler sees the installed headers."""
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/if_alg.h>"]
    lines += ["#include <linux/tls.h>", "int main(void) {"]
    for name in EXPECTED_SIZES:
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        if name.startswith("tls12"):
            for field in ("iv", "key", "salt", "rec_seq"):
                lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    lines.append(
        'printf("sockaddr_alg.salg_name %zu\\n", offsetof(struct sockaddr_alg, salg_name));'
    )
    lines.append("return 0; }")
    src = tmp_path / "sizes.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "sizes"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(
    not (shutil.which("cc") and Path("/usr/include/linux/tls.h").exists()),
    reason="needs a C compiler and the kernel UAPI headers (linux-libc-dev)",
)
def test_layout_matches_c_compiler(tmp_path: Path) -> None:
    c = _c_layout(tmp_path)
    for name in EXPECTED_SIZES:
        cls = getattr(cmsg, name)
        assert ctypes.sizeof(cls) == c[name], name
        if name.startswith("tls12"):
            for field in ("iv", "key", "salt", "rec_seq"):
                assert getattr(cls, field).offset == c[f"{name}.{field}"], (name, field)
    assert cmsg.sockaddr_alg.salg_name.offset == c["sockaddr_alg.salg_name"]


def test_tls13_aes_gcm_128_layout() -> None:
    key = bytes(range(16))
    write_iv = bytes(range(100, 112))  # TLS 1.3 client_write_iv: salt = first 4, iv = last 8
    data = cmsg.tls_crypto_info(
        TLS_1_3_VERSION, TLSCipherType.AES_GCM_128, key=key, iv=write_iv, rec_seq=5
    )
    expected = (
        struct.pack("=HH", 0x0304, 51) + write_iv[4:] + key + write_iv[:4] + (5).to_bytes(8, "big")
    )
    assert data == expected
    # the same with salt and iv given separately
    assert data == cmsg.tls_crypto_info(
        TLS_1_3_VERSION,
        TLSCipherType.AES_GCM_128,
        key=key,
        iv=write_iv[4:],
        salt=write_iv[:4],
        rec_seq=(5).to_bytes(8, "big"),
    )


def test_tls12_aes_gcm_256_layout() -> None:
    key, salt, explicit = b"K" * 32, b"SALT", b"E" * 8
    data = cmsg.tls_crypto_info(
        TLS_1_2_VERSION, TLSCipherType.AES_GCM_256, key=key, iv=explicit, salt=salt, rec_seq=1
    )
    assert len(data) == 56
    assert data == struct.pack("=HH", 0x0303, 52) + explicit + key + salt + bytes(7) + b"\x01"


def test_chacha20_layout() -> None:
    key, iv = b"k" * 32, b"i" * 12
    data = cmsg.tls_crypto_info(
        TLS_1_3_VERSION, TLSCipherType.CHACHA20_POLY1305, key=key, iv=iv, rec_seq=2**64 - 1
    )
    assert data == struct.pack("=HH", 0x0304, 54) + iv + key + b"\xff" * 8
    assert cmsg.tls_crypto_info(
        TLS_1_3_VERSION, TLSCipherType.CHACHA20_POLY1305, key=key, iv=iv, salt=b""
    ) == struct.pack("=HH", 0x0304, 54) + iv + key + bytes(8)


def test_ccm_layout() -> None:
    data = cmsg.tls_crypto_info(
        TLS_1_2_VERSION, TLSCipherType.AES_CCM_128, key=b"k" * 16, iv=b"i" * 8, salt=b"ssss"
    )
    assert data == struct.pack("=HH", 0x0303, 53) + b"i" * 8 + b"k" * 16 + b"ssss" + bytes(8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"key": b"k" * 15, "iv": b"i" * 12}, "key must be 16 bytes, got 15"),
        ({"key": b"k" * 16, "iv": b"i" * 9}, "iv must be 8 bytes, got 9"),
        ({"key": b"k" * 16, "iv": b"i" * 8, "salt": b"s"}, "salt must be 4 bytes, got 1"),
        ({"key": b"k" * 16, "iv": b"i" * 12, "rec_seq": 2**64}, "rec_seq must be in"),
        ({"key": b"k" * 16, "iv": b"i" * 12, "rec_seq": b"x"}, "rec_seq must be 8 bytes"),
    ],
)
def test_tls_crypto_info_sizes_checked(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cmsg.tls_crypto_info(TLS_1_3_VERSION, TLSCipherType.AES_GCM_128, **kwargs)


def test_tls_crypto_info_bad_version_and_cipher() -> None:
    with pytest.raises(ValueError, match="version"):
        cmsg.tls_crypto_info(0x0302, 51, key=b"k" * 16, iv=b"i" * 12)
    with pytest.raises(ValueError, match="unknown TLS cipher_type 99"):
        cmsg.tls_crypto_info(TLS_1_3_VERSION, 99, key=b"k" * 16, iv=b"i" * 12)


@given(
    cipher=st.sampled_from(list(TLSCipherType)),
    version=st.sampled_from([TLS_1_2_VERSION, TLS_1_3_VERSION]),
    data=st.data(),
)
def test_tls_crypto_info_round_trip(cipher: TLSCipherType, version: int, data) -> None:
    layout = cmsg.cipher_layout(cipher)
    key = data.draw(st.binary(min_size=layout.key, max_size=layout.key))
    iv = data.draw(st.binary(min_size=layout.iv, max_size=layout.iv))
    salt = data.draw(st.binary(min_size=layout.salt, max_size=layout.salt))
    seq = data.draw(st.integers(0, 2**64 - 1))
    raw = cmsg.tls_crypto_info(version, cipher, key=key, iv=iv, salt=salt, rec_seq=seq)
    assert len(raw) == ctypes.sizeof(cmsg.tls_crypto_info_struct(cipher))
    info = cmsg.unpack_tls_crypto_info(raw)
    assert info == (version, cipher, iv, key, salt, seq.to_bytes(8, "big"))
    assert key.hex() not in repr(info) or not key


def test_unpack_tls_crypto_info_rejects_wrong_size() -> None:
    raw = cmsg.tls_crypto_info(TLS_1_3_VERSION, 51, key=bytes(16), iv=bytes(12))
    with pytest.raises(ValueError, match="is 40 bytes, got 39"):
        cmsg.unpack_tls_crypto_info(raw[:-1])


def test_alg_cmsgs_layout() -> None:
    msgs = cmsg.alg_cmsgs(op=AlgOp.ENCRYPT, iv=b"\x01\x02\x03", assoclen=20)
    assert msgs == [
        (SOL_ALG, ALG_SET_OP, struct.pack("=I", 1)),
        (SOL_ALG, ALG_SET_IV, struct.pack("=I", 3) + b"\x01\x02\x03"),
        (SOL_ALG, ALG_SET_AEAD_ASSOCLEN, struct.pack("=I", 20)),
    ]
    assert cmsg.alg_cmsgs(op=0) == [(SOL_ALG, ALG_SET_OP, bytes(4))]
    assert cmsg.alg_cmsgs() == []
    assert SOL_ALG == 279 and ALG_SET_OP == 3 and ALG_SET_IV == 2 and ALG_SET_AEAD_ASSOCLEN == 4


def test_alg_cmsgs_match_cpython_sendmsg_afalg_constants() -> None:
    # CPython builds the same messages in sendmsg_afalg(); its constants must agree with ours.
    if hasattr(socket, "ALG_SET_OP"):
        assert socket.SOL_ALG == SOL_ALG
        assert socket.ALG_SET_OP == ALG_SET_OP
        assert socket.ALG_SET_IV == ALG_SET_IV
        assert socket.ALG_SET_AEAD_ASSOCLEN == ALG_SET_AEAD_ASSOCLEN
        assert socket.ALG_OP_ENCRYPT == AlgOp.ENCRYPT


@given(
    op=st.none() | st.sampled_from(list(AlgOp)),
    iv=st.none() | st.binary(max_size=64),
    assoclen=st.none() | st.integers(0, 2**32 - 1),
)
def test_alg_cmsgs_round_trip(op, iv, assoclen) -> None:
    assert cmsg.parse_alg_cmsgs(cmsg.alg_cmsgs(op=op, iv=iv, assoclen=assoclen)) == (
        op,
        iv,
        assoclen,
    )


def test_alg_cmsg_errors() -> None:
    with pytest.raises(ValueError):
        cmsg.op_cmsg(2)
    with pytest.raises(ValueError, match="u32"):
        cmsg.assoclen_cmsg(2**32)
    with pytest.raises(ValueError, match="ivlen is 5 but 3"):
        cmsg.unpack_af_alg_iv(struct.pack("=I", 5) + b"abc")
    with pytest.raises(ValueError, match="unknown SOL_ALG"):
        cmsg.parse_alg_cmsgs([(SOL_ALG, 9, b"")])
    with pytest.raises(ValueError, match="not a SOL_ALG"):
        cmsg.parse_alg_cmsgs([(SOL_TLS, ALG_SET_OP, bytes(4))])
    with pytest.raises(ValueError, match="needs 4 bytes"):
        cmsg.parse_alg_cmsgs([(SOL_ALG, ALG_SET_OP, bytes(3))])


@given(st.integers(0, 255))
def test_record_type_round_trip(content_type: int) -> None:
    level, kind, data = cmsg.record_type_cmsg(content_type)
    assert (level, kind) == (SOL_TLS, TLS_SET_RECORD_TYPE) == (282, 1)
    assert data == bytes([content_type])
    assert cmsg.parse_record_type(data) == content_type


def test_record_type_errors() -> None:
    with pytest.raises(ValueError):
        cmsg.record_type_cmsg(256)
    with pytest.raises(ValueError, match="1 byte, got 2"):
        cmsg.parse_record_type(b"\x17\x00")


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: cmsg.iv_cmsg(16), "iv"),
        (lambda: cmsg.iv_cmsg("0123456789abcdef"), "iv"),
        (lambda: cmsg.pack_af_alg_iv(12), "iv"),
        (lambda: cmsg.alg_cmsgs(iv=16), "iv"),
        (lambda: cmsg.unpack_af_alg_iv(8), "data"),
        (lambda: cmsg.parse_record_type(1), "cmsg_data"),
        (lambda: cmsg.unpack_tls_crypto_info(40), "data"),
        (lambda: cmsg.parse_alg_cmsgs([(SOL_ALG, ALG_SET_OP, 4)]), "data"),
        (
            lambda: cmsg.tls_crypto_info(0x0304, 51, key=16, iv=bytes(8), salt=bytes(4)),
            "key",
        ),
        (
            lambda: cmsg.tls_crypto_info(0x0304, 51, key=bytes(16), iv=12),
            "iv",
        ),
        (
            lambda: cmsg.tls_crypto_info(0x0304, 51, key=bytes(16), iv=bytes(8), salt=4),
            "salt",
        ),
        (
            lambda: cmsg.tls_crypto_info(
                0x0304, 51, key=bytes(16), iv=bytes(8), salt=bytes(4), rec_seq=True
            ),
            "rec_seq",
        ),
    ],
)
def test_int_where_bytes_belong_is_refused_by_name(call, name: str) -> None:
    """``bytes(16)`` is sixteen zero bytes: an int as an IV or a key must raise TypeError naming
    the argument, never reach the kernel as zeros."""
    with pytest.raises(TypeError, match=name):
        call()


def test_any_bytes_like_iv_and_key() -> None:
    import array

    assert cmsg.iv_cmsg(array.array("B", range(16)))[2] == cmsg.iv_cmsg(bytes(range(16)))[2]
    info = cmsg.tls_crypto_info(0x0304, 51, key=bytearray(16), iv=memoryview(bytes(12)))
    assert info == cmsg.tls_crypto_info(0x0304, 51, key=bytes(16), iv=bytes(12))


_C_CIPHER = {
    "tls12_crypto_info_aes_gcm_128": "TLS_CIPHER_AES_GCM_128",
    "tls12_crypto_info_aes_gcm_256": "TLS_CIPHER_AES_GCM_256",
    "tls12_crypto_info_aes_ccm_128": "TLS_CIPHER_AES_CCM_128",
    "tls12_crypto_info_chacha20_poly1305": "TLS_CIPHER_CHACHA20_POLY1305",
    "tls12_crypto_info_sm4_gcm": "TLS_CIPHER_SM4_GCM",
    "tls12_crypto_info_sm4_ccm": "TLS_CIPHER_SM4_CCM",
    "tls12_crypto_info_aria_gcm_128": "TLS_CIPHER_ARIA_GCM_128",
    "tls12_crypto_info_aria_gcm_256": "TLS_CIPHER_ARIA_GCM_256",
}


@pytest.mark.skipif(
    not (shutil.which("cc") and Path("/usr/include/linux/tls.h").exists()),
    reason="needs a C compiler and the kernel UAPI headers (linux-libc-dev)",
)
def test_peek_tls_crypto_info_against_c(tmp_path: Path) -> None:
    """Structs filled by C (iv/key/salt 0xAB, rec_seq 01..08): peek_tls_crypto_info reads the
    header and rec_seq where C put them, and nothing of the rest."""
    lines = ["#include <stdio.h>", "#include <string.h>", "#include <linux/tls.h>"]
    lines += ["int main(void) { unsigned char *p; size_t i;"]
    for name, macro in _C_CIPHER.items():
        lines.append(f"{{ struct {name} s; memset(&s, 0xAB, sizeof s);")
        lines.append("s.info.version = TLS_1_3_VERSION;")
        lines.append(f"s.info.cipher_type = {macro};")
        lines.append("for (i = 0; i < sizeof s.rec_seq; i++) s.rec_seq[i] = i + 1;")
        lines.append(f'printf("{name} "); p = (unsigned char *)&s;')
        lines.append('for (i = 0; i < sizeof s; i++) printf("%02x", p[i]); printf("\\n"); }')
    lines.append("return 0; }")
    src = tmp_path / "peek.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "peek"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    seen = set()
    for line in out.splitlines():
        name, hexdata = line.split()
        raw = bytearray.fromhex(hexdata)
        cipher = getattr(TLSCipherType, _C_CIPHER[name].removeprefix("TLS_CIPHER_"))
        info = cmsg.peek_tls_crypto_info(raw)
        assert info == (TLS_1_3_VERSION, cipher, 0x0102030405060708), name
        assert "171" not in repr(info) and "0xab" not in repr(info).lower()
        assert cmsg.peek_tls_crypto_info(raw[:4]) == (TLS_1_3_VERSION, cipher, None)
        seen.add(name)
    assert seen == set(_C_CIPHER)


def test_peek_tls_crypto_info_matches_unpack() -> None:
    raw = cmsg.tls_crypto_info(
        TLS_1_2_VERSION, TLSCipherType.AES_GCM_256, key=bytes(range(32)), iv=b"i" * 8,
        salt=b"salt", rec_seq=2**64 - 2,
    )  # fmt: skip
    full = cmsg.unpack_tls_crypto_info(raw)
    peek = cmsg.peek_tls_crypto_info(memoryview(bytearray(raw)))
    assert (peek.version, peek.cipher_type) == (full.version, full.cipher_type)
    assert peek.rec_seq == int.from_bytes(full.rec_seq, "big") == 2**64 - 2
    with pytest.raises(ValueError, match="56 bytes, got 55"):
        cmsg.peek_tls_crypto_info(raw[:-1])
    with pytest.raises(ValueError, match="at least 4"):
        cmsg.peek_tls_crypto_info(raw[:3])
    with pytest.raises(ValueError, match="unknown TLS cipher_type 99"):
        cmsg.peek_tls_crypto_info(b"\x04\x03\x63\x00")
