"""Kernel constants, grouped by the UAPI header they come from.

Where the standard :mod:`socket` module already exports a constant, it is used; the rest are
copied from the headers named in each section.
"""

from __future__ import annotations

import socket
from enum import IntEnum

# --- include/linux/socket.h -------------------------------------------------------------------
AF_ALG: int = getattr(socket, "AF_ALG", 38)
SOL_ALG: int = getattr(socket, "SOL_ALG", 279)
SOL_TLS: int = 282
SOL_TCP: int = socket.IPPROTO_TCP
TCP_ULP: int = getattr(socket, "TCP_ULP", 31)

# --- include/uapi/linux/if_alg.h --------------------------------------------------------------
ALG_SET_KEY = 1
ALG_SET_IV = 2
ALG_SET_OP = 3
ALG_SET_AEAD_ASSOCLEN = 4
ALG_SET_AEAD_AUTHSIZE = 5
ALG_SET_DRBG_ENTROPY = 6
ALG_SET_KEY_BY_KEY_SERIAL = 7


class AlgOp(IntEnum):
    """``ALG_OP_*``: the value of an ``ALG_SET_OP`` control message."""

    DECRYPT = 0
    ENCRYPT = 1


# --- include/uapi/linux/tls.h -----------------------------------------------------------------
TLS_TX = 1
TLS_RX = 2
TLS_TX_ZEROCOPY_RO = 3
TLS_RX_EXPECT_NO_PAD = 4

TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304


class TLSCipherType(IntEnum):
    """``TLS_CIPHER_*``: the ``cipher_type`` of ``struct tls_crypto_info``."""

    AES_GCM_128 = 51
    AES_GCM_256 = 52
    AES_CCM_128 = 53
    CHACHA20_POLY1305 = 54
    SM4_GCM = 55
    SM4_CCM = 56
    ARIA_GCM_128 = 57
    ARIA_GCM_256 = 58


# TLS_INFO_* netlink attributes and the TlsCurrTx*/TlsDecryptError counters are read through
# /proc/net/tls_stat, whose names are the kernel's own.
TLS_STAT_PATH = "/proc/net/tls_stat"

# --- include/uapi/linux/capability.h --------------------------------------------------------
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_ADMIN = 21


def has_capability(cap: int) -> bool:
    """Whether this process has capability ``cap`` (``CAP_*``) in its effective set."""
    try:
        with open("/proc/self/status") as f:
            caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caps >> cap & 1)


# --- include/uapi/linux/fcntl.h / splice ------------------------------------------------------
SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
SPLICE_F_MORE = 4
