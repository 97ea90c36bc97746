"""What the ``afalg`` command says where the kernel lacks something, and what it refuses
(issue 25, items 8, 10 and 11).

- ``afalg vm --env NAME=VALUE``: NAME goes into the guest's root shell script, so only names
  that are identifiers pass (an argparse error otherwise); values arrive byte for byte.
- ``afalg hash``/``hmac`` name an input file that cannot be read before AF_ALG's absence.
- ``afalg info``, ``afalg list`` and :class:`afalg.AlgorithmNotAvailable` say what still runs
  where AF_ALG is missing (algif on ``cryptography``, ``afalg vm``), and claim no absence where
  AF_ALG is there (the ``kernel`` tests, in the VM).

The host tests that need a kernel without AF_ALG skip where it has AF_ALG (the host stage has
none: that is the case they are for).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import afalg
from afalg import _vm as vm
from afalg import alg
from afalg.cli import build_parser
from afalg.keys import CipherSuite, TrafficKeys
from afalg.probe import AlgStatus, Capabilities, af_alg_absence, format_report
from afalg.record import RecordLayer


def _af_alg_missing() -> bool:
    try:
        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0).close()
    except OSError:
        return True
    return False


NO_AF_ALG = _af_alg_missing()
without_af_alg = pytest.mark.skipif(not NO_AF_ALG, reason="this kernel has AF_ALG")


ROOT = Path(__file__).resolve().parent.parent
# This checkout's afalg, whatever the current directory (an editable install may be another's)
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def afalg_cmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "afalg", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        env=ENV,
    )


# --- item 8: afalg vm --env ------------------------------------------------------------------


@pytest.mark.parametrize(
    "item",
    ["A;touch PWNED=1", "1A=x", "=x", "A B=x", "$(id)=x", "A-B=x", "NOVALUE", "É=x"],
)
def test_vm_env_name_must_be_an_identifier(item: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["vm", "--env", item, "--", "true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --env:" in err, err
    if "=" in item:
        assert "identifier" in err and repr(item.split("=", 1)[0]) in err
    else:
        assert "NAME=VALUE" in err


def test_vm_env_and_sysctl_parse_to_pairs() -> None:
    args = build_parser().parse_args(
        ["vm", "--env", "A_1=x=y", "--env", "_B=", "--sysctl", "net.a.b=1", "--", "true"]
    )
    assert args.env == [("A_1", "x=y"), ("_B", "")]
    assert args.sysctl == [("net.a.b", "1")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["vm", "--sysctl", "net.a.b", "--", "true"])


def test_vm_command_line_refuses_a_name_that_is_not_an_identifier() -> None:
    with pytest.raises(ValueError, match="identifier"):
        vm.command_line(["true"], Path("/vmlinuz"), cwd="/tmp", env={"A;id": "1"})
    for name in ("A", "_a1", "AFALG_IN_VM"):
        vm.check_env_name(name)
    for name in ("1A", "A-B", "A B", "", "A=B", "Ä"):
        with pytest.raises(ValueError, match="not an identifier"):
            vm.check_env_name(name)


VALUES = {
    "QUOTE": "it's",
    "SUBST": "$(touch PWNED)",
    "TICKS": "`touch PWNED`",
    "LINES": "a\nb",
    "EMPTY": "",
    "SPACES": "  two  spaces ",
    "GLOB": "*",
}


def test_vm_env_values_reach_the_command_verbatim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest's script, run by sh here: every value arrives as given, none is executed."""
    monkeypatch.setattr(vm, "_vng", lambda: "vng")  # the command line only, no VM
    show = f"import os, json; print(json.dumps({{k: os.environ[k] for k in {sorted(VALUES)}}}))"
    cmd = vm.command_line(
        [sys.executable, "-c", show], Path("/vmlinuz"), cwd=str(tmp_path), env=VALUES
    )
    script = cmd[cmd.index("--exec") + 1]
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == VALUES
    assert not (tmp_path / "PWNED").exists()


# --- item 10: the missing file first ---------------------------------------------------------


@without_af_alg
@pytest.mark.parametrize(
    "argv",
    [["hash", "sha256"], ["hmac", "sha256", "--key", "00"], ["hash", "sha256", "--check"]],
    ids=["hash", "hmac", "check"],
)
def test_a_missing_file_is_named_before_af_alg(argv: list[str], tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    done = afalg_cmd(*argv, "missing-file", "dir", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert lines[:2] == [
        f"afalg {argv[0]}: missing-file: No such file or directory",
        f"afalg {argv[0]}: dir: Is a directory",
    ], done.stderr
    assert "AF_ALG" in lines[2] and len(lines) == 3, done.stderr  # then why nothing was hashed


@without_af_alg
def test_readable_files_leave_the_af_alg_error_alone(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    done = afalg_cmd("hash", "sha256", "a", "-", cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("afalg hash: AF_ALG sockets are not available here")
    assert len(done.stderr.splitlines()) == 1


# --- item 11: what still runs without AF_ALG (host) ------------------------------------------


@without_af_alg
def test_info_names_what_runs_without_af_alg() -> None:
    done = afalg_cmd("info")
    assert done.returncode == 1
    assert 'algif on the cryptography backend (mode="auto" picks it)' in done.stdout
    assert "afalg vm -- CMD" in done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith("afalg: AF_ALG is not usable here: ")
    assert "algif mode on the cryptography backend still runs" in line and "afalg vm" in line
    report = json.loads(afalg_cmd("info", "--json").stdout)
    assert report["modes"] == [["algif", "cryptography"]]
    absence = af_alg_absence()
    assert absence is not None and absence in line


@without_af_alg
def test_list_says_its_algorithms_cannot_be_used_here() -> None:
    done = afalg_cmd("list")
    assert done.returncode == 0 and done.stdout  # /proc/crypto is there all the same
    (line,) = done.stderr.splitlines()
    assert line.startswith("afalg list: ")
    assert "cannot be used through AF_ALG here" in line and "socket(AF_ALG) failed" in line
    assert "afalg vm -- afalg list" in line


@without_af_alg
def test_algorithm_not_available_names_the_ways_out() -> None:
    with pytest.raises(afalg.AlgorithmNotAvailable) as exc_info:
        alg.Hash("sha256")
    text = str(exc_info.value)
    assert "AF_ALG sockets are not available here" in text
    assert "hashlib" in text and 'backend="cryptography"' in text
    assert 'mode="ktls"' in text and "afalg vm" in text
    keys = TrafficKeys.tls13(CipherSuite.TLS_AES_128_GCM_SHA256, bytes(32))
    with pytest.raises(afalg.AlgorithmNotAvailable, match="afalg vm"):
        RecordLayer(tx=keys, backend="kernel")


# --- item 11: where AF_ALG is there, nothing claims it absent (VM) ---------------------------


@pytest.mark.kernel
def test_info_claims_no_absence_where_the_kernel_has_it() -> None:
    if NO_AF_ALG:
        pytest.skip("no AF_ALG here")
    caps = afalg.probe()
    done = afalg_cmd("info")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "not usable" not in done.stdout and "afalg vm" not in done.stdout
    runs = done.stdout.split("run here: ")[1]
    modes = json.loads(afalg_cmd("info", "--json").stdout)["modes"]
    assert ["algif", "cryptography"] in modes and "algif on the cryptography backend" in runs
    record_aeads = ("gcm(aes)", "rfc7539(chacha20,poly1305)")
    if any(a.available for a in caps.algorithms if a.name in record_aeads):  # 7.3: allowlist
        assert ["algif", "kernel"] in modes and "algif on the kernel's AEAD" in runs
    if caps.ktls:
        assert ["ktls", "kernel"] in modes and runs.startswith("kTLS")


@pytest.mark.kernel
def test_list_and_errors_claim_no_absence_where_the_kernel_has_it(tmp_path: Path) -> None:
    if NO_AF_ALG:
        pytest.skip("no AF_ALG here")
    done = afalg_cmd("list", "--type", "hash")
    assert done.returncode == 0 and "sha256" in done.stdout
    assert "cannot be used" not in done.stderr and "afalg vm" not in done.stderr
    with pytest.raises(afalg.AlgorithmNotAvailable) as exc_info:
        alg.Hash("nosuchhash")
    text = str(exc_info.value)
    assert "not available here" not in text and "afalg vm" not in text
    assert af_alg_absence() is None
    done = afalg_cmd("hash", "sha256", "missing-file", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "afalg hash: missing-file: No such file or directory\n"


def test_the_report_without_ktls_only_names_what_is_missing() -> None:
    """AF_ALG there, kTLS not: algif on both AEADs runs; the hint names kTLS alone."""
    caps = Capabilities(
        kernel_release="6.12",
        af_alg=True,
        af_alg_reason=None,
        algorithms=[AlgStatus("aead", "gcm(aes)", True)],
        tls_ulp=False,
        tls_ulp_reason="no tls ULP",
    )
    assert caps.modes == [("algif", "kernel"), ("algif", "cryptography")]
    text = format_report(caps)
    runs = "algif on the kernel's AEAD, algif on the cryptography backend"
    assert f"TLS modes that run here: {runs}\n" in text
    assert "without kTLS: plain ssl runs too; `afalg vm -- CMD`" in text
    assert "hashlib" not in text and "AF_ALG and kTLS:" not in text


# --- item 13: afalg aead-dec --help ----------------------------------------------------------


def test_aead_help_says_which_side_carries_the_tag() -> None:
    dec = " ".join(afalg_cmd("aead-dec", "--help").stdout.split())  # argparse wraps lines
    assert "stdin is ciphertext || tag" in dec and "output is ciphertext" not in dec
    assert "nothing unless the tag verifies" in dec
    enc = " ".join(afalg_cmd("aead-enc", "--help").stdout.split())
    assert "stdout is ciphertext || tag" in enc
    listing = afalg_cmd("--help").stdout
    assert "aead-dec  AEAD-decrypt stdin (ciphertext || tag) to stdout" in listing
