"""Kernel structs and control messages for AF_ALG and kernel TLS. Pure functions, no I/O.

The ctypes classes mirror ``include/uapi/linux/if_alg.h`` and ``include/uapi/linux/tls.h``
field for field (each docstring quotes the C struct); their ``sizeof`` equals the kernel's.
Control messages are ``(level, type, data)`` tuples as :meth:`socket.socket.sendmsg` takes them
and :meth:`socket.socket.recvmsg` returns them.

Byte layouts (native endianness, which is what the kernel reads):

- ``ALG_SET_OP``: ``u32 op`` (0 decrypt, 1 encrypt).
- ``ALG_SET_IV``: ``struct af_alg_iv``: ``u32 ivlen`` then ``ivlen`` bytes.
- ``ALG_SET_AEAD_ASSOCLEN``: ``u32 assoclen``.
- ``TLS_SET_RECORD_TYPE`` / ``TLS_GET_RECORD_TYPE``: one byte, the TLS ContentType.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from typing import NamedTuple, TypeAlias

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

__all__ = [
    "AlgCmsgs",
    "Buffer",
    "CipherLayout",
    "Cmsg",
    "CryptoInfo",
    "CryptoInfoPublic",
    "af_alg_iv",
    "alg_cmsgs",
    "as_bytes",
    "assoclen_cmsg",
    "cipher_layout",
    "iv_cmsg",
    "iv_header",
    "op_cmsg",
    "pack_af_alg_iv",
    "parse_alg_cmsgs",
    "parse_record_type",
    "peek_tls_crypto_info",
    "record_type_cmsg",
    "sockaddr_alg",
    "tls12_crypto_info_aes_ccm_128",
    "tls12_crypto_info_aes_gcm_128",
    "tls12_crypto_info_aes_gcm_256",
    "tls12_crypto_info_aria_gcm_128",
    "tls12_crypto_info_aria_gcm_256",
    "tls12_crypto_info_chacha20_poly1305",
    "tls12_crypto_info_sm4_ccm",
    "tls12_crypto_info_sm4_gcm",
    "tls_crypto_info",
    "tls_crypto_info_header",
    "tls_crypto_info_struct",
    "unpack_af_alg_iv",
    "unpack_tls_crypto_info",
]

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Any bytes-like object (``collections.abc.Buffer`` needs Python 3.12)."""

Cmsg = tuple[int, int, bytes]
"""One control message as :meth:`socket.socket.sendmsg` takes it: ``(level, type, data)``."""

_U32 = struct.Struct("=I")


def as_bytes(name: str, value: object) -> bytes:
    """Return ``value`` as bytes if it is bytes-like; TypeError naming ``name`` if not.

    ``bytes(16)`` would be sixteen zero bytes: an int must never become an IV or a key."""
    if isinstance(value, bytes):
        return value
    try:
        with memoryview(value) as view:  # type: ignore[arg-type]
            return view.tobytes()
    except TypeError:
        raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}") from None


# ============================================================================================
# include/uapi/linux/if_alg.h
# ============================================================================================


class sockaddr_alg(ctypes.Structure):  # the kernel's name
    """The AF_ALG socket address (88 bytes).

    .. code-block:: c

        struct sockaddr_alg {
            __u16   salg_family;
            __u8    salg_type[14];
            __u32   salg_feat;
            __u32   salg_mask;
            __u8    salg_name[64];
        };

    Python's ``socket.bind((type, name[, feat[, mask]]))`` builds it for us; this class documents
    the limits (type < 14 bytes, name < 64 bytes, both NUL-terminated).
    """

    _fields_ = [
        ("salg_family", ctypes.c_uint16),
        ("salg_type", ctypes.c_uint8 * 14),
        ("salg_feat", ctypes.c_uint32),
        ("salg_mask", ctypes.c_uint32),
        ("salg_name", ctypes.c_uint8 * 64),
    ]


SALG_TYPE_MAX = 14
SALG_NAME_MAX = 64


class af_alg_iv(ctypes.Structure):  # the kernel's name
    """The header of the ``ALG_SET_IV`` control message (4 bytes, then the IV).

    .. code-block:: c

        struct af_alg_iv {
            __u32   ivlen;
            __u8    iv[];
        };
    """

    _fields_ = [("ivlen", ctypes.c_uint32)]


def pack_af_alg_iv(iv: Buffer) -> bytes:
    """``struct af_alg_iv`` with its flexible array: ``u32 len(iv)`` then ``iv``."""
    iv = as_bytes("iv", iv)
    return iv_header(len(iv)) + iv


def iv_header(ivlen: int) -> bytes:
    """Return the 4-byte ``struct af_alg_iv`` header (``u32 ivlen``) for an IV of ``ivlen`` bytes.

    Cached per length, since it is the same for every operation of a key."""
    header = _IV_HEADERS.get(ivlen)
    if header is None:
        if not 0 <= ivlen < 2**32:
            raise ValueError(f"ivlen must fit in a u32, got {ivlen}")
        header = bytes(af_alg_iv(ivlen))  # the C layout, from the struct itself
        if len(_IV_HEADERS) < 256:
            _IV_HEADERS[ivlen] = header
    return header


_IV_HEADERS: dict[int, bytes] = {}


def unpack_af_alg_iv(data: Buffer) -> bytes:
    """The IV inside a ``struct af_alg_iv``; ValueError if ``ivlen`` disagrees with the size."""
    data = as_bytes("data", data)
    if len(data) < ctypes.sizeof(af_alg_iv):
        raise ValueError(f"struct af_alg_iv needs at least 4 bytes, got {len(data)}")
    (ivlen,) = _U32.unpack_from(data)
    if ivlen != len(data) - 4:
        raise ValueError(f"af_alg_iv.ivlen is {ivlen} but {len(data) - 4} IV bytes follow")
    return data[4:]


# The two ALG_SET_OP messages, built once: they are the same for every operation.
_OP_CMSGS: dict[int, Cmsg] = {
    int(op): (SOL_ALG, ALG_SET_OP, _U32.pack(op)) for op in (AlgOp.DECRYPT, AlgOp.ENCRYPT)
}


def op_cmsg(op: int) -> Cmsg:
    """Return the ``ALG_SET_OP`` control message: ``AlgOp.ENCRYPT`` (1) or ``AlgOp.DECRYPT`` (0).

    The same (prebuilt) tuple is returned on every call."""
    try:
        return _OP_CMSGS[op]
    except (KeyError, TypeError):
        return (SOL_ALG, ALG_SET_OP, _U32.pack(AlgOp(op)))  # AlgOp(op) raises ValueError


def iv_cmsg(iv: Buffer) -> Cmsg:
    """``ALG_SET_IV`` carrying ``struct af_alg_iv``."""
    return (SOL_ALG, ALG_SET_IV, pack_af_alg_iv(iv))


def assoclen_cmsg(assoclen: int) -> Cmsg:
    """Return ``ALG_SET_AEAD_ASSOCLEN``: how many leading bytes of the input are associated data.

    Cached per length (a record layer uses one or two)."""
    msg = _ASSOCLEN_CMSGS.get(assoclen)
    if msg is None:
        if not 0 <= assoclen < 2**32:
            raise ValueError(f"assoclen must fit in a u32, got {assoclen}")
        msg = (SOL_ALG, ALG_SET_AEAD_ASSOCLEN, _U32.pack(assoclen))
        if len(_ASSOCLEN_CMSGS) < 256:
            _ASSOCLEN_CMSGS[assoclen] = msg
    return msg


_ASSOCLEN_CMSGS: dict[int, Cmsg] = {}


def alg_cmsgs(
    op: int | None = None, iv: Buffer | None = None, assoclen: int | None = None
) -> list[Cmsg]:
    """Return the control messages for one AF_ALG ``sendmsg()``.

    In the order the kernel documents (op, iv, assoclen); arguments left as None are omitted."""
    out: list[Cmsg] = []
    if op is not None:
        out.append(op_cmsg(op))
    if iv is not None:
        out.append(iv_cmsg(iv))
    if assoclen is not None:
        out.append(assoclen_cmsg(assoclen))
    return out


class AlgCmsgs(NamedTuple):
    """The decoded AF_ALG control messages (None where absent)."""

    op: AlgOp | None
    iv: bytes | None
    assoclen: int | None


def parse_alg_cmsgs(cmsgs: Iterable[tuple[int, int, Buffer]]) -> AlgCmsgs:
    """Inverse of :func:`alg_cmsgs`; ValueError on an unknown SOL_ALG type or a bad length."""
    op = iv = assoclen = None
    for level, kind, data in cmsgs:
        data = as_bytes("data", data)
        if level != SOL_ALG:
            raise ValueError(f"not a SOL_ALG control message: level {level}")
        if kind in (ALG_SET_OP, ALG_SET_AEAD_ASSOCLEN):
            if len(data) != 4:
                raise ValueError(f"control message type {kind} needs 4 bytes, got {len(data)}")
            (value,) = _U32.unpack(data)
            if kind == ALG_SET_OP:
                op = AlgOp(value)
            else:
                assoclen = value
        elif kind == ALG_SET_IV:
            iv = unpack_af_alg_iv(data)
        else:
            raise ValueError(f"unknown SOL_ALG control message type {kind}")
    return AlgCmsgs(op, iv, assoclen)


# ============================================================================================
# include/uapi/linux/tls.h
# ============================================================================================


def record_type_cmsg(content_type: int) -> Cmsg:
    """Return ``TLS_SET_RECORD_TYPE`` for ``sendmsg()`` on a kTLS socket.

    The record's ContentType (one byte; 23 = application_data is the default when no cmsg is
    given)."""
    msg = _RECORD_TYPE_CMSGS.get(content_type)
    if msg is not None:
        return msg
    if not 0 <= content_type <= 255:
        raise ValueError(f"TLS content type is one byte, got {content_type}")
    return (SOL_TLS, TLS_SET_RECORD_TYPE, bytes([content_type]))


# Built once: a kTLS sendmsg() of a control record passes one of these.
_RECORD_TYPE_CMSGS: dict[int, Cmsg] = {
    t: (SOL_TLS, TLS_SET_RECORD_TYPE, bytes([t])) for t in range(256)
}


def parse_record_type(cmsg_data: Buffer) -> int:
    """The ContentType in a ``TLS_GET_RECORD_TYPE`` control message's data (one byte)."""
    data = as_bytes("cmsg_data", cmsg_data)
    if len(data) != 1:
        raise ValueError(f"TLS_GET_RECORD_TYPE data is 1 byte, got {len(data)}")
    return data[0]


RECORD_TYPE_CMSG_SPACE = 1
"""Bytes of cmsg data to ask ``recvmsg()`` for (pass ``socket.CMSG_SPACE(1)`` as ancbufsize)."""


class tls_crypto_info_header(ctypes.Structure):  # the kernel's name
    """``struct tls_crypto_info``, the common header (4 bytes).

    The kernel's name is taken by the :func:`tls_crypto_info` builder here.

    .. code-block:: c

        struct tls_crypto_info {
            __u16 version;      /* TLS_1_2_VERSION 0x0303 or TLS_1_3_VERSION 0x0304 */
            __u16 cipher_type;  /* TLS_CIPHER_* */
        };
    """

    _fields_ = [("version", ctypes.c_uint16), ("cipher_type", ctypes.c_uint16)]


class CipherLayout(NamedTuple):
    """Field sizes of one ``tls12_crypto_info_*`` struct (``TLS_CIPHER_*_{IV,KEY,SALT,...}``)."""

    iv: int
    key: int
    salt: int
    tag: int
    rec_seq: int


_LAYOUTS: dict[TLSCipherType, CipherLayout] = {
    TLSCipherType.AES_GCM_128: CipherLayout(iv=8, key=16, salt=4, tag=16, rec_seq=8),
    TLSCipherType.AES_GCM_256: CipherLayout(iv=8, key=32, salt=4, tag=16, rec_seq=8),
    TLSCipherType.AES_CCM_128: CipherLayout(iv=8, key=16, salt=4, tag=16, rec_seq=8),
    TLSCipherType.CHACHA20_POLY1305: CipherLayout(iv=12, key=32, salt=0, tag=16, rec_seq=8),
    TLSCipherType.SM4_GCM: CipherLayout(iv=8, key=16, salt=4, tag=16, rec_seq=8),
    TLSCipherType.SM4_CCM: CipherLayout(iv=8, key=16, salt=4, tag=16, rec_seq=8),
    TLSCipherType.ARIA_GCM_128: CipherLayout(iv=8, key=16, salt=4, tag=16, rec_seq=8),
    TLSCipherType.ARIA_GCM_256: CipherLayout(iv=8, key=32, salt=4, tag=16, rec_seq=8),
}


def _crypto_info_struct(name: str, layout: CipherLayout, c_decl: str) -> type[ctypes.Structure]:
    fields: list[tuple[str, type]] = [("info", tls_crypto_info_header)]
    fields.append(("iv", ctypes.c_ubyte * layout.iv))
    fields.append(("key", ctypes.c_ubyte * layout.key))
    fields.append(("salt", ctypes.c_ubyte * layout.salt))  # a zero-length array for ChaCha20
    fields.append(("rec_seq", ctypes.c_ubyte * layout.rec_seq))
    size = 4 + layout.iv + layout.key + layout.salt + layout.rec_seq
    doc = f"``struct {name}`` ({size} bytes).\n\n.. code-block:: c\n\n{c_decl}"
    return type(name, (ctypes.Structure,), {"_fields_": fields, "__doc__": doc})


_C_GCM = """\
    struct {name} {{
        struct tls_crypto_info info;
        unsigned char iv[{iv}];
        unsigned char key[{key}];
        unsigned char salt[{salt}];
        unsigned char rec_seq[{rec_seq}];
    }};
"""


def _make(name: str, cipher: TLSCipherType) -> type[ctypes.Structure]:
    layout = _LAYOUTS[cipher]
    return _crypto_info_struct(name, layout, _C_GCM.format(name=name, **layout._asdict()))


tls12_crypto_info_aes_gcm_128 = _make("tls12_crypto_info_aes_gcm_128", TLSCipherType.AES_GCM_128)
tls12_crypto_info_aes_gcm_256 = _make("tls12_crypto_info_aes_gcm_256", TLSCipherType.AES_GCM_256)
tls12_crypto_info_aes_ccm_128 = _make("tls12_crypto_info_aes_ccm_128", TLSCipherType.AES_CCM_128)
tls12_crypto_info_chacha20_poly1305 = _make(
    "tls12_crypto_info_chacha20_poly1305", TLSCipherType.CHACHA20_POLY1305
)
tls12_crypto_info_sm4_gcm = _make("tls12_crypto_info_sm4_gcm", TLSCipherType.SM4_GCM)
tls12_crypto_info_sm4_ccm = _make("tls12_crypto_info_sm4_ccm", TLSCipherType.SM4_CCM)
tls12_crypto_info_aria_gcm_128 = _make("tls12_crypto_info_aria_gcm_128", TLSCipherType.ARIA_GCM_128)
tls12_crypto_info_aria_gcm_256 = _make("tls12_crypto_info_aria_gcm_256", TLSCipherType.ARIA_GCM_256)

_STRUCTS: dict[TLSCipherType, type[ctypes.Structure]] = {
    TLSCipherType.AES_GCM_128: tls12_crypto_info_aes_gcm_128,
    TLSCipherType.AES_GCM_256: tls12_crypto_info_aes_gcm_256,
    TLSCipherType.AES_CCM_128: tls12_crypto_info_aes_ccm_128,
    TLSCipherType.CHACHA20_POLY1305: tls12_crypto_info_chacha20_poly1305,
    TLSCipherType.SM4_GCM: tls12_crypto_info_sm4_gcm,
    TLSCipherType.SM4_CCM: tls12_crypto_info_sm4_ccm,
    TLSCipherType.ARIA_GCM_128: tls12_crypto_info_aria_gcm_128,
    TLSCipherType.ARIA_GCM_256: tls12_crypto_info_aria_gcm_256,
}


def tls_crypto_info_struct(cipher_type: int) -> type[ctypes.Structure]:
    """The ctypes class for ``cipher_type`` (a ``TLSCipherType``)."""
    try:
        return _STRUCTS[TLSCipherType(cipher_type)]
    except ValueError:
        raise ValueError(f"unknown TLS cipher_type {cipher_type}") from None


def cipher_layout(cipher_type: int) -> CipherLayout:
    """Field sizes of ``cipher_type``'s struct (``TLS_CIPHER_*_IV_SIZE`` etc.)."""
    tls_crypto_info_struct(cipher_type)
    return _LAYOUTS[TLSCipherType(cipher_type)]


def _field(name: str, value: Buffer, size: int, cipher: TLSCipherType) -> bytes:
    value = as_bytes(name, value)
    if len(value) != size:
        raise ValueError(f"{cipher.name}: {name} must be {size} bytes, got {len(value)}")
    return value


def tls_crypto_info(
    version: int,
    cipher_type: int,
    *,
    key: Buffer,
    iv: Buffer,
    salt: Buffer | None = None,
    rec_seq: Buffer | int = 0,
) -> bytes:
    """The bytes of ``struct tls12_crypto_info_*`` for ``setsockopt(SOL_TLS, TLS_TX/TLS_RX)``.

    Fields are the kernel's, sizes checked (ValueError names the expected size):

    - AES-GCM/CCM, SM4, ARIA: ``iv`` 8 bytes, ``salt`` 4 bytes. For TLS 1.3 the 12-byte
      ``client/server_write_iv`` is ``salt || iv`` (first 4 bytes salt, last 8 iv); for TLS 1.2
      ``salt`` is the 4-byte implicit nonce and ``iv`` the first explicit nonce.
      As a convenience ``salt=None`` with a 12-byte ``iv`` splits it that way.
    - ChaCha20-Poly1305: ``iv`` 12 bytes, no salt (``None`` or ``b""``).
    - ``rec_seq``: the next record's sequence number, 8 bytes big-endian, or an int.

    Layout: ``u16 version | u16 cipher_type | iv | key | salt | rec_seq`` (native u16s, no
    padding: every array is ``unsigned char``).
    """
    if version not in (TLS_1_2_VERSION, TLS_1_3_VERSION):
        raise ValueError(f"version must be 0x0303 (TLS 1.2) or 0x0304 (TLS 1.3), got {version:#x}")
    cls = tls_crypto_info_struct(cipher_type)
    cipher = TLSCipherType(cipher_type)
    layout = _LAYOUTS[cipher]
    iv = as_bytes("iv", iv)
    key = as_bytes("key", key)
    if salt is None:
        if layout.salt and len(iv) == layout.salt + layout.iv:
            salt, iv = iv[: layout.salt], iv[layout.salt :]
        else:
            salt = b""
    if isinstance(rec_seq, bool):
        raise TypeError("rec_seq must be an int or 8 bytes, not bool")
    if isinstance(rec_seq, int):
        if not 0 <= rec_seq < 2**64:
            raise ValueError(f"rec_seq must be in [0, 2**64), got {rec_seq}")
        rec_seq = rec_seq.to_bytes(8, "big")
    obj = cls()
    obj.info.version = version
    obj.info.cipher_type = cipher
    for name, value, size in (
        ("iv", iv, layout.iv),
        ("key", key, layout.key),
        ("salt", salt, layout.salt),
        ("rec_seq", rec_seq, layout.rec_seq),
    ):
        data = _field(name, value, size, cipher)
        ctypes.memmove(ctypes.addressof(getattr(obj, name)), data, size)
    return bytes(obj)


class CryptoInfo(NamedTuple):
    """A decoded ``struct tls12_crypto_info_*``."""

    version: int
    cipher_type: TLSCipherType
    iv: bytes
    key: bytes
    salt: bytes
    rec_seq: bytes

    def __repr__(self) -> str:  # never show the key
        return (
            f"CryptoInfo(version={self.version:#06x}, cipher_type={self.cipher_type.name}, "
            f"rec_seq={int.from_bytes(self.rec_seq, 'big')})"
        )


def unpack_tls_crypto_info(data: Buffer) -> CryptoInfo:
    """Inverse of :func:`tls_crypto_info` (e.g. for ``getsockopt(SOL_TLS, TLS_TX, 56)``)."""
    data = as_bytes("data", data)
    if len(data) < 4:
        raise ValueError(f"struct tls_crypto_info needs at least 4 bytes, got {len(data)}")
    header = tls_crypto_info_header.from_buffer_copy(data[:4])
    cls = tls_crypto_info_struct(header.cipher_type)
    if len(data) != ctypes.sizeof(cls):
        raise ValueError(f"{cls.__name__} is {ctypes.sizeof(cls)} bytes, got {len(data)}")
    obj = cls.from_buffer_copy(data)
    return CryptoInfo(
        header.version,
        TLSCipherType(header.cipher_type),
        bytes(obj.iv),
        bytes(obj.key),
        bytes(obj.salt),
        bytes(obj.rec_seq),
    )


class CryptoInfoPublic(NamedTuple):
    """The fields of a ``struct tls12_crypto_info_*`` that are not secret."""

    version: int
    """``TLS_1_2_VERSION`` (0x0303) or ``TLS_1_3_VERSION`` (0x0304)."""
    cipher_type: TLSCipherType
    rec_seq: int | None
    """The next record's sequence number (None for the bare 4-byte header)."""


def peek_tls_crypto_info(data: Buffer) -> CryptoInfoPublic:
    """Return ``version``, ``cipher_type`` and ``rec_seq`` of a ``struct tls12_crypto_info_*``.

    That struct is what ``getsockopt(SOL_TLS, TLS_TX or TLS_RX)`` writes; no other byte is read.

    ``data`` is either the bare ``struct tls_crypto_info`` (4 bytes: ``u16 version | u16
    cipher_type``, native endianness; ``rec_seq`` is then None) or the whole struct of its
    ``cipher_type`` (``... | iv | key | salt | rec_seq``, ``rec_seq`` the last 8 bytes,
    big-endian). The iv, key and salt in between are never copied: the caller can zero its
    buffer afterwards and no copy of the key is left in Python objects (unlike
    :func:`unpack_tls_crypto_info`). ValueError for a size that fits neither or an unknown
    ``cipher_type``.
    """
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    if len(view) < ctypes.sizeof(tls_crypto_info_header):
        raise ValueError(f"struct tls_crypto_info needs at least 4 bytes, got {len(view)}")
    version, cipher_type = struct.unpack_from("=HH", view)
    cls = tls_crypto_info_struct(cipher_type)
    if len(view) == ctypes.sizeof(tls_crypto_info_header):
        return CryptoInfoPublic(version, TLSCipherType(cipher_type), None)
    if len(view) != ctypes.sizeof(cls):
        raise ValueError(f"{cls.__name__} is {ctypes.sizeof(cls)} bytes, got {len(view)}")
    offset = cls.rec_seq.offset
    (seq,) = struct.unpack_from(">Q", view, offset)
    return CryptoInfoPublic(version, TLSCipherType(cipher_type), seq)
