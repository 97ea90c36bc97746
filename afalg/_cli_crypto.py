"""The crypto subcommands of ``afalg``, with coreutils-compatible output.

In the spirit of libkcapi's kcapi-dgst / kcapi-enc / kcapi-rng:

- ``afalg list [--type T]``: the algorithms in /proc/crypto.
- ``afalg hash ALG FILE...`` prints what ``sha256sum`` prints (``--check`` verifies such lines).
- ``afalg hmac ALG --key HEX FILE...``: the same format, keyed.
- ``afalg enc|dec --cipher NAME --key HEX [--iv HEX] [--padding pkcs7]``: stdin to stdout,
  streaming.
- ``afalg aead-enc|aead-dec --cipher NAME --key HEX --iv HEX [--aad HEX] [--tag-size N]``:
  stdin to stdout; decryption prints nothing unless the tag verifies.

Wherever ``--key HEX`` goes, ``--key-file PATH`` or ``--key-fd FD`` may instead (the key in hex,
surrounding whitespace ignored; read to EOF), keeping the key out of ``ps`` and shell history:
``afalg hmac sha256 --key-fd 3 FILE 3<keyfile``.
- ``afalg rng N [--name NAME] [--hex]`` (the default: ``stdrng``, else ``jitterentropy_rng``).

``add_parsers(subparsers)`` adds them; each sets ``func(args) -> int``. Errors surface as
:class:`afalg.AlgError` or :class:`ValueError`, which the ``afalg`` command prints as one line.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import string
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

from afalg import alg
from afalg._checksum import CheckState, escape, quotef, split_line, tag_name
from afalg.probe import af_alg_absence  # costs nothing more: the package imports probe

__all__ = ["add_parsers"]

_CHUNK = 64 * 1024


def _hex(what: str) -> Callable[[str], bytes]:
    """Return an argparse type for a hex argument.

    Its errors name the problem, never the value (a key must not end up on stderr or in a
    log)."""

    def parse(text: str) -> bytes:
        try:
            return bytes.fromhex(text)
        except ValueError:
            digits = "".join(text.split())
            bad = next((i for i, c in enumerate(digits) if c not in string.hexdigits), None)
            problem = (
                f"character {bad + 1} of {len(digits)} is not a hex digit"
                if bad is not None
                else f"an odd number of hex digits ({len(digits)})"
            )
            raise argparse.ArgumentTypeError(f"{what} must be hex: {problem}") from None

    return parse


def _add_key_options(p: argparse.ArgumentParser) -> None:
    """--key HEX, or (kept out of ps and shell history) --key-file PATH or --key-fd FD."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--key", type=_hex("--key"), help="the key in hex (visible in ps and shell history)"
    )
    group.add_argument(
        "--key-file", metavar="PATH", help="read the key in hex from PATH (whitespace ignored)"
    )
    group.add_argument(
        "--key-fd", metavar="FD", type=int, help="read the key in hex from descriptor FD to EOF"
    )


def _read_key(args: argparse.Namespace, stdin_is_data: bool) -> None:
    """Set ``args.key`` from --key-file or --key-fd.

    The file holds the key in hex, surrounding whitespace ignored. The errors (ValueError) name
    the option and the problem, never the key."""
    if args.key is not None:
        return
    if args.key_file is not None:
        what = "--key-file"
        try:
            with open(args.key_file, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ValueError(f"{what} {args.key_file}: {exc.strerror}") from None
    else:
        what, fd = "--key-fd", args.key_fd
        if fd < 0:
            raise ValueError(f"{what} must be a descriptor (>= 0), got {fd}")
        if fd == 0 and stdin_is_data:
            raise ValueError(f"{what} 0 is stdin, which carries the data here")
        chunks = []
        try:
            while chunk := os.read(fd, 4096):
                chunks.append(chunk)
        except OSError as exc:
            raise ValueError(f"{what} {fd}: {exc.strerror}") from None
        raw = b"".join(chunks)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{what} must hold the key in hex; it holds other bytes") from None
    try:
        args.key = _hex(what)(text.strip())
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# hash / hmac: coreutils' sha256sum (9.10, and 9.1 but for --check's escaping), byte for byte,
# with names as bytes (not UTF-8 only); quoting, escaping and line parsing in afalg/_checksum.py
# --------------------------------------------------------------------------------------------


def _new(args: argparse.Namespace) -> alg.Hash:
    return alg.Hash(args.alg) if args.key is None else alg.HMAC(args.alg, args.key)


def _digest_file(args: argparse.Namespace, path: bytes) -> str:
    with _new(args) as obj:
        if path == b"-":
            obj.update_file(sys.stdin.buffer)
        else:
            with open(path, "rb", buffering=0) as f:
                obj.update_file(f)
        return obj.hexdigest()


def _err(args: argparse.Namespace, message: bytes | str) -> None:
    if isinstance(message, str):
        message = message.encode("utf-8", "surrogateescape")
    sys.stdout.flush()
    sys.stdout.buffer.flush()
    err = sys.stderr.buffer
    err.write(f"afalg {args.subcommand}: ".encode() + message + b"\n")
    err.flush()


def _warn(args: argparse.Namespace, message: str) -> None:
    _err(args, message)


def _open_failure(args: argparse.Namespace, name: bytes, exc: OSError) -> None:
    if isinstance(exc, alg.AlgError):  # the kernel's, not the file's: one clear error
        raise exc
    _err(args, quotef(name) + b": " + (exc.strerror or str(exc)).encode())


def _name_unreadable(args: argparse.Namespace) -> None:
    """Report each FILE operand that cannot be opened, as hashing it would, reading none.

    The messages (``NAME: No such file or directory``) are those a user needs beside an error
    that ends the run before the files (AF_ALG missing, an unknown ALG)."""
    for path in args.files:
        name = os.fsencode(path)
        if name == b"-":
            continue
        try:
            # O_NONBLOCK: a FIFO opens without waiting for a writer; nothing is read
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            _open_failure(args, name, exc)
            continue
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):  # open() of a directory fails so
                _open_failure(
                    args, name, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                )
        finally:
            os.close(fd)


def _usage_error(args: argparse.Namespace, message: str) -> int:
    _err(args, message)
    sys.stderr.buffer.write(
        f"Try 'afalg {args.subcommand} --help' for more information.\n".encode()
    )
    sys.stderr.buffer.flush()
    return 1


def _cmd_hash(args: argparse.Namespace) -> int:
    if hasattr(args, "key_file"):
        _read_key(args, stdin_is_data="-" in args.files or not args.files)
    if args.check:
        if args.tag:
            return _usage_error(args, "the --tag option is meaningless when verifying checksums")
        if args.zero:
            return _usage_error(args, "the --zero option is not supported when verifying checksums")
    else:
        for flag in ("ignore_missing", "status", "warn", "strict", "quiet"):
            if getattr(args, flag):
                option = "--" + flag.replace("_", "-")
                return _usage_error(
                    args, f"the {option} option is meaningful only when verifying checksums"
                )
    try:
        _new(args).close()  # an unknown ALG is one clear error, before any file is read
    except alg.AlgError:
        _name_unreadable(args)  # but a missing file is named first (no AF_ALG: both are)
        raise
    if args.check:
        return _check(args)
    status = 0
    out = sys.stdout.buffer
    tag = tag_name(_new_name(args))
    for path in args.files or ["-"]:
        name = os.fsencode(path)
        try:
            digest = _digest_file(args, name).encode()
        except OSError as exc:
            _open_failure(args, name, exc)
            status = 1
            continue
        prefix, shown = (b"", name) if args.zero else escape(name)
        end = b"\0" if args.zero else b"\n"
        if args.tag:
            out.write(prefix + tag + b" (" + shown + b") = " + digest + end)
        else:
            out.write(prefix + digest + b"  " + shown + end)
    out.flush()
    return status


def _new_name(args: argparse.Namespace) -> str:
    with _new(args) as obj:
        name = obj.name
    return name[5:-1] if name.startswith("hmac(") else name


def _check(args: argparse.Namespace) -> int:
    with _new(args) as obj:
        hex_len = 2 * (obj.digest_size or 0)
    state = CheckState(tag_name(_new_name(args)), hex_len)
    ok = True
    for listing in args.files or ["-"]:
        ok &= _check_one(args, os.fsencode(listing), state)
    return 0 if ok else 1


def _check_one(args: argparse.Namespace, listing: bytes, state: CheckState) -> bool:
    out = sys.stdout.buffer
    is_stdin = listing == b"-"
    shown_listing = quotef(b"standard input" if is_stdin else listing)
    try:
        if is_stdin:
            data = sys.stdin.buffer.read()
        else:
            with open(listing, "rb") as f:
                data = f.read()
    except OSError as exc:
        _open_failure(args, listing, exc)
        return False
    malformed = unreadable = mismatched = 0
    formatted = matched = False
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        if line.startswith(b"#"):
            continue
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        parsed = split_line(line, state)
        if parsed is None or (is_stdin and parsed[1] == b"-"):
            malformed += 1
            if args.warn:
                what = f": {number}: improperly formatted {state.tag.decode()} checksum line"
                _err(args, shown_listing + what.encode())
            continue
        formatted = True
        digest, name = parsed
        prefix, shown = escape(name)
        try:
            actual = _digest_file(args, name).encode()
        except FileNotFoundError as exc:
            if args.ignore_missing:
                continue
            _open_failure(args, name, exc)
            actual = None
        except OSError as exc:
            _open_failure(args, name, exc)
            actual = None
        if actual is None:
            unreadable += 1
            if not args.status:
                out.write(prefix + shown + b": FAILED open or read\n")
            continue
        match = actual == digest.lower()
        if match:
            matched = True
        else:
            mismatched += 1
        if not args.status and (not match or not args.quiet):
            out.write(prefix + shown + (b": OK\n" if match else b": FAILED\n"))
    out.flush()
    if not formatted:
        _err(args, shown_listing + b": no properly formatted checksum lines found")
    elif not args.status:
        for count, one, many in (
            (malformed, "line is improperly formatted", "lines are improperly formatted"),
            (unreadable, "listed file could not be read", "listed files could not be read"),
            (mismatched, "computed checksum did NOT match", "computed checksums did NOT match"),
        ):
            if count:
                _warn(args, f"WARNING: {count} {one if count == 1 else many}")
        if args.ignore_missing and not matched:
            _err(args, shown_listing + b": no file was verified")
    return (
        formatted
        and matched
        and not mismatched
        and not unreadable
        and not (args.strict and malformed)
    )


def _copy_stream(stream: alg.CipherStream, src: BinaryIO, dst: BinaryIO) -> None:
    with stream:
        while block := src.read(_CHUNK):
            dst.write(stream.update(block))
        dst.write(stream.finalize())
    dst.flush()


def _cmd_cipher(args: argparse.Namespace) -> int:
    _read_key(args, stdin_is_data=True)
    with alg.SKCipher(args.cipher, args.key, padding=args.padding) as cipher:
        stream = (
            cipher.encryptor(args.iv) if args.subcommand == "enc" else cipher.decryptor(args.iv)
        )
        _copy_stream(stream, sys.stdin.buffer, sys.stdout.buffer)
    return 0


def _cmd_aead(args: argparse.Namespace) -> int:
    _read_key(args, stdin_is_data=True)
    data = sys.stdin.buffer.read()
    with alg.AEAD(args.cipher, args.key, args.tag_size) as aead:
        if args.subcommand == "aead-enc":
            out = aead.encrypt(args.iv, data, args.aad)
        else:
            out = aead.decrypt(args.iv, data, args.aad)
    sys.stdout.buffer.write(out)
    sys.stdout.buffer.flush()
    return 0


def _cmd_rng(args: argparse.Namespace) -> int:
    if args.n < 0:
        raise ValueError(f"N must be non-negative, got {args.n}")
    with alg.RNG(args.name) as rng:
        left = args.n
        while left:
            block = rng.read(min(left, _CHUNK))
            left -= len(block)
            if args.hex:
                sys.stdout.write(block.hex())
            else:
                sys.stdout.buffer.write(block)
    if args.hex:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# The kernel's crypto types (crypto_type.tfmsize users; /proc/crypto "type :"), and "hash" for
# shash and ahash together. Types /proc/crypto shows are accepted too (newer kernels add some).
KNOWN_TYPES = ("aead", "acomp", "ahash", "akcipher", "cipher", "compression", "hash", "kpp",
               "lskcipher", "rng", "scomp", "shash", "sig", "skcipher")  # fmt: skip


def _cmd_list(args: argparse.Namespace) -> int:
    if args.type is not None:
        known = sorted(set(KNOWN_TYPES) | {i.type for i in alg.algorithms()})
        if args.type not in known:
            _err(args, f"unknown type {args.type!r}; known types: {', '.join(known)}")
            return 2
    infos = alg.algorithms(type=args.type)
    for info in sorted(infos, key=lambda i: (i.type, i.name, -i.priority)):
        print(f"{info.type:<10} {info.name:<32} {info.driver:<40} {info.priority:>5} {info.module}")
    _list_note(args)
    return 0


def _list_note(args: argparse.Namespace) -> None:
    """Say on stderr when the listed algorithms cannot all be used through AF_ALG here.

    /proc/crypto lists what the kernel has, not what this process may bind."""
    absence = af_alg_absence()
    restrict = alg.af_alg_restrict()
    if absence is not None:
        _err(
            args,
            f"these algorithms cannot be used through AF_ALG here ({absence}); "
            "`afalg vm -- afalg list` lists and runs them under a kernel with AF_ALG",
        )
    elif restrict:
        _err(
            args,
            f"crypto.af_alg_restrict={restrict}: AF_ALG binds only the algorithms on its "
            "allowlist (`afalg info` shows which of afalg's it refuses)",
        )


class _IntermixedParser(argparse.ArgumentParser):
    """Options may follow the file operands (``afalg hash sha256 -c SUMS``), as in coreutils."""

    _mixing = False

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._mixing:
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add list, hash, hmac, enc, dec, aead-enc, aead-dec and rng to ``afalg``."""
    p = subparsers.add_parser("list", help="algorithms the kernel has registered (/proc/crypto)")
    p.add_argument("--type", help="only this type: skcipher, aead, hash, shash, ahash, rng, ...")
    p.set_defaults(func=_cmd_list)

    for name, keyed in (("hash", False), ("hmac", True)):
        p = subparsers.add_parser(
            name,
            help=f"{'HMAC' if keyed else 'hash'} files in the kernel (sha256sum's output format)",
        )
        p.__class__ = _IntermixedParser
        p.add_argument("alg", metavar="ALG", help="sha256, sha3-256, blake2b-512, ...")
        p.add_argument("files", metavar="FILE", nargs="*", help="files ('-' or none: stdin)")
        if keyed:
            _add_key_options(p)
        else:
            p.set_defaults(key=None)
        p.add_argument("-c", "--check", action="store_true", help="verify checksum lines")
        p.add_argument("--tag", action="store_true", help="BSD-style lines: ALG (FILE) = HEX")
        p.add_argument(
            "-z", "--zero", action="store_true", help="end lines with NUL, no name escaping"
        )
        p.add_argument(
            "--ignore-missing", action="store_true", help="with --check: skip missing files"
        )
        p.add_argument("--quiet", action="store_true", help="with --check: no OK lines")
        p.add_argument("--status", action="store_true", help="with --check: no output, status")
        p.add_argument("--strict", action="store_true", help="with --check: fail on improper lines")
        p.add_argument(
            "-w", "--warn", action="store_true", help="with --check: warn about improper lines"
        )
        p.set_defaults(func=_cmd_hash)

    for name, verb in (("enc", "encrypt"), ("dec", "decrypt")):
        p = subparsers.add_parser(name, help=f"{verb} stdin to stdout (streaming skcipher)")
        p.add_argument("--cipher", required=True, help="cbc(aes), ctr(aes), xts(aes), ...")
        _add_key_options(p)
        p.add_argument("--iv", type=_hex("--iv"), default=None, help="hex (none for ecb)")
        p.add_argument("--padding", choices=["pkcs7"], default=None)
        p.set_defaults(func=_cmd_cipher)

    aead_texts = {
        "aead-enc": (
            "AEAD-encrypt stdin to stdout (ciphertext || tag)",
            "AEAD-encrypt stdin: stdout is ciphertext || tag (the tag is --tag-size bytes).",
        ),
        "aead-dec": (
            "AEAD-decrypt stdin (ciphertext || tag) to stdout",
            "AEAD-decrypt: stdin is ciphertext || tag (the tag is its last --tag-size bytes); "
            "stdout is the plaintext, nothing unless the tag verifies.",
        ),
    }
    for name, (summary, description) in aead_texts.items():
        p = subparsers.add_parser(name, help=summary, description=description)
        p.add_argument(
            "--cipher", required=True, help="gcm(aes), ccm(aes), rfc7539(chacha20,poly1305), ..."
        )
        _add_key_options(p)
        p.add_argument("--iv", required=True, type=_hex("--iv"), help="the IV or nonce, in hex")
        p.add_argument("--aad", type=_hex("--aad"), default=b"", help="associated data, hex")
        p.add_argument("--tag-size", type=int, default=16)
        p.set_defaults(func=_cmd_aead)

    p = subparsers.add_parser("rng", help="N random bytes from a kernel RNG to stdout")
    p.add_argument("n", metavar="N", type=int)
    p.add_argument("--name", default=None, help="default: stdrng, else jitterentropy_rng")
    p.add_argument("--hex", action="store_true", help="print hex and a newline")
    p.set_defaults(func=_cmd_rng)
