"""Arguments are checked at the edge (STYLE 8): a wrong type or an impossible combination raises
TypeError or ValueError naming the argument before any AF_ALG socket is opened. Host tests: a
socket would fail the test (``bind`` is replaced by one that records the attempt)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from afalg import alg
from afalg._alg import base

KEY = bytes(16)
REAL_BIND = alg.bind  # before the fixture below replaces it


@pytest.fixture(autouse=True)
def no_socket(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    opened: list[tuple[str, str]] = []

    def refuse(kind: str, name: str) -> None:
        opened.append((kind, name))
        raise AssertionError(f"a socket was opened for {kind} {name!r} before the check")

    monkeypatch.setattr(base, "bind", refuse)  # what the classes call
    return opened


CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("hash-str-data", lambda: alg.Hash("sha256", "text"), TypeError, "data"),
    ("hash-int-data", lambda: alg.Hash("sha256", 5), TypeError, "data"),
    ("hash-bytes-name", lambda: alg.Hash(b"sha256"), TypeError, "name"),
    ("hmac-str-key", lambda: alg.HMAC("sha256", "key"), TypeError, "key"),
    ("hmac-str-data", lambda: alg.HMAC("sha256", b"key", "text"), TypeError, "data"),
    ("new-str-data", lambda: alg.new("sha256", "text"), TypeError, "data"),
    ("ctr-pkcs7", lambda: alg.SKCipher("ctr(aes)", KEY, padding="pkcs7"), ValueError, "padding"),
    (
        "chacha20-pkcs7",
        lambda: alg.SKCipher("chacha20", bytes(32), padding="pkcs7"),
        ValueError,
        "padding",
    ),
    ("skcipher-bytes-name", lambda: alg.SKCipher(b"cbc(aes)", KEY), TypeError, "name"),
    (
        "skcipher-int-padding",
        lambda: alg.SKCipher("cbc(aes)", KEY, padding=7),
        TypeError,
        "padding",
    ),
    (
        "skcipher-bad-padding",
        lambda: alg.SKCipher("cbc(aes)", KEY, padding="x"),
        ValueError,
        "padding",
    ),
    ("skcipher-int-key", lambda: alg.SKCipher("cbc(aes)", 16), TypeError, "key"),
    ("skcipher-empty-name", lambda: alg.SKCipher("", KEY), ValueError, "name"),
    ("aead-bytes-name", lambda: alg.AEAD(b"gcm(aes)", KEY), TypeError, "name"),
    ("aead-int-key", lambda: alg.AEAD("gcm(aes)", 16), TypeError, "key"),
    ("aead-str-tag", lambda: alg.AEAD("gcm(aes)", KEY, "16"), TypeError, "tag_size"),
    ("aead-bool-tag", lambda: alg.AEAD("gcm(aes)", KEY, True), TypeError, "tag_size"),
    ("aead-long-name", lambda: alg.AEAD("x" * 200, KEY), ValueError, "name"),
    ("rng-bytes-name", lambda: alg.RNG(b"stdrng"), TypeError, "name"),
    ("rng-str-seed", lambda: alg.RNG("stdrng", "seed"), TypeError, "seed"),
]


@pytest.mark.parametrize(
    ("make", "error", "argument"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_refused_before_any_socket(
    make: Callable[[], Any], error: type[Exception], argument: str, no_socket: list
) -> None:
    with pytest.raises(error) as info:
        make()
    assert argument in str(info.value)
    assert "pattern" not in str(info.value)  # not a regex error from deep inside
    assert no_socket == []


@pytest.mark.parametrize(
    ("kind", "name", "error", "argument"),
    [
        ("skcipher-and-more", "cbc(aes)", ValueError, "kind"),  # sockaddr_alg's salg_type: 14
        ("", "cbc(aes)", ValueError, "kind"),
        (b"aead", "gcm(aes)", TypeError, "kind"),
        ("aead", "x" * 64, ValueError, "name"),  # salg_name: 64
        ("aead", None, TypeError, "name"),
    ],
)
def test_bind_checks_kind_and_name_before_the_socket(
    kind: Any, name: Any, error: type[Exception], argument: str
) -> None:
    """alg.bind, the seam the classes share: a kind or name that cannot fit sockaddr_alg is
    refused before socket(AF_ALG), so no descriptor is left to the garbage collector."""
    with pytest.raises(error, match=argument):
        REAL_BIND(kind, name)
