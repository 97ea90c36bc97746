"""Mutations of valid inputs for the fuzz targets (tests/test_fuzz.py), and their sizes.

A fuzz input starts as something afalg accepts (records sealed by afalg.record, a handshake two
afalg.handoff.Handshake objects exchanged, control messages afalg.cmsg built) and is then
changed a few times: record-aware changes first (drop, repeat, swap or split records, set a
header field to a boundary value), then byte changes (flip, set, insert, delete, truncate,
splice in bytes of another valid input). Random bytes would fail the first header check; these
reach the tag check, and past it where the change is authentic.

Sizes: :data:`FUZZ` is a hypothesis ``settings`` for one target: ``smoke`` examples by default
(``make test``), 100,000 at full size (``make fuzz``; ``AFALG_FUZZ_EXAMPLES`` overrides), and
:data:`FUZZ_VM` the kernel variants' (tens of examples in the VM, also 100,000 at full size:
about 75 ms each under TCG, most of it hypothesis drawing the case, so about 2 hours per kernel).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

from _env import FULL, IN_VM
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from afalg.wire import HEADER, HEADER_SIZE, MAX_CIPHERTEXT_TLS12, MAX_CIPHERTEXT_TLS13


def fuzz_settings(smoke: int, full: int) -> settings:
    """``smoke`` examples (``make test``) or ``full`` (``make fuzz``, or AFALG_FUZZ_EXAMPLES)."""
    if FULL:
        full = int(os.environ.get("AFALG_FUZZ_EXAMPLES", full))
    return settings(
        max_examples=full if FULL else smoke,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


# Host targets: a few seconds each in make test; the 100,000 in make fuzz.
FUZZ = fuzz_settings(12 if IN_VM else 150, 100_000)
# The handshake target pumps two ssl handshakes per example (key exchange, certificates).
FUZZ_HANDSHAKE = fuzz_settings(6 if IN_VM else 40, 100_000)
# Kernel variants: every example costs AF_ALG operations under TCG.
FUZZ_VM = fuzz_settings(30, 100_000)

# Header fields worth trying: the boundaries the record layer and the hand-off check.
CONTENT_TYPES = [0, 19, 20, 21, 22, 23, 24, 255]
VERSIONS = [0x0000, 0x0200, 0x0300, 0x0301, 0x0303, 0x0304, 0x03FF, 0xFEFD]
LENGTHS = [0, 1, 15, 16, 17, 23, 24, 25, 2**14, 2**14 + 1, MAX_CIPHERTEXT_TLS13,
           MAX_CIPHERTEXT_TLS13 + 1, MAX_CIPHERTEXT_TLS12, MAX_CIPHERTEXT_TLS12 + 1,
           0xFFFF]  # fmt: skip

# An unprotected change_cipher_spec record: TLS 1.3 receivers may drop it (middlebox mode).
CCS_RECORD = b"\x14\x03\x03\x00\x01\x01"


def split_records(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole records at the start of ``data`` (header and body), and what follows."""
    out = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        length = HEADER.unpack_from(data, pos)[2]
        if len(data) - pos < HEADER_SIZE + length:
            break
        out.append(data[pos : pos + HEADER_SIZE + length])
        pos += HEADER_SIZE + length
    return out, data[pos:]


# A change is drawn as a plan that does not depend on the input (positions are taken modulo
# its size), so that the draws are the same whatever the input: a handshake's flights differ
# from one run to the next (randoms, signatures), and hypothesis replays draws.
_INDEX = st.integers(0, 2**16)
RECORD_OPS = st.tuples(
    st.sampled_from(["drop", "repeat", "swap", "split", "type", "version", "length", "insert"]),
    _INDEX,
    _INDEX,
    st.sampled_from(CONTENT_TYPES),
    st.sampled_from(VERSIONS),
    st.sampled_from(LENGTHS) | st.integers(-4, 4),
)
BYTE_OPS = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]),
    _INDEX,
    st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]) | st.integers(0, 255),
    st.binary(min_size=1, max_size=8),
    _INDEX,
)
Plan = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]
PLANS: st.SearchStrategy[Plan] = st.tuples(
    st.lists(RECORD_OPS, max_size=2), st.lists(BYTE_OPS, max_size=3)
)


def apply_record_ops(ops: list[tuple[Any, ...]], data: bytes, pool: Sequence[bytes]) -> bytes:
    """``data`` (a stream of records) changed record-wise: records dropped, repeated, swapped,
    split in two (each with its true length), inserted (an unprotected change_cipher_spec, or a
    record of ``pool``), a header field set to a boundary value."""
    records, rest = split_records(data)
    for op, i, j, ctype_value, version_value, length_value in ops:
        if op == "insert" or not records:
            extras = [CCS_RECORD, *pool]
            records.insert(i % (len(records) + 1), extras[j % len(extras)])
            continue
        i %= len(records)
        record = records[i]
        if op == "drop":
            del records[i]
        elif op == "repeat":
            records.insert(j % (len(records) + 1), record)
        elif op == "swap":
            j %= len(records)
            records[i], records[j] = records[j], records[i]
        elif op == "split":
            ctype, version, _ = HEADER.unpack_from(record)
            body = record[HEADER_SIZE:]
            cut = j % (len(body) + 1)
            records[i : i + 1] = [
                HEADER.pack(ctype, version, cut) + body[:cut],
                HEADER.pack(ctype, version, len(body) - cut) + body[cut:],
            ]
        else:
            ctype, version, length = HEADER.unpack_from(record)
            if op == "type":
                ctype = ctype_value
            elif op == "version":
                version = version_value
            else:  # a boundary, or the true length give or take 4
                # (a boundary of 0xFFFF, then the true length + 1, would not fit the 16-bit field)
                length = length_value if length_value > 4 else max(0, length + length_value)
                length = min(length, 0xFFFF)
            records[i] = HEADER.pack(ctype, version, length) + record[HEADER_SIZE:]
    return b"".join(records) + rest


def apply_byte_ops(ops: list[tuple[Any, ...]], data: bytes, pool: Sequence[bytes]) -> bytes:
    """``data`` changed byte-wise: a bit flipped, a byte set, bytes inserted or deleted, the end
    cut off, or up to 64 bytes of ``pool`` spliced in."""
    buf = bytearray(data)
    for op, pos, value, blob, other in ops:
        n = len(buf)
        pos %= n + 1
        if op in ("flip", "set") and n:
            pos = min(pos, n - 1)
            buf[pos] = buf[pos] ^ (1 << (value % 8)) if op == "flip" else value
        elif op == "insert":
            buf[pos:pos] = blob
        elif op == "delete":
            del buf[pos : pos + 1 + value % 32]
        elif op == "truncate":
            del buf[pos:]
        elif op == "splice" and pool:
            src = pool[other % len(pool)]
            a = other % (len(src) + 1)
            buf[pos:pos] = src[a : a + 1 + value % 64]
    return bytes(buf)


def byte_mutations(data: bytes, pool: Sequence[bytes] = ()) -> st.SearchStrategy[bytes]:
    """``data`` changed byte-wise, a few times (or not at all)."""
    return st.lists(BYTE_OPS, max_size=3).map(lambda ops: apply_byte_ops(ops, data, pool))


def mutate(plan: Plan, data: bytes, pool: Sequence[bytes] = ()) -> bytes:
    """Record-wise then byte-wise changes of ``data`` (a stream of records)."""
    return apply_byte_ops(plan[1], apply_record_ops(plan[0], data, pool), pool)


def mutations(draw: st.DrawFn, data: bytes, pool: Sequence[bytes] = ()) -> bytes:
    """``data`` with a drawn plan of changes applied."""
    return mutate(draw(PLANS), data, pool)


def chunks(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at a few drawn places (any split of a stream must give the same result)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]
