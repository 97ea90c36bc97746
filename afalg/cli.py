"""The ``afalg`` command (also ``python -m afalg``).

``afalg info`` reports what the kernel offers, ``afalg stat`` prints the kernel's TLS counters
(``/proc/net/tls_stat``, with deltas over an interval), ``afalg vm`` runs a command under a
Debian kernel, and the crypto subcommands (``hash``, ``enc``, ``rng``, ...) script AF_ALG like
libkcapi's tools.
Errors are one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence

from afalg import __version__

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    from afalg.probe import format_report, probe

    caps = probe()
    if args.json:
        report = dataclasses.asdict(caps)
        report["refused"] = [f"{a.type} {a.name}" for a in caps.refused]
        report["modes"] = caps.modes
        print(json.dumps(report, indent=2))
    else:
        print(format_report(caps))
    if not caps.af_alg:
        print(
            f"afalg: AF_ALG is not usable here: {caps.af_alg_reason}; algif mode on the "
            "cryptography backend still runs, and `afalg vm -- CMD` runs CMD under a kernel "
            "with AF_ALG",
            file=sys.stderr,
        )
        return 1
    return 0


def _stat_block(now: dict[str, int], before: dict[str, int] | None, interval: float) -> str:
    """Format one sample of the kernel's TLS counters.

    A header line (``counter total``, then ``+Ss`` with deltas), then ``NAME TOTAL`` per counter
    in the kernel's order (``NAME TOTAL +DELTA`` with a previous sample; the current counters
    such as ``TlsCurrTxSw`` may go down: ``-1``)."""
    width = max(len(name) for name in now) if now else 7
    if before is None:
        lines = [f"{'counter':<{width}} {'total':>12}"]
        lines += [f"{name:<{width}} {value:>12}" for name, value in now.items()]
    else:
        lines = [f"{'counter':<{width}} {'total':>12} {f'+{interval:g}s':>12}"]
        lines += [
            f"{name:<{width}} {value:>12} {value - before.get(name, 0):>+12}"
            for name, value in now.items()
        ]
    return "\n".join(lines)


def _cmd_stat(args: argparse.Namespace) -> int:
    from afalg import _uapi
    from afalg.ktls import tls_stats

    if args.interval is not None and not args.interval > 0:
        print("afalg stat: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    if args.count is not None and (args.interval is None or args.count < 1):
        print("afalg stat: --count N needs --interval S and N >= 1", file=sys.stderr)
        return 2
    if not os.path.exists(_uapi.TLS_STAT_PATH):
        print(
            f"afalg stat: {_uapi.TLS_STAT_PATH} does not exist: the kernel's tls module is not "
            "loaded (run 'modprobe tls' as root; the kernel needs CONFIG_TLS)",
            file=sys.stderr,
        )
        return 1
    # Each block ends with a blank line, so a reader knows when one is complete.
    before = tls_stats()
    print(_stat_block(before, None, 0.0) + "\n", flush=True)
    done = 0
    while args.interval is not None and (args.count is None or done < args.count):
        time.sleep(args.interval)
        now = tls_stats()
        print(_stat_block(now, before, args.interval) + "\n", flush=True)
        before = now
        done += 1
    return 0


def _cmd_vm(args: argparse.Namespace) -> int:
    from afalg import _vm as vm

    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        print("afalg vm: no command given (afalg vm -- CMD ...)", file=sys.stderr)
        return 2
    try:
        lacking = vm.missing(args.kernel)
    except ValueError as exc:  # an unknown kernel name
        print(f"afalg vm: {exc}", file=sys.stderr)
        return 2
    if lacking and args.install:
        try:
            vm.install(args.kernel)
        except subprocess.CalledProcessError as exc:
            print(
                f"afalg vm: installing failed: {shlex.join(exc.cmd)} exited {exc.returncode}",
                file=sys.stderr,
            )
            return 1
        lacking = vm.missing(args.kernel)
    if lacking:
        for item in lacking:
            print(f"afalg vm: missing {item}", file=sys.stderr)
        print("afalg vm: or run with --install (as root) to install all of it", file=sys.stderr)
        return 2
    return vm.run(
        argv,
        kernel=args.kernel,
        timeout=args.timeout,
        cpus=args.cpus,
        memory=args.memory,
        env=dict(args.env),
        sysctls=dict(args.sysctl),
    )


def _pair(text: str) -> tuple[str, str]:
    """An argparse type for ``KEY=VALUE`` (the value may hold ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _env_pair(text: str) -> tuple[str, str]:
    """Parse ``--env NAME=VALUE`` for argparse into (NAME, VALUE).

    NAME must be an identifier (the guest's shell exports it); the value is anything (it is
    quoted)."""
    from afalg import _vm as vm

    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {name!r}")
    try:
        vm.check_env_name(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="afalg", description="The Linux kernel crypto API (AF_ALG) and kernel TLS."
    )
    parser.add_argument("--version", action="version", version=f"afalg {__version__}")
    sub = parser.add_subparsers(dest="subcommand", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="what this kernel offers (AF_ALG types, kTLS ciphers)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    stat = sub.add_parser(
        "stat",
        help="the kernel's TLS counters (/proc/net/tls_stat), with deltas over an interval",
        description="Print /proc/net/tls_stat (this network namespace's kTLS counters). With "
        "--interval S, print them again every S seconds with the change since the previous "
        "sample (+DELTA), --count N times (default: until interrupted).",
    )
    stat.add_argument("--interval", type=float, default=None, metavar="S", help="seconds")
    stat.add_argument(
        "--count", type=int, default=None, metavar="N", help="samples after the first"
    )
    stat.set_defaults(func=_cmd_stat)

    vmp = sub.add_parser(
        "vm",
        help="run a command under a Debian kernel booted with virtme-ng",
        description="Boot a Debian kernel under QEMU (TCG) over this filesystem, run CMD in the "
        "current directory (made writable), pass its output through and exit with its status.",
    )
    vmp.add_argument("--kernel", default="6.12", help="6.1, 6.12, 7.3 or a path to a vmlinuz")
    vmp.add_argument("--install", action="store_true", help="install what is missing (root)")
    vmp.add_argument("--timeout", type=float, default=None, help="kill the VM after S seconds")
    vmp.add_argument("--cpus", type=int, default=2)
    vmp.add_argument("--memory", default="2G")
    vmp.add_argument(
        "--env",
        action="append",
        default=[],
        type=_env_pair,
        metavar="NAME=VALUE",
        help="export inside the VM (NAME: letters, digits and _)",
    )
    vmp.add_argument(
        "--sysctl",
        action="append",
        default=[],
        type=_pair,
        metavar="KEY=VALUE",
        help="set in the guest before CMD, e.g. crypto.af_alg_restrict=0",
    )
    vmp.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG ...]")
    vmp.set_defaults(func=_cmd_vm)

    try:
        from afalg._cli_crypto import add_parsers
    except ImportError:  # pragma: no cover - only while the crypto commands are absent
        pass
    else:
        add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except (OSError, ValueError) as exc:
        print(f"afalg {args.subcommand}: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(exc: BaseException) -> str:
    """The message of ``exc`` without OSError's ``[Errno N]`` prefix (the text names it)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename}"
    return str(exc)
