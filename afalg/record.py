"""The TLS record layer, sans I/O: bytes in, records out; records in, bytes out.

In use::

    layer = RecordLayer(tx=keys_tx, rx=keys_rx)          # afalg.keys.TrafficKeys
    wire = layer.seal(ContentType.application_data, b"hello")
    layer.feed(received_bytes)
    while (record := layer.next_record()) is not None:
        handle(record.content_type, record.payload)

The AEAD runs in the kernel (AF_ALG: ``gcm(aes)``, ``rfc7539(chacha20,poly1305)``) or, where
AF_ALG is missing, in pyca/cryptography; both take the full 12-byte nonce.

Record protection, by version (the header is ``type(1) || version(2) || length(2)``):

TLS 1.3 (RFC 8446 section 5.2)::

    nonce     = iv XOR (0^32 || seq_64)
    inner     = content || content_type(1) || zeros(padding)      (TLSInnerPlaintext)
    AAD       = 23 || 0x0303 || len(inner) + 16                  (the record header)
    record    = AAD || AEAD-Encrypt(key, nonce, inner, AAD)

TLS 1.2 AES-GCM (RFC 5288)::

    explicit  = seq_64                                           (as OpenSSL sends it)
    nonce     = salt(4) || explicit(8)
    AAD       = seq_64 || type || 0x0303 || len(content)
    record    = type || 0x0303 || 8 + len(content) + 16 || explicit || AEAD-Encrypt(...)

TLS 1.2 ChaCha20-Poly1305 (RFC 7905)::

    nonce     = iv XOR (0^32 || seq_64);  AAD as for AES-GCM;  no explicit nonce

Warnings: each direction owns its sequence number; never give one TrafficKeys value to two
record layers that both seal (nonce reuse breaks AES-GCM and ChaCha20-Poly1305 completely). The
layer refuses to seal or open past sequence number 2**64-1. Any error while opening poisons the
layer (h11 style): later calls raise again, and no plaintext of a record whose tag failed is ever
returned.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from afalg.aead_backend import TAG_SIZE, Backend, RecordAEAD, new_record_aead
from afalg.cmsg import Buffer
from afalg.errors import ClosedError, InvalidTag, KeyLimitReached, TLSProtocolError
from afalg.keys import MAX_SEQ, TLS_1_2_VERSION, TLS_1_3_VERSION, CipherSuite, TrafficKeys
from afalg.wire import (
    HEADER,
    HEADER_SIZE,
    MAX_CIPHERTEXT_TLS12,
    MAX_CIPHERTEXT_TLS13,
    MAX_PLAINTEXT,
    AlertDescription,
    ContentType,
)

__all__ = [
    "MAX_CIPHERTEXT_TLS12",
    "MAX_CIPHERTEXT_TLS13",
    "MAX_PLAINTEXT",
    "ContentType",
    "PaddingPolicy",
    "Record",
    "RecordLayer",
    "default_records_per_key",
]

EXPLICIT_NONCE_SIZE = 8

AES_GCM_RECORD_LIMIT = 2**24
"""Records one AES-GCM key may seal (RFC 8446 section 5.5: up to 2**24.5 full-size records keep
the AE safety margin at about 2**-57; afalg stops at 2**24)."""
CHACHA20_RECORD_LIMIT = 2**64
"""ChaCha20-Poly1305: no limit before the sequence number runs out (RFC 8446 section 5.5)."""


def default_records_per_key(suite: CipherSuite) -> int:
    """The most records one key of ``suite`` may seal by default (RFC 8446 section 5.5)."""
    return CHACHA20_RECORD_LIMIT if suite.is_chacha20 else AES_GCM_RECORD_LIMIT


_AAD12 = struct.Struct(">QBHH")


class Record(NamedTuple):
    """One opened record: its (inner, for TLS 1.3) content type and plaintext."""

    content_type: ContentType
    payload: bytes


PaddingPolicy = Callable[[ContentType, int], int]
"""TLS 1.3 padding: given the content type and content length, how many zero bytes to add.
The result is clamped so that TLSInnerPlaintext stays within 2**14 + 1 bytes.
:meth:`RecordLayer.seal` asks it about every record of a payload before sealing any: if it raises
(or returns anything but an int: TypeError), ``seal()`` raises with no sequence number used and
the layer stays usable."""

_CT = {int(t): t for t in ContentType}
_TYPE_BYTE = {t: bytes((t,)) for t in ContentType}
_A = AlertDescription


def pad_to_block(block: int) -> PaddingPolicy:
    """Return a padding policy that pads TLSInnerPlaintext to a multiple of ``block`` bytes.

    TLSInnerPlaintext is the content and the type byte; RFC 8446 5.4 leaves the policy to the
    sender."""
    if not isinstance(block, int) or block < 1:
        raise ValueError("block must be a positive int")

    def policy(content_type: ContentType, length: int) -> int:
        return -(length + 1) % block

    return policy


class _Direction:
    """Keys, AEAD and sequence number of one direction."""

    __slots__ = ("aead", "iv_int", "keys", "salt", "seq", "tls12_gcm", "version")

    def __init__(self, keys: TrafficKeys, backend: Backend) -> None:
        if not isinstance(keys, TrafficKeys):
            raise TypeError(f"keys must be TrafficKeys, not {type(keys).__name__}")
        self.keys = keys
        self.version = keys.version
        self.seq = keys.seq
        self.tls12_gcm = keys.version == TLS_1_2_VERSION and not keys.cipher_suite.is_chacha20
        self.salt = keys.iv if self.tls12_gcm else b""
        self.iv_int = 0 if self.tls12_gcm else int.from_bytes(keys.iv, "big")
        self.aead: RecordAEAD = new_record_aead(keys.cipher_suite, keys.key, backend)

    def current(self, name: str) -> TrafficKeys:
        if self.seq > MAX_SEQ:
            raise ValueError(
                f"{name} sequence numbers exhausted: 2**64 records used these keys, no record "
                "can follow"
            )
        return self.keys.with_seq(self.seq)

    def nonce(self, seq: int) -> bytes:
        return (self.iv_int ^ seq).to_bytes(12, "big")


class RecordLayer:
    """A TLS 1.2 or 1.3 record layer with its own sequence numbers and no I/O.

    ``tx`` and ``rx`` are the keys of each direction; a direction without keys carries plaintext
    records (TLSPlaintext, version 0x0303). ``backend`` picks the AEAD: ``"kernel"`` (AF_ALG),
    ``"cryptography"``, or ``"auto"`` (the kernel's when AF_ALG has the algorithm).
    ``padding`` (TLS 1.3 only) is a :data:`PaddingPolicy` or an int block size.
    ``accept_ccs`` lets a TLS 1.3 receiver drop unprotected ``change_cipher_spec`` records of the
    single byte 0x01 (only while a handshake is in progress, RFC 8446 5); by default any
    unprotected record other than application_data-typed ones is ``unexpected_message`` once rx
    keys are installed.

    Errors while opening raise :class:`afalg.TLSProtocolError` whose ``alert`` is the one to send
    (bad_record_mac, record_overflow, decode_error, unexpected_message, protocol_version) and
    poison the layer: every later call raises again, except :meth:`seal` of an alert record, so
    the caller can still send that fatal alert.
    """

    def __init__(
        self,
        *,
        tx: TrafficKeys | None = None,
        rx: TrafficKeys | None = None,
        backend: Backend = "auto",
        padding: PaddingPolicy | int | None = None,
        accept_ccs: bool = False,
        records_per_key: int | None = None,
    ) -> None:
        if records_per_key is not None and (
            not isinstance(records_per_key, int) or isinstance(records_per_key, bool)
        ):
            raise TypeError("records_per_key must be an int or None")
        if records_per_key is not None and records_per_key < 2:
            raise ValueError("records_per_key must be at least 2 (data, then a KeyUpdate)")
        if backend not in ("auto", "kernel", "cryptography"):
            raise ValueError(f"backend must be 'auto', 'kernel' or 'cryptography': {backend!r}")
        if isinstance(padding, int) and not isinstance(padding, bool):
            padding = pad_to_block(padding)
        elif padding is not None and not callable(padding):
            raise TypeError("padding must be None, an int block size or a callable")
        self._backend: Backend = backend
        self._padding: PaddingPolicy | None = padding
        self._accept_ccs = bool(accept_ccs)
        self._records_per_key = records_per_key
        self._tx: _Direction | None = None
        self._rx: _Direction | None = None
        self._buf = bytearray()
        self._pos = 0
        self._error: TLSProtocolError | None = None
        self._closed = False
        if tx is not None:
            self._tx = _Direction(tx, backend)
        if rx is not None:
            try:
                self._rx = _Direction(rx, backend)
            except BaseException:
                self.close()
                raise

    # --- state --------------------------------------------------------------------------------

    @property
    def tx_keys(self) -> TrafficKeys | None:
        """The sending keys with the next record's sequence number (None: plaintext).

        ValueError once all 2**64 sequence numbers have been used (no record can follow)."""
        return None if self._tx is None else self._tx.current("tx")

    @property
    def rx_keys(self) -> TrafficKeys | None:
        """The receiving keys with the next record's sequence number (None: plaintext).

        ValueError once all 2**64 sequence numbers have been used (no record can follow)."""
        return None if self._rx is None else self._rx.current("rx")

    @property
    def backend(self) -> str:
        """The AEAD backend in use ("kernel" or "cryptography"; "none" without keys)."""
        d = self._tx or self._rx
        return "none" if d is None else getattr(d.aead, "backend", type(d.aead).__name__)

    @property
    def records_per_key(self) -> int | None:
        """The most records one sending key may seal, as given (None: no limit).

        None leaves only the sequence number space; afalg's TLS sockets give
        :func:`default_records_per_key`."""
        return self._records_per_key

    @property
    def tx_records_left(self) -> int:
        """Records the current sending key may still seal.

        :attr:`records_per_key` (or 2**64) minus those it sealed (its sequence number: TLS 1.3
        keys start at 0, and TLS 1.2's first record, the Finished, was ssl's). :meth:`seal`
        refuses more (:class:`afalg.errors.KeyLimitReached`); a TLS 1.3 sender seals a
        KeyUpdate and calls :meth:`rekey_tx` before."""
        if self._tx is None:
            return 0
        limit = MAX_SEQ + 1 if self._records_per_key is None else self._records_per_key
        return max(0, limit - self._tx.seq)

    @property
    def error(self) -> TLSProtocolError | None:
        """The error that poisoned the layer, if any."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as records."""
        return len(self._buf) - self._pos

    def install_tx(self, keys: TrafficKeys) -> None:
        """Start protecting sent records with ``keys`` (e.g. after a handshake)."""
        self._check_usable()
        new = _Direction(keys, self._backend)
        old, self._tx = self._tx, new
        if old is not None:
            old.aead.close()

    def install_rx(self, keys: TrafficKeys) -> None:
        """Start opening received records with ``keys``."""
        self._check_usable()
        new = _Direction(keys, self._backend)
        old, self._rx = self._rx, new
        if old is not None:
            old.aead.close()

    def rekey_tx(self) -> TrafficKeys:
        """Switch sending to the next TLS 1.3 key generation (after sealing a KeyUpdate)."""
        self._check_usable()
        if self._tx is None:
            raise ValueError("no tx keys to update")
        nxt = self._tx.keys.next_generation()
        self.install_tx(nxt)
        return nxt

    def rekey_rx(self) -> TrafficKeys:
        """Switch receiving to the next TLS 1.3 key generation (after the peer's KeyUpdate)."""
        self._check_usable()
        if self._rx is None:
            raise ValueError("no rx keys to update")
        nxt = self._rx.keys.next_generation()
        self.install_rx(nxt)
        return nxt

    def close(self) -> None:
        """Release the AEADs (kernel sockets). Idempotent."""
        self._closed = True
        for d in (self._tx, self._rx):
            if d is not None:
                d.aead.close()

    def __enter__(self) -> RecordLayer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        def side(d: _Direction | None) -> str:
            if d is None:
                return "plaintext"
            return f"{d.keys.cipher_suite.name} seq={d.seq}"

        state = " poisoned" if self._error else (" closed" if self._closed else "")
        return (
            f"<RecordLayer backend={self.backend} tx=({side(self._tx)}) "
            f"rx=({side(self._rx)}){state}>"
        )

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError("record layer")
        if self._error is not None:
            raise TLSProtocolError(
                self._error.alert, f"record layer unusable after an earlier error: {self._error}"
            )

    def _fail(self, alert: AlertDescription, message: str) -> TLSProtocolError:
        exc = TLSProtocolError(alert, message)
        if self._error is None:  # the first error is the one that poisoned the layer
            self._error = exc
        return exc

    # --- sending ------------------------------------------------------------------------------

    def seal(self, content_type: ContentType | int, payload: Buffer) -> bytes:
        """Protect ``payload`` as one or more records of ``content_type``; return the wire bytes.

        Payloads over 2**14 bytes are split. An empty application_data payload gives one
        zero-length record; empty handshake, alert and change_cipher_spec payloads are refused
        (RFC 5246 6.2.1, RFC 8446 5.1)."""
        if self._closed:
            raise ClosedError("record layer")
        try:
            ctype = _CT[content_type]
        except (KeyError, TypeError):
            raise ValueError(f"unknown content type {content_type!r}") from None
        if self._error is not None and ctype is not ContentType.alert:
            self._check_usable()
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"payload must be bytes-like, not {type(payload).__name__}")
        view = memoryview(payload).cast("B")
        n = len(view)
        tx = self._tx
        if n == 0 and ctype is not ContentType.application_data:
            raise ValueError(f"zero-length {ctype.name} records are not allowed")
        if ctype is ContentType.alert and n != 2:
            raise ValueError("an alert record carries exactly one 2-byte alert")
        if tx is not None and ctype is ContentType.change_cipher_spec:
            raise ValueError("change_cipher_spec is never sent under record protection")
        if tx is None:
            return b"".join(
                HEADER.pack(ctype, TLS_1_2_VERSION, len(view[i : i + MAX_PLAINTEXT]))
                + bytes(view[i : i + MAX_PLAINTEXT])
                for i in range(0, max(n, 1), MAX_PLAINTEXT)
            )
        count = max(1, -(-n // MAX_PLAINTEXT))
        if tx.seq + count - 1 > MAX_SEQ:
            raise TLSProtocolError(
                _A.internal_error,
                "sequence number would pass 2**64-1: update the keys or close the connection",
            )
        if count > self.tx_records_left:
            raise KeyLimitReached(
                f"sealing {count} more records would take this key past its limit of "
                f"{self.records_per_key} records ({self.tx_records_left} left): update the keys "
                "first (TLS 1.3 KeyUpdate) or end the connection"
            )
        if count == 1 and self._padding is None:  # the common case: one record, as it is
            if tx.version == TLS_1_3_VERSION:
                return self._seal13(tx, ctype, view, 0)
            return self._seal12(tx, ctype, view)
        fragments = (
            [view]
            if count == 1
            else [view[i : i + MAX_PLAINTEXT] for i in range(0, n, MAX_PLAINTEXT)]
        )
        if tx.version != TLS_1_3_VERSION:
            return b"".join(self._seal12(tx, ctype, fragment) for fragment in fragments)
        # The padding policy is the caller's code: ask it about every record before sealing
        # any, so that if it raises no sequence number is used and the layer stays usable.
        pads = [self._pad(ctype, len(fragment)) for fragment in fragments]
        return b"".join(
            self._seal13(tx, ctype, fragment, pad)
            for fragment, pad in zip(fragments, pads, strict=True)
        )

    def _pad(self, ctype: ContentType, n: int) -> int:
        """The policy's padding for a record of ``n`` content bytes, clamped to what fits."""
        if self._padding is None:
            return 0
        pad = self._padding(ctype, n)
        if not isinstance(pad, int) or isinstance(pad, bool):
            raise TypeError(f"the padding policy must return an int, not {type(pad).__name__}")
        return max(0, min(pad, MAX_PLAINTEXT - n))

    def _seal13(
        self, tx: _Direction, ctype: ContentType, content: memoryview, pad: int | None = None
    ) -> bytes:
        if pad is None:
            pad = self._pad(ctype, len(content))
        inner = b"".join((content, _TYPE_BYTE[ctype], bytes(pad) if pad else b""))
        header = HEADER.pack(23, TLS_1_2_VERSION, len(inner) + TAG_SIZE)
        seq = tx.seq
        try:
            record = tx.aead.encrypt_record(tx.nonce(seq), inner, header)
        except Exception as exc:
            raise self._sealing_failed(exc) from exc
        tx.seq = seq + 1
        return record

    def _seal12(self, tx: _Direction, ctype: ContentType, content: memoryview) -> bytes:
        n = len(content)
        seq = tx.seq
        aad = _AAD12.pack(seq, ctype, TLS_1_2_VERSION, n)
        if tx.tls12_gcm:
            explicit = aad[:8]  # the explicit nonce is the sequence number
            out = self._encrypt(tx, tx.salt + explicit, content, aad)
            tx.seq = seq + 1
            return HEADER.pack(ctype, TLS_1_2_VERSION, len(out) + 8) + explicit + out
        out = self._encrypt(tx, tx.nonce(seq), content, aad)
        tx.seq = seq + 1
        return HEADER.pack(ctype, TLS_1_2_VERSION, len(out)) + out

    def _encrypt(
        self, tx: _Direction, nonce: bytes, content: Buffer, aad: bytes
    ) -> bytes | bytearray:
        try:
            return tx.aead.encrypt(nonce, content, aad)
        except Exception as exc:
            raise self._sealing_failed(exc) from exc

    def _sealing_failed(self, exc: Exception) -> TLSProtocolError:
        # Records of this seal() call may already have used sequence numbers and been
        # dropped with the exception: the peer would see a gap. Poison, as for opening.
        return self._fail(_A.internal_error, f"sealing a record failed: {exc}")

    # --- receiving ----------------------------------------------------------------------------

    def feed(self, data: Buffer) -> None:
        """Add received bytes; any split of the stream is fine."""
        self._check_usable()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, not {type(data).__name__}")
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_record(self) -> Record | None:
        """The next opened record, or None until a whole record has been fed."""
        self._check_usable()
        while True:
            buf, pos = self._buf, self._pos
            if len(buf) - pos < HEADER_SIZE:
                return None
            ctype_int, version, length = HEADER.unpack_from(buf, pos)
            rx = self._rx
            ctype = _CT.get(ctype_int)
            if ctype is None:
                raise self._fail(_A.unexpected_message, f"unknown record content type {ctype_int}")
            self._check_header(rx, ctype, version, length)
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                return None
            with memoryview(buf) as view:  # one copy out of the buffer, released at once
                header = bytes(view[pos : pos + HEADER_SIZE])
                body = bytes(view[pos + HEADER_SIZE : end])
            self._pos = end
            if end == len(buf):
                buf.clear()
                self._pos = 0
            if rx is None:
                return self._record(ctype, body)
            if rx.version == TLS_1_3_VERSION:
                if ctype is ContentType.change_cipher_spec:  # accept_ccs, checked in header
                    if body != b"\x01":
                        raise self._fail(_A.unexpected_message, "bad change_cipher_spec record")
                    continue
                return self._open13(rx, header, body)
            return self._open12(rx, ctype, header, body)

    def _check_header(
        self, rx: _Direction | None, ctype: ContentType, version: int, length: int
    ) -> None:
        if rx is None:
            if version >> 8 != 3:
                raise self._fail(_A.protocol_version, f"record version 0x{version:04x}")
            if length > MAX_PLAINTEXT:
                raise self._fail(_A.record_overflow, f"plaintext record of {length} bytes")
        elif rx.version == TLS_1_3_VERSION:
            # legacy_record_version is ignored (RFC 8446 5.1); it is authenticated as AAD.
            if ctype is not ContentType.application_data:
                if not (self._accept_ccs and ctype is ContentType.change_cipher_spec):
                    raise self._fail(
                        _A.unexpected_message, f"unprotected {ctype.name} record after keys"
                    )
                if length != 1:
                    raise self._fail(_A.unexpected_message, "bad change_cipher_spec record")
            elif length > MAX_CIPHERTEXT_TLS13:
                raise self._fail(_A.record_overflow, f"TLSCiphertext of {length} bytes")
        else:
            if version != TLS_1_2_VERSION:
                raise self._fail(_A.protocol_version, f"record version 0x{version:04x}")
            if ctype is ContentType.change_cipher_spec:
                raise self._fail(_A.unexpected_message, "change_cipher_spec after keys")
            if length > MAX_CIPHERTEXT_TLS12:
                raise self._fail(_A.record_overflow, f"TLSCiphertext of {length} bytes")

    def _check_rx_seq(self, rx: _Direction) -> None:
        if rx.seq > MAX_SEQ:
            raise self._fail(_A.internal_error, "receive sequence number would pass 2**64-1")

    def _decrypt(self, rx: _Direction, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        try:
            plaintext = rx.aead.decrypt(nonce, data, aad)
        except InvalidTag:
            raise self._fail(_A.bad_record_mac, "record authentication failed") from None
        except Exception as exc:  # the record is consumed but not opened: the stream is lost
            raise self._fail(_A.internal_error, f"opening a record failed: {exc}") from exc
        rx.seq += 1
        return plaintext

    def _open13(self, rx: _Direction, header: bytes, body: bytes) -> Record:
        self._check_rx_seq(rx)
        if len(body) < TAG_SIZE:
            raise self._fail(_A.bad_record_mac, "record shorter than the tag")
        inner = self._decrypt(rx, rx.nonce(rx.seq), body, header)
        if len(inner) > MAX_PLAINTEXT + 1:
            raise self._fail(_A.record_overflow, f"TLSInnerPlaintext of {len(inner)} bytes")
        if inner and inner[-1]:
            i = len(inner) - 1
        else:
            i = len(inner.rstrip(b"\x00")) - 1
            if i < 0:
                raise self._fail(_A.unexpected_message, "no content type in TLSInnerPlaintext")
        ctype = _CT.get(inner[i])
        if ctype is None or ctype is ContentType.change_cipher_spec:
            raise self._fail(_A.unexpected_message, f"protected record of type {inner[i]}")
        return self._record(ctype, inner[:i])

    def _open12(self, rx: _Direction, ctype: ContentType, header: bytes, body: bytes) -> Record:
        self._check_rx_seq(rx)
        if rx.tls12_gcm:
            if len(body) < EXPLICIT_NONCE_SIZE + TAG_SIZE:
                raise self._fail(_A.bad_record_mac, "record shorter than nonce and tag")
            nonce = rx.salt + body[:EXPLICIT_NONCE_SIZE]
            data = body[EXPLICIT_NONCE_SIZE:]
        else:
            if len(body) < TAG_SIZE:
                raise self._fail(_A.bad_record_mac, "record shorter than the tag")
            nonce = rx.nonce(rx.seq)
            data = body
        aad = _AAD12.pack(rx.seq, ctype, TLS_1_2_VERSION, len(data) - TAG_SIZE)
        plaintext = self._decrypt(rx, nonce, data, aad)
        if len(plaintext) > MAX_PLAINTEXT:
            raise self._fail(_A.record_overflow, f"plaintext of {len(plaintext)} bytes")
        return self._record(ctype, plaintext)

    def _record(self, ctype: ContentType, payload: bytes) -> Record:
        if ctype is not ContentType.application_data:
            if not payload:
                raise self._fail(_A.unexpected_message, f"zero-length {ctype.name} record")
            if ctype is ContentType.alert and len(payload) != 2:
                raise self._fail(_A.decode_error, f"alert record of {len(payload)} bytes")
        return Record(ctype, payload)
