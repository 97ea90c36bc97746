"""The crypto subcommands of ``afalg``, in the spirit of libkcapi's kcapi-dgst / kcapi-enc /
kcapi-rng, with coreutils-compatible output:

- ``afalg list [--type T]``: the algorithms in /proc/crypto.
- ``afalg hash ALG FILE...`` prints what ``sha256sum`` prints (``--check`` verifies such lines).
- ``afalg hmac ALG --key HEX FILE...``: the same format, keyed.
- ``afalg enc|dec --cipher NAME --key HEX [--iv HEX] [--padding pkcs7]``: stdin to stdout,
  streaming.
- ``afalg aead-enc|aead-dec --cipher NAME --key HEX --iv HEX [--aad HEX] [--tag-size N]``:
  stdin to stdout; decryption prints nothing unless the tag verifies.
- ``afalg rng N [--name NAME] [--hex]`` (the default: ``stdrng``, else ``jitterentropy_rng``).

``add_parsers(subparsers)`` adds them; each sets ``func(args) -> int``. Errors surface as
:class:`afalg.AlgError` or :class:`ValueError`, which the ``afalg`` command prints as one line.
"""

from __future__ import annotations

import argparse
import string
import sys
from collections.abc import Callable, Sequence
from typing import BinaryIO

from afalg import alg

__all__ = ["add_parsers"]

_CHUNK = 64 * 1024


def _hex(what: str) -> Callable[[str], bytes]:
    """An argparse type for a hex argument. Its errors name the problem, never the value (a
    key must not end up on stderr or in a log)."""

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


def _escape(name: str) -> tuple[str, str]:
    """coreutils' escaping of a file name in a checksum line: (prefix, name)."""
    if not any(c in name for c in "\\\n\r"):
        return "", name
    return "\\", name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name):
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(name[i + 1], name[i + 1]))
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def _new(args: argparse.Namespace) -> alg.Hash:
    return alg.Hash(args.alg) if args.key is None else alg.HMAC(args.alg, args.key)


def _digest_file(args: argparse.Namespace, path: str) -> str:
    with _new(args) as obj:
        if path == "-":
            obj.update_file(sys.stdin.buffer)
        else:
            obj.update_file(path)
        return obj.hexdigest()


def _warn(args: argparse.Namespace, message: str) -> None:
    print(f"afalg {args.subcommand}: {message}", file=sys.stderr)


def _cmd_hash(args: argparse.Namespace) -> int:
    _new(args).close()  # an unknown ALG is one clear error, before any file
    if args.check:
        return _check(args)
    status = 0
    for path in args.files or ["-"]:
        try:
            digest = _digest_file(args, path)
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            _warn(args, f"{path}: {exc.strerror}")
            status = 1
            continue
        prefix, shown = _escape(path)
        sys.stdout.write(f"{prefix}{digest}  {shown}\n")
    sys.stdout.flush()
    return status


def _check(args: argparse.Namespace) -> int:
    bad = unreadable = malformed = 0
    for listing in args.files or ["-"]:
        stream = sys.stdin if listing == "-" else open(listing, encoding="utf-8")  # noqa: SIM115
        with stream:
            lines = stream.read().splitlines()
        for line in lines:
            if not line.strip():
                continue
            escaped = line.startswith("\\")
            body = line[1:] if escaped else line
            digest, sep, name = body.partition(" ")
            if not sep or not name or name[0] not in " *":
                malformed += 1
                continue
            name = name[1:]
            if escaped:
                name = _unescape(name)
            try:
                actual = _digest_file(args, name)
            except OSError:
                print(f"{name}: FAILED open or read")
                unreadable += 1
                continue
            if actual == digest.lower():
                if not args.quiet:
                    print(f"{name}: OK")
            else:
                print(f"{name}: FAILED")
                bad += 1
    sys.stdout.flush()
    for count, what in (
        (malformed, "line is improperly formatted"),
        (unreadable, "listed file could not be read"),
        (bad, "computed checksum did NOT match"),
    ):
        if count:
            plural = what.replace("line is", "lines are").replace("file could", "files could")
            plural = plural.replace("checksum did", "checksums did")
            _warn(args, f"WARNING: {count} {what if count == 1 else plural}")
    return 1 if bad or unreadable or malformed else 0


def _copy_stream(stream: alg.CipherStream, src: BinaryIO, dst: BinaryIO) -> None:
    with stream:
        while block := src.read(_CHUNK):
            dst.write(stream.update(block))
        dst.write(stream.finalize())
    dst.flush()


def _cmd_cipher(args: argparse.Namespace) -> int:
    with alg.SKCipher(args.cipher, args.key, padding=args.padding) as cipher:
        stream = (
            cipher.encryptor(args.iv) if args.subcommand == "enc" else cipher.decryptor(args.iv)
        )
        _copy_stream(stream, sys.stdin.buffer, sys.stdout.buffer)
    return 0


def _cmd_aead(args: argparse.Namespace) -> int:
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


def _cmd_list(args: argparse.Namespace) -> int:
    infos = alg.algorithms(type=args.type)
    for info in sorted(infos, key=lambda i: (i.type, i.name, -i.priority)):
        print(f"{info.type:<10} {info.name:<32} {info.driver:<40} {info.priority:>5} {info.module}")
    return 0


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
            p.add_argument("--key", required=True, type=_hex("--key"), help="the key, in hex")
        else:
            p.set_defaults(key=None)
        p.add_argument("-c", "--check", action="store_true", help="verify checksum lines")
        p.add_argument("--quiet", action="store_true", help="with --check: no OK lines")
        p.set_defaults(func=_cmd_hash)

    for name, verb in (("enc", "encrypt"), ("dec", "decrypt")):
        p = subparsers.add_parser(name, help=f"{verb} stdin to stdout (streaming skcipher)")
        p.add_argument("--cipher", required=True, help="cbc(aes), ctr(aes), xts(aes), ...")
        p.add_argument("--key", required=True, type=_hex("--key"))
        p.add_argument("--iv", type=_hex("--iv"), default=None, help="hex (none for ecb)")
        p.add_argument("--padding", choices=["pkcs7"], default=None)
        p.set_defaults(func=_cmd_cipher)

    for name, verb in (("aead-enc", "encrypt"), ("aead-dec", "decrypt")):
        p = subparsers.add_parser(
            name, help=f"AEAD-{verb} stdin to stdout (output is ciphertext || tag)"
        )
        p.add_argument(
            "--cipher", required=True, help="gcm(aes), ccm(aes), rfc7539(chacha20,poly1305), ..."
        )
        p.add_argument("--key", required=True, type=_hex("--key"))
        p.add_argument("--iv", required=True, type=_hex("--iv"), help="the IV or nonce, in hex")
        p.add_argument("--aad", type=_hex("--aad"), default=b"", help="associated data, hex")
        p.add_argument("--tag-size", type=int, default=16)
        p.set_defaults(func=_cmd_aead)

    p = subparsers.add_parser("rng", help="N random bytes from a kernel RNG to stdout")
    p.add_argument("n", metavar="N", type=int)
    p.add_argument("--name", default=None, help="default: stdrng, else jitterentropy_rng")
    p.add_argument("--hex", action="store_true", help="print hex and a newline")
    p.set_defaults(func=_cmd_rng)
