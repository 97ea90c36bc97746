"""NETLINK_CRYPTO (``crypto_user``): ask the kernel about one registered algorithm.

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

from afalg.errors import AlgError, AlgorithmNotAvailable

__all__ = [
    "CRYPTO_MSG_GETALG",
    "NETLINK_CRYPTO",
    "CryptoAlg",
    "crypto_user_alg",
    "query",
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
        """``struct crypto_report_blkcipher`` (skcipher): type, geniv, blocksize,
        min_keysize, max_keysize, ivsize."""

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


def decode_reply(data: bytes) -> CryptoAlg:
    """Parse the kernel's reply (a ``crypto_user_alg`` message, or NLMSG_ERROR)."""
    if len(data) < 16:
        raise AlgError(errno.EPROTO, f"short netlink reply ({len(data)} bytes)")
    length, mtype = struct.unpack_from("=IH", data)
    if mtype == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        raise OSError(-err, os.strerror(-err))
    if mtype != CRYPTO_MSG_GETALG:
        raise AlgError(errno.EPROTO, f"unexpected netlink message type {mtype:#x}")
    msg = crypto_user_alg(data[:length])
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
    """Ask the kernel (``CRYPTO_MSG_GETALG``) about the algorithm ``name`` (its
    highest-priority implementation) or the exact ``driver``.

    ``instantiate="skcipher"`` (or "aead", "hash", "rng") first binds an AF_ALG socket of that
    type to ``name``, so a template such as ``cbc(aes)`` gets registered before the query.
    :class:`afalg.AlgorithmNotAvailable` if the kernel does not know it; :class:`afalg.AlgError`
    (EPERM) without CAP_NET_ADMIN.
    """
    holder = None
    if instantiate:
        from afalg.alg import bind  # the netlink query does not need AF_ALG otherwise

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
