"""Interop between afalg.record and OpenSSL (Python's ssl over MemoryBIOs), used by
tests/test_record_interop.py on the host and tests/test_record_kernel.py in the VM.

One exchange: an ssl client and an ssl server handshake in memory with a key log in a tmp file;
we watch every byte, build TrafficKeys from the key log (TLS 1.3 traffic secrets; TLS 1.2 master
secret with the randoms read from the hello messages), open every record OpenSSL protects after
the handshake (TLS 1.2 Finished, TLS 1.3 NewSessionTickets, application data of many sizes) and
send records of our own that OpenSSL must accept (data, padded and zero-length records, a TLS 1.3
KeyUpdate both ways, close_notify).

Python's ssl cannot choose a TLS 1.3 suite, so :func:`run_in_subprocess` runs the exchange in a
child whose OPENSSL_CONF sets ``Ciphersuites``. Run directly:
``python tests/_record_interop.py VERSION SUITE BACKEND CERTFILE KEYFILE`` prints a JSON summary
(the matrix both test files run, and :func:`check` of a summary, are in _record_helpers).
"""

from __future__ import annotations

import json
import os
import ssl
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from tls_wire import parse_keylog, split_records

from afalg.keys import TrafficKeys, suite_from_openssl_name, tls12_traffic_keys
from afalg.record import ContentType, Record, RecordLayer

HS = ContentType.handshake
APP = ContentType.application_data
SIZES = (1, 1000, 16384, 16385, 100 * 1024)


def whole_records(stream: bytes) -> list[bytes]:
    """Each record of ``stream``, header included; a stream that does not end on a record
    boundary raises ValueError."""
    return [
        struct.pack("!BHH", content_type, version, len(fragment)) + fragment
        for content_type, version, fragment in split_records(stream)
    ]


def _step(obj: ssl.SSLObject) -> bool:
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        return False
    return True


def _read_all(obj: ssl.SSLObject) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = obj.read(1 << 20)
        except ssl.SSLWantReadError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def open_all(layer: RecordLayer, data: bytes) -> list[Record]:
    """Feed ``data`` to ``layer`` and return every record it completes."""
    layer.feed(data)
    out = []
    while (r := layer.next_record()) is not None:
        out.append(r)
    return out


def _keylog(path: str) -> dict[str, bytes]:
    """The secrets in the key log at ``path`` (one connection's), by label."""
    return {
        label: secret
        for by_label in parse_keylog(Path(path).read_text()).values()
        for label, secret in by_label.items()
    }


def contexts(version: str, suite: str, certfile: str, keyfile: str, keylog: str):
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certfile, keyfile)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.keylog_filename = keylog
    for ctx in (server, client):
        if version == "1.2":
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(suite)
        else:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return client, server


def run_exchange(version: str, suite: str, backend: str, certfile: str, keyfile: str) -> dict:
    """Run one exchange; raises AssertionError on any mismatch; returns a summary."""
    with tempfile.TemporaryDirectory() as tmp:
        keylog = os.path.join(tmp, "keylog.txt")
        cctx, sctx = contexts(version, suite, certfile, keyfile, keylog)
        cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
        c = cctx.wrap_bio(cin, cout, server_hostname="localhost")
        s = sctx.wrap_bio(sin, sout, server_side=True)

        # --- handshake, every flight recorded --------------------------------------------
        c_stream = bytearray()
        s_stream = bytearray()
        s_after_done = b""  # what the server wrote in the step that completed its handshake
        c_done = s_done = False
        for _ in range(10):
            c_done = _step(c) or c_done
            data = cout.read()
            c_stream += data
            sin.write(data)
            was_done = s_done
            s_done = _step(s) or s_done
            data = sout.read()
            s_stream += data
            if s_done and not was_done:
                s_after_done = data
            cin.write(data)
            if c_done and s_done:
                break
        assert c_done and s_done, "handshake did not finish"
        negotiated = c.cipher()[0]
        assert c.version() == f"TLSv{version}", c.version()
        cs = suite_from_openssl_name(negotiated)
        log = _keylog(keylog)

        summary: dict = {"version": c.version(), "suite": negotiated, "opened": 0, "sealed": 0}
        c_records = whole_records(bytes(c_stream))
        s_records = whole_records(bytes(s_stream))

        if version == "1.3":
            ckeys = TrafficKeys.tls13(cs, log["CLIENT_TRAFFIC_SECRET_0"])
            skeys = TrafficKeys.tls13(cs, log["SERVER_TRAFFIC_SECRET_0"])
            c_protected: list[bytes] = []
            s_protected = whole_records(s_after_done)  # NewSessionTickets
        else:
            # ClientHello / ServerHello random: record header 5, handshake header 4, version 2
            client_random = c_records[0][11:43]
            server_random = s_records[0][11:43]
            ckeys, skeys = tls12_traffic_keys(
                cs, log["CLIENT_RANDOM"], client_random, server_random
            )
            c_protected = _after_ccs(c_records)
            s_protected = _after_ccs(s_records)
            assert c_protected and s_protected

        obs_c = RecordLayer(rx=ckeys, backend=backend)  # watches client -> server
        obs_s = RecordLayer(rx=skeys, backend=backend)  # watches server -> client
        for obs, recs in ((obs_c, c_protected), (obs_s, s_protected)):
            for rec in recs:
                opened = open_all(obs, rec)
                assert [r.content_type for r in opened] == [HS], opened
                # TLS 1.2: Finished (20); TLS 1.3: NewSessionTicket (4)
                assert opened[0].payload[0] == (20 if version == "1.2" else 4)
                summary["opened"] += 1
        summary["tickets"] = len(s_protected) if version == "1.3" else 0

        # --- OpenSSL seals, we open (both directions) -------------------------------------
        for size in SIZES:
            payload = os.urandom(size)
            for writer, out_bio, obs, reader, in_bio in (
                (c, cout, obs_c, s, sin),
                (s, sout, obs_s, c, cin),
            ):
                writer.write(payload)
                wire = out_bio.read()
                records = open_all(obs, wire)
                assert all(r.content_type == APP for r in records)
                assert b"".join(r.payload for r in records) == payload
                summary["opened"] += len(records)
                in_bio.write(wire)
                assert _read_all(reader) == payload

        # --- we seal, OpenSSL opens --------------------------------------------------------
        padding = 512 if version == "1.3" else None
        our_c = RecordLayer(tx=obs_c.rx_keys, backend=backend, padding=padding)
        our_s = RecordLayer(tx=obs_s.rx_keys, backend=backend)
        for size in (0, *SIZES):
            payload = os.urandom(size)
            for ours, in_bio, reader in ((our_c, sin, s), (our_s, cin, c)):
                wire = ours.seal(APP, payload)
                summary["sealed"] += len(whole_records(wire))
                in_bio.write(wire)
                assert _read_all(reader) == payload

        if version == "1.3":
            # our KeyUpdate(update_requested): OpenSSL takes our next generation, then answers
            # with its own KeyUpdate before its next data, which we follow with rekey_rx().
            sin.write(our_c.seal(HS, b"\x18\x00\x00\x01\x01"))
            our_c.rekey_tx()
            sin.write(our_c.seal(APP, b"after our key update"))
            assert _read_all(s) == b"after our key update"
            s.write(b"after its key update")
            obs_s.feed(sout.read())
            key_update = obs_s.next_record()  # one record at a time: the next needs new keys
            assert key_update == Record(HS, b"\x18\x00\x00\x01\x00"), key_update
            obs_s.rekey_rx()
            assert open_all(obs_s, b"") == [Record(APP, b"after its key update")]
            summary["key_updates"] = 2

        # close_notify from us ends OpenSSL's read side
        sin.write(our_c.seal(ContentType.alert, b"\x01\x00"))
        # (ssl returns b"" for a clean close_notify, raises SSLWantReadError while waiting)
        assert s.read(10) == b"", "OpenSSL did not see our close_notify"
        summary["close_notify"] = True
        summary["backend"] = our_c.backend
        for layer in (obs_c, obs_s, our_c, our_s):
            layer.close()
        return summary


def _after_ccs(records: list[bytes]) -> list[bytes]:
    for i, rec in enumerate(records):
        if rec[0] == ContentType.change_cipher_spec:
            return records[i + 1 :]
    return []


OPENSSL_CONF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = {suites}
"""


def run_in_subprocess(
    suite: str, backend: str, certfile: str, keyfile: str, tmpdir: str, version: str = "1.3"
) -> dict:
    """The exchange in a child process whose OpenSSL offers only ``suite`` in TLS 1.3."""
    conf = os.path.join(tmpdir, f"openssl-{suite}.cnf")
    Path(conf).write_text(OPENSSL_CONF.format(suites=suite))
    env = dict(os.environ, OPENSSL_CONF=conf)
    proc = subprocess.run(
        [sys.executable, __file__, version, suite, backend, certfile, keyfile],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if proc.returncode:
        raise AssertionError(f"interop child failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    ver, name, be, cert, key = sys.argv[1:6]
    print(json.dumps(run_exchange(ver, name, be, cert, key)))
