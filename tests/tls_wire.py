"""TLS on the wire, independently of afalg: key logs, key schedules, records, a raw client.

The conformance and interop tests judge afalg's records with this module, so nothing here
imports afalg: the key schedules (RFC 8446 HKDF-Expand-Label, RFC 5246 PRF) and the record
protection (RFC 8446 section 5.2; RFC 5288 AES-GCM with the explicit nonce, RFC 7905
ChaCha20-Poly1305) are written out again over plain ``cryptography``. The secrets come from the
*client's* NSS key log (``SSLKEYLOGFILE`` format), never from the server under test.

- :func:`parse_keylog`, :func:`connection_keys`: key log + the captured hellos -> per-direction
  :class:`Protection` objects (key, iv, sequence number) for handshake and application epochs.
- :func:`split_records`, :func:`hello_info`, :func:`decrypt_stream`: a captured TCP stream ->
  records -> the plaintext of each record, in order.
- :class:`RawTLSClient`: Python ssl does the client handshake over MemoryBIOs, reading whole
  records only; afterwards this module seals and opens records itself, so tests can send
  anything (bad tags, forged types, oversized or truncated records).
- :func:`s_client_argv`, :func:`run_s_client_echo`: drive ``openssl s_client`` as an echo peer.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import select
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

CT_CCS, CT_ALERT, CT_HANDSHAKE, CT_APPDATA = 20, 21, 22, 23
TLS12, TLS13 = 0x0303, 0x0304
MAX_PLAINTEXT = 2**14
MAX_CIPHERTEXT_13 = 2**14 + 256
MAX_CIPHERTEXT_12 = 2**14 + 2048


@dataclass(frozen=True)
class Suite:
    code: int
    name: str  # IANA/RFC name
    openssl: str  # OpenSSL name
    version: int
    key_len: int
    hash_name: str
    chacha: bool = False


SUITES = {
    s.code: s
    for s in [
        Suite(0x1301, "TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", TLS13, 16, "sha256"),
        Suite(0x1302, "TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", TLS13, 32, "sha384"),
        Suite(
            0x1303,
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
            TLS13,
            32,
            "sha256",
            chacha=True,
        ),
        Suite(
            0xC02B,
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            TLS12,
            16,
            "sha256",
        ),
        Suite(
            0xC02C,
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            TLS12,
            32,
            "sha384",
        ),
        Suite(
            0xCCA9,
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            TLS12,
            32,
            "sha256",
            chacha=True,
        ),
    ]
}
BY_OPENSSL = {s.openssl: s for s in SUITES.values()}


# --- key schedules (RFC 8446 section 7, RFC 5246 section 5/6.3) --------------------------------


def hkdf_expand_label(
    hash_name: str, secret: bytes, label: str, context: bytes, length: int
) -> bytes:
    full = b"tls13 " + label.encode()
    info = struct.pack("!HB", length, len(full)) + full + bytes([len(context)]) + context
    algorithm = hashes.SHA384() if hash_name == "sha384" else hashes.SHA256()
    return HKDFExpand(algorithm, length, info).derive(secret)


def prf_tls12(hash_name: str, secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """P_hash (RFC 5246 section 5)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.new(secret, a, hash_name).digest()
        out += hmac.new(secret, a + seed, hash_name).digest()
    return out[:length]


@dataclass
class Protection:
    """One direction, one epoch: AEAD key, IV (TLS 1.2 AES-GCM: the 4-byte salt), sequence."""

    suite: Suite
    key: bytes
    iv: bytes
    seq: int = 0

    def __repr__(self) -> str:  # never print keys
        return f"<Protection {self.suite.name} seq={self.seq}>"

    @classmethod
    def tls13(cls, suite: Suite, secret: bytes) -> Protection:
        key = hkdf_expand_label(suite.hash_name, secret, "key", b"", suite.key_len)
        iv = hkdf_expand_label(suite.hash_name, secret, "iv", b"", 12)
        return cls(suite, key, iv)

    def _aead(self) -> AESGCM | ChaCha20Poly1305:
        return ChaCha20Poly1305(self.key) if self.suite.chacha else AESGCM(self.key)

    def _xor_nonce(self, seq: int) -> bytes:
        return bytes(a ^ b for a, b in zip(self.iv, seq.to_bytes(12, "big"), strict=True))

    def seal(self, content_type: int, payload: bytes, *, pad: int = 0) -> bytes:
        """One whole record (header included) carrying ``payload`` of ``content_type``."""
        seq = self.seq
        self.seq += 1
        aead = self._aead()
        if self.suite.version == TLS13:
            inner = payload + bytes([content_type]) + b"\x00" * pad
            header = struct.pack("!BHH", CT_APPDATA, TLS12, len(inner) + 16)
            return header + aead.encrypt(self._xor_nonce(seq), inner, header)
        aad = struct.pack("!QBHH", seq, content_type, TLS12, len(payload))
        if self.suite.chacha:
            body = aead.encrypt(self._xor_nonce(seq), payload, aad)
        else:
            explicit = seq.to_bytes(8, "big")
            body = explicit + aead.encrypt(self.iv + explicit, payload, aad)
        return struct.pack("!BHH", content_type, TLS12, len(body)) + body

    def open(self, content_type: int, fragment: bytes) -> tuple[int, bytes]:
        """Decrypt one record's fragment; returns (content type, plaintext). Raises
        cryptography's InvalidTag (the sequence number is not advanced then)."""
        seq = self.seq
        aead = self._aead()
        if self.suite.version == TLS13:
            header = struct.pack("!BHH", content_type, TLS12, len(fragment))
            inner = aead.decrypt(self._xor_nonce(seq), fragment, header).rstrip(b"\x00")
            self.seq += 1
            return inner[-1], inner[:-1]
        if self.suite.chacha:
            nonce, ciphertext = self._xor_nonce(seq), fragment
        else:
            nonce, ciphertext = self.iv + fragment[:8], fragment[8:]
        aad = struct.pack("!QBHH", seq, content_type, TLS12, len(ciphertext) - 16)
        plaintext = aead.decrypt(nonce, ciphertext, aad)
        self.seq += 1
        return content_type, plaintext


def parse_keylog(text: str) -> dict[bytes, dict[str, bytes]]:
    """NSS key log -> {client_random: {label: secret}}."""
    out: dict[bytes, dict[str, bytes]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            out.setdefault(bytes.fromhex(parts[1]), {})[parts[0]] = bytes.fromhex(parts[2])
    return out


@dataclass
class Hellos:
    client_random: bytes
    server_random: bytes
    suite: Suite
    version: int


def _first_handshake(stream: bytes) -> bytes:
    for content_type, _version, fragment in split_records(stream):
        if content_type == CT_HANDSHAKE:
            return fragment
    raise ValueError("no handshake record")


def hello_info(client_stream: bytes, server_stream: bytes) -> Hellos:
    """Randoms, suite and version from the plaintext ClientHello and ServerHello."""
    ch = _first_handshake(client_stream)
    sh = _first_handshake(server_stream)
    assert ch[0] == 1 and sh[0] == 2, "expected ClientHello / ServerHello"
    client_random = ch[6:38]
    server_random = sh[6:38]
    sid_len = sh[38]
    pos = 39 + sid_len
    code = struct.unpack_from("!H", sh, pos)[0]
    version = TLS12
    ext_pos = pos + 3
    if ext_pos + 2 <= 4 + struct.unpack("!I", b"\x00" + sh[1:4])[0]:
        ext_len = struct.unpack_from("!H", sh, ext_pos)[0]
        p, end = ext_pos + 2, ext_pos + 2 + ext_len
        while p + 4 <= end:
            ext_type, length = struct.unpack_from("!HH", sh, p)
            if ext_type == 43:  # supported_versions
                version = struct.unpack_from("!H", sh, p + 4)[0]
            p += 4 + length
    return Hellos(client_random, server_random, SUITES[code], version)


@dataclass
class ConnectionKeys:
    hellos: Hellos
    client_hs: Protection | None  # TLS 1.3 handshake epoch
    server_hs: Protection | None
    client_app: Protection
    server_app: Protection


def connection_keys(hellos: Hellos, keylog: dict[bytes, dict[str, bytes]]) -> ConnectionKeys:
    secrets = keylog[hellos.client_random]
    suite = hellos.suite
    if hellos.version == TLS13:
        return ConnectionKeys(
            hellos,
            Protection.tls13(suite, secrets["CLIENT_HANDSHAKE_TRAFFIC_SECRET"]),
            Protection.tls13(suite, secrets["SERVER_HANDSHAKE_TRAFFIC_SECRET"]),
            Protection.tls13(suite, secrets["CLIENT_TRAFFIC_SECRET_0"]),
            Protection.tls13(suite, secrets["SERVER_TRAFFIC_SECRET_0"]),
        )
    iv_len = 12 if suite.chacha else 4
    block = prf_tls12(
        suite.hash_name,
        secrets["CLIENT_RANDOM"],
        b"key expansion",
        hellos.server_random + hellos.client_random,
        2 * suite.key_len + 2 * iv_len,
    )
    k = suite.key_len
    client = Protection(suite, block[:k], block[2 * k : 2 * k + iv_len])
    server = Protection(suite, block[k : 2 * k], block[2 * k + iv_len : 2 * k + 2 * iv_len])
    return ConnectionKeys(hellos, None, None, client, server)


# --- records on the wire -----------------------------------------------------------------------


def split_records(stream: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(content type, legacy version, fragment) for each record; a truncated last record
    raises ValueError."""
    pos = 0
    while pos < len(stream):
        if pos + 5 > len(stream):
            raise ValueError(f"truncated record header at {pos}")
        content_type, version, length = struct.unpack_from("!BHH", stream, pos)
        if pos + 5 + length > len(stream):
            raise ValueError(f"truncated record at {pos}: {length} bytes announced")
        yield content_type, version, stream[pos + 5 : pos + 5 + length]
        pos += 5 + length


@dataclass
class WireRecord:
    """One record as captured and as decrypted (``inner_type``/``plaintext`` None if it was
    not encrypted)."""

    content_type: int
    version: int
    fragment: bytes
    epoch: str  # "plain", "handshake" or "application"
    seq: int | None = None
    inner_type: int | None = None
    plaintext: bytes | None = None


def decrypt_stream(
    stream: bytes, version: int, hs: Protection | None, app: Protection
) -> list[WireRecord]:
    """Every record of one direction, decrypted with the keys of its epoch.

    TLS 1.3: records before the first application_data record are plaintext (hello, CCS);
    encrypted records use the handshake keys until the Finished message was sent under them,
    then the application keys. TLS 1.2: everything after ChangeCipherSpec is under the
    application keys (the Finished has sequence number 0).
    """
    out: list[WireRecord] = []
    epoch = "plain"
    for content_type, rec_version, fragment in split_records(stream):
        rec = WireRecord(content_type, rec_version, fragment, epoch)
        if version == TLS13 and content_type == CT_APPDATA and epoch == "plain":
            epoch = rec.epoch = "handshake"
        if rec.epoch == "handshake":
            assert hs is not None
            rec.seq = hs.seq
            rec.inner_type, rec.plaintext = hs.open(content_type, fragment)
            if rec.inner_type == CT_HANDSHAKE and _has_finished(rec.plaintext):
                epoch = "application"
        elif rec.epoch == "application":
            rec.seq = app.seq
            rec.inner_type, rec.plaintext = app.open(content_type, fragment)
        if version == TLS12 and content_type == CT_CCS:
            epoch = "application"
        out.append(rec)
    return out


def _has_finished(handshake: bytes) -> bool:
    pos = 0
    while pos + 4 <= len(handshake):
        msg_type = handshake[pos]
        length = struct.unpack("!I", b"\x00" + handshake[pos + 1 : pos + 4])[0]
        if msg_type == 20:
            return True
        pos += 4 + length
    return False


def application_data(records: Sequence[WireRecord]) -> bytes:
    return b"".join(
        r.plaintext or b""
        for r in records
        if r.epoch == "application" and r.inner_type == CT_APPDATA
    )


# --- a client that speaks records itself after ssl's handshake ---------------------------------


@dataclass
class RawTLSClient:
    """Python ssl's client handshake over MemoryBIOs, then records sealed/opened here.

    ``keylog`` is a path the context writes its secrets to. The handshake reads whole records
    only, so afterwards the socket is at a record boundary: everything the server sends next is
    read by :meth:`read_records`.
    """

    sock: socket.socket
    context: ssl.SSLContext
    keylog: str
    tx: Protection | None = None
    rx: Protection | None = None
    version: int = 0
    _rx_buffer: bytes = field(default=b"", repr=False)

    def handshake(self, server_hostname: str | None = None) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self.context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        sent = bytearray()
        received = bytearray()
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            data = outgoing.read()
            if data:
                self.sock.sendall(data)
                sent += data
            if done:
                break
            record = self._read_exact(5)
            record += self._read_exact(struct.unpack("!H", record[3:5])[0])
            received += record
            incoming.write(record)
        hellos = hello_info(bytes(sent), bytes(received))
        with open(self.keylog) as f:
            keys = connection_keys(hellos, parse_keylog(f.read()))
        self.version = hellos.version
        self.tx, self.rx = keys.client_app, keys.server_app
        if self.version == TLS12:  # the Finished of each side used sequence number 0
            self.tx.seq = self.rx.seq = 1
        self.ssl_object = obj

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise ConnectionError("EOF during handshake")
            data += more
        return data

    def send_record(self, content_type: int, payload: bytes, **kwargs: int) -> bytes:
        assert self.tx is not None
        record = self.tx.seal(content_type, payload, **kwargs)
        self.sock.sendall(record)
        return record

    def read_records(
        self,
        timeout: float,
        *,
        stop_on_data: bool = False,
    ) -> tuple[list[tuple[int, bytes]], str]:
        """Read until EOF/reset/timeout (or, with ``stop_on_data``, the first application_data
        record); decrypt what came. Returns ([(type, plaintext)], how the stream ended: "eof",
        "reset", "timeout" or "data")."""
        assert self.rx is not None
        records: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        end = "timeout"
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                more = self.sock.recv(65536)
            except ConnectionResetError:
                end = "reset"
                break
            if not more:
                end = "eof"
                break
            self._rx_buffer += more
            records += self._open_buffered()
            if stop_on_data and any(t == CT_APPDATA for t, _ in records):
                return records, "data"
        return records + self._open_buffered(), end

    def _open_buffered(self) -> list[tuple[int, bytes]]:
        assert self.rx is not None
        records = []
        data, pos = self._rx_buffer, 0
        while pos + 5 <= len(data):
            content_type, _version, length = struct.unpack_from("!BHH", data, pos)
            if pos + 5 + length > len(data):
                break
            records.append(self.rx.open(content_type, data[pos + 5 : pos + 5 + length]))
            pos += 5 + length
        self._rx_buffer = data[pos:]
        return records

    def echo(self, payload: bytes, timeout: float) -> bytes:
        """Send one application_data record, read the echo (for honest checks)."""
        self.send_record(CT_APPDATA, payload)
        got = b""
        deadline = time.monotonic() + timeout
        while len(got) < len(payload) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            if not ready:
                break
            more = self.sock.recv(65536)
            if not more:
                break
            self._rx_buffer += more
            assert self.rx is not None
            while len(self._rx_buffer) >= 5:
                content_type, _v, length = struct.unpack_from("!BHH", self._rx_buffer)
                if len(self._rx_buffer) < 5 + length:
                    break
                inner, plaintext = self.rx.open(content_type, self._rx_buffer[5 : 5 + length])
                self._rx_buffer = self._rx_buffer[5 + length :]
                if inner == CT_APPDATA:
                    got += plaintext
        return got


# --- openssl s_client ----------------------------------------------------------------------------


def s_client_argv(host: str, port: int, *, suite: Suite, keylog: str, cafile: str) -> list[str]:
    from test_tls_helpers import require_openssl

    argv = [
        require_openssl(),
        "s_client",
        "-connect",
        f"{host}:{port}",
        "-quiet",
        "-no_ign_eof",
        "-nocommands",
        "-keylogfile",
        keylog,
        "-CAfile",
        cafile,
        "-verify_return_error",
    ]
    if suite.version == TLS13:
        argv += ["-tls1_3", "-ciphersuites", suite.openssl]
    else:
        argv += ["-tls1_2", "-cipher", suite.openssl]
    return argv


def run_s_client_echo(argv: Sequence[str], chunks: Sequence[bytes], timeout: float) -> bytes:
    """Start ``argv`` (an s_client), write each chunk and read its echo before the next, then
    close stdin (s_client sends close_notify) and wait. Returns everything s_client printed."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""
    deadline = time.monotonic() + timeout
    try:
        expected = 0
        for chunk in chunks:
            proc.stdin.write(chunk)
            proc.stdin.flush()
            expected += len(chunk)
            while len(out) < expected:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
                if not ready:
                    raise TimeoutError(f"s_client echoed {len(out)} of {expected} bytes")
                more = os.read(proc.stdout.fileno(), 65536)
                if not more:
                    proc.wait(timeout=5)
                    err = proc.stderr.read() if proc.stderr else b""
                    raise ConnectionError(f"s_client ended early: {err.decode(errors='replace')}")
                out += more
        proc.stdin.close()
        while True:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                raise TimeoutError("s_client did not finish after its stdin closed")
            more = os.read(proc.stdout.fileno(), 65536)
            if not more:
                break
            out += more
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        err = proc.stderr.read() if proc.stderr else b""
        if proc.returncode != 0:
            raise ConnectionError(
                f"s_client exit {proc.returncode}: {err.decode(errors='replace')}"
            )
        return out
    finally:
        with contextlib.suppress(OSError):
            proc.kill()
        proc.wait()


def marker_payload(n: int, tag: bytes = b"AFALG-PLAINTEXT-MARKER-") -> bytes:
    """``n`` bytes of easily recognisable plaintext (to check it never appears on the wire)."""
    unit = tag + hashlib.sha256(tag).hexdigest().encode()
    return (unit * (n // len(unit) + 1))[:n]
