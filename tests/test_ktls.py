"""kTLS specifics: setting the ULP and keys up (and the errors when it cannot be), mode="auto",
the kernel's TLS counters, kTLS on both ends. All in the VM (kernel-marked)."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from test_tls_helpers import (
    Bg,
    client_context,
    connect,
    recv_exactly,
    server_context,
    tcp_pair,
)

from afalg import ktls, tls
from afalg._uapi import TLS_1_2_VERSION, TLS_1_3_VERSION, TLS_TX, TLSCipherType
from afalg.errors import KeyUpdateUnsupported, KTLSError
from afalg.keys import CipherSuite, TrafficKeys

pytestmark = pytest.mark.kernel


def _keys(suite: CipherSuite = CipherSuite.TLS_AES_128_GCM_SHA256) -> TrafficKeys:
    return TrafficKeys.tls13(suite, bytes(32))


def test_ulp_before_connect() -> None:
    with socket.socket() as sock:
        with pytest.raises(KTLSError, match="after connect") as info:
            ktls.enable(sock, _keys(), _keys())
        assert info.value.errno == errno.ENOTCONN


def test_ulp_twice_and_keys_twice() -> None:
    """The ULP goes on once (EEXIST). A second TLS 1.3 key is a rekey on Linux 6.14+ (TLS 1.3
    KeyUpdate) and refused before (EBUSY); the probe agrees with the release."""
    major, minor = os.uname().release.split("-")[0].split(".")[:2]
    rekeys = (int(major), int(minor)) >= (6, 14)
    assert ktls.supports_rekey() == rekeys
    a, b = tcp_pair()
    with a, b:
        ktls.attach_ulp(a)
        with pytest.raises(KTLSError, match="already has the tls ULP") as info:
            ktls.attach_ulp(a)
        assert info.value.errno == errno.EEXIST
        ktls.install_keys(a, TLS_TX, _keys())
        if rekeys:
            ktls.install_keys(a, TLS_TX, _keys().next_generation())
        else:
            with pytest.raises(KTLSError, match="already installed") as info:
                ktls.install_keys(a, TLS_TX, _keys().next_generation())
            assert info.value.errno == errno.EBUSY
    c, d = tcp_pair()
    with c, d:  # TLS 1.2 has no rekey: a second key is refused on every kernel
        keys12 = TrafficKeys(TLS_1_2_VERSION, CipherSuite.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                             bytes(16), bytes(4))  # fmt: skip
        ktls.attach_ulp(c)
        ktls.install_keys(c, TLS_TX, keys12)
        with pytest.raises(KTLSError, match="already installed") as info:
            ktls.install_keys(c, TLS_TX, keys12)
        assert info.value.errno == errno.EBUSY


@pytest.mark.kernel_independent  # refused by afalg before the kernel is asked
def test_not_tcp() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(KTLSError, match="TCP"):
        ktls.enable(a, _keys(), _keys())


def test_wrap_ktls_on_a_socket_that_has_the_ulp() -> None:
    """The handshake runs (the bare ULP passes bytes through), then kTLS refuses clearly and
    wrap() closes the socket."""
    csock, ssock = tcp_pair()
    ktls.attach_ulp(csock)
    peer = Bg(lambda: server_context().wrap_socket(ssock, server_side=True))
    with pytest.raises(KTLSError, match="already has the tls ULP"):
        tls.wrap(csock, client_context(), server_hostname="localhost", mode="ktls")
    assert csock.fileno() == -1
    peer.result().close()


def test_supports_every_suite() -> None:
    for version in (TLS_1_2_VERSION, TLS_1_3_VERSION):
        for cipher in (TLSCipherType.AES_GCM_128, TLSCipherType.AES_GCM_256,
                       TLSCipherType.CHACHA20_POLY1305):  # fmt: skip
            assert ktls.supports(version, cipher), (version, cipher)


def test_auto_picks_ktls_and_stats_count() -> None:
    before = ktls.tls_stats()
    ours, theirs = connect(("auto", "kernel"), "client")
    with theirs:
        assert ours.mode == "ktls" and isinstance(ours, ktls.KTLSSocket)
        during = ktls.tls_stats()
        assert during["TlsCurrTxSw"] == before["TlsCurrTxSw"] + 1
        assert during["TlsCurrRxSw"] == before["TlsCurrRxSw"] + 1
        assert during["TlsTxSw"] == before["TlsTxSw"] + 1
        assert "fd=" in repr(ours) and "key" not in repr(ours)
        ours.close()
        ours.close()  # idempotent
        assert theirs.recv(1) == b""
    after = ktls.tls_stats()
    assert after["TlsCurrTxSw"] == before["TlsCurrTxSw"]


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_ktls_on_both_ends(version: str) -> None:
    csock, ssock = tcp_pair()
    server = Bg(lambda: tls.wrap(ssock, server_context(version), server_side=True, mode="ktls"))
    client = tls.wrap(csock, client_context(version), server_hostname="localhost", mode="ktls")
    with client, server.result() as srv:
        srv.sendall(b"s" * 40000)
        client.sendall(b"c" * 40000)
        assert recv_exactly(client, 40000) == b"s" * 40000
        assert recv_exactly(srv, 40000) == b"c" * 40000
        # Where the kernel pauses after a TLS 1.3 KeyUpdate (it rekeys: 6.14+), poll() misses
        # the paused record: reads must come before waits there.
        pauses = version == "TLSv1.3" and ktls.supports_rekey()
        assert client.poll_sees_every_record is srv.poll_sees_every_record is (not pauses)
        client.shutdown(socket.SHUT_WR)  # close_notify, then FIN
        assert srv.recv(1) == b""
        srv.sendall(b"still open the other way")
        assert recv_exactly(client, 24) == b"still open the other way"


def test_key_update_where_the_kernel_cannot_rekey_or_can() -> None:
    """Linux < 6.14 cannot replace live kTLS keys: key_update() says so before sending a byte
    and the connection goes on. Where the kernel can (6.14+, found by the probe), the peer
    (algif on cryptography) follows the KeyUpdate and reads what comes after it."""
    ours, theirs = connect(("ktls", "kernel"), "client", peer="afalg")
    with ours, theirs:
        before = theirs.record_layer.rx_keys
        if not ktls.supports_rekey():
            with pytest.raises(KeyUpdateUnsupported, match=r"6\.14.*nothing was sent"):
                ours.key_update()
        else:
            ours.key_update(request_peer=True)
        ours.sendall(b"after")
        assert recv_exactly(theirs, 5) == b"after"
        assert (theirs.record_layer.rx_keys.secret != before.secret) == ktls.supports_rekey()
        theirs.sendall(b"back")  # under the peer's next keys if it was asked to update
        assert recv_exactly(ours, 4) == b"back"
