"""Python 3.14 and 3.15 for tests/run.py: Debian sid's, with its OpenSSL, in a chroot.

Debian ships these Pythons only in sid, built against sid's userland (glibc, OpenSSL 3.6), so
they run in a ``debootstrap`` root of sid, cached in :data:`SID` (``/var/cache/afalg/sid``)
beside the 7.3 kernel's apt cache, with ``openssl`` 3.6 (the interop peer) and what else the
tests call there (:data:`PACKAGES`). Each Python gets a virtualenv in the checkout,
``.venv-3.14`` and ``.venv-3.15`` as pyenv's do, made inside the root and given afalg (editable)
with its ``test`` extra from wheels that the host's pip downloads (pip in the root may refuse
this machine's certificate chain): remade when ``setup.cfg`` or ``pyproject.toml`` changes.

Commands run through :func:`chroot_argv`: ``unshare --mount`` gives them a private mount
namespace in which ``/proc``, ``/sys``, ``/dev`` and the checkout are bound into the root, so
nothing stays mounted on the host whatever happens to the run. Inside ``afalg vm`` (the host's
root read-only) it mounts tmpfs on the root's ``/tmp`` and ``/run`` too.

Everything here needs root (debootstrap, mount, chroot); :func:`unavailable` says why not.
Removal: ``rm -r /var/cache/afalg/sid .venv-3.14 .venv-3.15`` (and ``apt-get remove
debootstrap``), or ``rm -r /var/cache/afalg`` with the 7.3 kernel's cache.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path("/var/cache/afalg")
SID = CACHE / "sid"
SERIES = ("3.14", "3.15")
# What the tests call inside the root: the Pythons, openssl (the interop peer), ip (network
# namespaces), curl (tests/test_sslcontext.py reads a server with it), a C compiler and the
# kernel's UAPI headers (tests/test_cmsg.py's layout check)
PACKAGES = (
    "python3.14", "python3.14-venv", "python3.15", "python3.15-venv",
    "openssl", "iproute2", "curl", "gcc", "libc6-dev", "linux-libc-dev",
)  # fmt: skip
STAMP = "afalg-installed"  # in the root, written last: the packages it was made with
WHEELS = "/var/cache/afalg-wheels"  # inside the root: the host's pip downloads into it
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--"]
# The kernel tests whose outcome can depend on Python's ssl or asyncio (and on the OpenSSL
# behind ssl, or the openssl command as the peer): run under sid's newest Python on 7.3 too.
# The hand-off itself (tests/test_handoff.py, test_handshake.py) runs in the host stages.
KERNEL_TESTS = (
    "tests/test_tls_sockets.py",  # wrap() after ssl's handshake, both modes, both roles
    "tests/test_tls_close.py",  # close with unread input (tickets ssl sent): the reset
    "tests/test_nonblocking.py",  # ssl's non-blocking exceptions and semantics
    "tests/test_sslcontext.py",  # the ssl.SSLContext subclass: what http.client calls
    "tests/test_aio.py",  # asyncio streams and server (asyncio internals move per version)
    "tests/test_aio_api.py",
    "tests/test_aio_transport.py",
    "tests/test_aio_limits.py",
    "tests/test_loop.py",  # the event loop: loop.create_connection(ssl=...), sendfile
    "tests/test_loop_frameworks.py",  # aiohttp, uvicorn, websockets on that loop
    "tests/test_tls_interop.py",  # openssl s_client/s_server 3.6 as the peer: both roles,
    "tests/test_interop_server.py",  # both versions, both modes, default groups, KeyUpdate
    "tests/test_ktls_rekey.py::test_openssl_s_client_updates_both_ways",
    "tests/test_ktls_rekey.py::test_openssl_s_server_answers_our_request",
)


def log(message: str) -> None:
    print(f"afalg tests: {message}", flush=True)


def unavailable() -> str | None:
    """Why the sid stages cannot run here (None if they can, once set up)."""
    if os.geteuid() != 0:
        return "not root (the Debian sid root needs debootstrap, mount and chroot)"
    if not shutil.which("unshare") or not shutil.which("chroot"):
        return "no unshare or chroot (util-linux, coreutils)"
    return None


def mirror() -> str:
    sys.path.insert(0, str(ROOT))
    from afalg import _vm as vm

    return vm._debian_mirror()


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """One setup at a time on this machine (the root and the wheels are shared)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "sid.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def complete(root: Path = SID) -> bool:
    """Whether ``root`` is a finished root made with today's :data:`PACKAGES`."""
    stamp = root / STAMP
    return stamp.exists() and stamp.read_text().split("\n", 1)[0] == " ".join(PACKAGES)


def mounted_under(path: Path) -> bool:
    """Whether anything is mounted at or under ``path`` in this mount namespace."""
    points = (line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())
    return any(p == str(path) or p.startswith(f"{path}/") for p in points)


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap") or Path("/usr/sbin/debootstrap").exists():
        return
    started = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    log(f"installed debootstrap with apt ({time.monotonic() - started:.0f} s)")


def ensure_root() -> None:
    """Make the sid root unless a complete one is there (an incomplete one is made anew)."""
    if complete():
        return
    for path in (SID, SID.with_name("sid.new")):
        if mounted_under(path):
            raise RuntimeError(f"something is mounted under {path}: not removing it")
        shutil.rmtree(path, ignore_errors=True)
    ensure_debootstrap()
    new = SID.with_name("sid.new")
    log(f"making the Debian sid root in {SID} (debootstrap: {', '.join(PACKAGES)})")
    started = time.monotonic()
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    # in a mount namespace of its own: the /proc it mounts in the root goes with it
    subprocess.run(
        [*UNSHARE, debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", "sid",
         str(new), mirror()],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    (new / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
    for deb in (new / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (new / STAMP).write_text(
        " ".join(PACKAGES) + f"\nmade by tests/run.py ({time.strftime('%Y-%m-%d')}); "
        f"remove with: rm -r {SID}\n"
    )
    new.rename(SID)
    log(f"made the sid root in {time.monotonic() - started:.0f} s")


def chroot_argv(
    argv: Sequence[str], series: str | None = None, *, in_vm: bool = False
) -> list[str]:
    """``argv`` run in the sid root, in the checkout, in a private mount namespace.

    With ``series``, the PATH starts with that virtualenv's ``bin``. ``in_vm`` (``afalg vm``):
    the guest hides /var/cache under a tmpfs, so the root is reached through a bind of ``/``
    alone (no submounts), and being read-only it gets a tmpfs on ``/tmp`` and ``/run``."""
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if series:
        path = f"{venv(series)}/bin:{path}"
    script = [f"root={shlex.quote(str(SID))}"]
    if in_vm:
        script += ['top="$(mktemp -d -p /run)"', 'mount --bind / "$top"', f'root="$top"{SID}']
        # first, so that a checkout under /tmp (a CI clone) is bound on top of it, not hidden
        script += [f'mount -t tmpfs tmpfs "$root"/{d}' for d in ("tmp", "run")]
    script.append(f'mkdir -p "$root"{shlex.quote(str(ROOT))}')  # in the tmpfs, or there already
    binds = ["/proc", "/sys", "/dev", str(ROOT)]
    script += [f'mount --rbind {shlex.quote(d)} "$root"{shlex.quote(d)}' for d in binds]
    inner = f'cd {shlex.quote(str(ROOT))} && exec "$@"'
    # the host's pip settings (a find-links directory, a CA file) name paths the root lacks
    unset = " ".join(f"-u {name}" for name in sorted(os.environ) if name.startswith("PIP_"))
    script.append(
        f'exec chroot "$root" /usr/bin/env {unset} PATH={shlex.quote(path)} HOME=/root '
        f'TMPDIR=/tmp /bin/sh -c {shlex.quote(inner)} sh "$@"'
    )
    return [*UNSHARE, "/bin/sh", "-ec", "\n".join(script), "sh", *argv]


def venv(series: str) -> Path:
    return ROOT / f".venv-{series}"


def requirements() -> list[str]:
    """afalg's install_requires and its ``test`` extra, from setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"] + cfg["options.extras_require"]["test"]
    return [line.strip() for line in lines.splitlines() if line.strip()]


def glibc(series: str) -> tuple[int, int]:
    out = subprocess.run(
        chroot_argv([f"python{series}", "-c", "import platform; print(platform.libc_ver()[1])"]),
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    major, minor = out.strip().split(".")[:2]
    return int(major), int(minor)


def download_wheels(series: str) -> None:
    """The wheels afalg's test extra needs under ``series``, by the host's pip."""
    major, minor = glibc(series)
    platforms = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    abi = "cp" + series.replace(".", "")
    wanted = ["pip", "setuptools>=64", "wheel", *requirements()]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
         "-d", f"{SID}{WHEELS}", "--only-binary=:all:", "--python-version", series,
         "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
         *(arg for p in platforms for arg in ("--platform", p)), *wanted],
        check=True,
    )  # fmt: skip


def stale(series: str) -> bool:
    stamp = venv(series) / ".installed"
    newest = max((ROOT / name).stat().st_mtime for name in ("setup.cfg", "pyproject.toml"))
    return not stamp.exists() or stamp.stat().st_mtime < newest


def ensure_venv(series: str) -> None:
    """``.venv-<series>`` made in the root and given afalg[test], unless it is up to date."""
    if not stale(series):
        return
    log(f"installing {venv(series).name} (Debian sid's python{series})")
    started = time.monotonic()
    download_wheels(series)
    fetched = time.monotonic()
    shutil.rmtree(venv(series), ignore_errors=True)
    python = str(venv(series) / "bin/python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
           "--find-links", WHEELS]  # fmt: skip
    steps = [
        [f"python{series}", "-m", "venv", str(venv(series))],
        [*pip, "--upgrade", "pip", "setuptools>=64", "wheel"],
        [*pip, "--no-build-isolation", "-e", f"{ROOT}[test]"],
    ]
    for step in steps:
        subprocess.run(chroot_argv(step), check=True)
    (venv(series) / ".installed").touch()
    log(f"installed {venv(series).name}: wheels {fetched - started:.0f} s, "
        f"venv {time.monotonic() - fetched:.0f} s")  # fmt: skip


@functools.cache
def setup(series: str) -> str | None:
    """Everything the stages under sid's ``series`` need (once per process); why they cannot
    run (None if they can)."""
    why = unavailable()
    if why:
        return why
    try:
        with locked():
            ensure_root()
            (SID / ROOT.relative_to("/")).mkdir(parents=True, exist_ok=True)  # the bind's target
            ensure_venv(series)
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        return f"setting up Debian sid failed: {exc}"
    return None


def python(series: str) -> Path:
    """The virtualenv's python (a path in the checkout, run in the root)."""
    return venv(series) / "bin/python"


def host_wrap(series: str) -> Callable[[list[str]], list[str]]:
    """A command line into the same in the root, on the host, with the venv first on PATH."""
    return functools.partial(chroot_argv, series=series)


def vm_argv(series: str, python_args: Sequence[str]) -> list[str]:
    """The command that ``afalg vm`` runs for pytest (``python_args``: ``-m pytest ...``)
    under ``series`` in the root: :data:`KERNEL_TESTS` unless test paths are given."""
    named = any(Path(ROOT, arg.split("::")[0]).exists() for arg in python_args[2:]
                if not arg.startswith("-"))  # fmt: skip
    tests = [] if named else list(KERNEL_TESTS)
    return [sys.executable, str(Path(__file__).resolve()), "--vm", series, "--",
            str(python(series)), *python_args, *tests]  # fmt: skip


def main(argv: list[str]) -> int:
    """``python tests/_sid.py [--vm] SERIES -- COMMAND...``: run COMMAND in the sid root."""
    in_vm = argv[:1] == ["--vm"]
    argv = argv[1:] if in_vm else argv
    if len(argv) < 3 or argv[1] != "--" or not re.fullmatch(r"3\.\d+", argv[0]):
        print(main.__doc__, file=sys.stderr)
        return 2
    os.execvp("unshare", chroot_argv(argv[2:], argv[0], in_vm=in_vm))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
