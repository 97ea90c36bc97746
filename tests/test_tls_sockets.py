"""afalg TLS sockets (kTLS and algif) against Python ssl and against afalg itself, mirroring the
behaviours of the kernel's tools/testing/selftests/net/tls.c: transfers of 1 B, 16 KiB and 8 MiB
both ways right after the handshake in both roles, many small sends, partial reads across record
boundaries, sendfile of a 10 MiB file, close_notify both ways, ragged EOF, a peer's alert, a
corrupted record, a peer's KeyUpdate, TLS 1.2.

Each test runs for ``ktls`` and ``algif`` (kernel AEAD) in the VM, and for ``algif-host`` (the
same socket on the cryptography backend) on the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import ssl
import threading
from typing import Any

import pytest
from _env import WRAP_MODES
from test_tls_helpers import (
    TLS12_SUITES,
    Bg,
    connect,
    pattern,
    recv_exactly,
)

import afalg
from afalg.errors import AlertDescription, KeyUpdateUnsupported
from afalg.keys import TLS_1_3_VERSION
from afalg.ktls import tls_stats
from afalg.wire import AlertLevel, key_update_message

BIG = 8 * 2**20
# A short read goes through recv_into and the socket's buffer; a read of a whole record's room
# takes kTLS's one-read path (KTLSSocket.recv): every rule must hold on both.
READS = pytest.mark.parametrize("read", [10, 2**14], ids=["short-read", "record-read"])


def _exchange(ours: object, theirs: object, size: int) -> None:
    """``size`` bytes one way, then the other, digests compared. (One direction at a time: an
    OpenSSL SSL object must not be read and written from two threads at once.)"""
    out_data, in_data = pattern(size, 1), pattern(size, 2)
    reader = Bg(lambda: hashlib.sha256(recv_exactly(theirs, size)).digest())
    ours.sendall(out_data)  # type: ignore[attr-defined]
    assert reader.result() == hashlib.sha256(out_data).digest()
    sender = Bg(lambda: theirs.sendall(in_data))  # type: ignore[attr-defined]
    got = recv_exactly(ours, size)
    sender.result()
    assert hashlib.sha256(got).digest() == hashlib.sha256(in_data).digest()


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("role", ["client", "server"])
def test_transfers_both_ways(mode: tuple[str, str], role: str) -> None:
    """1 B each way right after the handshake (a wrong starting sequence number fails here),
    then 16 KiB and 8 MiB (client role; 1 MiB as server) each way, then close_notify."""
    ours, theirs = connect(mode, role)
    with ours, theirs:
        assert (ours.mode, ours.backend) == mode  # type: ignore[union-attr]
        if role == "client":
            ours.sendall(b"a")  # our first record, before reading anything
            assert theirs.recv(1) == b"a"
            theirs.sendall(b"b")
            assert ours.recv(1) == b"b"
        else:
            theirs.sendall(b"b")  # the peer's first record
            assert ours.recv(1) == b"b"
            ours.sendall(b"a")
            assert theirs.recv(1) == b"a"
        _exchange(ours, theirs, 2**14)
        _exchange(ours, theirs, BIG if role == "client" else 2**20)
        assert ours.version() == "TLSv1.3" and ours.cipher()[0] == "TLS_AES_256_GCM_SHA384"
        assert ours.getpeercert() if role == "client" else ours.getpeercert() is None
        ours.close()  # close_notify
        assert theirs.recv(10) == b""


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("cipher", TLS12_SUITES[::2])
def test_tls12(mode: tuple[str, str], cipher: str) -> None:
    ours, theirs = connect(mode, "client", version="TLSv1.2", cipher=cipher)
    with ours, theirs:
        assert ours.version() == "TLSv1.2" and ours.cipher()[0] == cipher
        ours.sendall(b"x")
        assert theirs.recv(1) == b"x"
        _exchange(ours, theirs, 3 * 2**14 + 5)
        bg = Bg(theirs.unwrap)  # close_notify from the peer (it waits for ours)
        assert ours.recv(10) == b""
        ours.close()
        bg.result()


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_many_small_sends_and_partial_reads(mode: tuple[str, str]) -> None:
    ours, theirs = connect(mode, "server")
    with ours, theirs:
        # tls.c multi_chunk_sendfile/recv_partial: many records, read in odd pieces.
        messages = [bytes([i % 251]) * (i % 37 + 1) for i in range(300)]
        for m in messages:
            theirs.sendall(m)
        want = b"".join(messages)
        got = bytearray()
        while len(got) < len(want):
            got += ours.recv(7)
        assert bytes(got) == want
        for m in messages:
            ours.send(m)
        assert recv_exactly(theirs, len(want)) == want
        # recv_into with nbytes, and a record bigger than the caller's buffer.
        theirs.sendall(pattern(5000))
        buf = bytearray(8192)
        n = ours.recv_into(buf, 100)
        rest = recv_exactly(ours, 5000 - n)
        assert bytes(buf[:n]) + rest == pattern(5000)
        # makefile: lines over records.
        theirs.sendall(b"line one\nline two\n")
        with ours.makefile("rb") as f:
            assert f.readline() == b"line one\n"
            assert f.readline() == b"line two\n"
        with ours.makefile("wb") as f:
            f.write(b"written through makefile\n")
        assert recv_exactly(theirs, 25) == b"written through makefile\n"


@pytest.mark.parametrize("mode", WRAP_MODES)
@READS
def test_timeout_and_nonblocking(mode: tuple[str, str], read: int) -> None:
    ours, theirs = connect(mode, "client")
    with ours, theirs:
        ours.settimeout(0.2)
        with pytest.raises(TimeoutError):
            ours.recv(read)
        ours.setblocking(False)
        with pytest.raises(BlockingIOError):
            ours.recv(read)
        ours.settimeout(30)
        theirs.sendall(b"still fine")
        assert ours.recv(read) == b"still fine"
        # sendall with a timeout waits for room as often as it must, and sends it all: once
        # the send key's budget is known (after a first send), in one call under kTLS.
        ours.sendall(b"budget")
        assert recv_exactly(theirs, 6) == b"budget"
        big = pattern(2**21, 3)
        reader = Bg(lambda: recv_exactly(theirs, len(big)))
        ours.sendall(big)
        assert reader.result() == big
        # Non-blocking, with nobody reading: what the socket takes, then WantWrite.
        ours.setblocking(False)
        with pytest.raises(BlockingIOError) as info:
            ours.sendall(big * 4)
        assert isinstance(info.value, ssl.SSLWantWriteError)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendfile_10mib(mode: tuple[str, str], tmp_path: object) -> None:
    data = pattern(10 * 2**20, 3)
    path = tmp_path / "blob"  # type: ignore[operator]
    path.write_bytes(data)
    ours, theirs = connect(mode, "server")
    with ours, theirs:
        reader = Bg(lambda: hashlib.sha256(recv_exactly(theirs, len(data))).digest())
        with open(path, "rb") as f:
            assert ours.sendfile(f) == len(data)
            assert f.tell() == len(data)
            assert ours.sendfile(f, 1000, 10) == 10  # offset and count
        assert reader.result() == hashlib.sha256(data).digest()
        assert recv_exactly(theirs, 10) == data[1000:1010]


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendfile_of_what_is_not_a_regular_file(mode: tuple[str, str]) -> None:
    """An in-memory file and a pipe go through send (os.sendfile cannot read them): the same
    bytes arrive, from the offset, and the in-memory file's position follows what was sent."""
    data = pattern(200_000, 5)
    ours, theirs = connect(mode, "server")
    with ours, theirs:
        reader = Bg(lambda: recv_exactly(theirs, 3 * len(data) - 7))
        r, w = os.pipe()
        writer = Bg(lambda: (os.write(w, data), os.close(w)))
        with open(r, "rb", buffering=0) as pipe:
            assert ours.sendfile(pipe) == len(data)
        writer.result()
        memory = io.BytesIO(data)
        assert ours.sendfile(memory) == len(data)
        assert memory.tell() == len(data)
        assert ours.sendfile(memory, 7) == len(data) - 7
        assert memory.tell() == len(data)
        assert reader.result() == data + data + data[7:]


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_sendfile_with_a_timeout(mode: tuple[str, str], tmp_path: object) -> None:
    """With a timeout the socket is non-blocking inside: sendfile waits while the reader is
    slow (the socket full) and sends all; when nobody reads, the wait raises TimeoutError,
    and the connection still closes cleanly once the peer reads again. The send buffer keeps
    its default size: under 6.1's kTLS a sendfile into a 4 KiB SO_SNDBUF gets EAGAIN for an
    open record that can never fit, and POLLOUT never comes (send() is not affected)."""
    data = pattern(4 * 2**20, 6)
    path = tmp_path / "blob"  # type: ignore[operator]
    path.write_bytes(data)
    big = tmp_path / "zeros"  # type: ignore[operator]
    with open(big, "wb") as f:
        f.truncate(64 * 2**20)  # more than the socket buffers on both sides can hold
    ours, theirs = connect(mode, "server")
    with ours, theirs:
        ours.settimeout(60)
        reader = Bg(lambda: hashlib.sha256(recv_exactly(theirs, len(data))).digest())
        with open(path, "rb") as f:
            assert ours.sendfile(f) == len(data)
        assert reader.result() == hashlib.sha256(data).digest()
        ours.settimeout(0.5)
        with open(big, "rb") as f, pytest.raises(TimeoutError):
            ours.sendfile(f)
        ours.settimeout(60)
        drained = Bg(lambda: _drain(theirs))
        ours.close()  # close_notify goes out behind what was sent
        assert drained.result() > 0


def _drain(sock: Any) -> int:
    total = 0
    with contextlib.suppress(ssl.SSLError, OSError):
        while chunk := sock.recv(2**16):
            total += len(chunk)
    return total


@pytest.mark.parametrize("mode", WRAP_MODES)
@READS
def test_close_notify_from_peer_and_ragged_eof(mode: tuple[str, str], read: int) -> None:
    ours, theirs = connect(mode, "client")
    with ours:
        theirs.sendall(b"last words")
        bg = Bg(theirs.unwrap)  # sends close_notify, waits for ours
        assert recv_exactly(ours, 10) == b"last words"
        assert ours.recv(read) == b""
        assert ours.recv(read) == b""  # EOF stays EOF
        ours.close()
        bg.result().close()
    # A TCP close without close_notify: EOF, or SSLEOFError when not suppressed.
    for suppress in (True, False):
        ours, theirs = connect(mode, "client", suppress_ragged_eofs=suppress)
        with ours:
            theirs.sendall(b"x")
            theirs.close()  # Python ssl closes without close_notify (no unwrap)
            assert ours.recv(1) == b"x"
            if suppress:
                assert ours.recv(read) == b""
            else:
                with pytest.raises(ssl.SSLEOFError):
                    ours.recv(read)


@pytest.mark.parametrize("mode", WRAP_MODES)
@READS
def test_peer_alert(mode: tuple[str, str], read: int) -> None:
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        theirs.sendall(b"before")
        theirs._send_alert(AlertLevel.fatal, AlertDescription.handshake_failure, wait=True)
        assert recv_exactly(ours, 6) == b"before"
        with pytest.raises(afalg.TLSAlertReceived, match="handshake_failure") as info:
            ours.recv(read)
        assert isinstance(info.value, ssl.SSLError)
        assert info.value.alert is AlertDescription.handshake_failure
        with pytest.raises(afalg.TLSAlertReceived):  # the connection stays dead
            ours.recv(read)
        with pytest.raises(afalg.TLSAlertReceived):
            ours.send(b"x")


@pytest.mark.parametrize("mode", WRAP_MODES)
@READS
def test_corrupted_record(mode: tuple[str, str], read: int) -> None:
    """A record whose tag fails: bad_record_mac raised here and sent to the peer."""
    stats = tls_stats() if mode[0] == "ktls" else {}
    ours, theirs = connect(mode, "server", peer="afalg")
    with ours, theirs:
        theirs.sendall(b"good")
        assert recv_exactly(ours, 4) == b"good"
        record = bytearray(theirs.record_layer.seal(23, b"evil"))
        record[-1] ^= 1
        theirs._sock.sendall(record)
        with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac") as info:
            ours.recv(read)
        assert info.value.alert is AlertDescription.bad_record_mac
        with pytest.raises(afalg.TLSAlertReceived, match="bad_record_mac"):
            theirs.recv(10)
        with pytest.raises(afalg.TLSProtocolError):  # poisoned
            ours.recv(read)
    if mode[0] == "ktls":
        assert tls_stats()["TlsDecryptError"] == stats["TlsDecryptError"] + 1


@pytest.mark.parametrize("mode", WRAP_MODES)
@pytest.mark.parametrize("requested", [False, True], ids=["update_not_requested", "requested"])
@READS
def test_peer_key_update(mode: tuple[str, str], requested: bool, read: int) -> None:
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        theirs.sendall(b"old keys")
        assert recv_exactly(ours, 8) == b"old keys"
        their_rx = theirs.record_layer.rx_keys
        theirs.key_update(request_peer=requested)
        theirs.sendall(b"new keys")
        if mode[0] == "ktls" and not _kernel_can_rekey():
            with pytest.raises(KeyUpdateUnsupported, match=r"6\.14") as info:
                ours.recv(read)
            assert isinstance(info.value, ssl.SSLError)
            return
        assert ours.recv(read) == b"new keys"  # one record, read after the KeyUpdate record
        ours.sendall(b"reply")
        assert recv_exactly(theirs, 5) == b"reply"
        rx = theirs.record_layer.rx_keys
        assert rx.version == TLS_1_3_VERSION
        # update_requested: we answered with our own KeyUpdate before "reply".
        assert (rx.secret != their_rx.secret) == requested
        assert rx.seq == (1 if requested else their_rx.seq + 1)
        ours.key_update(request_peer=True)  # and the other way round
        ours.sendall(b"ours updated")
        assert recv_exactly(theirs, 12) == b"ours updated"
        theirs.sendall(b"theirs too")
        assert recv_exactly(ours, 10) == b"theirs too"


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_one_key_update_answers_many_requests(mode: tuple[str, str]) -> None:
    """Three update_requested KeyUpdates while we are silent: one KeyUpdate of ours answers
    them, before our next data (RFC 8446 4.6.3; the rule itself: test_session.py)."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        first_rx = theirs.record_layer.rx_keys
        if not _peer_updates_keys(mode, ours, theirs, b"new keys", requests=3):
            return
        ours.sendall(b"reply")
        assert recv_exactly(theirs, 5) == b"reply"
        rx = theirs.record_layer.rx_keys
        assert rx.secret == first_rx.next_generation().secret and rx.seq == 1


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_a_request_after_our_data_gets_its_own_answer(mode: tuple[str, str]) -> None:
    """RFC 8446 4.6.3: once data went out under the key our KeyUpdate brought, the peer's next
    update_requested is owed a KeyUpdate of its own (the data was sealed under that key, so
    it is no longer "unused")."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        if not _peer_updates_keys(mode, ours, theirs, b"one"):
            return
        ours.sendall(b"first reply")  # our KeyUpdate, then the data under its key
        assert recv_exactly(theirs, 11) == b"first reply"
        after_first = theirs.record_layer.rx_keys
        assert after_first.seq == 1
        theirs.key_update(request_peer=True)
        theirs.sendall(b"two")
        # While another thread holds our send side, the receiving side leaves its answer to
        # the next send: that send's KeyUpdate brings the key "second reply" is sealed under.
        held, release = threading.Event(), threading.Event()
        holder = Bg(lambda: _hold(ours._tx_lock, held, release))
        held.wait()
        assert recv_exactly(ours, 3) == b"two"
        assert ours.tls_session.key_update_due
        release.set()
        holder.result()
        ours.sendall(b"second reply")
        assert recv_exactly(theirs, 12) == b"second reply"
        after_second = theirs.record_layer.rx_keys
        assert after_second.secret == after_first.next_generation().secret
        theirs.key_update(request_peer=True)
        theirs.sendall(b"three")
        assert recv_exactly(ours, 5) == b"three"
        ours.sendall(b"third reply")
        assert recv_exactly(theirs, 11) == b"third reply"
        rx = theirs.record_layer.rx_keys
        assert rx.secret == after_second.next_generation().secret and rx.seq == 1


def _hold(lock: Any, held: threading.Event, release: threading.Event) -> None:
    with lock:
        held.set()
        release.wait(30)


def _peer_updates_keys(
    mode: tuple[str, str], ours: Any, theirs: Any, data: bytes, *, requests: int = 1
) -> bool:
    """The peer sends ``requests`` update_requested KeyUpdates, then ``data``; we read it.

    False where kTLS cannot rekey: our read then refuses the KeyUpdate (checked here)."""
    for _ in range(requests):
        theirs.key_update(request_peer=True)
    theirs.sendall(data)
    if mode[0] == "ktls" and not _kernel_can_rekey():
        with pytest.raises(KeyUpdateUnsupported):
            ours.recv(10)
        return False
    assert recv_exactly(ours, len(data)) == data
    return True


def _kernel_can_rekey() -> bool:
    major, minor = os.uname().release.split("-")[0].split(".")[:2]
    return (int(major), int(minor)) >= (6, 14)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_concurrent_send_and_recv(mode: tuple[str, str]) -> None:
    """One thread sends while another receives, on both ends (afalg peer: unlike an OpenSSL SSL
    object, afalg sockets allow one reader and one writer at once)."""
    ours, theirs = connect(mode, "client", peer="afalg")
    size = 2**20
    out_data, in_data = pattern(size, 4), pattern(size, 5)
    with ours, theirs:
        jobs = [
            Bg(lambda: theirs.sendall(in_data)),
            Bg(lambda: hashlib.sha256(recv_exactly(theirs, size)).digest()),
            Bg(lambda: ours.sendall(out_data)),
        ]
        got = recv_exactly(ours, size)
        assert [j.result() for j in jobs][1] == hashlib.sha256(out_data).digest()
        assert got == in_data


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_malformed_key_update(mode: tuple[str, str]) -> None:
    """KeyUpdate whose request_update is neither 0 nor 1: illegal_parameter, sent and raised."""
    ours, theirs = connect(mode, "client", peer="afalg")
    with ours, theirs:
        theirs._sock.sendall(theirs.record_layer.seal(22, bytes([24, 0, 0, 1, 2])))
        with pytest.raises(afalg.TLSProtocolError, match="illegal_parameter"):
            ours.recv(10)
        with pytest.raises(afalg.TLSAlertReceived, match="illegal_parameter"):
            theirs.recv(10)


def _read_record(peer: Any) -> tuple[int, bytes]:
    """The next record the peer's record layer opens, read from its TCP socket (raw: the
    peer's session does not see it), past our server's NewSessionTickets."""
    layer = peer.record_layer
    while True:
        while (record := layer.next_record()) is None:
            data = peer._sock.recv(2**16)
            if not data:
                raise EOFError("the connection ended before a whole record")
            layer.feed(data)
        if record.content_type != 22 or record.payload[:1] != b"\x04":
            return record.content_type, bytes(record.payload)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_key_update_request_answered_while_we_wait_for_data(mode: tuple[str, str]) -> None:
    """tlsfuzzer's "app data split" conversation: the peer sends part of a request, then a
    KeyUpdate request, and waits for our KeyUpdate before sending the rest. We answer as soon
    as we read the request (the send lock is free), not only before our next data: otherwise
    both sides wait."""
    ours, theirs = connect(mode, "server", peer="afalg")
    with ours, theirs:
        layer = theirs.record_layer
        wire = layer.seal(23, b"GET / ") + layer.seal(22, key_update_message(True))
        layer.rekey_tx()
        theirs._sock.sendall(wire)
        assert recv_exactly(ours, 6) == b"GET / "
        if mode[0] == "ktls" and not _kernel_can_rekey():
            with pytest.raises(KeyUpdateUnsupported):
                ours.recv(100)
            return
        rest = Bg(lambda: recv_exactly(ours, 12))  # waits for the rest of the request
        assert _read_record(theirs) == (22, key_update_message(False))
        layer.rekey_rx()
        theirs._sock.sendall(layer.seal(23, b"HTTP/1.0\r\n\r\n"))
        assert rest.result() == b"HTTP/1.0\r\n\r\n"
        ours.sendall(b"reply")  # under our next keys, with no second KeyUpdate before it
        assert _read_record(theirs) == (23, b"reply")
