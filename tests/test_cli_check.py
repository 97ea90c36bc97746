"""``afalg hash`` against coreutils' ``sha256sum``, byte for byte: the checksum lines it prints
(escaped names, ``--tag``, ``-z``) and ``--check`` with its options, exit statuses and messages
(only the program name differs on stderr). On the host the digests come from hashlib (the
command's logic is what is compared); in the VM the same cases run on the kernel's sha256.

``--check`` prints names as coreutils 9.10 does (Debian sid's): a name with a backslash, newline
or carriage return escaped, the line starting with a backslash, as in the checksum lines.
coreutils 9.1 (bookworm's) escaped a status line only for a newline: where the installed
``sha256sum`` does that (:data:`OLD_CHECK_ESCAPING`, asked of it), its status lines are brought
to the new form before the comparison, and that step is tested on its own."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from afalg import _cli_crypto as cli_crypto
from afalg.cli import main

A = b"alpha"
ENV = {**os.environ, "LC_ALL": "C.UTF-8"}  # quoting of non-ASCII names in messages


class _HashlibHash:
    """The part of afalg.alg.Hash the command uses, from hashlib (host: no AF_ALG)."""

    def __init__(self, name: str) -> None:
        self._h = hashlib.new(name)
        self.name = self._h.name
        self.digest_size = self._h.digest_size

    def update_file(self, f: Any) -> None:
        while block := f.read(1 << 16):
            self._h.update(block)

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def close(self) -> None:
        pass

    def __enter__(self) -> _HashlibHash:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture(params=["hashlib", pytest.param("kernel", marks=pytest.mark.kernel)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both: the tests that read and write files run on the kernel's sha256 too."""
    if request.param == "hashlib":
        monkeypatch.setattr(cli_crypto, "_new", lambda args: _HashlibHash(args.alg))
    return request.param


@pytest.fixture
def host_backend(monkeypatch: pytest.MonkeyPatch) -> str:
    """hashlib only: the line-parsing matrix (the kernel adds nothing there but VM time)."""
    monkeypatch.setattr(cli_crypto, "_new", lambda args: _HashlibHash(args.alg))
    return "hashlib"


def ours(argv: list[bytes | str], stdin: bytes, capsysbinary: Any) -> tuple[int, bytes, bytes]:
    old = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        rc = main(["hash", "sha256", *(os.fsdecode(a) for a in argv)])
    finally:
        sys.stdin = old
    out, err = capsysbinary.readouterr()
    return rc, out, err


STATUSES = (b": FAILED open or read", b": FAILED", b": OK")  # longest first


def escape_status_lines(out: bytes) -> bytes:
    """coreutils 9.1's ``--check`` output in 9.10's form: each status line whose name has a
    backslash or carriage return (and is not already escaped, as one with a newline is)
    escaped, with a leading backslash."""
    lines = []
    for line in out.split(b"\n"):
        status = next((s for s in STATUSES if line.endswith(s)), None)
        name = line[: -len(status)] if status else b""
        if status and not line.startswith(b"\\") and (b"\\" in name or b"\r" in name):
            line = b"\\" + name.replace(b"\\", b"\\\\").replace(b"\r", b"\\r") + status
        lines.append(line)
    return b"\n".join(lines)


def _old_check_escaping() -> bool:
    """Whether the installed sha256sum prints ``--check`` names raw but for newlines (9.1)."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "a\\b").write_bytes(b"")
        listing = subprocess.run(["sha256sum", "a\\b"], cwd=tmp, capture_output=True, check=True)
        out = subprocess.run(["sha256sum", "-c"], input=listing.stdout, cwd=tmp,
                             capture_output=True, check=True).stdout  # fmt: skip
    assert out in (b"a\\b: OK\n", b"\\a\\\\b: OK\n"), out
    return out == b"a\\b: OK\n"


OLD_CHECK_ESCAPING = _old_check_escaping()


def theirs(argv: list[bytes | str], stdin: bytes) -> tuple[int, bytes, bytes]:
    proc = subprocess.run(
        ["sha256sum", *(os.fsencode(a) for a in argv)], input=stdin, capture_output=True, env=ENV
    )
    err = proc.stderr.replace(b"sha256sum: ", b"afalg hash: ")
    err = err.replace(b"Try 'sha256sum --help'", b"Try 'afalg hash --help'")
    out = proc.stdout
    if OLD_CHECK_ESCAPING and ("-c" in argv or "--check" in argv):
        out = escape_status_lines(out)
    return proc.returncode, out, err


def test_escape_status_lines() -> None:
    """9.1's status lines, as sha256sum 9.1 printed them, in 9.10's form (names unchanged
    where they need no escaping or are escaped already)."""
    old = (b"plain: OK\nback\\slash: FAILED\ncarriage\rreturn: FAILED open or read\n"
           b"\\new\\nline: OK\nsp ace: FAILED\n")  # fmt: skip
    new = (b"plain: OK\n\\back\\\\slash: FAILED\n\\carriage\\rreturn: FAILED open or read\n"
           b"\\new\\nline: OK\nsp ace: FAILED\n")  # fmt: skip
    assert escape_status_lines(old) == new
    assert escape_status_lines(new) == new


def same(argv: list[bytes | str], capsysbinary: Any, stdin: bytes = b"") -> tuple[int, bytes]:
    got = ours(argv, stdin, capsysbinary)
    want = theirs(argv, stdin)
    assert got == want, argv
    return want[0], want[1]


NAMES = [b"plain", b"sp ace", b"back\\slash", b"new\nline", b"carriage\rreturn", b"\xffnot-utf8",
         "caf\u00e9".encode(), b"it's", b"two\n\nlines\\", b"-dash"]  # fmt: skip


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(NAMES):
        (tmp_path / os.fsdecode(name)).write_bytes(b"content %d" % i)
    return tmp_path


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).hexdigest().encode()


def test_hashing_output(tree: Path, backend: str, capsysbinary: Any) -> None:
    names = [os.fsdecode(n) for n in NAMES]
    for options in ([], ["--tag"], ["-z"], ["--tag", "-z"]):
        rc, out = same([*options, "--", *names], capsysbinary)
        assert rc == 0
        assert "-z" in options or out.count(b"\\") >= 3
    assert same(["nope", "sp ace2", b"new\nmissing", b"\xffgone", "plain"], capsysbinary)[0] == 1


def test_check_listings_written_by_sha256sum(tree: Path, backend: str, capsysbinary: Any) -> None:
    names = [os.fsdecode(n) for n in NAMES]
    for options in ([], ["--tag"]):
        listing = subprocess.run(["sha256sum", *options, "--", *names], capture_output=True,
                                 check=True, env=ENV).stdout  # fmt: skip
        (tree / "SUMS").write_bytes(listing)
        assert same(["-c", "SUMS"], capsysbinary) == (0, same(["-c", "SUMS"], capsysbinary)[1])
        assert same(["--check", "--quiet", "SUMS"], capsysbinary) == (0, b"")
        (tree / "it's").write_bytes(b"changed")
        (tree / "new\nline").write_bytes(b"changed")
        rc, out = same(["-c", "SUMS"], capsysbinary)
        assert rc == 1 and b"\\new\\nline: FAILED\n" in out and b"\\it's: FAILED\n" not in out
        assert b"\\back\\\\slash: OK\n" in out and b"\\carriage\\rreturn: OK\n" in out
        assert same(["-c", "--quiet", "SUMS"], capsysbinary)[0] == 1
        assert same(["-c", "--status", "SUMS"], capsysbinary) == (1, b"")
        (tree / "it's").write_bytes(b"content 7")
        (tree / "new\nline").write_bytes(b"content 3")
        (tree / "sp ace").unlink()
        rc, out = same(["-c", "SUMS"], capsysbinary)
        assert rc == 1 and b"sp ace: FAILED open or read\n" in out
        assert same(["-c", "--ignore-missing", "SUMS"], capsysbinary)[0] == 0
        (tree / "sp ace").write_bytes(b"content 1")


LINES = {
    # one good line and one malformed: sha256sum exits 0 unless --strict
    "malformed": b"%s  plain\nbogus line\n",
    # a digest that is not hex, or one character short: improperly formatted, not FAILED
    "not-hex": b"%s  plain\nzz" + b"0" * 62 + b"  plain\n" + b"0" * 63 + b"  plain\n",
    "only-malformed": b"nothing here\n",
    "empty": b"",
    "comments-crlf": b"# a comment\r\n\r\n%s  plain\r\n",
    "missing": b"%s  missing\n%s  plain\n",
    "all-missing": b"%s  missing\n",
    "mismatch": b"%s  sp ace\n%s  back\\slash\n%s  plain\n",
    "bsd-reversed": b"%s plain\n%s  plain\n",
    "gnu-then-reversed": b"%s  plain\n%s plain\n",
    "binary-flag": b"%s *plain\n",
    "bad-escape": b"\\%s  bad\\xescape\n\\%s  trailing\\\n%s  plain\n",
    "tab": b"%s\tplain\n",
    "tag-wrong-alg": b"SHA1 (plain) = %s\nSHA256 (plain) = %s\n",
    "tag-spaces": b"  SHA256(plain)=%s\n",
    "uppercase": b"%s  plain\n",
    "dash-name": b"%s  -\n",
    "no-newline-at-end": b"%s  plain",
    "escaped-newline-name": b"\\%s  new\\nline\n",
}


@pytest.mark.parametrize("case", list(LINES))
@pytest.mark.parametrize(
    "options", [[], ["--strict"], ["--warn"], ["--status"], ["--quiet"], ["--ignore-missing"]],
    ids=["", "strict", "warn", "status", "quiet", "ignore-missing"],
)  # fmt: skip
def test_check_lines(
    tree: Path, host_backend: str, capsysbinary: Any, case: str, options: list[str]
) -> None:
    good = digest(b"content 0")
    if case == "uppercase":
        good = good.upper()
    text = LINES[case]
    text = text % ((good,) * text.count(b"%s"))
    (tree / "SUMS").write_bytes(text)
    same(["-c", *options, "SUMS"], capsysbinary)
    same(["-c", *options], capsysbinary, stdin=text)  # the listing on stdin: 'standard input'
    same(["-c", *options, "-", "SUMS"], capsysbinary, stdin=text)


def test_check_stdin_as_a_listed_file(tree: Path, backend: str, capsysbinary: Any) -> None:
    (tree / "SUMS").write_bytes(b"%s  -\n" % digest(b"from stdin"))
    assert same(["-c", "SUMS"], capsysbinary, stdin=b"from stdin") == (0, b"-: OK\n")


def test_check_unreadable_listing_and_plurals(tree: Path, backend: str, capsysbinary: Any) -> None:
    good = digest(b"content 0")
    (tree / "SUMS").write_bytes(b"x\ny\n%s  plain\n%s  sp ace\n%s  it's\n%s  gone\n%s  gone2\n"
                                % (good, good, good, good, good))  # fmt: skip
    assert same(["-c", "SUMS", "NOSUMS", "SUMS"], capsysbinary)[0] == 1
    os.mkdir(tree / "dir")
    (tree / "SUMS").write_bytes(b"%s  dir\n" % good)
    assert same(["-c", "SUMS"], capsysbinary)[0] == 1


@pytest.mark.parametrize(
    "argv",
    [["--tag", "-c", "SUMS"], ["-z", "-c", "SUMS"], ["--quiet", "plain"], ["--status", "plain"],
     ["--strict", "plain"], ["--warn", "plain"], ["--ignore-missing", "plain"]],
)  # fmt: skip
def test_options_that_need_or_refuse_check(
    tree: Path, host_backend: str, capsysbinary: Any, argv: list[str]
) -> None:
    (tree / "SUMS").write_bytes(b"")
    assert same(argv, capsysbinary)[0] == 1


def test_list_unknown_type(capsysbinary: Any) -> None:
    rc = main(["list", "--type", "nonsense"])
    out, err = capsysbinary.readouterr()
    assert rc == 2 and out == b""
    assert b"nonsense" in err and b"skcipher" in err and b"aead" in err and err.count(b"\n") == 1
