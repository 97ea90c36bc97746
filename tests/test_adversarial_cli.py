"""The crypto CLI never echoes a key: a malformed or wrongly sized --key is one clear line on
stderr that names the problem, not the key (shell history is enough exposure; logs of failed
runs must not add to it). These errors come before any AF_ALG socket, so they run on the host.
"""

from __future__ import annotations

import subprocess
import sys

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
