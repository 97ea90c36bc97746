"""afalg.netlink message layout (no kernel needed)."""

from __future__ import annotations

import struct

from afalg import netlink


def test_getalg_request_layout() -> None:
    raw = netlink.encode_request("sha256", "sha256-generic", seq=7)
    assert len(raw) == 16 + 3 * 64 + 4 * 4
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", raw)
    assert (length, mtype, flags, seq, pid) == (len(raw), 0x13, 1, 7, 0)
    assert raw[16:22] == b"sha256" and raw[22:80] == bytes(58)
    assert raw[80:94] == b"sha256-generic"
    assert raw[208:] == bytes(16)


def test_getalg_reply_decodes() -> None:
    body = b"sha256".ljust(64, b"\0") + b"sha256-generic".ljust(64, b"\0")
    body += b"kernel".ljust(64, b"\0") + struct.pack("=IIII", 14, 0, 2, 0x400 | 0xE)
    prio = struct.pack("=HHI", 8, 1, 100)
    report = b"shash".ljust(64, b"\0") + struct.pack("=II", 64, 32)
    report_nla = struct.pack("=HH", 4 + len(report), 3) + report
    payload = body + prio + report_nla
    reply = struct.pack("=IHHII", 16 + len(payload), 0x13, 0, 1, 0) + payload
    info = netlink.decode_reply(reply)
    assert (info.name, info.driver, info.module, info.priority) == (
        "sha256",
        "sha256-generic",
        "kernel",
        100,
    )
    assert info.type == "shash" and info.selftest and not info.internal
    assert info.report == {"type": "shash", "blocksize": 64, "digestsize": 32}
