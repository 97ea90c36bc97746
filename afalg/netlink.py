"""Ask the kernel about one registered algorithm, and about one socket's kernel TLS.

NETLINK_CRYPTO (``crypto_user``): ask the kernel about one registered algorithm; and
NETLINK_SOCK_DIAG (``inet_diag``): what the tls ULP reports about one TCP socket
(:func:`tls_ulp_info`).

The messages are declarative pyroute2 classes mirroring ``include/uapi/linux/cryptouser.h``;
the I/O is one plain ``AF_NETLINK`` socket (request, one reply). ``CRYPTO_MSG_GETALG`` needs
``CAP_NET_ADMIN`` and the ``crypto_user`` module (autoloaded). Only *registered* algorithms are
known: a template such as ``cbc(aes)`` exists once something instantiated it (e.g. an AF_ALG
``bind()``), which :func:`query` can do for you with ``instantiate=``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass, field

from pyroute2.netlink import NLM_F_REQUEST, NLMSG_ERROR, nla, nlmsg

from afalg._uapi import CAP_NET_ADMIN, has_capability
from afalg.alg import bind
from afalg.errors import AlgError, AlgorithmNotAvailable

__all__ = [
    "CRYPTO_MSG_GETALG",
    "NETLINK_CRYPTO",
    "NETLINK_SOCK_DIAG",
    "CryptoAlg",
    "TLSDiagInfo",
    "crypto_user_alg",
    "inet_diag_msg",
    "inet_diag_req_v2",
    "query",
    "tls_ulp_info",
]

# --- include/uapi/linux/netlink.h / cryptouser.h ----------------------------------------------
NETLINK_CRYPTO = 21
CRYPTO_MSG_NEWALG = 0x10
CRYPTO_MSG_DELALG = 0x11
CRYPTO_MSG_UPDATEALG = 0x12
CRYPTO_MSG_GETALG = 0x13
CRYPTO_MAX_NAME = 64

# --- include/linux/crypto.h (cru_flags) -------------------------------------------------------
CRYPTO_ALG_TYPE_MASK = 0x0000000F
CRYPTO_ALG_ASYNC = 0x00000080
CRYPTO_ALG_TESTED = 0x00000400
CRYPTO_ALG_INTERNAL = 0x00002000

_STR = f"{CRYPTO_MAX_NAME}s"


class crypto_user_alg(nlmsg):  # the kernel's name
    """The ``CRYPTO_MSG_GETALG`` request and reply.

    .. code-block:: c

        struct crypto_user_alg {
            char cru_name[CRYPTO_MAX_NAME];
            char cru_driver_name[CRYPTO_MAX_NAME];
            char cru_module_name[CRYPTO_MAX_NAME];
            __u32 cru_type;
            __u32 cru_mask;
            __u32 cru_refcnt;
            __u32 cru_flags;
        };

    followed by ``CRYPTOCFGA_*`` attributes (``enum crypto_attr_type_t``).
    """

    fields = (
        ("cru_name", _STR),
        ("cru_driver_name", _STR),
        ("cru_module_name", _STR),
        ("cru_type", "I"),
        ("cru_mask", "I"),
        ("cru_refcnt", "I"),
        ("cru_flags", "I"),
    )

    nla_map = (
        (0, "CRYPTOCFGA_UNSPEC", "none"),
        (1, "CRYPTOCFGA_PRIORITY_VAL", "uint32"),
        (2, "CRYPTOCFGA_REPORT_LARVAL", "report_type"),
        (3, "CRYPTOCFGA_REPORT_HASH", "report_hash"),
        (4, "CRYPTOCFGA_REPORT_BLKCIPHER", "report_blkcipher"),
        (5, "CRYPTOCFGA_REPORT_AEAD", "report_aead"),
        (6, "CRYPTOCFGA_REPORT_COMPRESS", "report_type"),
        (7, "CRYPTOCFGA_REPORT_RNG", "report_rng"),
        (8, "CRYPTOCFGA_REPORT_CIPHER", "report_cipher"),
        (9, "CRYPTOCFGA_REPORT_AKCIPHER", "report_type"),
        (10, "CRYPTOCFGA_REPORT_KPP", "report_type"),
        (11, "CRYPTOCFGA_REPORT_ACOMP", "report_type"),
    )

    class report_type(nla):
        """``struct crypto_report_{larval,comp,akcipher,kpp,acomp}``: ``char type[64]``."""

        fields = (("type", _STR),)

    class report_hash(nla):
        """``struct crypto_report_hash``: type, blocksize, digestsize."""

        fields = (("type", _STR), ("blocksize", "I"), ("digestsize", "I"))

    class report_blkcipher(nla):
        """``struct crypto_report_blkcipher`` (skcipher).

        type, geniv, blocksize, min_keysize, max_keysize, ivsize."""

        fields = (
            ("type", _STR),
            ("geniv", _STR),
            ("blocksize", "I"),
            ("min_keysize", "I"),
            ("max_keysize", "I"),
            ("ivsize", "I"),
        )

    class report_aead(nla):
        """``struct crypto_report_aead``: type, geniv, blocksize, maxauthsize, ivsize."""

        fields = (
            ("type", _STR),
            ("geniv", _STR),
            ("blocksize", "I"),
            ("maxauthsize", "I"),
            ("ivsize", "I"),
        )

    class report_rng(nla):
        """``struct crypto_report_rng``: type, seedsize."""

        fields = (("type", _STR), ("seedsize", "I"))

    class report_cipher(nla):
        """``struct crypto_report_cipher``: type, blocksize, min_keysize, max_keysize."""

        fields = (("type", _STR), ("blocksize", "I"), ("min_keysize", "I"), ("max_keysize", "I"))


def _cstr(value: bytes | str) -> str:
    if isinstance(value, str):
        return value.split("\0", 1)[0]
    return value.split(b"\0", 1)[0].decode(errors="replace")


@dataclass(frozen=True)
class CryptoAlg:
    """What ``CRYPTO_MSG_GETALG`` says about one algorithm implementation."""

    name: str
    driver: str
    module: str
    priority: int
    type: str  # the report's type: "skcipher", "aead", "shash", "ahash", "rng", "cipher", ...
    selftest: bool  # CRYPTO_ALG_TESTED: the kernel's self-test passed (or was not required)
    internal: bool  # CRYPTO_ALG_INTERNAL: not usable from AF_ALG
    flags: int  # cru_flags
    refcnt: int
    report: dict[str, int | str] = field(default_factory=dict)  # sizes from the report NLA


def encode_request(name: str, driver: str = "", *, seq: int = 1) -> bytes:
    """The bytes of a ``CRYPTO_MSG_GETALG`` request for ``name`` (or the exact ``driver``)."""
    for what, value in (("name", name), ("driver", driver)):
        if len(value.encode()) >= CRYPTO_MAX_NAME:
            raise ValueError(f"algorithm {what} must be under {CRYPTO_MAX_NAME} bytes: {value!r}")
    msg = crypto_user_alg()
    msg["header"]["type"] = CRYPTO_MSG_GETALG
    msg["header"]["flags"] = NLM_F_REQUEST
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg["cru_name"] = name.encode()
    msg["cru_driver_name"] = driver.encode()
    msg["cru_module_name"] = b""
    msg["cru_type"] = msg["cru_mask"] = msg["cru_refcnt"] = msg["cru_flags"] = 0
    msg.encode()
    return bytes(msg.data)


def _reply(data: bytes, expected: int, error: type[OSError]) -> bytes:
    """Return the netlink message at the start of ``data`` if its type is ``expected``.

    Its own length's worth. NLMSG_ERROR raises OSError with the kernel's errno; a short reply
    or a message of another type raises ``error`` (EPROTO)."""
    if len(data) < 16:
        raise error(errno.EPROTO, f"short netlink reply ({len(data)} bytes)")
    length, mtype = struct.unpack_from("=IH", data)
    if mtype == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        raise OSError(-err, os.strerror(-err))
    if mtype != expected:
        raise error(errno.EPROTO, f"unexpected netlink message type {mtype:#x}")
    return data[:length]


def decode_reply(data: bytes) -> CryptoAlg:
    """Parse the kernel's reply (a ``crypto_user_alg`` message, or NLMSG_ERROR)."""
    msg = crypto_user_alg(_reply(data, CRYPTO_MSG_GETALG, AlgError))
    msg.decode()
    flags = msg["cru_flags"]
    report: dict[str, int | str] = {}
    for nla_name, value in msg["attrs"]:
        if nla_name.startswith("CRYPTOCFGA_REPORT_") and hasattr(value, "items"):
            report = {k: (_cstr(v) if isinstance(v, (bytes, str)) else v) for k, v in value.items()}
            report.pop("header", None)
    return CryptoAlg(
        name=_cstr(msg["cru_name"]),
        driver=_cstr(msg["cru_driver_name"]),
        module=_cstr(msg["cru_module_name"]),
        priority=msg.get_attr("CRYPTOCFGA_PRIORITY_VAL") or 0,
        type=str(report.get("type", "")),
        selftest=bool(flags & CRYPTO_ALG_TESTED),
        internal=bool(flags & CRYPTO_ALG_INTERNAL),
        flags=flags,
        refcnt=msg["cru_refcnt"],
        report=report,
    )


def query(name: str, driver: str = "", *, instantiate: str | None = None) -> CryptoAlg:
    """Ask the kernel (``CRYPTO_MSG_GETALG``) about the algorithm ``name`` or the ``driver``.

    ``name`` gives its highest-priority implementation; ``driver`` is exact.

    ``instantiate="skcipher"`` (or "aead", "hash", "rng") first binds an AF_ALG socket of that
    type to ``name``, so a template such as ``cbc(aes)`` gets registered before the query.
    :class:`afalg.AlgorithmNotAvailable` if the kernel does not know it; :class:`afalg.AlgError`
    (EPERM) without CAP_NET_ADMIN.
    """
    holder = None
    if instantiate:
        holder = bind(instantiate, name)
    try:
        return _query(name, driver)
    finally:
        if holder is not None:
            holder.close()


def _query(name: str, driver: str) -> CryptoAlg:
    request = encode_request(name, driver)
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_CRYPTO)
    except OSError as exc:
        raise AlgorithmNotAvailable(
            exc.errno, f"NETLINK_CRYPTO is not available (crypto_user): {exc.strerror}"
        ) from None
    with sock:
        try:
            sock.bind((0, 0))
            sock.sendto(request, (0, 0))
            reply = sock.recv(65536)
            return decode_reply(reply)
        except OSError as exc:
            if isinstance(exc, AlgError):
                raise
            what = driver or name
            if exc.errno == errno.ENOENT:
                raise AlgorithmNotAvailable(
                    errno.ENOENT, f"the kernel has no registered algorithm {what!r}"
                ) from None
            raise AlgError(exc.errno, f"CRYPTO_MSG_GETALG {what!r}: {exc.strerror}") from None


# ============================================================================================
# NETLINK_SOCK_DIAG: include/uapi/linux/sock_diag.h, inet_diag.h, tls.h
# ============================================================================================

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
INET_DIAG_NOCOOKIE = 0xFFFFFFFF  # (~0U), both halves of idiag_cookie
INET_DIAG_INFO = 2  # asking for it (idiag_ext bit INET_DIAG_INFO - 1) brings the ULP info too
TLS_CONF = {1: "base", 2: "sw", 3: "hw", 4: "hw_record"}  # TLS_CONF_BASE .. TLS_CONF_HW_RECORD


class inet_diag_req_v2(nlmsg):  # the kernel's name
    """A ``SOCK_DIAG_BY_FAMILY`` request for one TCP socket (56 bytes after the header).

    .. code-block:: c

        struct inet_diag_req_v2 {
            __u8    sdiag_family;
            __u8    sdiag_protocol;
            __u8    idiag_ext;
            __u8    pad;
            __u32   idiag_states;
            struct inet_diag_sockid {
                __be16  idiag_sport;
                __be16  idiag_dport;
                __be32  idiag_src[4];
                __be32  idiag_dst[4];
                __u32   idiag_if;
                __u32   idiag_cookie[2];   /* INET_DIAG_NOCOOKIE: any */
            } id;
        };
    """

    fields = (
        ("sdiag_family", "B"),
        ("sdiag_protocol", "B"),
        ("idiag_ext", "B"),
        ("pad", "B"),
        ("idiag_states", "I"),
        ("idiag_sport", ">H"),
        ("idiag_dport", ">H"),
        ("idiag_src", "16s"),
        ("idiag_dst", "16s"),
        ("idiag_if", "I"),
        ("idiag_cookie", "2I"),
    )


class inet_diag_msg(nlmsg):  # the kernel's name
    """The reply: ``struct inet_diag_msg`` (72 bytes), then ``INET_DIAG_*`` attributes.

    The struct holds family, state, timer, retrans, the ``inet_diag_sockid``, expires, rqueue,
    wqueue, uid, inode. ``INET_DIAG_ULP_INFO`` (19) nests ``INET_ULP_INFO_NAME`` and, for the
    tls ULP, ``INET_ULP_INFO_TLS`` with the ``TLS_INFO_*`` attributes of net/tls/tls_main.c
    ``tls_get_info()``; the kernel adds it only for a requester with CAP_NET_ADMIN."""

    fields = (
        ("idiag_family", "B"),
        ("idiag_state", "B"),
        ("idiag_timer", "B"),
        ("idiag_retrans", "B"),
        ("idiag_sport", ">H"),
        ("idiag_dport", ">H"),
        ("idiag_src", "16s"),
        ("idiag_dst", "16s"),
        ("idiag_if", "I"),
        ("idiag_cookie", "2I"),
        ("idiag_expires", "I"),
        ("idiag_rqueue", "I"),
        ("idiag_wqueue", "I"),
        ("idiag_uid", "I"),
        ("idiag_inode", "I"),
    )

    nla_map = (
        (0, "INET_DIAG_NONE", "none"),
        (19, "INET_DIAG_ULP_INFO", "ulp_info"),
    )

    class ulp_info(nla):
        """``INET_ULP_INFO_*`` (include/uapi/linux/inet_diag.h)."""

        nla_map = (
            (0, "INET_ULP_INFO_UNSPEC", "none"),
            (1, "INET_ULP_INFO_NAME", "asciiz"),
            (2, "INET_ULP_INFO_TLS", "tls_info"),
            (3, "INET_ULP_INFO_MPTCP", "hex"),
        )

        class tls_info(nla):
            """``TLS_INFO_*`` (include/uapi/linux/tls.h).

            Each is present only where the kernel has it (VERSION and CIPHER once keys are set,
            the flags when on)."""

            nla_map = (
                (0, "TLS_INFO_UNSPEC", "none"),
                (1, "TLS_INFO_VERSION", "uint16"),
                (2, "TLS_INFO_CIPHER", "uint16"),
                (3, "TLS_INFO_TXCONF", "uint16"),
                (4, "TLS_INFO_RXCONF", "uint16"),
                (5, "TLS_INFO_ZC_RO_TX", "flag"),
                (6, "TLS_INFO_RX_NO_PAD", "flag"),
            )


@dataclass(frozen=True)
class TLSDiagInfo:
    """What ``INET_DIAG_ULP_INFO`` says about one socket.

    ``ulp`` is None when the socket has no ULP; the rest is None where the kernel sent no such
    attribute. ``tx_conf``/``rx_conf``: ``"base"`` (no keys), ``"sw"`` (kernel software
    crypto), ``"hw"`` (NIC offload), ``"hw_record"`` (TOE). ``zc_ro_tx`` is reported by the
    kernel only with TX offload."""

    ulp: str | None
    version: int | None = None
    cipher_type: int | None = None
    tx_conf: str | None = None
    rx_conf: str | None = None
    zc_ro_tx: bool = False
    rx_no_pad: bool = False


def _addr(family: int, host: str) -> bytes:
    packed = socket.inet_pton(family, host)
    return packed.ljust(16, b"\0")


def encode_diag_request(sock: socket.socket, *, seq: int = 1) -> bytes:
    """Return the bytes of a ``SOCK_DIAG_BY_FAMILY`` request for exactly the TCP socket ``sock``.

    By its addresses and ports; any cookie; ``INET_DIAG_INFO`` asked for, which brings the ULP
    information with it."""
    local, peer = sock.getsockname(), sock.getpeername()
    msg = inet_diag_req_v2()
    msg["header"]["type"] = SOCK_DIAG_BY_FAMILY
    msg["header"]["flags"] = NLM_F_REQUEST
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg["sdiag_family"] = sock.family
    msg["sdiag_protocol"] = socket.IPPROTO_TCP
    # net/ipv4/inet_diag.c adds the protocol's aux attributes (tcp_diag_get_aux: the ULP info,
    # for CAP_NET_ADMIN) only when INET_DIAG_INFO is asked for.
    msg["idiag_ext"] = 1 << (INET_DIAG_INFO - 1)
    msg["pad"] = 0
    msg["idiag_states"] = 0xFFFFFFFF
    msg["idiag_sport"], msg["idiag_dport"] = local[1], peer[1]
    msg["idiag_src"] = _addr(sock.family, local[0])
    msg["idiag_dst"] = _addr(sock.family, peer[0])
    msg["idiag_if"] = 0
    msg["idiag_cookie"] = (INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    msg.encode()
    return bytes(msg.data)


def decode_diag_reply(data: bytes, inode: int) -> TLSDiagInfo:
    """Parse the kernel's ``inet_diag_msg`` reply for the socket with ``inode``.

    OSError for NLMSG_ERROR, EPROTO for another socket's reply."""
    msg = inet_diag_msg(_reply(data, SOCK_DIAG_BY_FAMILY, OSError))
    msg.decode()
    if msg["idiag_inode"] != inode:
        raise OSError(errno.EPROTO, f"inet_diag answered for inode {msg['idiag_inode']}")
    ulp = msg.get_attr("INET_DIAG_ULP_INFO")
    if ulp is None:
        return TLSDiagInfo(None)
    tls = ulp.get_attr("INET_ULP_INFO_TLS")
    name = ulp.get_attr("INET_ULP_INFO_NAME")
    if tls is None:
        return TLSDiagInfo(name)
    attrs = dict(tls["attrs"])
    return TLSDiagInfo(
        ulp=name,
        version=attrs.get("TLS_INFO_VERSION"),
        cipher_type=attrs.get("TLS_INFO_CIPHER"),
        tx_conf=TLS_CONF.get(attrs.get("TLS_INFO_TXCONF", 0)),
        rx_conf=TLS_CONF.get(attrs.get("TLS_INFO_RXCONF", 0)),
        zc_ro_tx="TLS_INFO_ZC_RO_TX" in attrs,
        rx_no_pad="TLS_INFO_RX_NO_PAD" in attrs,
    )


def tls_ulp_info(sock: socket.socket) -> TLSDiagInfo | None:
    """Ask ``inet_diag`` about the connected TCP socket ``sock``: its ULP and TLS attributes.

    For tls, the ``TLS_INFO_*`` attributes. None when the kernel gives no ULP information to
    this process (it does only to CAP_NET_ADMIN) or has no ``inet_diag``/``tcp_diag``; a socket
    with no ULP gives ``TLSDiagInfo(ulp=None)`` only with CAP_NET_ADMIN, since without it the
    two look alike."""
    if not has_capability(CAP_NET_ADMIN):
        return None
    inode = os.fstat(sock.fileno()).st_ino
    request = encode_diag_request(sock)
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with nl:
        nl.bind((0, 0))
        nl.sendto(request, (0, 0))
        try:
            return decode_diag_reply(nl.recv(65536), inode)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EOPNOTSUPP, errno.EINVAL):
                return None  # no tcp_diag, or the socket is gone
            raise
