"""AF_ALG restricted by policy: since CVE-2026-31431 some systems deny ``socket(AF_ALG)`` with a
seccomp filter or a security module. The denial is made real here: a child process installs a
seccomp filter that answers EPERM to ``socket(AF_ALG, ...)`` (and lets everything else through),
then uses afalg. What must hold: a clear :class:`afalg.AlgorithmNotAvailable` naming the
restriction, the record layer's ``"auto"`` backend falling back to cryptography, and
``afalg info`` saying why it fails. Runs on the host and under any kernel with seccomp."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

# A classic-BPF seccomp filter (x86_64): socket(AF_ALG=38, ...) -> EPERM, anything else allowed.
INSTALL_FILTER = textwrap.dedent(
    """
    import ctypes, ctypes.util, errno

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                    ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    LD_ABS, JEQ, RET = 0x20, 0x15, 0x06
    NR_SOCKET, AF_ALG = 41, 38
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    program = (Insn * 6)(
        Insn(LD_ABS, 0, 0, 0),              # seccomp_data.nr
        Insn(JEQ, 0, 3, NR_SOCKET),         # socket()? else allow
        Insn(LD_ABS, 0, 0, 16),             # args[0] (low 32 bits): the family
        Insn(JEQ, 0, 1, AF_ALG),            # AF_ALG? else allow
        Insn(RET, 0, 0, ERRNO | errno.EPERM),
        Insn(RET, 0, 0, ALLOW),
    )
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    prog = Prog(len(program), program)
    assert libc.prctl(38, 1, 0, 0, 0) == 0, "PR_SET_NO_NEW_PRIVS"
    assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, "PR_SET_SECCOMP"
    """
)

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the seccomp filter here is written for x86_64"
)


def run_restricted(code: str) -> subprocess.CompletedProcess[str]:
    script = INSTALL_FILTER + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_restricted_af_alg_is_named_and_the_record_layer_falls_back() -> None:
    result = run_restricted(
        """
        import errno, os, socket
        try:
            socket.socket(AF_ALG, socket.SOCK_SEQPACKET, 0)
        except PermissionError:
            print("filter: denied")
        import afalg
        from afalg.alg import AEAD, Hash
        from afalg.keys import CipherSuite, TrafficKeys
        from afalg.record import ContentType, RecordLayer
        for make in (lambda: AEAD("gcm(aes)", bytes(16)), lambda: Hash("sha256")):
            try:
                make()
            except afalg.AlgorithmNotAvailable as exc:
                assert exc.errno == errno.EPERM, exc
                print("refused:", exc)
        keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, os.urandom(32))
        tx, rx = RecordLayer(tx=keys), RecordLayer(rx=keys)
        rx.feed(tx.seal(ContentType.application_data, b"still works"))
        print("backend:", tx.backend, rx.next_record().payload)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "filter: denied"
    refused = [line for line in lines if line.startswith("refused:")]
    assert len(refused) == 2, lines
    assert all("AF_ALG is restricted here" in line and "seccomp" in line for line in refused)
    assert lines[-1] == "backend: cryptography b'still works'"


def test_afalg_info_says_af_alg_is_denied() -> None:
    result = run_restricted(
        """
        import sys
        from afalg.cli import main
        sys.exit(main(["info"]))
        """
    )
    assert result.returncode == 1
    assert "AF_ALG is not usable here" in result.stderr and "EPERM" in result.stderr
    assert "denied by policy" in result.stderr
    assert "Traceback" not in result.stderr
