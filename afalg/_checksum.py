"""Quote, escape and parse names and checksum lines as coreutils' sha256sum 9.10 does.

``quotef(name)`` quotes a file name for a message; ``escape(name)`` and ``unescape(name)`` write
and read a name in a checksum line; ``tag_name(kernel_name)`` is the ``--tag`` spelling of an
algorithm; ``split_line(line, state)`` parses one checksum line, ``state`` (a ``CheckState``)
carrying what the lines so far were. Names are bytes (not UTF-8 only); nothing here does I/O
or raises. ``afalg hash`` and ``afalg hash --check`` (afalg/_cli_crypto.py) use it.
"""

from __future__ import annotations

# Where a name does not need quoting in a message (gnulib's quotef: shell-escape style, ':' too).
_PLAIN = frozenset(b"%+,-./0123456789@ABCDEFGHIJKLMNOPQRSTUVWXYZ]_abcdefghijklmnopqrstuvwxyz")
# What may sit inside "..." when a name with a single quote is double-quoted instead.
_DQ_OK = _PLAIN | frozenset(b" :'")
_C_ESCAPES = {7: "a", 8: "b", 9: "t", 10: "n", 11: "v", 12: "f", 13: "r"}


def quotef(name: bytes) -> bytes:
    """Return a file name quoted as coreutils quotes it in a message.

    E.g. ``'a b'``, ``"it's"``, ``'a'$'\\n''b'``: gnulib's shell-escape quoting, printable
    UTF-8 kept as is."""
    chars = name.decode("utf-8", "surrogateescape")
    plain = True
    for i, c in enumerate(chars):
        code = ord(c)
        if code < 128:
            if not (code in _PLAIN or (c in "#~" and i > 0)):
                plain = False
        elif not c.isprintable():  # non-printable, or a byte that is not UTF-8
            plain = False
    if plain and chars:
        return name
    if "'" in chars and all(
        (ord(c) in _DQ_OK if ord(c) < 128 else c.isprintable()) or (c in "#~" and i == 0)
        for i, c in enumerate(chars)
    ):
        return b'"' + name + b'"'
    out, dollar = ["'"], False
    for c in chars:
        code = ord(c)
        if (code < 128 and (code < 32 or code == 127)) or (code >= 128 and not c.isprintable()):
            if not dollar:
                out.append("'$'")
                dollar = True
            if code in _C_ESCAPES:
                out.append("\\" + _C_ESCAPES[code])
            else:
                raw = c.encode("utf-8", "surrogateescape")
                out.append("".join(f"\\{b:03o}" for b in raw))
            continue
        if dollar:
            out.append("''")
            dollar = False
        out.append("'\\''" if c == "'" else c)
    out.append("'")
    return "".join(out).encode("utf-8", "surrogateescape")


def escape(name: bytes, chars: bytes = b"\\\n\r") -> tuple[bytes, bytes]:
    """Escape a name for a checksum line or a ``--check`` status line; return (prefix, name).

    A name with a backslash, newline or carriage return is escaped (``\\``, ``\\n``, ``\\r``)
    and the line starts with a backslash, as sha256sum 9.10 does in both. (9.1 escaped a
    ``--check`` status line only for a newline, printing a backslash or carriage return raw:
    ambiguous, and a raw carriage return overwrites the line on a terminal.)"""
    if not any(b in chars for b in name):
        return b"", name
    return b"\\", name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def unescape(name: bytes) -> bytes | None:
    """Return a name from an escaped checksum line, or None where it is malformed.

    Malformed: a lone trailing backslash, an escape other than \\\\, \\n and \\r. As coreutils'
    filename_unescape."""
    out, i = bytearray(), 0
    while i < len(name):
        c = name[i]
        if c == 0x5C:
            if i + 1 == len(name):
                return None
            nxt = {0x5C: b"\\", 0x6E: b"\n", 0x72: b"\r"}.get(name[i + 1])
            if nxt is None:
                return None
            out += nxt
            i += 2
        elif c == 0:
            return None
        else:
            out.append(c)
            i += 1
    return bytes(out)


_TAGS = {"blake2b-512": "BLAKE2b", "rmd160": "RIPEMD160"}


def tag_name(kernel_name: str) -> bytes:
    """The algorithm's name in a BSD-style (``--tag``) line, as coreutils spells it."""
    if kernel_name.startswith("blake2b-"):
        return _TAGS.get(kernel_name, "BLAKE2b" + kernel_name[7:]).encode()
    return _TAGS.get(kernel_name, kernel_name.upper()).encode()


class CheckState:
    """What sha256sum keeps across the checksum files of one run.

    ``bsd_reversed``: whether the lines so far were "digest name" (BSD reversed, 1) or
    "digest  name" (0), unknown (-1)."""

    def __init__(self, tag: bytes, hex_len: int) -> None:
        self.tag = tag
        self.hex_len = hex_len
        self.bsd_reversed = -1


def _hex_digits(digest: bytes, hex_len: int) -> bool:
    return len(digest) == hex_len and all(c in b"0123456789abcdefABCDEF" for c in digest)


def _split_bsd(s: bytes, escaped: bool, state: CheckState) -> tuple[bytes, bytes] | None:
    """``NAME) = DIGEST`` after ``TAG (``: coreutils' bsd_split_3."""
    if not s:
        return None
    i = len(s) - 1
    while i and s[i] != 0x29:  # ')'
        i -= 1
    if s[i] != 0x29:
        return None
    name: bytes | None = s[:i]
    if escaped:
        name = unescape(s[:i])
        if name is None:
            return None
    i += 1
    while i < len(s) and s[i] in b" \t":
        i += 1
    if i >= len(s) or s[i] != 0x3D:  # '='
        return None
    i += 1
    while i < len(s) and s[i] in b" \t":
        i += 1
    digest = s[i:]
    return (digest, name) if name is not None and _hex_digits(digest, state.hex_len) else None


def split_line(s: bytes, state: CheckState) -> tuple[bytes, bytes] | None:
    """Return (digest, name) of one checksum line, or None if it is improperly formatted.

    As coreutils' split_3: GNU ``digest  name``, ``digest *name``, BSD ``TAG (name) = digest``,
    BSD reversed ``digest name``; a leading backslash means an escaped name."""
    s = s.split(b"\0", 1)[0]  # C strings end at a NUL
    n, i = len(s), 0
    while i < n and s[i] in b" \t":
        i += 1
    escaped = i < n and s[i] == 0x5C
    if escaped:
        i += 1
    if s.startswith(state.tag, i):
        i += len(state.tag)
        if i < n and s[i] == 0x20:
            i += 1
        if i < n and s[i] == 0x28:  # '('
            return _split_bsd(s[i + 1 :], escaped, state)
        return None
    if n - i < state.hex_len + 2 + (i < n and s[i] == 0x5C):
        return None
    digest = s[i : i + state.hex_len]
    i += state.hex_len
    if s[i] not in b" \t":
        return None
    i += 1
    if not _hex_digits(digest, state.hex_len):
        return None
    if n - i == 1 or s[i] not in b" *":
        if state.bsd_reversed == 0:  # no mixing with GNU lines (leading-space renames)
            return None
        state.bsd_reversed = 1
    elif state.bsd_reversed != 1:
        state.bsd_reversed = 0
        i += 1
    name: bytes | None = s[i:]
    if escaped:
        name = unescape(s[i:])
    return None if name is None else (digest, name)
