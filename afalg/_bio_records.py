"""The records that cross the handshake's BIOs: counted per direction, and read whole.

The hand-off (:mod:`afalg.handoff`) reads each incoming record as a 5-byte header then exactly
its body, and counts the records that went each way to find the sequence numbers the kernel
starts from.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from afalg.wire import HEADER, HEADER_SIZE, MAX_CIPHERTEXT_TLS12, ContentType

_CONTENT_TYPES = frozenset(ContentType)


@dataclass
class _Direction:
    """The records that went one way during the handshake."""

    records: list[tuple[int, int]] = field(default_factory=list)  # (content_type, call number)
    handshake: bytearray = field(default_factory=bytearray)  # plaintext handshake stream
    encrypted: bool = False  # a ChangeCipherSpec (1.2) or an encrypted record (1.3) was seen
    pending: bytearray = field(default_factory=bytearray)

    def add(self, data: bytes, call: int) -> None:
        self.pending += data
        while len(self.pending) >= HEADER_SIZE:
            content_type, _version, length = HEADER.unpack_from(self.pending)
            if len(self.pending) < HEADER_SIZE + length:
                break
            payload = bytes(self.pending[HEADER_SIZE : HEADER_SIZE + length])
            del self.pending[: HEADER_SIZE + length]
            self.records.append((content_type, call))
            if content_type in (ContentType.change_cipher_spec, ContentType.application_data):
                self.encrypted = True
            elif content_type == ContentType.handshake and not self.encrypted:
                self.handshake += payload

    def first_message_random(self, msg_type: int) -> bytes | None:
        """The 32-byte random of the first handshake message if it is ``msg_type``, else None.

        ``msg_type`` is ClientHello or ServerHello: type(1) length(3) legacy_version(2) random(32).
        """
        if len(self.handshake) < 38 or self.handshake[0] != msg_type:
            return None
        return bytes(self.handshake[6:38])

    def after_last_ccs(self) -> int:
        """Records after the last ChangeCipherSpec (TLS 1.2: sealed under the new keys)."""
        count = 0
        for content_type, _call in self.records:
            count = 0 if content_type == ContentType.change_cipher_spec else count + 1
        return count

    def in_call(self, call: int) -> int:
        return sum(1 for _t, c in self.records if c == call)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            break
        got += k
    return bytes(buf[:got])


def record_length(header: bytes | bytearray) -> int | None:
    """The body length announced by a 5-byte record header, or None if the header is not TLS.

    Not TLS: a content type outside 20..23, a major version other than 3, or a length over 2^14 +
    2048 (the TLS 1.2 bound, the largest either version allows)."""
    content_type, version, length = HEADER.unpack_from(header)
    if content_type not in _CONTENT_TYPES or version >> 8 != 3 or length > MAX_CIPHERTEXT_TLS12:
        return None
    return length


def read_record(sock: socket.socket) -> tuple[bytes, bool]:
    """One TLS record from ``sock`` (header and body) and not a byte more, and whether it is whole.

    Not whole: EOF came first, or the header is not TLS (see :func:`record_length`)."""
    header = _recv_exactly(sock, HEADER_SIZE)
    if len(header) < HEADER_SIZE:
        return header, False
    length = record_length(header)
    if length is None:
        return header, False  # not TLS (a plain-text request?): ssl raises a clear error at once
    body = _recv_exactly(sock, length)
    return header + body, len(body) == length
