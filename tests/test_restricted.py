"""AF_ALG restricted: Linux 7.3's ``crypto.af_alg_restrict`` (0 all, 1 an allowlist, shorter
without CAP_SYS_ADMIN or CAP_NET_ADMIN, 2 AF_ALG disabled), and the fall-backs that keep afalg
working under it.

The ``restricted`` tests run on 7.3 with the sysctl at its default (1) as well as in the whole
kernel suite. They check what holds on every kernel: where the sysctl exists the ``allowlist``
fixture sets it to 1 for the test (and restores it); where it does not (before 7.3), the same
test checks that nothing is refused. The mode tests make kTLS and AF_ALG unavailable for real in
a child process (a seccomp filter answering ENOENT to ``setsockopt(TCP_ULP)`` and EPERM to
``socket(AF_ALG)``) and talk to it with Python's ssl as the peer. The unprivileged case runs in
a child that drops every capability and becomes nobody (as ``setpriv`` would). The children are
forked from the test process (:func:`in_child`): no interpreter start or imports, which cost
seconds each in the VM.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import errno
import importlib
import io
import json
import os
import platform
import select
import signal
import socket
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_tls_helpers import client_context, server_context, tcp_pair

import afalg
from afalg import alg, cli, ktls, tls
from afalg._alg import refusal  # where the refusal messages look up the sysctl and the rest
from afalg.alg import AEAD, RNG, Hash
from afalg.keys import TLS_1_3_VERSION, CipherSuite, TrafficKeys
from afalg.probe import AlgStatus, Capabilities, format_report, probe
from afalg.record import ContentType, RecordLayer

GCM = "gcm(aes)"

# -- host: the messages, from a faked sysctl ------------------------------------------------


def test_refusal_names_the_sysctl_its_value_and_the_remedies(monkeypatch) -> None:
    monkeypatch.setattr(refusal, "af_alg_restrict", lambda: 1)
    monkeypatch.setattr(refusal, "kernel_lacks", lambda name: None)
    monkeypatch.setattr(refusal, "_in_proc_crypto", lambda name: True)
    monkeypatch.setattr(refusal, "privileged", lambda: True)
    exc = alg.not_available("aead", GCM)
    assert isinstance(exc, afalg.AlgorithmNotAvailable) and exc.errno == errno.ENOENT
    assert exc.af_alg_restrict == 1
    text = str(exc)
    assert "crypto.af_alg_restrict=1" in text and "allowlist" in text
    assert "the kernel has it" in text and "CAP_SYS_ADMIN" not in text
    assert "sysctl crypto.af_alg_restrict=0" in text
    assert 'backend="cryptography"' in text and "kTLS" in text

    monkeypatch.setattr(refusal, "privileged", lambda: False)
    text = str(alg.not_available("hash", "sha256"))
    assert "shorter allowlist" in text and "without CAP_SYS_ADMIN or CAP_NET_ADMIN" in text


def test_level_2_is_reported_as_af_alg_disabled_by_the_sysctl(monkeypatch) -> None:
    monkeypatch.setattr(refusal, "af_alg_restrict", lambda: 2)
    exc = alg.socket_error(OSError(errno.EAFNOSUPPORT, "Address family not supported"))
    assert isinstance(exc, afalg.AlgorithmNotAvailable) and exc.errno == errno.EAFNOSUPPORT
    assert exc.af_alg_restrict == 2
    assert "AF_ALG is disabled by the sysctl crypto.af_alg_restrict=2" in str(exc)
    assert "sysctl crypto.af_alg_restrict=0" in str(exc)
    monkeypatch.setattr(refusal, "af_alg_restrict", lambda: None)  # no such sysctl: plain absence
    exc = alg.socket_error(OSError(errno.EAFNOSUPPORT, "Address family not supported"))
    assert exc.af_alg_restrict is None and "not available here" in str(exc)


def test_a_kernel_built_without_the_drbg_is_named(monkeypatch, tmp_path) -> None:
    config = tmp_path / "config"
    config.write_text("CONFIG_CRYPTO_JITTERENTROPY=m\n# CONFIG_CRYPTO_DRBG is not set\n")
    monkeypatch.setattr(refusal, "_kernel_config", lambda: (str(config), config.read_text()))
    monkeypatch.setattr(refusal, "af_alg_restrict", lambda: 0)
    assert alg.kernel_lacks("stdrng") == f"CONFIG_CRYPTO_DRBG is not set in {config}"
    assert alg.kernel_lacks("drbg_pr_sha256") == alg.kernel_lacks("stdrng")
    assert alg.kernel_lacks("jitterentropy_rng") is None and alg.kernel_lacks(GCM) is None
    text = str(alg.not_available("rng", "stdrng"))
    assert "the kernel has no rng algorithm 'stdrng'" in text
    assert "CONFIG_CRYPTO_DRBG is not set" in text and "jitterentropy_rng" in text
    # the kernel lacks it: that is the reason given, even under the allowlist
    monkeypatch.setattr(refusal, "af_alg_restrict", lambda: 1)
    exc = alg.not_available("rng", "stdrng")
    assert exc.af_alg_restrict is None and "also restricted" in str(exc)


def test_info_report_lists_what_the_sysctl_refuses() -> None:
    caps = Capabilities(
        kernel_release="7.3.4",
        af_alg=True,
        af_alg_reason=None,
        alg_types={"aead": True},
        af_alg_restrict=1,
        privileged=False,
        algorithms=[
            AlgStatus("aead", GCM, False, "refused by crypto.af_alg_restrict=1", True),
            AlgStatus("aead", "ccm(aes)", True),
        ],
    )
    text = format_report(caps)
    assert "crypto.af_alg_restrict: 1 (the shorter allowlist" in text
    assert "gcm(aes)" in text and "no (refused by crypto.af_alg_restrict=1)" in text
    assert "refused by crypto.af_alg_restrict=1: aead gcm(aes);" in text
    assert "sysctl crypto.af_alg_restrict=0" in text
    assert [a.name for a in caps.refused] == [GCM]


# -- under a kernel: the real sysctl ---------------------------------------------------------


@pytest.fixture
def allowlist() -> Iterator[int | None]:
    """crypto.af_alg_restrict at 1 (its default) for the test, where the kernel has it; None
    (and nothing changed) where it does not."""
    with contextlib.suppress(OSError):  # the first socket(AF_ALG) loads af_alg: the sysctl
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
    before = alg.af_alg_restrict()
    if before is None:
        yield None
        return
    path = Path(alg.AF_ALG_RESTRICT)
    path.write_text("1")
    try:
        yield 1
    finally:
        path.write_text(str(before))


@pytest.mark.kernel
@pytest.mark.restricted
def test_allowlist_refusal_says_so(allowlist: int | None) -> None:
    with AEAD("ccm(aes)", bytes(16)) as ccm:  # on the allowlist for root
        assert len(ccm.encrypt(bytes(12), b"x")) == 17
    if allowlist is None:
        AEAD(GCM, bytes(16)).close()
    else:
        with pytest.raises(afalg.AlgorithmNotAvailable) as info:
            AEAD(GCM, bytes(16))
        assert info.value.errno == errno.ENOENT and info.value.af_alg_restrict == 1
        assert "crypto.af_alg_restrict=1" in str(info.value)
        assert "sysctl crypto.af_alg_restrict=0" in str(info.value)
    with pytest.raises(afalg.AlgorithmNotAvailable) as info:  # absent everywhere
        Hash("nosuchhash")
    assert "nosuchhash" in str(info.value)


@pytest.mark.kernel
@pytest.mark.restricted
def test_level_2_disables_af_alg(allowlist: int | None) -> None:
    if allowlist is None:
        Hash("sha256").close()  # no sysctl: nothing can disable AF_ALG this way
        return
    Path(alg.AF_ALG_RESTRICT).write_text("2")
    with pytest.raises(afalg.AlgorithmNotAvailable) as info:
        Hash("sha256")
    assert info.value.errno == errno.EAFNOSUPPORT and info.value.af_alg_restrict == 2
    assert "disabled by the sysctl crypto.af_alg_restrict=2" in str(info.value)
    caps = probe()
    assert not caps.af_alg and "crypto.af_alg_restrict=2" in (caps.af_alg_reason or "")


def _info() -> dict[str, tuple[int, str]]:
    """The child: ``afalg info`` and ``afalg info --json`` (what ``python -m afalg`` runs), their
    exit statuses and outputs."""
    outputs = {}
    for argv in (["info"], ["info", "--json"]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = cli.main(argv)
        outputs[argv[-1]] = (code, out.getvalue())
    return outputs


@pytest.mark.kernel
@pytest.mark.restricted
def test_afalg_info_shows_the_sysctl_and_what_it_refuses(allowlist: int | None) -> None:
    outputs = in_child(_info)
    assert outputs["info"][0] == outputs["--json"][0] == 0, outputs
    text, report = outputs["info"][1], json.loads(outputs["--json"][1])
    assert report["af_alg_restrict"] == allowlist
    if allowlist is None:
        assert "crypto.af_alg_restrict: absent" in text
        assert report["refused"] == [] and "refused by" not in text
    else:
        assert "crypto.af_alg_restrict: 1 (the allowlist for CAP_SYS_ADMIN" in text
        assert {"aead gcm(aes)", "aead rfc7539(chacha20,poly1305)"} <= set(report["refused"])
        assert "hash sha256" not in report["refused"]
        assert "refused by crypto.af_alg_restrict=1: " in text
    # the rng line: it works, or the kernel's reason is shown
    rng = {a["name"]: a for a in report["algorithms"] if a["type"] == "rng"}
    lacks = alg.kernel_lacks("stdrng")
    if lacks:
        assert not rng["stdrng"]["available"] and lacks in rng["stdrng"]["reason"]
        assert lacks in text
    elif allowlist is None:
        assert rng["stdrng"]["available"]


@pytest.mark.kernel
@pytest.mark.restricted
def test_rng_works_or_says_why(allowlist: int | None) -> None:
    lacks = alg.kernel_lacks("stdrng")
    if allowlist is None:
        with RNG() as rng:
            assert rng.name == ("jitterentropy_rng" if lacks else "stdrng")
            assert len(rng.read(300)) == 300
        return
    with pytest.raises(afalg.AlgorithmNotAvailable) as info:  # 7.3's allowlist has no rng
        RNG()
    text = str(info.value)
    assert "stdrng" in text and "crypto.af_alg_restrict=1" in text
    if lacks:
        assert lacks in text


@pytest.mark.kernel
@pytest.mark.restricted
def test_record_layer_auto_shows_its_backend(allowlist: int | None) -> None:
    for suite in (CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_CHACHA20_POLY1305_SHA256):
        keys = TrafficKeys.tls13(suite, os.urandom(32))
        tx, rx = RecordLayer(tx=keys), RecordLayer(rx=keys)
        expected = "kernel" if allowlist is None else "cryptography"
        assert tx.backend == rx.backend == expected, suite
        rx.feed(tx.seal(ContentType.application_data, b"either way"))
        assert rx.next_record().payload == b"either way"  # type: ignore[union-attr]


# -- children: forked from this process ------------------------------------------------------


def in_child(fn: Callable[[], Any], timeout: float = 300) -> Any:
    """``fn()`` run in a child forked from this process, its (JSON) result returned: what the
    child does to itself (a seccomp filter, dropped privileges) stays there. A fork costs no
    interpreter start and no imports (seconds each under TCG, over 9p). The child starts as a
    fresh process would: kTLS support is tried afresh (afalg.ktls caches it per process)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports, then leaves without returning to pytest
        status = 1
        try:
            os.close(read)
            ktls.supports.cache_clear()
            ktls.supports_rekey.cache_clear()
            try:
                report = {"result": fn()}
            except BaseException:
                report = {"error": traceback.format_exc()}
            with os.fdopen(write, "w") as f:
                json.dump(report, f)
            status = 0
        finally:
            os._exit(status)
    os.close(write)
    chunks: list[bytes] = []
    deadline, eof = time.monotonic() + timeout, False
    try:
        while select.select([read], [], [], max(0, deadline - time.monotonic()))[0]:
            chunk = os.read(read, 1 << 16)
            if not chunk:
                eof = True
                break
            chunks.append(chunk)
    finally:  # timed out, or interrupted (pytest-timeout): the child goes too
        os.close(read)
        if not eof:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert eof, f"the child gave no answer in {timeout} s"
    assert os.waitstatus_to_exitcode(status) == 0 and chunks, f"child: wait status {status:#x}"
    report = json.loads(b"".join(chunks))
    assert "error" not in report, report["error"]
    return report["result"]


# -- unprivileged: every capability dropped --------------------------------------------------

PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 4, 24, 47, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
LIBC = ctypes.CDLL(None, use_errno=True)


def _libc_ok(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def drop_privileges() -> None:
    """What ``setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all
    --bounding-set=-all`` does before it runs a command, done to this (forked) process."""
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _libc_ok(LIBC.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"PR_CAPBSET_DROP {cap}")
    _libc_ok(LIBC.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT")
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)  # from root to none: permitted and effective sets cleared
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _libc_ok(LIBC.capset(header, (ctypes.c_uint32 * 6)()), "capset")  # inheritable: none
    _libc_ok(LIBC.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")  # as after an exec


def _unprivileged() -> dict:
    codecs.lookup("idna")  # imported on first use (getaddrinfo): now, while still root
    importlib.import_module("gzip")  # likewise (alg.kernel_lacks)
    drop_privileges()
    with open("/proc/self/status") as f:
        status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    try:
        Hash("sha256").close()
        refusal = None
    except afalg.AlgorithmNotAvailable as exc:
        refusal = str(exc)
    caps = probe()
    return {
        "refusal": refusal,
        "privileged": caps.privileged,
        "refused": [f"{a.type} {a.name}" for a in caps.refused],
        "ids": [os.getresuid(), os.getresgid(), os.getgroups()],
        "caps": {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
    }


@pytest.mark.kernel
@pytest.mark.restricted
def test_unprivileged_allowlist_is_named(allowlist: int | None) -> None:
    report = in_child(_unprivileged)
    assert report["ids"] == [[65534] * 3, [65534] * 3, []]
    assert report["caps"] == dict.fromkeys(report["caps"], 0), report["caps"]
    assert report["privileged"] is False
    if allowlist is None:
        assert report["refusal"] is None and report["refused"] == []
    else:
        assert "crypto.af_alg_restrict=1" in report["refusal"]
        assert "without CAP_SYS_ADMIN or CAP_NET_ADMIN (this one)" in report["refusal"]
        assert "hash sha256" in report["refused"] and "skcipher cbc(aes)" in report["refused"]


# -- wrap(mode="auto"): the one definition, with kTLS and AF_ALG made unavailable for real ----


def deny(af_alg: bool, tls_ulp: bool) -> None:
    """A classic-BPF seccomp filter (x86_64) on this (forked) process: socket(AF_ALG) -> EPERM
    and setsockopt(SOL_TCP, TCP_ULP) -> ENOENT, each when asked; anything else allowed."""

    class Insn(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_uint16),
            ("jt", ctypes.c_uint8),
            ("jf", ctypes.c_uint8),
            ("k", ctypes.c_uint32),
        ]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    LD, JEQ, RET, ALLOW, ERRNO = 0x20, 0x15, 0x06, 0x7FFF0000, 0x00050000
    code = [
        (LD, 0, 0, 0),                                               # 0 seccomp_data.nr
        (JEQ, 0, 3, 41),                                             # 1 socket? else 5
        (LD, 0, 0, 16),                                              # 2 args[0]: family
        (JEQ, 0, 8, 38),                                             # 3 AF_ALG? else 12
        (RET, 0, 0, ERRNO | errno.EPERM if af_alg else ALLOW),       # 4
        (JEQ, 0, 6, 54),                                             # 5 setsockopt? else 12
        (LD, 0, 0, 24),                                              # 6 args[1]: level
        (JEQ, 0, 4, 6),                                              # 7 SOL_TCP? else 12
        (LD, 0, 0, 32),                                              # 8 args[2]: optname
        (JEQ, 0, 2, 31),                                             # 9 TCP_ULP? else 12
        (RET, 0, 0, ERRNO | errno.ENOENT if tls_ulp else ALLOW),     # 10
        (RET, 0, 0, ALLOW),                                          # 11
        (RET, 0, 0, ALLOW),                                          # 12
    ]  # fmt: skip
    program = (Insn * len(code))(*(Insn(*c) for c in code))
    prog = Prog(len(code), program)
    _libc_ok(LIBC.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _libc_ok(LIBC.prctl(22, 2, ctypes.byref(prog), 0, 0), "PR_SET_SECCOMP")


def _serve(version: str, mode: str, backend: str, deny_af_alg: bool, deny_tls_ulp: bool) -> dict:
    """The child: a server wrap()ping with the given mode, Python's ssl as the client in a
    thread."""
    deny(deny_af_alg, deny_tls_ulp)
    client, server = tcp_pair()
    seen: dict[str, Any] = {}

    def peer() -> None:
        try:
            with client_context(version).wrap_socket(client, server_hostname="localhost") as c:
                seen["client"] = c.recv(100).decode()  # nothing sent: no RST on a refusal
        except ssl.SSLError as exc:
            seen["client"] = f"SSLError: {exc.reason}"

    thread = threading.Thread(target=peer)
    thread.start()
    try:
        conn = tls.wrap(
            server, server_context(version), server_side=True, mode=mode, algif_backend=backend
        )
    except OSError as exc:
        seen["server"] = {
            "error": type(exc).__name__,
            "message": str(exc),
            "af_alg_restrict": getattr(exc, "af_alg_restrict", None),
        }
    else:
        with conn:
            conn.sendall(b"ping")
            seen["server"] = {"mode": conn.mode, "backend": conn.backend}
    thread.join(60)
    return seen


def serve(
    version: str = "TLSv1.3",
    *,
    mode: str = "auto",
    backend: str = "auto",
    deny_af_alg: bool = False,
    deny_tls_ulp: bool = False,
) -> dict:
    return in_child(lambda: _serve(version, mode, backend, deny_af_alg, deny_tls_ulp))


seccomp_x86_64 = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the seccomp filter here is written for x86_64"
)


@pytest.mark.kernel
@pytest.mark.restricted
def test_wrap_auto_is_ktls_where_the_kernel_runs_the_suite(allowlist: int | None) -> None:
    # kTLS does not use AF_ALG: the allowlist changes nothing
    assert tls.choose_mode(TLS_1_3_VERSION, CipherSuite.TLS_AES_128_GCM_SHA256) == (
        "ktls",
        "kernel",
    )
    expected = ("algif", "kernel" if allowlist is None else "cryptography")
    assert tls.choose_mode(TLS_1_3_VERSION, CipherSuite.TLS_AES_128_GCM_SHA256, "algif") == (
        expected
    )


@seccomp_x86_64
@pytest.mark.kernel
@pytest.mark.restricted
def test_wrap_auto_falls_back_without_ktls(allowlist: int | None) -> None:
    # no kTLS: algif on the kernel AEAD (cryptography where the allowlist refuses gcm(aes))
    seen = serve(deny_tls_ulp=True)
    expected = "kernel" if allowlist is None else "cryptography"
    assert seen == {"client": "ping", "server": {"mode": "algif", "backend": expected}}
    # no kTLS and no AF_ALG: algif on cryptography
    seen = serve("TLSv1.2", deny_tls_ulp=True, deny_af_alg=True)
    assert seen == {"client": "ping", "server": {"mode": "algif", "backend": "cryptography"}}


@seccomp_x86_64
@pytest.mark.kernel
@pytest.mark.restricted
@pytest.mark.parametrize("version", ["TLSv1.2", "TLSv1.3"])
def test_nothing_that_may_run_works_peer_gets_a_fatal_alert(version: str) -> None:
    # the kernel AEAD asked for, AF_ALG denied: the client hears internal_error, then wrap raises
    seen = serve(version, mode="algif", backend="kernel", deny_af_alg=True)
    assert seen["client"] == "SSLError: TLSV1_ALERT_INTERNAL_ERROR", seen
    assert seen["server"]["error"] == "AlgorithmNotAvailable", seen
    # kTLS asked for, the tls ULP refused
    seen = serve(version, mode="ktls", deny_tls_ulp=True)
    assert seen["client"] == "SSLError: TLSV1_ALERT_INTERNAL_ERROR", seen
    assert seen["server"]["error"] == "KTLSError", seen


@pytest.mark.kernel
@pytest.mark.restricted
def test_allowlist_refusal_alerts_the_peer(allowlist: int | None) -> None:
    seen = serve(mode="algif", backend="kernel")
    if allowlist is None:
        assert seen == {"client": "ping", "server": {"mode": "algif", "backend": "kernel"}}
    else:
        assert seen["client"] == "SSLError: TLSV1_ALERT_INTERNAL_ERROR", seen
        assert seen["server"]["af_alg_restrict"] == 1, seen
        assert "crypto.af_alg_restrict=1" in seen["server"]["message"]
