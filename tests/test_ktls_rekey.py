"""TLS 1.3 KeyUpdate under kTLS (Linux 6.14+ rekeys a live socket; Documentation/networking/
tls.rst, "TLS 1.3 Key Updates"), in both roles, against afalg's algif peer, kTLS itself,
tlslite-ng and OpenSSL, with the kernel's rekey counters (``/proc/net/tls_stat``).

Where the kernel cannot rekey (6.1, 6.12) the same tests pin what happens instead: our
``key_update()`` raises :class:`afalg.errors.KeyUpdateUnsupported` before sending anything and
the connection goes on; a peer's KeyUpdate ends the connection with that error (and an
internal_error alert to the peer), since the kernel cannot follow it.

Every step is synchronised on data: a KeyUpdate is followed by data that can only be read under
the new keys, and each side reads it (byte for byte) before the next step. No sleeps.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from _env import SLOW
from test_tls_helpers import (
    Bg,
    client_context,
    connect,
    openssl_client,
    openssl_server,
    pattern,
    read_stdout,
    recv_exactly,
    server_context,
    tcp_pair,
    wait_stderr,
)

from afalg import ktls, tls
from afalg.errors import KeyUpdateUnsupported, TLSAlertReceived
from afalg.keys import TLS_1_3_VERSION, CipherSuite, TrafficKeys
from afalg.ktls import tls_stats

pytestmark = pytest.mark.kernel

REKEY_COUNTERS = (
    "TlsTxRekeyOk",
    "TlsRxRekeyOk",
    "TlsRxRekeyReceived",
    "TlsTxRekeyError",
    "TlsRxRekeyError",
    "TlsDecryptError",
)
ROLES = ["client", "server"]
REQUESTED = pytest.mark.parametrize(
    "requested", [False, True], ids=["update_not_requested", "update_requested"]
)


def release_can_rekey() -> bool:
    major, minor = os.uname().release.split("-")[0].split(".")[:2]
    return (int(major), int(minor)) >= (6, 14)


def can_rekey() -> bool:
    """The probe (which installs TX keys twice on a throwaway socket, counting one TX rekey of
    its own: call it before taking a counter baseline)."""
    return ktls.supports_rekey()


class Counters:
    """The kernel's rekey counters since the start of the block (one network namespace: the
    test controls every kTLS socket in it while it runs)."""

    def __init__(self) -> None:
        self.before = tls_stats()

    def delta(self) -> dict[str, int]:
        now = tls_stats()
        return {k: now.get(k, 0) - self.before.get(k, 0) for k in REKEY_COUNTERS}


def expect(tx: int = 0, rx: int = 0, received: int | None = None) -> dict[str, int]:
    return {
        "TlsTxRekeyOk": tx,
        "TlsRxRekeyOk": rx,
        "TlsRxRekeyReceived": rx if received is None else received,
        "TlsTxRekeyError": 0,
        "TlsRxRekeyError": 0,
        "TlsDecryptError": 0,
    }


def exchange(a: Any, b: Any, n: int, seed: int) -> None:
    """a sends n bytes, b reads them; checked byte for byte."""
    data = pattern(n, seed)
    a.sendall(data)
    assert recv_exactly(b, n) == data


# --- the probe and the kernel's answer to a second key ---------------------------------------


def test_the_probe_matches_the_release() -> None:
    assert can_rekey() == release_can_rekey()


def test_second_key_is_a_rekey_in_tls13_only() -> None:
    """Setting TLS_TX/TLS_RX again: 6.14+ takes it as a TLS 1.3 rekey (counted), refuses it in
    TLS 1.2 (EBUSY, counted as a rekey error) and refuses another version or cipher (EINVAL);
    older kernels refuse any second key (EBUSY)."""
    import errno

    from afalg._uapi import TLS_1_2_VERSION, TLS_RX, TLS_TX

    can = can_rekey()
    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))
    a, b = tcp_pair()
    with a, b:
        ktls.enable(a, keys, keys)
        counters = Counters()
        for direction in (TLS_TX, TLS_RX):
            if can:
                ktls.install_keys(a, direction, keys.next_generation())
            else:
                with pytest.raises(ktls.KTLSError, match="already installed") as info:
                    ktls.install_keys(a, direction, keys.next_generation())
                assert info.value.errno == errno.EBUSY
            other = TrafficKeys.tls13(CipherSuite.TLS_AES_256_GCM_SHA384, bytes(48))
            with pytest.raises(ktls.KTLSError) as info:
                ktls.install_keys(a, direction, other)
            assert info.value.errno == (errno.EINVAL if can else errno.EBUSY)
        if can:
            assert counters.delta()["TlsTxRekeyOk"] == 1
            assert counters.delta()["TlsRxRekeyOk"] == 1
    c, d = tcp_pair()
    with c, d:
        keys12 = TrafficKeys(TLS_1_2_VERSION, CipherSuite.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                             bytes(16), bytes(4))  # fmt: skip
        ktls.enable(c, keys12, keys12)
        with pytest.raises(ktls.KTLSError, match="already installed") as info:
            ktls.install_keys(c, TLS_TX, keys12)
        assert info.value.errno == errno.EBUSY


# --- our KeyUpdate and the peer's, against afalg's algif peer --------------------------------


@pytest.mark.parametrize("role", ROLES)
@REQUESTED
def test_updates_both_ways_against_algif(role: str, requested: bool) -> None:
    """Rounds of: our KeyUpdate then data; the peer's KeyUpdate then data; each answered when
    it asks (both before their next data, one reply for any number of requests)."""
    can = can_rekey()
    ours, theirs = connect(("ktls", "kernel"), role, peer="afalg")
    with ours, theirs:
        exchange(theirs, ours, 100, 1)
        if not can:
            with pytest.raises(KeyUpdateUnsupported, match=r"6\.14.*nothing was sent"):
                ours.key_update(request_peer=requested)
            exchange(ours, theirs, 5000, 2)  # intact, both ways
            exchange(theirs, ours, 5000, 3)
            theirs.key_update(request_peer=requested)
            theirs.sendall(b"under the next keys")
            with pytest.raises(KeyUpdateUnsupported, match=r"6\.14"):
                ours.recv(100)
            with pytest.raises(TLSAlertReceived, match="internal_error"):
                theirs.recv(100)
            return
        counters = Counters()
        rounds = 4
        first_rx = theirs.record_layer.rx_keys
        for i in range(rounds):
            ours.key_update(request_peer=requested)
            exchange(ours, theirs, 3000 + i, 10 + i)  # the peer reads under our next keys
            exchange(theirs, ours, 2**14 + 7, 20 + i)  # after its answer, if we asked
            theirs.key_update(request_peer=requested)
            exchange(theirs, ours, 40000, 30 + i)  # we read under its next keys
            exchange(ours, theirs, 17, 40 + i)  # after our answer, if it asked
        per_round = 1 + requested
        assert counters.delta() == expect(tx=rounds * per_round, rx=rounds * per_round)
        # the peer's receive keys went through exactly that many generations
        gen = first_rx.with_seq(0)
        for _ in range(rounds * per_round):
            gen = gen.next_generation()
        assert theirs.record_layer.rx_keys.secret == gen.secret


@pytest.mark.parametrize("role", ROLES)
def test_many_updates_in_a_row_against_algif(role: str) -> None:
    """Ten KeyUpdates back to back each way, nothing between them; then data."""
    can = can_rekey()
    ours, theirs = connect(("ktls", "kernel"), role, peer="afalg")
    with ours, theirs:
        if not can:
            with pytest.raises(KeyUpdateUnsupported):
                ours.key_update()
            exchange(ours, theirs, 1000, 1)
            return
        counters = Counters()
        for _ in range(10):
            ours.key_update()
        exchange(ours, theirs, 50000, 2)
        for _ in range(10):
            theirs.key_update()
        exchange(theirs, ours, 50000, 3)
        exchange(ours, theirs, 10, 4)
        assert counters.delta() == expect(tx=10, rx=10)


# --- kTLS on both ends ---------------------------------------------------------------------------


@contextmanager
def ktls_pair() -> Iterator[tuple[Any, Any]]:
    csock, ssock = tcp_pair()
    server = Bg(lambda: tls.wrap(ssock, server_context(), server_side=True, mode="ktls"))
    client = tls.wrap(csock, client_context(), server_hostname="localhost", mode="ktls")
    with client, server.result() as srv:
        yield client, srv


def test_ktls_on_both_ends_one_reply_to_many_requests() -> None:
    """Five update_requested KeyUpdates while the peer is silent get one KeyUpdate back, sent
    before its next data (RFC 8446 4.6.3); then ten plain ones the other way."""
    can = can_rekey()
    with ktls_pair() as (a, b):
        exchange(a, b, 10, 1)
        if not can:
            with pytest.raises(KeyUpdateUnsupported):
                a.key_update(request_peer=True)
            exchange(b, a, 10, 2)
            return
        counters = Counters()
        for _ in range(5):
            a.key_update(request_peer=True)
        exchange(a, b, 20000, 3)  # b read five KeyUpdates, then data: it answered once
        assert counters.delta() == expect(tx=6, rx=5)
        exchange(b, a, 20000, 4)  # a reads b's one KeyUpdate, then data
        assert counters.delta() == expect(tx=6, rx=6)
        for _ in range(10):
            b.key_update()
        exchange(b, a, 3 * 2**14, 5)
        exchange(a, b, 1, 6)
        assert counters.delta() == expect(tx=16, rx=16)
        a.shutdown(socket.SHUT_WR)  # close_notify under the latest keys
        assert b.recv(1) == b""


def test_key_update_between_sendfile_and_send(tmp_path: Any) -> None:
    """sendfile, KeyUpdate, sendfile: the kernel's own records around the change."""
    can = can_rekey()
    blob = tmp_path / "blob"
    data = os.urandom(200_000)
    blob.write_bytes(data)
    with ktls_pair() as (a, b):
        if not can:
            return  # sendfile itself is covered in test_tls_sockets
        with open(blob, "rb") as f:
            assert a.sendfile(f) == len(data)
        a.key_update()
        with open(blob, "rb") as f:
            assert a.sendfile(f) == len(data)
        assert recv_exactly(b, 2 * len(data)) == data + data


# --- data and a KeyUpdate read together ----------------------------------------------------


@pytest.mark.parametrize("timeout", [30.0 * SLOW, None], ids=["timeout", "blocking"])
def test_data_then_key_update_in_one_write(timeout: float | None) -> None:
    """Data, KeyUpdate, data in one TCP write: the kernel reads ahead into the KeyUpdate while
    returning the first data (it keeps it decrypted, and pauses). poll() then stays silent, so
    a read with a timeout must not wait for it (Python polls first); blocking reads too must
    get the KeyUpdate and go on."""
    can = can_rekey()
    ours, theirs = connect(("ktls", "kernel"), "client", peer="afalg")
    with ours, theirs:
        ours.settimeout(timeout)
        layer = theirs.record_layer
        first, second = pattern(3000, 1), pattern(3000, 2)
        wire = layer.seal(23, first) + layer.seal(22, b"\x18\x00\x00\x01\x00")
        layer.rekey_tx()
        wire += layer.seal(23, second)
        counters = Counters()
        theirs._sock.sendall(wire)
        reader = Bg(lambda: recv_exactly(ours, 6000))  # a hang fails the test, not the run
        if not can:
            with pytest.raises(KeyUpdateUnsupported):
                reader.result(60 * SLOW)
            return
        try:
            got = reader.result(60 * SLOW)
        finally:
            if reader._thread.is_alive():
                ours._sock.shutdown(socket.SHUT_RD)  # let the stuck reader go
        assert got == first + second
        assert counters.delta() == expect(tx=0, rx=1)


# --- a KeyUpdate spread over records (the kernel pauses on the first byte) ------------------


@pytest.mark.parametrize(
    "pieces",
    [
        [b"\x18", b"\x00\x00\x01\x00"],  # the kernel pauses after the first piece
        [b"\x18\x00\x00", b"\x01", b"\x01"],  # update_requested, in three records
    ],
    ids=["two-records", "three-records-requested"],
)
def test_key_update_fragmented_over_records(pieces: list[bytes]) -> None:
    """RFC 8446 5.1 lets a KeyUpdate span records (it must end at a record boundary). The
    kernel pauses after the record that starts with the byte 24, before the message is
    complete: afalg installs the current keys again to read on, then the next ones."""
    can = can_rekey()
    ours, theirs = connect(("ktls", "kernel"), "client", peer="afalg")
    with ours, theirs:
        exchange(theirs, ours, 100, 1)
        layer = theirs.record_layer
        wire = b"".join(layer.seal(22, piece) for piece in pieces)
        layer.rekey_tx()
        wire += layer.seal(23, b"after the fragmented KeyUpdate")
        counters = Counters()
        theirs._sock.sendall(wire)
        if not can:
            with pytest.raises(KeyUpdateUnsupported):
                ours.recv(100)
            return
        assert recv_exactly(ours, 30) == b"after the fragmented KeyUpdate"
        requested = pieces[-1] == b"\x01"
        exchange(ours, theirs, 1000, 2)  # with our answer first if asked
        # two RX installs: the current keys again (to read the rest), then the next ones
        assert counters.delta() == expect(tx=int(requested), rx=2, received=1)


def test_fragment_of_another_message_starting_with_24() -> None:
    """A NewSessionTicket whose second record starts with the byte 24: the kernel pauses
    although no KeyUpdate came; afalg reads on under the same keys."""
    can = can_rekey()
    ours, theirs = connect(("ktls", "kernel"), "client", peer="afalg")
    with ours, theirs:
        body = bytes(4) + bytes(4) + b"\x00" + b"\x00\x04" + b"\x18" * 4 + b"\x00\x00"
        message = bytes([4]) + len(body).to_bytes(3, "big") + body
        cut = message.index(b"\x18")
        layer = theirs.record_layer
        wire = layer.seal(22, message[:cut]) + layer.seal(22, message[cut:])
        wire += layer.seal(23, b"same keys")
        theirs._sock.sendall(wire)
        if not can:
            assert recv_exactly(ours, 9) == b"same keys"  # no pause before 6.14
            return
        assert recv_exactly(ours, 9) == b"same keys"
        exchange(ours, theirs, 100, 1)


# --- tlslite-ng ---------------------------------------------------------------------------------


def _tlslite_read(conn: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        data = conn.read(max=n - len(out))
        if not data:
            raise EOFError(f"tlslite: EOF after {len(out)} of {n} bytes")
        out += data
    return out


def test_many_updates_against_tlslite_ng() -> None:
    """tlslite-ng (an independent TLS 1.3 stack) as the client of our kTLS server: rounds of
    its KeyUpdate (requested and not) and ours (requested, which it answers at once)."""
    from tlslite.constants import KeyUpdateMessageType
    from tlslite.handshakesettings import HandshakeSettings
    from tlslite.tlsconnection import TLSConnection

    can = can_rekey()
    csock, ssock = tcp_pair(timeout=60 * SLOW)
    server = Bg(lambda: tls.wrap(ssock, server_context(), server_side=True, mode="ktls"))
    peer = TLSConnection(csock)
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    peer.handshakeClientCert(settings=settings, serverName="localhost")
    with server.result() as ours, csock:
        assert ours.version() == "TLSv1.3"
        peer.write(b"hello")
        assert recv_exactly(ours, 5) == b"hello"
        if not can:
            for _ in peer.send_keyupdate_request(KeyUpdateMessageType.update_requested):
                pass
            peer.write(b"next keys")
            with pytest.raises(KeyUpdateUnsupported, match=r"6\.14"):
                ours.recv(100)
            return
        counters = Counters()
        rounds = 6
        for i in range(rounds):
            kind = (KeyUpdateMessageType.update_requested if i % 2
                    else KeyUpdateMessageType.update_not_requested)  # fmt: skip
            for _ in peer.send_keyupdate_request(kind):
                pass
            data = pattern(5000 + i, i)
            peer.write(data)
            assert recv_exactly(ours, len(data)) == data
            ours.sendall(data[::-1])  # our answer first, when it asked
            assert _tlslite_read(peer, len(data)) == data[::-1]
            ours.key_update(request_peer=True)
            ours.sendall(b"ours %d" % i)
            assert _tlslite_read(peer, 6) == b"ours %d" % i  # it answered at once
            peer.write(b"theirs %d" % i)
            assert recv_exactly(ours, 8) == b"theirs %d" % i
        asked = rounds // 2
        # ours: one per round, plus one answer per request; theirs: one per round, one answer
        assert counters.delta() == expect(tx=rounds + asked, rx=2 * rounds)
        peer.close()
        assert ours.recv(1) == b""


# --- OpenSSL ----------------------------------------------------------------------------------


def test_openssl_s_client_updates_both_ways() -> None:
    """s_client's KeyUpdate (``k``: not requested; ``K``: requested) and ours, one per
    direction at a time, each followed by a line read on the other side."""
    can = can_rekey()
    with openssl_client("TLSv1.3", "TLS_AES_128_GCM_SHA256") as (proc, sock):
        conn = tls.wrap(sock, server_context(), server_side=True, mode="ktls")
        with conn:
            proc.stdin.write(b"1111\n")
            proc.stdin.flush()
            assert recv_exactly(conn, 5) == b"1111\n"
            if not can:
                with pytest.raises(KeyUpdateUnsupported, match=r"6\.14.*nothing was sent"):
                    conn.key_update()
                conn.sendall(b"intact\n")
                assert read_stdout(proc, 7) == b"intact\n"
                return
            counters = Counters()
            for i, command in enumerate((b"k\n", b"K\n")):
                proc.stdin.write(command)
                proc.stdin.flush()
                # s_client drops the rest of a stdin read that held a command: the next line
                # goes only once it has taken this one
                wait_stderr(proc, b"KEYUPDATE\n")
                proc.stdin.write(b"%d%d%d%d\n" % ((i + 2,) * 4))
                proc.stdin.flush()
                assert recv_exactly(conn, 5) == b"%d%d%d%d\n" % ((i + 2,) * 4)
                conn.key_update()  # ours ("K"'s request was answered as soon as read)
                conn.sendall(b"ours\n")
                assert read_stdout(proc, 5) == b"ours\n"
            assert counters.delta() == expect(tx=3, rx=2)
            proc.stdin.close()  # close_notify under its latest keys
            assert conn.recv(1) == b""
        proc.wait(30 * SLOW)


def test_openssl_s_server_answers_our_request() -> None:
    """Our KeyUpdate(update_requested) to s_server: it follows ours and sends its own before
    its next data, which we read under its next keys."""
    can = can_rekey()
    with openssl_server("TLSv1.3", "TLS_AES_256_GCM_SHA384") as (proc, sock):
        conn = tls.wrap(sock, client_context(), server_hostname="localhost", mode="ktls")
        with conn:
            conn.sendall(b"1111\n")
            assert read_stdout(proc, 5) == b"1111\n"
            if not can:
                with pytest.raises(KeyUpdateUnsupported):
                    conn.key_update(request_peer=True)
                proc.stdin.write(b"intact\n")
                proc.stdin.flush()
                assert recv_exactly(conn, 7) == b"intact\n"
                return
            counters = Counters()
            conn.key_update(request_peer=True)
            conn.sendall(b"2222\n")
            assert read_stdout(proc, 5) == b"2222\n"  # s_server read it under our next keys
            proc.stdin.write(b"3333\n")
            proc.stdin.flush()
            assert recv_exactly(conn, 5) == b"3333\n"  # after s_server's KeyUpdate
            assert counters.delta() == expect(tx=1, rx=1)


def test_key_update_keys_are_tls13_only() -> None:
    """key_update() on a TLS 1.2 kTLS socket is refused before anything is sent."""
    csock, ssock = tcp_pair()
    server = Bg(lambda: tls.wrap(ssock, server_context("TLSv1.2"), server_side=True,
                                 mode="ktls"))  # fmt: skip
    client = tls.wrap(csock, client_context("TLSv1.2"), server_hostname="localhost", mode="ktls")
    with client, server.result() as srv:
        assert client._version != TLS_1_3_VERSION
        with pytest.raises(ValueError, match=r"TLS 1\.3"):
            client.key_update()
        exchange(client, srv, 100, 1)
