"""afalg.serving: the limits and path checks a file server shares (host; no sockets)."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from afalg.serving import (
    ConnectionLimits,
    FileRequest,
    RequestRefused,
    ServeDir,
    ServerLimits,
    response_head,
)


@pytest.fixture
def files(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "small.txt").write_bytes(b"hello\n")
    (root / "sub").mkdir()
    (root / "sub" / "empty").write_bytes(b"")
    (root / "alias").symlink_to(root / "small.txt")  # a symlink that stays inside
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside the served directory")
    (root / "link").symlink_to(outside / "secret.txt")
    (root / "linkdir").symlink_to(outside)
    return root


def refused(files: ServeDir, target: str) -> int:
    with pytest.raises(RequestRefused) as info:
        files.open(target)
    return info.value.status


def test_resolve(files):
    d = ServeDir(files)
    assert d.resolve("/small.txt") == str(files / "small.txt")
    assert d.resolve("/sub/../small.txt?x=1") == str(files / "small.txt")
    assert d.resolve("/%73mall.txt") == str(files / "small.txt")
    for bad in ("/../outside/secret.txt", "/link", "/linkdir/secret.txt", "small.txt", "/\x00",
                "/", "//", "/%2e%2e/outside/secret.txt"):  # fmt: skip
        assert d.resolve(bad) is None, bad


def test_open_regular_files(files):
    d = ServeDir(str(files))
    with d.open("/small.txt") as f:
        assert f.read() == b"hello\n"
        assert os.get_blocking(f.fileno())  # O_NONBLOCK was only for opening
    with d.open("/alias") as f:  # resolved inside the root
        assert f.read() == b"hello\n"
    with d.open("/sub/empty") as f:
        assert f.read() == b""


def test_not_found(files):
    d = ServeDir(files)
    for target in ("/missing", "/sub", "/link", "/linkdir/secret.txt", "/../x", "/sub/empty/x"):
        assert refused(d, target) == 404, target


def test_fifo_and_socket_do_not_block(files):
    """Opened with O_NONBLOCK, then refused as not regular files (a FIFO without a writer would
    block a plain open() for ever)."""
    os.mkfifo(files / "fifo")
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(files / "sock"))
        d = ServeDir(files)
        done = threading.Event()

        def run() -> None:
            assert refused(d, "/fifo") == 404
            assert refused(d, "/sock") == 404
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(30)
        if not done.is_set():  # let the blocked reader go before failing
            os.close(os.open(files / "fifo", os.O_WRONLY | os.O_NONBLOCK))
        assert done.is_set()


def test_symlink_swapped_in_after_the_check_is_refused(files, monkeypatch):
    """The check (realpath) saw plain directories and files; by the time of opening, a
    component is a symlink leading out: O_NOFOLLOW on every component refuses it."""
    d = ServeDir(files)
    monkeypatch.setattr(os.path, "realpath", lambda p: os.path.normpath(p))
    assert d.resolve("/linkdir/secret.txt") == str(files / "linkdir" / "secret.txt")
    assert refused(d, "/linkdir/secret.txt") == 404
    assert refused(d, "/link") == 404


def test_unreadable_is_403_other_errors_500(files, monkeypatch):
    d = ServeDir(files)
    real_open = os.open

    def failing(errno_: int):
        def fake(path, *args, **kwargs):
            if os.fsdecode(path) == "small.txt":
                raise OSError(errno_, os.strerror(errno_))
            return real_open(path, *args, **kwargs)

        return fake

    monkeypatch.setattr(os, "open", failing(13))  # EACCES (root ignores mode bits)
    assert refused(d, "/small.txt") == 403
    monkeypatch.setattr(os, "open", failing(5))  # EIO
    assert refused(d, "/small.txt") == 500
    monkeypatch.undo()
    if os.geteuid() != 0:
        (files / "small.txt").chmod(0)
        assert refused(d, "/small.txt") == 403


def test_serve_dir_must_be_a_directory(files):
    with pytest.raises(NotADirectoryError):
        ServeDir(files / "small.txt")


def test_connection_limits():
    limits = ConnectionLimits(max_conns=3, max_conns_per_address=2)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("::ffff:10.0.0.1") is None  # the same peer over IPv6
    assert limits.admit("10.0.0.1") == "address-cap"
    assert limits.admit("10.0.0.2") is None
    assert limits.admit("10.0.0.3") == "connection-cap"
    assert (limits.count(), limits.count("10.0.0.1"), limits.count("10.0.0.2")) == (3, 2, 1)
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1") is None
    for address in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        limits.release(address)
    assert limits.count() == 0 and "0/3" in repr(limits)
    with pytest.raises(ValueError, match="without admit"):
        limits.release("10.0.0.9")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_conns": 0}, ValueError),
        ({"max_conns_per_address": True}, TypeError),
        ({"request_timeout": 0}, ValueError),
        ({"idle_timeout": "5"}, TypeError),
    ],
)
def test_server_limits_checked(kwargs, error):
    with pytest.raises(error):
        ServerLimits(**kwargs)


REQUESTS = [
    (b"GET /a/b?x=1\n", "/a/b?x=1"),
    (b"GET /f HTTP/1.0\r\n\r\n", "/f"),
    (b"GET /f HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\ntrailing", "/f"),
    (b"GET /f HTTP/1.0\nHost: x\n\n", "/f"),
]


@pytest.mark.parametrize(("raw", "target"), REQUESTS)
def test_file_request_in_any_pieces(raw, target):
    """The request is whole exactly when its last needed byte arrives, however it is split."""
    end = len(raw) - (len(b"trailing") if raw.endswith(b"trailing") else 0)
    for cut in range(1, len(raw)):
        request = FileRequest()
        assert request.feed(raw[:cut]) is (cut >= end), cut
        assert request.feed(raw[cut:]) is True
        assert request.target == target


@pytest.mark.parametrize(
    "raw", [b"POST /f\n", b"GET\n", b"GET /a b c\n", b"GET /f HTTP/1.0\r\n" + b"H: v\r\n" * 20]
)
def test_file_request_refused_with_400(raw):
    request = FileRequest(max_size=64)
    with pytest.raises(RequestRefused) as info:
        for i in range(0, len(raw), 7):
            request.feed(raw[i : i + 7])
    assert info.value.status == 400
    assert request.target is None


def test_response_head():
    assert response_head(200, "OK", 5) == (
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nContent-Type: application/octet-stream\r\n"
        b"Connection: close\r\n\r\n"
    )
    assert response_head(404, "Not Found") == (
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )


# --- request targets that look like URLs (origin-form is a path, not a URL) -----------------------


def test_origin_form_target_is_a_path(files):
    """``//x/f`` names ``x/f`` under the root, never ``/f`` (``urlsplit`` read ``x`` as a host);
    ``//[x/`` is a path too, refused with 404 (``urlsplit`` raised ValueError)."""
    d = ServeDir(files)
    (files / "f").write_bytes(b"top-level f")
    assert refused(d, "//x/f") == 404
    assert refused(d, "//[x/") == 404
    assert refused(d, "//[::1]:80/f") == 404
    (files / "x").mkdir()
    (files / "x" / "f").write_bytes(b"x/f")
    with d.open("//x/f") as f:
        assert f.read() == b"x/f"
    with d.open("/f?a=//b#frag") as f:  # query and fragment are not part of the path
        assert f.read() == b"top-level f"
    for url in ("http://h/f", "https:/f", "f", "*", "?x", ""):  # not origin-form
        assert refused(d, url) == 404, url


_PIECES = [
    "",
    ".",
    "..",
    "[",
    "]",
    "%",
    "%2f",
    "%2e%2e",
    "%00",
    "%ff",
    "?",
    "#",
    ":",
    "@",
    "small.txt",
    "sub",
    "x",
    "//",
    "[::1]",
    "%5b",
    "http:",
]
TARGETS = st.text(st.characters(max_codepoint=0xFF), max_size=40) | st.builds(
    lambda parts: "/" + "/".join(parts), st.lists(st.sampled_from(_PIECES), max_size=8)
)


@given(target=TARGETS)
@example(target="//[x/")
@example(target="//x/small.txt")
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_open_any_target_gives_a_file_or_a_status(files, target):
    """Whatever the target (latin-1 text, as the servers decode it), open() returns a file
    under the root or refuses with 404, 403 or 500; it never raises anything else."""
    d = ServeDir(files)
    try:
        f = d.open(target)
    except RequestRefused as exc:
        assert exc.status in (403, 404, 500), (target, exc)
        return
    with f:
        real = os.path.realpath(f"/proc/self/fd/{f.fileno()}")
        assert os.path.commonpath([d.root, real]) == d.root, (target, real)
