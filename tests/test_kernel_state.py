"""What the kernel holds per connection (``conn.kernel_state()``, :func:`afalg.ktls.kernel_state`)
and ``afalg stat`` (``/proc/net/tls_stat`` with deltas).

Every expectation comes from somewhere else than the state read back: the suite ssl or OpenSSL
negotiated, the keys and sequence numbers the test installs itself, the records it sends. The
kTLS tests are kernel-marked (the VM); algif on the cryptography backend, closed sockets and the
command's error without the tls module run on the host too.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest
from _env import ROOT, SLOW
from test_tls_helpers import (
    TLS12_SUITES,
    TLS13_SUITES,
    Bg,
    client_context,
    connect,
    openssl_server,
    read_stdout,
    recv_exactly,
    server_context,
    tcp_pair,
)

from afalg import ktls, netlink, tls
from afalg._ktls import state as ktls_state
from afalg._uapi import (
    CAP_NET_ADMIN,
    SOL_TLS,
    TLS_1_2_VERSION,
    TLS_1_3_VERSION,
    TLS_RX,
    TLS_RX_EXPECT_NO_PAD,
    TLS_STAT_PATH,
    TLS_TX,
    TLS_TX_ZEROCOPY_RO,
    has_capability,
)
from afalg.errors import ClosedError, KeyUpdateUnsupported
from afalg.keys import CipherSuite, TrafficKeys, suite_from_openssl_name
from afalg.ktls import KernelTLSState

kernel = pytest.mark.kernel
VERSIONS = {"TLSv1.2": TLS_1_2_VERSION, "TLSv1.3": TLS_1_3_VERSION}
FIELDS = {
    "ulp", "tx", "rx", "version", "cipher_type", "tx_seq", "rx_seq", "tx_zerocopy_ro",
    "rx_expect_no_pad", "tx_conf", "rx_conf",
}  # fmt: skip


def assert_no_tls(state: KernelTLSState) -> None:
    assert state == KernelTLSState(None, False, False, None, None, None, None, None, None)
    assert not state.ktls
    assert str(state).startswith("no kernel TLS: no ULP")


# --- algif mode and closed sockets (host and VM) -------------------------------------------


def test_algif_on_the_host_holds_no_kernel_tls() -> None:
    ours, theirs = connect(("algif", "cryptography"), "client")
    with ours, theirs:
        assert_no_tls(ours.kernel_state())
        ours.sendall(b"ping")
        assert recv_exactly(theirs, 4) == b"ping"
        assert_no_tls(ours.kernel_state())  # traffic changes nothing: no ULP, no keys
    with pytest.raises(ClosedError):
        ours.kernel_state()


@pytest.mark.parametrize("family", ["socketpair", "udp", "unconnected-tcp"])
def test_sockets_without_tcp_have_no_ulp(family: str) -> None:
    """A socket that is not a TCP connection has no ULP: ``ulp=None``, as the docs promise,
    not the kernel's EOPNOTSUPP for ``TCP_ULP`` on a non-TCP socket."""
    if family == "socketpair":
        sock, other = socket.socketpair()
        other.close()
    elif family == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        sock = socket.socket()
    with sock:
        assert_no_tls(ktls.kernel_state(sock))


def test_algif_over_a_socketpair_holds_no_kernel_tls() -> None:
    """algif mode runs over any connected stream socket, a Unix socketpair too; its
    ``kernel_state()`` says ``ulp=None`` there as over TCP."""
    a, b = socket.socketpair()
    options: dict[str, Any] = {"mode": "algif", "algif_backend": "cryptography"}
    peer = Bg(lambda: tls.wrap(b, server_context(), server_side=True, **options))
    ours = tls.wrap(a, client_context(), server_hostname="localhost", **options)
    with ours, peer.result(60) as theirs:
        assert_no_tls(ours.kernel_state())
        assert_no_tls(theirs.kernel_state())


@kernel
def test_algif_in_the_kernel_vm_holds_no_kernel_tls() -> None:
    """algif on the kernel's AEAD: AF_ALG does the crypto, the TCP socket has no ULP, and the
    kernel refuses SOL_TLS on it (TCP passes the level on to IP: EOPNOTSUPP)."""
    ours, theirs = connect(("algif", "kernel"), "client")
    with ours, theirs:
        assert_no_tls(ours.kernel_state())
        with pytest.raises(OSError) as info:
            ours.getsockopt(SOL_TLS, TLS_TX, 4)
        assert info.value.errno == errno.EOPNOTSUPP


@kernel
def test_closed_ktls_socket_raises_closed_error() -> None:
    ours, theirs = connect(("ktls", "kernel"), "client")
    with theirs:
        assert ours.kernel_state().ktls
        ours.close()
        with pytest.raises(ClosedError):
            ours.kernel_state()
    with pytest.raises(OSError) as info:  # the function on a closed socket.socket: EBADF
        ktls.kernel_state(ours._sock)
    assert info.value.errno == errno.EBADF


# --- kTLS after wrap(): the negotiated suite, record sequence numbers ----------------------

SUITES = [("TLSv1.3", s) for s in TLS13_SUITES] + [("TLSv1.2", s) for s in TLS12_SUITES]


@kernel
@pytest.mark.parametrize(("version", "suite"), SUITES)
def test_state_after_wrap_is_the_negotiated_suite(version: str, suite: str) -> None:
    """Against OpenSSL forced to one suite: the kernel holds what the handshake negotiated,
    both directions, and seals our first application record as sequence number 0."""
    with openssl_server(version, suite) as (proc, sock):
        conn = tls.wrap(sock, client_context(version), server_hostname="localhost", mode="ktls")
        with conn:
            assert conn.version() == version and conn.cipher()[0] == suite
            state = conn.kernel_state()
            assert state.ulp == "tls" and state.tx and state.rx and state.ktls
            assert state.version == VERSIONS[version] and state.version_name == version
            assert state.cipher_type == suite_from_openssl_name(suite).ktls_cipher_type
            # TLS 1.2: each side's Finished went out under the new keys as record 0; TLS 1.3:
            # under the handshake keys, so the application traffic keys start at 0.
            first = 1 if version == "TLSv1.2" else 0
            assert state.tx_seq == first
            assert state.rx_seq is not None and state.rx_seq >= first
            assert state.tx_zerocopy_ro is False
            assert state.rx_expect_no_pad is (False if version == "TLSv1.3" else None)
            conn.sendall(b"one record")
            assert conn.kernel_state().tx_seq == first + 1
            assert read_stdout(proc, 10) == b"one record"


@kernel
@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_sequence_numbers_count_records_on_both_ends(version: str) -> None:
    """kTLS on both ends: three sends are three records; the sender's tx_seq and the
    receiver's rx_seq each move by three, and both ends agree on version and cipher."""
    csock, ssock = tcp_pair()
    server = Bg(lambda: tls.wrap(ssock, server_context(version), server_side=True, mode="ktls"))
    client = tls.wrap(csock, client_context(version), server_hostname="localhost", mode="ktls")
    with client, server.result() as srv:
        c0, s0 = client.kernel_state(), srv.kernel_state()
        assert (c0.version, c0.cipher_type) == (s0.version, s0.cipher_type)
        assert c0.version == VERSIONS[version]
        assert c0.cipher_type == suite_from_openssl_name(client.cipher()[0]).ktls_cipher_type
        for i in range(3):
            client.send(b"record %d." % i)
        assert recv_exactly(srv, 27) == b"record 0.record 1.record 2."
        c1, s1 = client.kernel_state(), srv.kernel_state()
        assert c1.tx_seq - c0.tx_seq == 3
        assert s1.rx_seq - s0.rx_seq == 3
        assert (c1.rx_seq, s1.tx_seq) == (c0.rx_seq, s0.tx_seq)  # nothing the other way


# --- the ULP and the keys step by step ------------------------------------------------------

STEP_KEYS = [
    pytest.param(
        TrafficKeys(
            TLS_1_2_VERSION,
            CipherSuite.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            b"\xa5" * 32,
            b"\x5a" * 4,
        ),
        id="tls12-aes256gcm",
    ),
    pytest.param(
        TrafficKeys(
            TLS_1_3_VERSION, CipherSuite.TLS_CHACHA20_POLY1305_SHA256, b"\xa5" * 32, b"\x5a" * 12
        ),
        id="tls13-chacha20",
    ),
]


@kernel
@pytest.mark.parametrize("keys", STEP_KEYS)
def test_ulp_then_tx_then_rx(keys: TrafficKeys) -> None:
    """The ULP alone holds no keys; TX is configured before RX is; each direction shows the
    sequence number it was installed with."""
    tls13 = keys.version == TLS_1_3_VERSION
    a, b = tcp_pair()
    with a, b:
        assert_no_tls(ktls.kernel_state(a))
        ktls.attach_ulp(a)
        bare = ktls.kernel_state(a)
        assert bare == KernelTLSState(
            "tls", False, False, None, None, None, None, False, None, "base", "base"
        )
        assert not bare.ktls and str(bare) == "kernel TLS: no keys (tx base, rx base)"
        ktls.install_keys(a, TLS_TX, keys.with_seq(7))
        tx_only = ktls.kernel_state(a)
        assert (tx_only.tx, tx_only.rx, tx_only.ktls) == (True, False, False)
        assert (tx_only.tx_conf, tx_only.rx_conf) == ("sw", "base")
        assert tx_only.version == keys.version
        assert tx_only.cipher_type == keys.cipher_suite.ktls_cipher_type
        assert (tx_only.tx_seq, tx_only.rx_seq) == (7, None)
        assert tx_only.rx_expect_no_pad is None  # the kernel answers it for TLS 1.3 RX only
        ktls.install_keys(a, TLS_RX, keys.with_seq(2**40 + 5))
        both = ktls.kernel_state(a)
        assert both.ktls and (both.tx_seq, both.rx_seq) == (7, 2**40 + 5)
        assert (both.tx_conf, both.rx_conf) == ("sw", "sw")
        assert both.rx_expect_no_pad is (False if tls13 else None)
        assert str(both).startswith(
            "kernel TLS: TX+RX (tx sw, rx sw), " + ("TLSv1.3" if tls13 else "TLSv1.2")
        )


@kernel
def test_flags_read_back_from_the_kernel() -> None:
    """TLS_TX_ZEROCOPY_RO and TLS_RX_EXPECT_NO_PAD as set on the socket; the no-pad flag is
    TLS 1.3 only (the kernel refuses it for TLS 1.2 with EINVAL)."""
    keys13 = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))
    a, b = tcp_pair()
    with a, b:
        ktls.enable(a, keys13, keys13)
        assert (ktls.kernel_state(a).tx_zerocopy_ro, ktls.kernel_state(a).rx_expect_no_pad) == (
            False,
            False,
        )
        a.setsockopt(SOL_TLS, TLS_TX_ZEROCOPY_RO, 1)
        assert ktls.kernel_state(a).tx_zerocopy_ro is True
        a.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)
        state = ktls.kernel_state(a)
        assert state.rx_expect_no_pad is True and state.tx_zerocopy_ro is True
        assert str(state).endswith("tx_zerocopy_ro, rx_expect_no_pad")
        a.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 0)
        assert ktls.kernel_state(a).rx_expect_no_pad is False
    keys12 = TrafficKeys(TLS_1_2_VERSION, CipherSuite.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                         bytes(16), bytes(4))  # fmt: skip
    c, d = tcp_pair()
    with c, d:
        ktls.enable(c, keys12, keys12)
        with pytest.raises(OSError) as info:
            c.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)
        assert info.value.errno == errno.EINVAL
        assert ktls.kernel_state(c).rx_expect_no_pad is None


@kernel
def test_no_key_byte_leaves_and_the_buffer_is_zeroed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel does copy the key out with the crypto_info (seen in the buffer right after
    getsockopt); the buffer is all zeros once kernel_state returns, and the key is in no
    field, repr or str of the result."""
    key, iv = bytes(range(0xC0, 0xE0)), bytes(range(0x10, 0x1C))
    keys = TrafficKeys(TLS_1_3_VERSION, CipherSuite.TLS_AES_256_GCM_SHA384, key, iv, seq=3)
    seen: list[tuple[bytearray, bytes]] = []
    real = ktls_state._getsockopt_into

    def spy(fd: int, level: int, name: int, buf: bytearray) -> int:
        n = real(fd, level, name, buf)
        seen.append((buf, bytes(buf)))  # what the kernel wrote, before afalg zeroes it
        return n

    monkeypatch.setattr(ktls_state, "_getsockopt_into", spy)
    a, b = tcp_pair()
    with a, b:
        ktls.enable(a, keys, keys)
        state = ktls.kernel_state(a)
    assert state.tx_seq == state.rx_seq == 3
    full = [(buf, raw) for buf, raw in seen if len(buf) > 4]
    assert len(full) == 2  # TLS_TX and TLS_RX, 56 bytes each
    for buf, raw in full:
        assert len(raw) == 56 and key in raw  # the kernel handed the key out...
        assert buf == bytearray(56)  # ...and afalg zeroed it
    assert all(key not in raw for buf, raw in seen if len(buf) == 4)  # the header-only reads
    assert {f.name for f in dataclasses.fields(state)} == FIELDS
    for value in dataclasses.astuple(state):
        assert not isinstance(value, (bytes, bytearray, memoryview))
    for text in (repr(state), str(state)):
        assert key.hex() not in text and iv.hex() not in text and "key" not in text


# --- TLS 1.3 KeyUpdate (7.3 rekeys; 6.1 and 6.12 cannot) -----------------------------------


@kernel
def test_state_across_a_key_update() -> None:
    """Where the kernel rekeys, new keys restart both sequence numbers at 0, same version and
    cipher. Where it cannot, key_update() is refused and the kernel state is unchanged."""
    ours, theirs = connect(("ktls", "kernel"), "client", peer="afalg")
    with ours, theirs:
        ours.sendall(b"before")
        assert recv_exactly(theirs, 6) == b"before"
        theirs.sendall(b"before")
        assert recv_exactly(ours, 6) == b"before"
        before = ours.kernel_state()
        assert before.tx_seq >= 1 and before.rx_seq >= 1
        if not ktls.supports_rekey():
            with pytest.raises(KeyUpdateUnsupported):
                ours.key_update(request_peer=True)
            assert ours.kernel_state() == before
            return
        ours.key_update(request_peer=True)  # KeyUpdate under the old keys, then TLS_TX anew
        assert ours.kernel_state().tx_seq == 0
        ours.sendall(b"after")
        assert recv_exactly(theirs, 5) == b"after"
        theirs.sendall(b"back")  # its KeyUpdate, then "back" under its next keys
        assert recv_exactly(ours, 4) == b"back"
        after = ours.kernel_state()
        assert (after.tx_seq, after.rx_seq) == (1, 1)
        assert (after.version, after.cipher_type) == (before.version, before.cipher_type)
        assert after.ktls


# --- afalg stat -----------------------------------------------------------------------------


def afalg_cmd(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(
        [sys.executable, "-m", "afalg", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, **kw,
    )  # fmt: skip


def parse_blocks(out: str) -> list[dict[str, tuple[int, int | None]]]:
    """``afalg stat`` output: blocks separated by a blank line, each a header line then
    ``NAME TOTAL [+DELTA]`` lines."""
    blocks = []
    for chunk in out.strip().split("\n\n"):
        header, *rows = chunk.splitlines()
        assert header.split()[:2] == ["counter", "total"]
        block = {}
        for row in rows:
            name, total, *delta = row.split()
            block[name] = (int(total), int(delta[0]) if delta else None)
        blocks.append(block)
    return blocks


@pytest.mark.skipif(os.path.exists(TLS_STAT_PATH), reason="the tls module is loaded here")
def test_stat_without_the_tls_module_is_one_line() -> None:
    proc = afalg_cmd("stat", "--interval", "0.2", "--count", "2")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("afalg stat: ")
    assert "tls module is not loaded" in err and "modprobe tls" in err


def test_stat_usage_errors() -> None:
    for args in (["--count", "2"], ["--interval", "0"], ["--interval", "1", "--count", "0"]):
        proc = afalg_cmd("stat", *args)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and out == "" and err.count("\n") == 1, args


@kernel
def test_stat_deltas_after_traffic() -> None:
    """``afalg stat --interval 0.2``: the first block is the counters as they were; keys
    installed while it runs show up as deltas (+1 TlsTxSw/TlsRxSw/TlsCurrTxSw/TlsCurrRxSw) in
    whichever block follows (however late: no timing is assumed), and every block adds up."""
    a, b = tcp_pair()
    with a, b:
        ktls.attach_ulp(a)  # loads the tls module (root in the VM): /proc/net/tls_stat exists
        keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))
        before = ktls.tls_stats()
        proc = afalg_cmd("stat", "--interval", "0.2")
        assert proc.stdout is not None
        try:
            blocks = [read_block(proc)]
            assert {name: total for name, (total, _) in blocks[0].items()} == before
            assert all(delta is None for _, delta in blocks[0].values())
            ktls.install_keys(a, TLS_TX, keys)
            ktls.install_keys(a, TLS_RX, keys)
            after = ktls.tls_stats()
            while {n: t for n, (t, _) in blocks[-1].items()}["TlsTxSw"] < after["TlsTxSw"]:
                blocks.append(read_block(proc))
        finally:
            proc.kill()
            proc.communicate(timeout=60 * SLOW)
    for prev, block in itertools.pairwise(blocks):
        for name, (total, delta) in block.items():
            assert total == prev[name][0] + (delta or 0), name
    for name in ("TlsTxSw", "TlsRxSw", "TlsCurrTxSw", "TlsCurrRxSw"):
        assert sum(block[name][1] or 0 for block in blocks[1:]) == 1, name


def read_block(proc: subprocess.Popen[str]) -> dict[str, tuple[int, int | None]]:
    """The next block ``afalg stat`` prints (every block ends with a blank line)."""
    assert proc.stdout is not None
    lines = []
    while line := proc.stdout.readline():
        if not line.strip():
            break
        lines.append(line)
    assert lines, proc.stderr.read() if proc.stderr else "afalg stat ended"
    (block,) = parse_blocks("".join(lines))
    return block


@kernel
def test_stat_once_matches_the_proc_file() -> None:
    with ktls.loopback() as sock:
        ktls.attach_ulp(sock)  # the tls module is loaded (root in the VM)
    proc = afalg_cmd("stat")
    out, err = proc.communicate(timeout=60 * SLOW)
    assert proc.returncode == 0, err
    (block,) = parse_blocks(out)
    with open(TLS_STAT_PATH) as f:
        names = [line.split()[0] for line in f if line.strip()]
    assert list(block) == names  # every counter, in the kernel's order
    assert all(delta is None for _, delta in block.values())


def test_stat_block_layout() -> None:
    """The layout parse_blocks reads: header, then NAME TOTAL [+DELTA], signed deltas (a
    current counter going down shows -N)."""
    from afalg.cli import _stat_block

    text = _stat_block({"TlsCurrTxSw": 2, "TlsTxSw": 5}, {"TlsCurrTxSw": 3, "TlsTxSw": 1}, 0.2)
    assert text.splitlines()[0].split() == ["counter", "total", "+0.2s"]
    assert parse_blocks(text) == [{"TlsCurrTxSw": (2, -1), "TlsTxSw": (5, 4)}]
    assert parse_blocks(_stat_block({"TlsTxSw": 5}, None, 0)) == [{"TlsTxSw": (5, None)}]


# --- inet_diag: the kernel's second account -------------------------------------------------

NET_ADMIN = pytest.mark.skipif(
    not has_capability(CAP_NET_ADMIN), reason="inet_diag gives ULP info to CAP_NET_ADMIN only"
)


def _c_size(cls: type) -> int:
    return sum(struct.calcsize("=" + fmt.lstrip("<>!=")) for _, fmt in cls.fields)


def test_inet_diag_structs_are_the_kernels_size() -> None:
    """sizeof(struct inet_diag_req_v2) and sizeof(struct inet_diag_msg) of
    include/uapi/linux/inet_diag.h."""
    assert _c_size(netlink.inet_diag_req_v2) == 56
    assert _c_size(netlink.inet_diag_msg) == 72


@NET_ADMIN
def test_inet_diag_finds_a_plain_tcp_socket() -> None:
    """On any kernel with tcp_diag (the host too): the exact lookup finds our socket (by
    inode) and reports no ULP."""
    a, b = tcp_pair()
    with a, b:
        assert netlink.tls_ulp_info(a) == netlink.TLSDiagInfo(None)
        assert netlink.tls_ulp_info(b) == netlink.TLSDiagInfo(None)
        assert_no_tls(ktls.kernel_state(a))


@kernel
@NET_ADMIN
def test_inet_diag_agrees_with_getsockopt() -> None:
    """INET_DIAG_ULP_INFO and getsockopt are two separate kernel paths; they agree on version
    and cipher, and on the no-pad flag. TLS_INFO_ZC_RO_TX is reported only with TX device
    offload, so it stays off under software kTLS although the option is set."""
    ours, theirs = connect(("ktls", "kernel"), "client")
    with ours, theirs:
        state = ours.kernel_state()
        diag = netlink.tls_ulp_info(ours._sock)
        assert diag is not None and diag.ulp == "tls"
        assert (diag.version, diag.cipher_type) == (state.version, state.cipher_type)
        assert (diag.tx_conf, diag.rx_conf) == ("sw", "sw") == (state.tx_conf, state.rx_conf)
        assert not diag.rx_no_pad and not diag.zc_ro_tx
        ours.setsockopt(SOL_TLS, TLS_RX_EXPECT_NO_PAD, 1)
        ours.setsockopt(SOL_TLS, TLS_TX_ZEROCOPY_RO, 1)
        diag = netlink.tls_ulp_info(ours._sock)
        assert diag is not None and diag.rx_no_pad and not diag.zc_ro_tx
        state = ours.kernel_state()
        assert state.rx_expect_no_pad and state.tx_zerocopy_ro
