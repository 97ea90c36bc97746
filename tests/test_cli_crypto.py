"""The crypto subcommands of ``afalg`` (kernel: run in the VM)."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _env import scaled
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from afalg.cli import main

pytestmark = pytest.mark.kernel

# The issue asks for a 100 MiB file: that is the full size (make stress; 36 s of a kernel stage
# under TCG on a loaded machine). The smoke size, 16 MiB, crosses every boundary the 100 MiB file
# does (pipe buffers, splice chunks, many reads); AFALG_BIG_HASH_MIB overrides both.
BIG_MIB = int(os.environ.get("AFALG_BIG_HASH_MIB", scaled(16, 100)))


def _run(argv: list[str], stdin: bytes = b"", capsysbinary=None) -> tuple[int, bytes, bytes]:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        rc = main(argv)
    finally:
        sys.stdin = old
    out, err = capsysbinary.readouterr()
    return rc, out, err


@pytest.mark.stress
def test_hash_matches_sha256sum_end_to_end(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BIG_MIB):
            f.write(block)
    odd = tmp_path / "we ird\\name"
    odd.write_bytes(b"x")
    files = [str(big), str(odd), str(tmp_path / "empty")]
    Path(files[2]).write_bytes(b"")
    started = time.monotonic()
    ours = subprocess.run(
        [sys.executable, "-m", "afalg", "hash", "sha256", *files],
        capture_output=True,
        check=True,
    ).stdout
    elapsed = time.monotonic() - started
    theirs = subprocess.run(["sha256sum", *files], capture_output=True, check=True).stdout
    print(f"afalg hash sha256 of {BIG_MIB} MiB + 2 files: {elapsed:.1f} s")
    assert ours == theirs
    assert ours.startswith(hashlib.sha256(block * BIG_MIB).hexdigest().encode())


def test_hash_check(tmp_path: Path, capsysbinary) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"alpha")
    b.write_bytes(b"beta")
    rc, out, _ = _run(["hash", "sha1", str(a), str(b)], capsysbinary=capsysbinary)
    assert rc == 0
    listing = tmp_path / "SUMS"
    listing.write_bytes(out)
    rc, out, err = _run(["hash", "sha1", "--check", str(listing)], capsysbinary=capsysbinary)
    assert (rc, out, err) == (0, f"{a}: OK\n{b}: OK\n".encode(), b"")
    b.write_bytes(b"changed")
    rc, out, err = _run(["hash", "sha1", "-c", str(listing)], capsysbinary=capsysbinary)
    assert rc == 1
    assert out == f"{a}: OK\n{b}: FAILED\n".encode()
    assert b"WARNING: 1 computed checksum did NOT match" in err


def test_hash_missing_file_and_unknown_alg(tmp_path: Path, capsysbinary) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"alpha")
    rc, out, err = _run(
        ["hash", "sha256", str(tmp_path / "nope"), str(a)], capsysbinary=capsysbinary
    )
    assert rc == 1
    assert out == f"{hashlib.sha256(b'alpha').hexdigest()}  {a}\n".encode()
    assert err.count(b"\n") == 1 and b"No such file" in err
    rc, out, err = _run(["hash", "nosuchhash", str(a)], capsysbinary=capsysbinary)
    assert rc == 1 and out == b"" and err.count(b"\n") == 1 and b"nosuchhash" in err


def test_hmac(tmp_path: Path, capsysbinary) -> None:
    a = tmp_path / "a"
    a.write_bytes(b"message")
    rc, out, _ = _run(["hmac", "sha256", "--key", "6b6579", str(a)], capsysbinary=capsysbinary)
    assert rc == 0
    assert out == f"{hmac.new(b'key', b'message', 'sha256').hexdigest()}  {a}\n".encode()


def test_hmac_and_cipher_keys_from_file_and_fd(tmp_path: Path, capsysbinary) -> None:
    """--key-file and --key-fd give what --key gives (issue 15 item 7)."""
    a = tmp_path / "a"
    a.write_bytes(b"message")
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"6b6579\n")
    expected = f"{hmac.new(b'key', b'message', 'sha256').hexdigest()}  {a}\n".encode()
    rc, out, _ = _run(
        ["hmac", "sha256", "--key-file", str(keyfile), str(a)], capsysbinary=capsysbinary
    )
    assert (rc, out) == (0, expected)
    r, w = os.pipe()
    os.write(w, b"6b6579")
    os.close(w)
    try:
        rc, out, _ = _run(["hmac", "sha256", "--key-fd", str(r), str(a)], capsysbinary=capsysbinary)
    finally:
        os.close(r)
    assert (rc, out) == (0, expected)
    key, iv = os.urandom(16), os.urandom(12)
    keyfile.write_text(key.hex())
    args = ["--cipher", "gcm(aes)", "--iv", iv.hex()]
    rc, ct, _ = _run(["aead-enc", *args, "--key-file", str(keyfile)], b"secret", capsysbinary)
    assert rc == 0 and ct == AESGCM(key).encrypt(iv, b"secret", b"")


def test_enc_dec_streaming(capsysbinary) -> None:
    key, iv = os.urandom(16), os.urandom(16)
    data = os.urandom(300_000)
    args = ["--cipher", "cbc(aes)", "--key", key.hex(), "--iv", iv.hex(), "--padding", "pkcs7"]
    rc, ct, _ = _run(["enc", *args], data, capsysbinary)
    assert rc == 0 and len(ct) == 300_000 + 16 - 300_000 % 16
    rc, pt, _ = _run(["dec", *args], ct, capsysbinary)
    assert rc == 0 and pt == data
    rc, raw, _ = _run(["enc", *args[:-2]], bytes(32), capsysbinary)  # no padding: last byte 0
    assert rc == 0 and len(raw) == 32
    rc, _, err = _run(["dec", *args], raw, capsysbinary)
    assert rc == 1 and err.count(b"\n") == 1 and b"padding" in err


def test_aead(capsysbinary) -> None:
    key, iv, aad = os.urandom(16), os.urandom(12), b"hdr"
    args = ["--cipher", "gcm(aes)", "--key", key.hex(), "--iv", iv.hex(), "--aad", aad.hex()]
    rc, ct, _ = _run(["aead-enc", *args], b"secret", capsysbinary)
    assert rc == 0 and ct == AESGCM(key).encrypt(iv, b"secret", aad)
    rc, pt, _ = _run(["aead-dec", *args], ct, capsysbinary)
    assert rc == 0 and pt == b"secret"
    rc, out, err = _run(["aead-dec", *args], ct[:-1] + b"\0", capsysbinary)
    assert rc == 1 and out == b"" and err.count(b"\n") == 1
    rc, out, err = _run(["aead-enc", *args[:-2], "--key", "00"], b"", capsysbinary)
    assert rc == 1 and b"key must be 16, 24 or 32 bytes" in err


def test_rng_and_list(capsysbinary) -> None:
    rc, out, _ = _run(["rng", "1000"], capsysbinary=capsysbinary)
    assert rc == 0 and len(out) == 1000 and len(set(out)) > 200
    rc, out, _ = _run(["rng", "16", "--hex"], capsysbinary=capsysbinary)
    assert rc == 0 and len(out) == 33
    rc, out, _ = _run(["list", "--type", "aead"], capsysbinary=capsysbinary)
    assert rc == 0 and b"aead" in out
    assert all(line.startswith(b"aead ") for line in out.splitlines())
