"""Sendfile on the asyncio transport: sendfile(2) under kTLS, else the file read and queued.

:class:`SendfileTransport` is the base class of :class:`afalg._transport.TLSTransport` that
holds its ``sendfile`` (what :func:`afalg.aio.sendfile` calls); the public face is
:mod:`afalg.aio`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import stat
from asyncio import constants as _constants
from asyncio import transports as _transports
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from afalg._sslmode import SSLObjectSocket
from afalg._transport_state import _WRITABLE, _Write
from afalg.algif import AlgTLSSocket
from afalg.errors import KeyLimitReached
from afalg.ktls import KTLSSocket

_FILE_CHUNK = 256 * 1024  # sealed sendfile: what is read from the file at a time
_SENDFILE_MAX = 0x7FFFF000  # the most one sendfile(2) moves


class SendfileTransport(_transports._FlowControlMixin):
    """The sendfile of :class:`afalg._transport.TLSTransport`, its base class."""

    # asyncio's loop.sendfile() works through its fallback (reads the file, calls write());
    # afalg.aio.sendfile() is the native path under kTLS. Not TRY_NATIVE: the loop's native
    # path would bypass the usage limit and KeyUpdate answering (see afalg.aio's docstring).
    _sendfile_compatible = _constants._SendfileMode.FALLBACK

    # TLSTransport's (and asyncio's flow-control base class's), which sendfile uses
    _loop: asyncio.AbstractEventLoop
    _low_water: int
    _tls: KTLSSocket | AlgTLSSocket | SSLObjectSocket
    _write_state: _Write
    _set_write: Callable[[_Write], None]
    _wait_buffer: Callable[[int], Awaitable[None]]
    _fatal_error: Callable[[BaseException, str], None]
    _write: Callable[[bytes | bytearray | memoryview], None]
    _advance: Callable[[], None]

    async def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """See :func:`afalg.aio.sendfile`."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer (got {offset!r})")
        if count is not None and (not isinstance(count, int) or count <= 0):
            raise ValueError(f"count must be a positive integer (got {count!r})")
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        state = self._write_state
        if state in (_Write.CLOSING, _Write.CLOSED):
            raise ConnectionError("the transport is closing")
        if state is _Write.SENDFILE:
            raise RuntimeError("sendfile is in progress already")
        if state is not _Write.OPEN:
            raise RuntimeError("cannot sendfile after write_eof()")
        self._set_write(_Write.SENDFILE)
        total = 0
        try:
            fd = _regular_fileno(file) if isinstance(self._tls, KTLSSocket) else None
            if fd is not None:
                await self._wait_buffer(0)  # what was written before goes first
                sent = self._sendfile_native(fd, offset, count)
            else:
                sent = self._sendfile_sealed(file, offset, count)
            async for n in sent:
                total += n
            return total
        finally:
            if self._write_state is _Write.SENDFILE:
                self._set_write(_Write.OPEN)
            with contextlib.suppress(OSError, ValueError):
                file.seek(offset + total)  # as loop.sendfile: the position follows what was sent
            self._advance()

    async def _sendfile_native(self, fd: int, offset: int, count: int | None) -> AsyncIterator[int]:
        """kTLS: non-blocking sendfile(2) steps; the kernel reads and encrypts the pages."""
        assert isinstance(self._tls, KTLSSocket)
        if count is None:
            count = max(0, os.fstat(fd).st_size - offset)
        done = 0
        while done < count:
            self._check_sendfile()
            try:
                n = self._tls.sendfile_nowait(fd, offset + done, min(count - done, _SENDFILE_MAX))
            except (BlockingIOError, InterruptedError):
                await self._wait_buffer(_WRITABLE)
                continue
            except (SystemExit, KeyboardInterrupt, KeyLimitReached):
                raise  # KeyLimitReached: nothing of this step was sent; the connection goes on
            except BaseException as exc:
                self._fatal_error(exc, "sendfile failed")
                raise
            if n == 0:
                return  # the file ended early
            done += n
            yield n

    async def _sendfile_sealed(
        self, file: Any, offset: int, count: int | None
    ) -> AsyncIterator[int]:
        """algif (or a file without a descriptor): read chunks, queue them, wait for room."""
        file.seek(offset)
        done = 0
        while count is None or done < count:
            self._check_sendfile()
            want = _FILE_CHUNK if count is None else min(_FILE_CHUNK, count - done)
            read = self._loop.run_in_executor(None, file.read, want)
            try:
                data = await asyncio.shield(read)
            except asyncio.CancelledError:
                # The thread's read ends before sendfile sets the file's position (a read still
                # running would move it past what was sent); its chunk is not sent.
                await asyncio.wait([read])
                raise
            if not data:
                return
            self._check_sendfile()  # closed while the file was read: that chunk is not sent
            self._write(data)
            done += len(data)
            yield len(data)
            await self._wait_buffer(self._low_water)
        self._check_sendfile()

    def _check_sendfile(self) -> None:
        if self._write_state is not _Write.SENDFILE:
            raise ConnectionError("the connection was closed during sendfile")


def _regular_fileno(file: Any) -> int | None:
    """The descriptor of a regular file (what sendfile(2) reads), else None."""
    try:
        fd = file.fileno()
    except (AttributeError, io.UnsupportedOperation, OSError):
        return None
    try:
        return fd if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
