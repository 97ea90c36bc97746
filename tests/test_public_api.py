"""Every public function and method of afalg is exercised by some test.

:func:`test_every_public_name_is_named_by_a_test` lists the public names (each public module's
``__all__``, and the public methods and properties of the classes there, inherited ones from
afalg's private bases included) and fails on one that no test file names: a function by its
name, a method or property as ``.name``. A textual check, so it proves a test *names* it; the
tests below call the ones no other test did. A name that truly cannot be exercised goes in
``UNTESTABLE`` with its reason.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import fcntl
import importlib
import inspect
import os
import pkgutil
import re
import socket
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from _env import SLOW, WRAP_MODES
from test_tls_helpers import Bg, client_context, server_context, tcp_pair

import afalg
from afalg import aio, cmsg, handoff, tls, wire
from afalg.keys import TrafficKeys

TESTS = Path(__file__).parent

# (module, qualified name) -> why no test can call it. Empty: keep it so, or justify each entry.
UNTESTABLE: dict[str, str] = {}


def _members(cls: type) -> Iterator[str]:
    """The public methods and properties of ``cls``, from afalg's own classes in its MRO."""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("afalg"):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_"):
                continue
            if inspect.isfunction(value) or isinstance(
                value, (property, staticmethod, classmethod)
            ):
                yield attr


def public_objects() -> Iterator[tuple[str, str, object]]:
    """(module, name, object) for every name in the ``__all__`` of afalg's public modules."""
    for info in pkgutil.iter_modules(afalg.__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"afalg.{info.name}")
            for name in getattr(module, "__all__", ()):
                yield info.name, name, getattr(module, name)


def public_names() -> dict[str, tuple[str, bool]]:
    """``{"module.Name[.method]": (the name, whether it is a method)}`` of every public function
    and method (one entry per defining object: a re-export is not listed twice)."""
    names: dict[str, tuple[str, bool]] = {}
    for _module, name, obj in public_objects():
        if inspect.isfunction(obj):
            names[f"{obj.__module__}.{obj.__qualname__}"] = (name, False)
        elif inspect.isclass(obj) and not issubclass(obj, enum.Enum):
            for attr in _members(obj):
                names[f"{obj.__module__}.{obj.__qualname__}.{attr}"] = (attr, True)
    return names


def test_every_public_name_is_named_by_a_test() -> None:
    text = "\n".join(path.read_text() for path in TESTS.glob("*.py"))
    words = set(re.findall(r"\w+", text))
    attributes = set(re.findall(r"\.(\w+)", text))
    names = public_names()
    assert len(names) > 100, "the walk found too few names: is afalg importable here?"
    unnamed = sorted(
        qualified
        for qualified, (name, method) in names.items()
        if name not in (attributes if method else words) and qualified not in UNTESTABLE
    )
    assert not unnamed, f"public names no test calls: {unnamed}"
    assert set(UNTESTABLE) <= set(names), "UNTESTABLE lists names that are gone"


def test_every_public_annotation_resolves() -> None:
    """``typing.get_type_hints`` works on every public class and function, and on the methods of
    the classes: a name moved to a private module but documented as the public one's
    (``__module__``) must find its annotations' names there too (cattrs, pydantic, typeguard and
    Sphinx resolve them in ``sys.modules[obj.__module__]``)."""
    import typing

    checked = []
    for module, name, obj in public_objects():
        if inspect.isclass(obj) or inspect.isfunction(obj):
            typing.get_type_hints(obj)  # NameError for a name its module lacks
            checked.append(f"{module}.{name}")
        if inspect.isclass(obj):
            for value in vars(obj).values():
                if inspect.isfunction(value):
                    typing.get_type_hints(value)
    assert "ktls.KernelTLSState" in checked and len(checked) > 100


# --- small pure functions ----------------------------------------------------------------------


def test_alert_name_maps_known_values_and_keeps_unknown_ones() -> None:
    assert wire.alert_name(20) is afalg.AlertDescription.bad_record_mac
    assert wire.alert_name(0) is afalg.AlertDescription.close_notify
    assert wire.alert_name(255) == 255 and not isinstance(wire.alert_name(255), enum.Enum)


def test_check_options_refuses_bad_options_by_name() -> None:
    for mode in tls.MODES:
        tls.check_options(mode=mode)
    tls.check_options(records_per_key=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        tls.check_options(mode="kernel")
    with pytest.raises(ValueError, match="algif_backend must be one of"):
        tls.check_options(algif_backend="openssl")
    with pytest.raises(TypeError, match="records_per_key must be an int"):
        tls.check_options(records_per_key=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 3"):
        tls.check_options(records_per_key=2)


def test_as_bytes_takes_any_bytes_like_and_refuses_ints() -> None:
    assert cmsg.as_bytes("key", b"ab") == b"ab"
    assert cmsg.as_bytes("key", bytearray(b"ab")) == b"ab"
    assert cmsg.as_bytes("key", memoryview(b"abcd")[1:3]) == b"bc"
    with pytest.raises(TypeError, match="iv must be bytes-like, not int"):
        cmsg.as_bytes("iv", 16)


def test_iv_header_is_struct_af_alg_iv() -> None:
    assert cmsg.iv_header(12) == struct.pack("=I", 12)  # struct af_alg_iv { __u32 ivlen; }
    assert cmsg.iv_header(12) + bytes(12) == cmsg.pack_af_alg_iv(bytes(12))
    with pytest.raises(ValueError, match="u32"):
        cmsg.iv_header(2**32)


def test_nonce_iv_is_the_iv_or_the_salt_and_room_for_the_explicit_nonce() -> None:
    """RFC 8446 5.3: the 12-byte iv XORed with the sequence number; RFC 5288: the 4-byte salt
    then the 8-byte explicit nonce (zeros here, the record supplies them)."""
    tls13 = TrafficKeys(0x0304, "TLS_AES_128_GCM_SHA256", bytes(16), bytes(range(12)))
    assert tls13.nonce_iv == bytes(range(12))
    tls12 = TrafficKeys(0x0303, "ECDHE-ECDSA-AES128-GCM-SHA256", bytes(16), b"salt")
    assert tls12.nonce_iv == b"salt" + bytes(8)
    chacha12 = TrafficKeys(0x0303, "ECDHE-ECDSA-CHACHA20-POLY1305", bytes(32), bytes(range(12)))
    assert chacha12.nonce_iv == bytes(range(12))


def test_install_tx_and_rx_wire_a_sealer_to_an_opener() -> None:
    from afalg.record import RecordLayer

    keys = TrafficKeys(0x0304, "TLS_AES_128_GCM_SHA256", os.urandom(16), os.urandom(12))
    sender, receiver = RecordLayer(backend="cryptography"), RecordLayer(backend="cryptography")
    sender.install_tx(keys)
    receiver.install_rx(keys)
    receiver.feed(sender.seal(wire.ContentType.application_data, b"hello"))
    record = receiver.next_record()
    assert record is not None and bytes(record.payload) == b"hello"
    sender.install_tx(keys.with_seq(5))  # a new key (here: a later sequence) for what follows
    receiver.feed(sender.seal(wire.ContentType.application_data, b"later"))
    with pytest.raises(afalg.TLSProtocolError, match="bad_record_mac"):  # opener at seq 1
        receiver.next_record()


def test_keylog_collect_locked_and_discard() -> None:
    """collect_locked parses whole lines only and keeps those of expected randoms; discard
    forgets a connection's secrets."""
    log = handoff.KeyLog()
    try:
        random, secret = os.urandom(32), os.urandom(32)
        log.expect(random, True)
        line = f"CLIENT_TRAFFIC_SECRET_0 {random.hex()} {secret.hex()}"
        with open(log.path, "ab") as f:
            f.write(line.encode() + b"\n" + line.encode()[:10])  # one whole line, one partial
        log.collect_locked()  # this thread is the only user: no lock to take
        with open(log.path, "rb") as f:  # the parsed line is punched out, the partial stays
            assert f.read().lstrip(b"\x00") == line.encode()[:10]
        log.discard(random, True)
        assert log.take(random, True) == {}
        log.expect(random, True)  # discarded: the random may be expected again
        assert "pending=1" in repr(log)
    finally:
        log.close()


def test_add_parsers_adds_the_crypto_commands() -> None:
    from afalg._cli_crypto import add_parsers

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["hash", "sha256"])
    assert args.command == "hash" and callable(args.func)
    for command in ("list", "hmac", "enc", "dec", "aead-enc", "aead-dec", "rng"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args([command, "--help"])
        assert info.value.code == 0


def test_kernel_refusal_names_why_the_kernel_backend_cannot_run() -> None:
    from afalg.aead_backend import kernel_refusal
    from afalg.keys import CipherSuite
    from afalg.probe import probe

    refusal = kernel_refusal(CipherSuite.TLS_AES_128_GCM_SHA256)
    if not probe().af_alg:  # the host: no AF_ALG, and the reason says so
        assert isinstance(refusal, afalg.AlgorithmNotAvailable), refusal
        assert "AF_ALG" in str(refusal)
    else:  # allowed, or refused by name (crypto.af_alg_restrict)
        assert refusal is None or "gcm(aes)" in str(refusal), refusal


@pytest.mark.kernel
def test_kernel_refusal_is_none_where_the_kernel_runs_the_suite() -> None:
    from afalg.aead_backend import kernel_refusal
    from afalg.keys import CipherSuite

    for suite in (CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_CHACHA20_POLY1305_SHA256):
        refusal = kernel_refusal(suite)
        restricted = Path("/proc/sys/crypto/af_alg_restrict")
        if restricted.exists() and restricted.read_text().strip() != "0":
            assert isinstance(refusal, afalg.AlgorithmNotAvailable), refusal
            assert "af_alg_restrict" in str(refusal)
        else:
            assert refusal is None, refusal


# --- the TLS sockets' face ---------------------------------------------------------------------


def _alpn_pair(mode: tuple[str, str]):
    """(ours: an afalg client in ``mode``, theirs: a Python ssl server), ALPN h2 agreed."""
    csock, ssock = tcp_pair()
    sctx, cctx = server_context(), client_context()
    sctx.set_alpn_protocols(["http/1.1", "h2"])
    cctx.set_alpn_protocols(["h2"])
    peer = Bg(lambda: sctx.wrap_socket(ssock, server_side=True))
    ours = tls.wrap(csock, cctx, server_hostname="localhost", mode=mode[0],
                    algif_backend=mode[1])  # fmt: skip
    return ours, peer.result(60)


@pytest.mark.parametrize("mode", WRAP_MODES)
def test_tls_socket_face(mode) -> None:
    """selected_alpn_protocol (the protocol ssl agreed), gettimeout/getblocking (the TCP
    socket's), tls_session (the post-handshake state, of the version negotiated)."""
    from afalg.session import Session

    ours, theirs = _alpn_pair(mode)
    with ours, theirs:
        assert ours.selected_alpn_protocol() == theirs.selected_alpn_protocol() == "h2"
        ours.settimeout(7.5)
        assert (ours.gettimeout(), ours.getblocking()) == (7.5, True)
        ours.setblocking(False)
        assert (ours.gettimeout(), ours.getblocking()) == (0.0, False)
        ours.setblocking(True)
        assert isinstance(ours.tls_session, Session)
        assert ours.tls_session.version == 0x0304
        # the TCP socket's (create_connection gives getaddrinfo's protocol, TCP)
        assert (ours.family, ours.proto) == (socket.AF_INET, socket.IPPROTO_TCP)
        assert (ours.server_side, ours.server_hostname) == (False, "localhost")
        ours.sendall(b"ping")
        assert theirs.recv(4) == b"ping"


def test_no_alpn_is_none() -> None:
    csock, ssock = tcp_pair()
    peer = Bg(lambda: server_context().wrap_socket(ssock, server_side=True))
    ours = tls.wrap(csock, client_context(), server_hostname="localhost", mode="algif",
                    algif_backend="cryptography")  # fmt: skip
    with ours, peer.result(60):
        assert ours.selected_alpn_protocol() is None


def test_ticket_feed_gives_ssl_the_tickets_and_stops_at_a_refused_one() -> None:
    """A TLS 1.3 client's NewSessionTickets, opened by afalg, reach ssl through the feed's
    ticket() (the session can resume); a body ssl refuses stops the feed."""
    ours, theirs = _alpn_pair(("algif", "cryptography"))
    with ours, theirs:
        theirs.sendall(b"x")  # behind the tickets the server sent after its handshake
        assert ours.recv(1) == b"x"
        assert ours.session is not None and ours.session.has_ticket
        feed = ours._tickets
        assert repr(feed) == "<TicketFeed active>"
        feed.ticket(b"\xff" * 8)  # not a NewSessionTicket body: ssl refuses it
        assert repr(feed) == "<TicketFeed stopped>"
        feed.ticket(b"\xff" * 8)  # stopped: nothing happens


def test_vm_kernel_package_names_what_brings_the_kernel() -> None:
    from afalg import _vm as vm

    assert vm.KERNELS["6.1"].package == "linux-image-amd64"
    assert vm.KERNELS["7.3"].package.startswith("linux-binary-7.3.")
    assert "trixie-backports" in vm.KERNELS["7.3"].package


# --- asyncio transport: protocol swap, read pausing --------------------------------------------


class _Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.more = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.more.set()


def _unread(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def _until(predicate, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_transport_protocol_swap_and_read_pausing() -> None:
    """set_protocol/get_protocol move delivery to another protocol; pause_reading leaves what
    arrives in the socket (asyncio's contract), resume_reading delivers it."""

    async def main() -> None:
        got: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await got.put(writer)

        server = await aio.start_server(serve, "127.0.0.1", 0, ssl=server_context(),
                                        mode="algif", algif_backend="cryptography")  # fmt: skip
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await aio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost",
            mode="algif", algif_backend="cryptography",
        )  # fmt: skip
        peer = await got.get()
        transport = writer.transport
        assert isinstance(transport, aio.TLSTransport)
        collect = _Collect()
        transport.set_protocol(collect)
        assert transport.get_protocol() is collect

        transport.pause_reading()
        assert not transport.is_reading()
        raw = transport.get_extra_info("socket")._sock  # the TCP socket under the TLS socket
        peer.write(b"while paused")
        await peer.drain()
        await _until(lambda: _unread(raw) > 0, 30 * SLOW)
        for _ in range(10):  # the loop runs: a paused transport still reads nothing
            await asyncio.sleep(0)
        assert not collect.data and _unread(raw) > 0

        transport.resume_reading()
        assert transport.is_reading()
        await _until(lambda: bytes(collect.data) == b"while paused", 30 * SLOW)
        writer.close()
        peer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())


# --- kernel: the AF_ALG objects' sizes, kTLS sendfile and sequence numbers ---------------------


@pytest.mark.kernel
def test_aead_iv_sizes_and_skcipher_iv_size_are_what_the_kernel_takes() -> None:
    from afalg.alg import AEAD, SKCipher

    key = os.urandom(16)
    with AEAD("gcm(aes)", key) as gcm:
        assert gcm.iv_sizes == (12,)
        (size,) = gcm.iv_sizes
        sealed = gcm.encrypt(bytes(size), b"data", b"")
        assert gcm.decrypt(bytes(size), sealed, b"") == b"data"
        with pytest.raises(ValueError):
            gcm.encrypt(bytes(size + 1), b"data", b"")
    with SKCipher("cbc(aes)", key) as cbc:
        assert cbc.iv_size == 16
        assert len(cbc.encrypt(bytes(cbc.iv_size), bytes(32))) == 32
        with pytest.raises(ValueError):
            cbc.encrypt(bytes(cbc.iv_size - 1), bytes(32))
    with SKCipher("ecb(aes)", key) as ecb:
        assert ecb.iv_size == 0


@pytest.mark.kernel
def test_ktls_sendfile_nowait_and_record_sequence(tmp_path) -> None:
    """sendfile_nowait sends a file's bytes through the kernel's records; record_sequence reads
    the kernel's next sequence number, which counts them."""
    from afalg.keys import CipherSuite
    from afalg.ktls import KTLSSocket, record_sequence

    TLS_TX = 1  # <linux/tls.h>

    ours, theirs = _alpn_pair(("ktls", "kernel"))
    with ours, theirs:
        assert isinstance(ours, KTLSSocket)
        raw = socket.fromfd(ours.fileno(), socket.AF_INET, socket.SOCK_STREAM)  # a dup
        cipher_type = CipherSuite[ours.cipher()[0]].ktls_cipher_type
        before = record_sequence(raw, TLS_TX, cipher_type)
        body = os.urandom(40_000)
        path = tmp_path / "body"
        path.write_bytes(body)
        with open(path, "rb") as f:
            offset = 0
            while offset < len(body):
                try:
                    offset += ours.sendfile_nowait(f.fileno(), offset, len(body) - offset)
                except BlockingIOError:
                    continue
        received = b""
        while len(received) < len(body):
            received += theirs.recv(65536)
        assert received == body
        assert record_sequence(raw, TLS_TX, cipher_type) >= before + len(body) // 16384 + 1
        raw.close()
