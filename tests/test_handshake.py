"""The sans-I/O handshake (:class:`afalg.handoff.Handshake`), on the host: two of them pumped
through memory in chunks of any size agree on the keys, never read past a record, and fail the
way ssl fails, with the alert to send and no secret left behind."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_handoff import client_context, server_context

from afalg import handoff
from afalg.wire import HEADER, ContentType

VERSIONS = ["TLSv1.2", "TLSv1.3"]


def contexts(version: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    v = ssl.TLSVersion[version.replace(".", "_")]
    sctx = server_context(minimum_version=v, maximum_version=v)
    cctx = client_context(minimum_version=v, maximum_version=v)
    return sctx, cctx


def pump(
    client: handoff.Handshake, server: handoff.Handshake, chunk: int | st.DrawFn = 2**16
) -> tuple[bytes, bytes]:
    """Move bytes both ways until both are done, each read at most ``bytes_wanted()`` and at most
    ``chunk`` (an int, or a draw of one); returns the bytes left on the way to the server and to
    the client (records after the handshake: the kernel's to read)."""
    wires = {id(client): bytearray(), id(server): bytearray()}  # bytes on their way to each
    while not (client.done and server.done):
        moved = False
        for me, peer in ((client, server), (server, client)):
            out = me.data_to_send()
            wires[id(peer)] += out
            moved = moved or bool(out)
            wire = wires[id(me)]
            while wire and me.bytes_wanted():
                size = chunk if isinstance(chunk, int) else chunk(st.integers(1, 600))
                n = min(size, me.bytes_wanted(), len(wire))
                me.receive(bytes(wire[:n]))
                del wire[:n]
                moved = True
        assert moved or (client.done and server.done), "the handshake stalled"
    wires[id(server)] += client.data_to_send()
    wires[id(client)] += server.data_to_send()
    return bytes(wires[id(server)]), bytes(wires[id(client)])


def records(data: bytes) -> list[int]:
    """The content types of the whole records in ``data`` (which must end at a record end)."""
    types = []
    while data:
        content_type, _version, length = HEADER.unpack_from(data)
        types.append(content_type)
        data = data[HEADER.size + length :]
    return types


@pytest.mark.parametrize("version", VERSIONS)
def test_two_handshakes_agree_on_keys(version: str) -> None:
    sctx, cctx = contexts(version)
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    assert not client.done and server.bytes_wanted() == 5
    to_server, to_client = pump(client, server)
    c, s = client.result(), server.result()
    assert c.version == s.version == (0x0304 if version == "TLSv1.3" else 0x0303)
    assert (c.tx.key, c.tx.iv, c.tx.seq) == (s.rx.key, s.rx.iv, s.rx.seq)
    assert (c.rx.key, c.rx.iv) == (s.tx.key, s.tx.iv)
    # Nothing past the last handshake record was read: what the server sealed under the
    # application keys after it (TLS 1.3 NewSessionTickets) waits whole for the next reader,
    # which starts at the client's receive sequence number.
    assert to_server == b""
    assert records(to_client) == [ContentType.application_data] * (s.tx.seq - c.rx.seq)
    assert (version == "TLSv1.3") == (s.tx.seq - c.rx.seq == 2)  # sctx.num_tickets
    assert c.ssl_object.version() == version
    assert client.bytes_wanted() == 0 and server.bytes_wanted() == 0
    assert not handoff.keylog_for(cctx)._expected and not handoff.keylog_for(sctx)._expected


@given(data=st.data(), version=st.sampled_from(VERSIONS))
def test_any_chunking_gives_the_same_keys(data: st.DataObject, version: str) -> None:
    sctx, cctx = contexts(version)
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    _, to_client = pump(client, server, chunk=data.draw)
    c, s = client.result(), server.result()
    assert (c.tx.key, c.tx.seq) == (s.rx.key, s.rx.seq)
    assert len(records(to_client)) == s.tx.seq - c.rx.seq


def test_never_reads_past_a_record() -> None:
    sctx, cctx = contexts("TLSv1.3")
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    hello = client.data_to_send()
    (length,) = HEADER.unpack_from(hello)[2:]
    assert server.bytes_wanted() == 5
    with pytest.raises(ValueError, match="whole records"):
        server.receive(hello[:6])
    server.receive(hello[:3])  # a header in pieces
    assert server.bytes_wanted() == 2
    server.receive(hello[3:5])
    assert server.bytes_wanted() == length
    with pytest.raises(ValueError, match="whole records"):
        server.receive(hello[5:] + b"\x17")  # one byte of the next record: not the handshake's
    server.receive(hello[5:])
    assert server.data_to_send()  # ServerHello ... Finished


def test_certificate_failure_raises_ssls_error_and_leaves_the_alert_to_send() -> None:
    sctx, cctx = contexts("TLSv1.3")
    client = handoff.Handshake(cctx, server_hostname="not-the-name.example")
    server = handoff.Handshake(sctx, server_side=True)
    with pytest.raises(ssl.SSLCertVerificationError):  # ssl's own exception, unwrapped
        pump(client, server)
    alert = client.data_to_send()
    assert alert[0] == ContentType.alert or alert[0] == ContentType.application_data  # sealed
    assert client.bytes_wanted() == 0
    assert not handoff.keylog_for(cctx)._expected  # its secrets are gone
    with pytest.raises(ssl.SSLError, match="ALERT_BAD_CERTIFICATE"):  # the server hears it
        server.receive(alert[:5])
        server.receive(alert[5:])


def test_not_tls_is_refused_at_the_header() -> None:
    sctx, _ = contexts("TLSv1.3")
    server = handoff.Handshake(sctx, server_side=True)
    with pytest.raises(ssl.SSLError):
        server.receive(b"GET /")
    assert server.bytes_wanted() == 0


@pytest.mark.parametrize("cut", [0, 3, 40])
def test_eof_in_the_middle_raises(cut: int) -> None:
    sctx, cctx = contexts("TLSv1.2")
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    hello = client.data_to_send()
    for piece in (hello[:3], hello[3:5], hello[5:cut])[: 1 if cut == 3 else 3 if cut else 0]:
        server.receive(piece)
    with pytest.raises(ssl.SSLError):
        server.receive_eof()
    client.close()
    assert not handoff.keylog_for(cctx)._expected


def test_abandoned_handshake_forgets_its_secrets() -> None:
    sctx, cctx = contexts("TLSv1.3")
    client = handoff.Handshake(cctx, server_hostname="localhost")
    server = handoff.Handshake(sctx, server_side=True)
    server.receive(client.data_to_send()[:5])
    assert handoff.keylog_for(cctx)._expected  # the ClientHello random is registered
    client.close()
    client.close()
    assert not handoff.keylog_for(cctx)._expected
    assert "failed" in repr(client) and client.bytes_wanted() == 0
    with pytest.raises(ValueError, match="not done"):
        client.result()


def test_steps_drive_both_ends_and_fail_with_the_alert_best_effort() -> None:
    """Handshake.steps() (what the blocking and asyncio drivers run): Send/Receive steps that
    pumped between two ends give the keys; a failing end yields its alert as a best-effort
    Send, then raises ssl's error; closing an unfinished generator forgets the secrets."""
    sctx, cctx = contexts("TLSv1.3")
    ends = [handoff.Handshake(cctx, server_hostname="localhost"),
            handoff.Handshake(sctx, server_side=True)]  # fmt: skip
    gens = [end.steps() for end in ends]
    wires = [bytearray(), bytearray()]  # bytes on their way to each end
    steps: list[Any] = [next(g) for g in gens]
    results: list[Any] = [None, None]
    while None in results:
        moved = False
        for i, g in enumerate(gens):
            step = steps[i]
            if results[i] is not None:
                continue
            try:
                if isinstance(step, handoff.Send):
                    assert not step.best_effort
                    wires[1 - i] += step.data
                    steps[i] = g.send(None)
                elif wires[i]:
                    n = min(len(step.buffer), len(wires[i]))
                    step.buffer[:n] = wires[i][:n]
                    del wires[i][:n]
                    steps[i] = g.send(n)
                else:
                    continue
            except StopIteration as done:
                results[i] = done.value
            moved = True
        assert moved, "the handshake stalled"
    c, s = results
    assert (c.tx.key, c.tx.seq) == (s.rx.key, s.rx.seq) and c.rx.key == s.tx.key

    client = handoff.Handshake(cctx, server_hostname="not-the-name.example")
    server = handoff.Handshake(sctx, server_side=True)
    cg, sg = client.steps(), server.steps()
    hello = next(cg)
    step = next(sg)
    for b in (hello.data[:5], hello.data[5:]):
        step.buffer[: len(b)] = b
        step = sg.send(len(b))
    flight = b""
    while isinstance(step, handoff.Send):
        flight += step.data
        step = sg.send(None)
    step = cg.send(None)
    alerts = []
    with pytest.raises(ssl.SSLCertVerificationError):
        while flight:
            n = min(len(step.buffer), len(flight))
            step.buffer[:n] = flight[:n]
            flight = flight[n:]
            step = cg.send(n)
            while isinstance(step, handoff.Send):
                assert step.best_effort and step.data[0] in (
                    ContentType.alert, ContentType.application_data,
                )  # fmt: skip
                alerts.append(step.data)
                step = cg.send(None)
    assert len(alerts) == 1  # the alert, before ssl's error
    assert not handoff.keylog_for(cctx)._expected
    sg.close()  # abandoned mid-handshake: its secrets go too
    assert not handoff.keylog_for(sctx)._expected
