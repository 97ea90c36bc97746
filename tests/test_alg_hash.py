"""afalg.alg Hash / HMAC against hashlib and hmac (kernel: run in the VM)."""

from __future__ import annotations

import gzip
import hashlib
import hmac
import io
import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import afalg
from afalg import alg

pytestmark = pytest.mark.kernel

HASHES = ["md5", "sha1", "sha224", "sha256", "sha384", "sha512", "sha3_256", "sha3_512"]


@pytest.mark.parametrize("name", HASHES)
def test_known_sizes_and_answers(name: str) -> None:
    ref = hashlib.new(name)
    with alg.Hash(name) as h:
        assert (h.digest_size, h.block_size) == (ref.digest_size, ref.block_size)
        assert h.digest() == ref.digest()  # empty message
        for piece in (b"abc", b"", os.urandom(1000), os.urandom(70000)):
            h.update(piece)
            ref.update(piece)
            assert h.digest() == ref.digest()  # digest() does not end the hash
        assert h.hexdigest() == ref.hexdigest()


def test_kernel_names_and_new() -> None:
    assert alg.Hash("sha3-256", b"x").digest() == hashlib.sha3_256(b"x").digest()
    # a driver name, as /proc/crypto lists it: sha256-generic before 7.3, sha256-lib after
    drivers = [i.driver for i in alg.algorithms(type="hash", name="sha256")]
    assert drivers, "sha256 has no driver in /proc/crypto"
    assert alg.Hash(drivers[0], b"x").digest() == hashlib.sha256(b"x").digest()
    h = alg.new("sha256", b"abc")
    assert h.name == "sha256"
    assert h.hexdigest() == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(ValueError, match="needs a key"):
        alg.new("hmac(sha256)")


def test_copy_forks_state() -> None:
    with alg.Hash("sha256", b"common prefix ") as h:
        c = h.copy()
        h.update(b"left")
        c.update(b"right")
        assert h.digest() == hashlib.sha256(b"common prefix left").digest()
        assert c.digest() == hashlib.sha256(b"common prefix right").digest()
        c.close()
        assert h.digest() == hashlib.sha256(b"common prefix left").digest()
    fresh = alg.Hash("sha1").copy()  # a copy of an empty hash
    fresh.update(b"x")
    assert fresh.digest() == hashlib.sha1(b"x").digest()


@pytest.mark.parametrize("name", ["sha1", "sha256", "sha384", "sha512"])
def test_hmac(name: str) -> None:
    for key in (b"", b"Jefe", os.urandom(200)):  # empty, short, longer than the block
        with alg.HMAC(name, key) as m:
            assert m.name == f"hmac({name})"
            assert m.digest() == hmac.new(key, b"", name).digest()
            m.update(b"what do ya want for nothing?")
            ref = hmac.new(key, b"what do ya want for nothing?", name)
            assert m.digest() == ref.digest()
            m.verify(ref.digest())
            with pytest.raises(afalg.InvalidTag):
                m.verify(ref.digest()[:-1] + bytes([ref.digest()[-1] ^ 1]))
            with pytest.raises(afalg.InvalidTag):
                m.verify(ref.digest()[:10])  # a truncated tag is not the tag
            c = m.copy()
            c.update(b"!")
            assert c.digest() == hmac.new(key, b"what do ya want for nothing?!", name).digest()
            c.close()
    assert alg.HMAC("hmac(sha256)", b"k", b"d").digest() == hmac.digest(b"k", b"d", "sha256")


def test_update_file_splice(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # crosses pipe-size boundaries
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert alg.file_digest(path, "sha256").digest() == hashlib.sha256(data).digest()
    with alg.Hash("sha256", b"prefix") as h, open(path, "rb") as f:
        f.seek(100)
        assert h.update_file(f, length=1000) == 1000
        assert h.digest() == hashlib.sha256(b"prefix" + data[100:1100]).digest()
        h.update(b"more")  # the hash goes on after a splice
        assert h.update_file(str(path)) == len(data)
        expected = hashlib.sha256(b"prefix" + data[100:1100] + b"more" + data).digest()
        assert h.digest() == expected
    with alg.HMAC("sha256", b"key") as m:
        fd = os.open(path, os.O_RDONLY)
        try:
            m.update_file(fd)
        finally:
            os.close(fd)
        assert m.digest() == hmac.digest(b"key", data, "sha256")


def test_file_objects_hash_from_their_position(tmp_path: Path) -> None:
    """A buffered reader's position, not its descriptor's offset (4096 after f.read(10)), as
    hashlib.file_digest reads it; the reader is left after the bytes hashed (issue 15 item 3)."""
    data = os.urandom(200_000)
    path = tmp_path / "blob"
    path.write_bytes(data)
    with open(path, "rb") as f, open(path, "rb") as g:
        f.read(10)
        g.read(10)
        assert alg.file_digest(f, "sha256").digest() == hashlib.file_digest(g, "sha256").digest()
        assert f.tell() == len(data) and f.read() == b""
        f.seek(5)
        assert f.read(3) == data[5:8]  # seeking back still reads the file
    with open(path, "rb") as f, alg.Hash("sha256") as h:
        assert f.read(10) == data[:10]
        assert h.update_file(f, 5000) == 5000
        assert h.digest() == hashlib.sha256(data[10:5010]).digest()
        assert f.tell() == 5010 and f.read(7) == data[5010:5017]  # the reader stays consistent
        assert h.update_file(f) == len(data) - 5017
        assert h.digest() == hashlib.sha256(data[10:5010] + data[5017:]).digest()
    with open(path, "r+b") as f:  # pending writes are hashed (flushed first)
        f.read(1)
        f.write(b"new")
        f.seek(2)
        expected = (data[:1] + b"new" + data[4:])[2:]
        assert alg.file_digest(f, "sha256").digest() == hashlib.sha256(expected).digest()
    with gzip.open(tmp_path / "blob.gz", "wb") as z:
        z.write(data)
    with gzip.open(tmp_path / "blob.gz", "rb") as z:  # its fileno() is the compressed file
        z.read(7)
        assert alg.file_digest(z, "sha256").digest() == hashlib.sha256(data[7:]).digest()
    buf = io.BytesIO(data)
    buf.seek(99)
    assert alg.file_digest(buf, "sha256").digest() == hashlib.sha256(data[99:]).digest()
    with open(path) as text, pytest.raises(ValueError, match="binary"):
        alg.file_digest(text, "sha256")


def test_buffered_pipe_hashes_what_the_reader_holds() -> None:
    data = os.urandom(20_000)
    r, w = os.pipe()
    os.write(w, data[:10_000])  # within the pipe's 64 KiB: no writer thread needed
    os.write(w, data[10_000:])
    os.close(w)
    with os.fdopen(r, "rb") as f, alg.Hash("sha256") as h:
        assert f.read(10) == data[:10]  # the reader now holds up to 8 KiB more
        assert h.update_file(f, 100) == 100
        assert h.digest() == hashlib.sha256(data[10:110]).digest()
        assert f.read(5) == data[110:115]
        assert h.update_file(f) == len(data) - 115
        assert h.digest() == hashlib.sha256(data[10:110] + data[115:]).digest()
        assert f.read() == b""


def test_update_file_from_pipe_and_empty(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"through a pipe")
    os.close(w)
    with alg.Hash("sha1") as h:
        assert h.update_file(r) == 14
        os.close(r)
        assert h.digest() == hashlib.sha1(b"through a pipe").digest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert alg.file_digest(empty, "sha256").digest() == hashlib.sha256().digest()


@given(
    name=st.sampled_from(["sha256", "sha512", "sha1"]),
    key=st.none() | st.binary(max_size=200),
    size=st.integers(0, 256 * 1024),
    cuts=st.lists(st.integers(0, 256 * 1024), max_size=8),
)
def test_differential_chunked(name, key, size, cuts) -> None:
    data = os.urandom(size)
    bounds = sorted({0, size, *(c % (size + 1) for c in cuts)})
    obj = alg.Hash(name) if key is None else alg.HMAC(name, key)
    ref = hashlib.new(name) if key is None else hmac.new(key, digestmod=name)
    with obj:
        for a, b in itertools.pairwise(bounds):
            obj.update(memoryview(data)[a:b])
            ref.update(data[a:b])
        assert obj.digest() == ref.digest()


def test_errors_and_close() -> None:
    h = alg.Hash("sha256")
    with pytest.raises(TypeError):
        h.update("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        alg.HMAC("sha256", "key")  # type: ignore[arg-type]
    key = b"\xde\xad\xbe\xef" * 4
    m = alg.HMAC("sha256", key)
    assert "deadbeef" not in repr(m) and "hmac(sha256)" in repr(m)
    for obj in (h, m):
        obj.close()
        obj.close()
        with pytest.raises(afalg.AlgError) as info:
            obj.update(b"x")
        assert info.value.errno == 9  # EBADF
        with pytest.raises(afalg.AlgError):
            obj.digest()
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        alg.Hash("x" * 64)


def test_detach_and_failed_update_poisons() -> None:
    h = alg.Hash("sha256", b"abc")
    fd = h.detach()
    assert h.closed and fd >= 0
    os.close(fd)
    m = alg.Hash("sha256", b"abc")
    m._op.close()  # simulate the kernel socket failing under us
    with pytest.raises(afalg.AlgError):
        m.update(b"more")
    with pytest.raises(afalg.AlgError, match="state is lost"):
        m.digest()  # never the digest of a silently restarted hash
    m.close()
