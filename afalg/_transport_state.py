"""The asyncio transport's named states, one per direction, and the moves each allows.

:class:`afalg._transport.TLSTransport` changes them only through its ``_set_write`` and
``_set_read``, which check each move against these tables.
"""

from __future__ import annotations

import enum

_WRITABLE = -1  # a waiter woken by every writable event, not by the buffer's size


class _Write(enum.Enum):
    """The sending direction."""

    OPEN = "open"
    SENDFILE = "sendfile"  # write() refused; the sendfile's end moves back to OPEN
    EOF_PENDING = "eof pending"  # write_eof(): close_notify and FIN once the output drains
    EOF_SENT = "eof sent"
    CLOSING = "closing"  # close(): the output drains, close_notify, the socket closes
    CLOSED = "closed"  # the socket is closed; connection_lost() follows


class _Read(enum.Enum):
    """The receiving direction; a reader is registered with the loop in ACTIVE only."""

    NEW = "new"  # before the first read
    ACTIVE = "reading"
    PAUSED = "paused"  # by the protocol
    EOF = "eof"  # the peer ended its direction
    STOPPED = "stopped"  # the transport closes


_WRITE_MOVES = {
    _Write.OPEN: {_Write.SENDFILE, _Write.EOF_PENDING, _Write.CLOSING, _Write.CLOSED},
    _Write.SENDFILE: {_Write.OPEN, _Write.CLOSING, _Write.CLOSED},
    _Write.EOF_PENDING: {_Write.EOF_SENT, _Write.CLOSING, _Write.CLOSED},
    _Write.EOF_SENT: {_Write.CLOSING, _Write.CLOSED},
    _Write.CLOSING: {_Write.CLOSED},
    _Write.CLOSED: set(),
}
_READ_MOVES = {
    _Read.NEW: {_Read.ACTIVE, _Read.PAUSED, _Read.STOPPED},
    _Read.ACTIVE: {_Read.PAUSED, _Read.EOF, _Read.STOPPED},
    _Read.PAUSED: {_Read.ACTIVE, _Read.STOPPED},
    _Read.EOF: {_Read.STOPPED},
    _Read.STOPPED: set(),
}
