"""The crypto CLI never echoes a key: a malformed or wrongly sized --key is one clear line on
stderr that names the problem, not the key (shell history is enough exposure; logs of failed
runs must not add to it). These errors come before any AF_ALG socket, so they run on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

KEY = "a7" * 16


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "afalg", *args], input="hello", capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [
        ["aead-enc", "--cipher", "gcm(aes)", "--key", KEY + "a7", "--iv", "00" * 12],
        ["enc", "--cipher", "cbc(aes)", "--key", KEY[:-2], "--iv", "00" * 16],
    ],
    ids=["aead-key-size", "cipher-key-size"],
)
def test_wrong_key_size_named_not_shown(args: list[str]) -> None:
    proc = run(*args)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "key" in proc.stderr and "bytes" in proc.stderr
    assert "a7a7a7a7" not in proc.stderr + proc.stdout


def test_malformed_hex_key_not_echoed() -> None:
    proc = run("hmac", "sha256", "--key", KEY + "zz", "/dev/null")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--key" in proc.stderr and "hex" in proc.stderr
    assert f"character {len(KEY) + 1} of {len(KEY) + 2}" in proc.stderr
    assert "a7a7a7a7" not in proc.stderr
    proc = run("hmac", "sha256", "--key", KEY + "a", "/dev/null")
    assert "odd number of hex digits" in proc.stderr and "a7a7a7a7" not in proc.stderr


# --- --key-file and --key-fd: the key off the command line (issue 15 item 7) -----------------


def run_fd(args: list[str], key: bytes) -> subprocess.CompletedProcess[str]:
    """``afalg ARGS --key-fd N`` with ``key`` readable on descriptor N (a pipe, as ``3<(...)``
    gives)."""
    r, w = os.pipe()
    os.write(w, key)
    os.close(w)
    try:
        return subprocess.run(
            [sys.executable, "-m", "afalg", *args, "--key-fd", str(r)], input="hello",
            capture_output=True, text=True, timeout=60, pass_fds=(r,),
        )  # fmt: skip
    finally:
        os.close(r)


@pytest.mark.parametrize("source", ["file", "fd"])
def test_key_file_and_fd_are_read(tmp_path: Path, source: str) -> None:
    """A 15-byte key from the file or descriptor reaches the size check (before any socket):
    the key was read and parsed, whitespace and all, and is not shown."""
    key = (KEY[:-2] + "\n").encode()
    args = ["enc", "--cipher", "cbc(aes)", "--iv", "00" * 16]
    if source == "file":
        (tmp_path / "k").write_bytes(b"  " + key)
        proc = run(*args, "--key-file", str(tmp_path / "k"))
    else:
        proc = run_fd(args, key)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "key must be 16, 24 or 32 bytes, got 15" in proc.stderr
    assert "a7a7a7a7" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("source", ["file", "fd"])
def test_key_file_and_fd_errors_name_the_option_not_the_key(tmp_path: Path, source: str) -> None:
    bad = (KEY + "zz").encode()
    args = ["aead-enc", "--cipher", "gcm(aes)", "--iv", "00" * 12]
    if source == "file":
        (tmp_path / "k").write_bytes(bad)
        proc = run(*args, "--key-file", str(tmp_path / "k"))
    else:
        proc = run_fd(args, bad)
    option = f"--key-{source}"
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert f"{option} must be hex: character {len(KEY) + 1} of {len(KEY) + 2}" in proc.stderr
    assert "a7a7a7a7" not in proc.stderr
    proc = run(*args, "--key-file", str(tmp_path / "missing"))
    assert proc.returncode == 1 and "--key-file" in proc.stderr and "No such file" in proc.stderr
    proc = run(*args, "--key-fd", "57")
    assert proc.returncode == 1 and "--key-fd 57: Bad file descriptor" in proc.stderr
    proc = run(*args, "--key-fd", "0")  # stdin carries the plaintext
    assert proc.returncode == 1 and "--key-fd 0 is stdin" in proc.stderr


def test_one_key_source_only(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(KEY)
    proc = run("hmac", "sha256", "--key", KEY, "--key-file", str(tmp_path / "k"), "/dev/null")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
    proc = run("hmac", "sha256", "/dev/null")
    assert proc.returncode == 2 and "--key" in proc.stderr and "required" in proc.stderr
