"""Run a command under a Debian kernel booted with virtme-ng.

Hosts whose kernel lacks AF_ALG or kTLS (containers, sandboxes) can still use and test afalg: the
kernel is booted under QEMU over the host's own filesystem (read-only), with the current
directory writable, and the command's output and exit status come back unchanged.

What it needs, and where it comes from (:data:`REQUIREMENTS` and :data:`KERNELS`; ``afalg vm
--install`` installs all of it as root, ``afalg vm`` names what is missing):

==============================  ==============================================================
``qemu-system-x86_64``          Debian package ``qemu-system-x86`` (without recommends)
a static ``busybox``            Debian package ``busybox-static`` (virtme-ng's initramfs)
``modprobe``, ``depmod``        Debian package ``kmod`` (virtme-ng loads the guest's modules)
``systemd-udevd``               Debian package ``udev`` (the guest's /dev/virtio-ports links)
``file``                        Debian package ``file`` (virtme-ng reads the kernel's version)
``vng`` (virtme-ng)             PyPI package ``virtme-ng``, in the running Python's environment
``/boot/vmlinuz-6.1.*``         Debian package ``linux-image-amd64`` (bookworm: 6.1)
``/boot/vmlinuz-6.12.*``        Debian package ``linux-image-6.12-amd64``
``/usr/lib/modules/7.3.*/``     ``linux-{binary,modules,base}-7.3.*`` from Debian's
                                ``trixie-backports``, unpacked (not installed) there
==============================  ==============================================================

The 7.3 kernel comes from another Debian suite, so it is fetched with a private apt
configuration under ``/var/cache/afalg/apt`` (the system's apt sources are not touched) and
only unpacked: its image and modules go to ``/usr/lib/modules/VERSION/`` (``vmlinuz`` there, as
the package lays it out), ``depmod`` indexes them, and nothing goes under ``/boot``. The file
``/usr/lib/modules/VERSION/afalg-installed`` records the packages used. To remove it:
``rm -r /usr/lib/modules/7.3.*+deb13-amd64 /var/cache/afalg``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO

__all__ = [
    "KERNELS",
    "REQUIREMENTS",
    "Kernel",
    "Missing",
    "check_env_name",
    "find_busybox",
    "find_kernel",
    "install",
    "kernel_release",
    "missing",
    "run",
]


@dataclass(frozen=True)
class Kernel:
    """A kernel the project is tested on: where its image lies and what brings it.

    ``apt`` is a bookworm package (installed normally, image under /boot); ``backports`` a
    ``major.minor`` series taken, newest first, from Debian's trixie-backports and unpacked
    under /usr/lib/modules."""

    pattern: str
    apt: str | None = None
    backports: str | None = None

    @property
    def package(self) -> str:
        if self.apt:
            return self.apt
        return f"linux-binary-{self.backports}.*+deb13-amd64 from trixie-backports"


# Short names for the Debian kernels the project is tested on.
KERNELS: dict[str, Kernel] = {
    "6.1": Kernel("/boot/vmlinuz-6.1.*", apt="linux-image-amd64"),
    "6.12": Kernel("/boot/vmlinuz-6.12.*", apt="linux-image-6.12-amd64"),
    "7.3": Kernel("/usr/lib/modules/7.3.*/vmlinuz", backports="7.3"),
}
DEFAULT_KERNEL = "6.12"

BACKPORTS_SUITE = "trixie-backports"
APT_DIR = Path("/var/cache/afalg/apt")
MODULES = Path("/usr/lib/modules")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Missing:
    """One thing the VM needs that this host lacks, and how to get it."""

    what: str
    apt: str | None = None
    pip: str | None = None
    kernel: str | None = None  # a KERNELS name installed from trixie-backports

    def __str__(self) -> str:
        how = f"apt-get install --no-install-recommends {self.apt}" if self.apt else ""
        if self.pip:
            how = f"{shlex.quote(sys.executable)} -m pip install {self.pip}"
        if self.kernel:
            how = f"afalg vm --install --kernel {self.kernel} (as root)"
        if not how:
            return f"{self.what} (no known way to install it)"
        return f"{self.what} (get it with: {how})"


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for paths holding a kernel version: 7.3.10 after 7.3.4."""
    match = re.search(r"(\d+(?:\.\d+)+)", path)
    return tuple(int(n) for n in match.group(1).split(".")) if match else ()


def find_kernel(spec: str) -> Path | None:
    """The kernel image for a short name ("6.1", "6.12", "7.3") or a path; None if absent.

    Raises ValueError for a name that is neither, listing the known ones."""
    if spec in KERNELS:
        images = sorted(glob.glob(KERNELS[spec].pattern), key=_version_key)
        return Path(images[-1]) if images else None
    path = Path(spec)
    if path.is_file():
        return path
    if "/" not in spec:
        known = ", ".join(KERNELS)
        raise ValueError(f"unknown kernel {spec!r}: use one of {known} or a path to a vmlinuz")
    return None


def kernel_release(image: Path) -> str:
    """The release (``uname -r``) of a kernel image, read from its version string."""
    with open(image, "rb") as f:
        head = f.read(1 << 20)
    # x86 bzImage: the setup header points at "VERSION (builder) #..." (offset 0x20E, +0x200).
    if head[0x202:0x206] == b"HdrS":
        offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
        return head[offset : head.index(b" ", offset)].decode()
    if image.name == "vmlinuz" and image.parent.parent == MODULES:
        return image.parent.name
    name = image.name
    return name.split("-", 1)[1] if "-" in name else name


def find_busybox() -> str | None:
    """The busybox virtme-ng would put in its initramfs, if it is statically linked.

    virtme-ng takes the first of busybox-static, busybox.static, busybox on PATH (and in the
    system directories); a dynamically linked one cannot run in the initramfs."""
    dirs = [*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/bin", "/usr/bin", "/bin"]
    for name in ("busybox-static", "busybox.static", "busybox"):
        for d in dirs:
            path = os.path.join(d, name)
            if os.access(path, os.X_OK):
                return path if _is_static(path) else None
    return None


def _is_static(path: str) -> bool:
    """True if the ELF file at ``path`` has no program interpreter (no PT_INTERP)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # ELF, 64-bit
            return False
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (int.from_bytes(table[i : i + 4], "little") for i in range(0, len(table), phentsize))
    return 3 not in types  # PT_INTERP


def _vng() -> str | None:
    here = Path(sys.executable).parent / "vng"
    return str(here) if here.exists() else shutil.which("vng")


@dataclass(frozen=True)
class Requirement:
    """A program or file the VM runner uses on the host, how to find it, what installs it."""

    what: str
    found: str | None  # where it is, or None
    missing: Missing


def requirements() -> list[Requirement]:
    """Every program the VM runner needs on the host besides the kernel (see REQUIREMENTS)."""
    return [
        Requirement(what, find(), Missing(what, apt=apt, pip=pip))
        for what, find, apt, pip in REQUIREMENTS
    ]


def _udevd() -> str | None:
    return shutil.which("systemd-udevd", path=_UDEVD) or shutil.which("udevd")


_SBIN = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"
_UDEVD = "/usr/lib/systemd:/lib/systemd"

# What ``afalg vm`` runs on the host: (what, how to find it, Debian package, PyPI package).
# tests/test_harness.py traces a real boot and checks that every file it opens comes from one of
# these packages (or from what a fresh Debian 12 machine has). Without udevd the guest has no
# /dev/virtio-ports links and virtme-ng's init falls back to the console: no output, exit status
# 255 (linux-image-* pulls udev in; the unpacked 7.3 does not).
REQUIREMENTS = [
    ("qemu-system-x86_64", lambda: shutil.which("qemu-system-x86_64"), "qemu-system-x86", None),
    ("a statically linked busybox", find_busybox, "busybox-static", None),
    ("modprobe and depmod", lambda: shutil.which("depmod", path=_SBIN), "kmod", None),
    ("udevd", _udevd, "udev", None),
    (
        "file, which virtme-ng reads kernel versions with",
        lambda: shutil.which("file"),
        "file",
        None,
    ),
    ("virtme-ng (vng)", _vng, None, "virtme-ng"),
]


def missing(kernel: str = DEFAULT_KERNEL) -> list[Missing]:
    """What the VM for ``kernel`` still needs on this host (empty when ready)."""
    lacking = [req.missing for req in requirements() if req.found is None]
    if find_kernel(kernel) is None:
        spec = KERNELS.get(kernel)
        if spec is None:
            lacking.append(Missing(f"kernel image {kernel}"))
        elif spec.apt:
            lacking.append(Missing(f"kernel image {kernel}", apt=spec.apt))
        else:
            lacking.append(Missing(f"kernel image {kernel} ({spec.package})", kernel=kernel))
    return lacking


def install(kernel: str = DEFAULT_KERNEL) -> None:
    """Install what :func:`missing` names (apt needs root). Raises CalledProcessError."""
    lacking = missing(kernel)
    apt = [m.apt for m in lacking if m.apt]
    pip = [m.pip for m in lacking if m.pip]
    backports = [m.kernel for m in lacking if m.kernel]
    if any(m.apt is None and m.pip is None and m.kernel is None for m in lacking):
        raise FileNotFoundError(f"cannot install: {', '.join(m.what for m in lacking)}")
    if (apt or backports) and os.geteuid() != 0:
        raise PermissionError(f"installing {' '.join(apt + backports)} needs root")
    if apt:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", INITRD="No")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    if pip:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip], check=True)
    for name in backports:
        install_backports_kernel(KERNELS[name])


def _debian_mirror() -> str:
    """The Debian archive the system's apt uses (deb822 or one-line sources)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") or path.name == "sources.list":
            try:
                texts.append(path.read_text())
            except OSError:
                continue
    for uri in re.findall(r"(?:URIs:|^deb(?:\s+\[[^]]*\])?)\s+(\S+)", "\n".join(texts), re.M):
        if uri.rstrip("/").endswith("/debian"):
            return uri.rstrip("/")
    return "http://deb.debian.org/debian"


def _apt_options() -> list[str]:
    """apt-get options for the private configuration that reaches trixie-backports."""
    return [
        f"-oDir::Etc::SourceList={APT_DIR / 'sources.list'}",
        "-oDir::Etc::SourceParts=/dev/null",
        f"-oDir::State={APT_DIR / 'state'}",
        f"-oDir::State::status={APT_DIR / 'state' / 'status'}",
        f"-oDir::Cache={APT_DIR / 'cache'}",
        "-oAPT::Architecture=amd64",
        "-oAPT::Sandbox::User=root",
        "-qq",
    ]


def install_backports_kernel(spec: Kernel) -> Path:
    """Fetch the newest ``spec.backports`` kernel from trixie-backports and unpack it.

    The image and modules land in /usr/lib/modules/VERSION (nothing under /boot; the system's
    apt sources are untouched). Returns the image's path."""
    assert spec.backports
    (APT_DIR / "state" / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (APT_DIR / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (APT_DIR / "state" / "status").touch()
    (APT_DIR / "sources.list").write_text(
        f"deb [signed-by={KEYRING}] {_debian_mirror()} {BACKPORTS_SUITE} main\n"
    )
    opts = _apt_options()
    subprocess.run(["apt-get", *opts, "update"], check=True)
    names = subprocess.run(
        ["apt-cache", *opts, "pkgnames", f"linux-binary-{spec.backports}."],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    pattern = re.compile(rf"linux-binary-({re.escape(spec.backports)}\.\d+\+deb13-amd64)$")
    versions = sorted((m.group(1) for n in names if (m := pattern.match(n))), key=_version_key)
    if not versions:
        raise FileNotFoundError(f"no linux-binary-{spec.backports}.* in {BACKPORTS_SUITE}")
    release = versions[-1]
    packages = [f"linux-{part}-{release}" for part in ("binary", "modules", "base")]
    with tempfile.TemporaryDirectory(prefix="afalg-kernel-") as tmp:
        subprocess.run(["apt-get", *opts, "download", *packages], check=True, cwd=tmp)
        debs = sorted(Path(tmp).glob("*.deb"))
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), f"{tmp}/root"], check=True)
        target = MODULES / release
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(f"{tmp}/root/usr/lib/modules/{release}", target, symlinks=True)
        (target / "afalg-installed").write_text(
            "".join(f"{deb.name}\n" for deb in debs)
            + f"from {BACKPORTS_SUITE}; remove with: rm -r {target} {APT_DIR.parent}\n"
        )
    subprocess.run(["depmod", release], check=True)
    print(f"afalg vm: installed kernel {release} in {target}", file=sys.stderr)
    return target / "vmlinuz"


# A name the guest's shell takes as a variable name (POSIX "name"): the script exports it
# unquoted (quoting would make it a command word), so nothing else may reach it.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def check_env_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be exported by the guest's shell.

    That is letters, digits and underscores, not starting with a digit."""
    if not _ENV_NAME.fullmatch(name):
        raise ValueError(
            f"environment variable name {name!r} is not an identifier "
            "(letters, digits and _, not starting with a digit)"
        )


def command_line(
    argv: Sequence[str],
    kernel_image: Path,
    *,
    cwd: str,
    env: Mapping[str, str] | None = None,
    cpus: int = 2,
    memory: str = "2G",
    started: str | None = None,
    sysctls: Mapping[str, str] | None = None,
) -> list[str]:
    """The ``vng`` command line that runs ``argv`` in ``cwd`` (made writable) under the VM.

    The guest sets ``sysctls`` first (loading ``af_alg`` for ``crypto.af_alg_*``, whose file
    appears only then), then creates the file ``started`` (if given), then runs ``argv`` with
    ``env`` exported (values quoted). Raises ValueError for an ``env`` name that is not an
    identifier (:func:`check_env_name`), before anything else."""
    for name in env or {}:
        check_env_name(name)
    vng = _vng()
    if vng is None:
        raise FileNotFoundError("virtme-ng (vng) is not installed")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    script = f"cd {shlex.quote(cwd)} && exec env {exports} {shlex.join(argv)}"
    if started:
        script = f": > {shlex.quote(started)} && {script}"
    for key, value in reversed(list((sysctls or {}).items())):
        setting = shlex.quote(f"{key}={value}")
        script = f"sysctl -q -w {setting} && {script}"
        if key.startswith("crypto.af_alg"):
            script = f"modprobe -q af_alg; {script}"
    return [
        vng,
        "--run",
        str(kernel_image),
        "--user",
        "root",
        "--disable-kvm",
        "--cpus",
        str(cpus),
        "--memory",
        memory,
        "--rwdir",
        cwd,
        "--exec",
        script,
    ]


def run(
    argv: Sequence[str],
    *,
    kernel: str = DEFAULT_KERNEL,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cpus: int = 2,
    memory: str = "2G",
    sysctls: Mapping[str, str] | None = None,
) -> int:
    """Run ``argv`` under the kernel ``kernel``; return its exit status.

    Output is passed through unchanged; stdin is /dev/null (there is no terminal). ``env`` is
    exported inside the VM, with the running Python's ``bin`` first on PATH; ``sysctls`` (e.g.
    ``{"crypto.af_alg_restrict": "0"}``) are set before the command runs. On ``timeout``
    seconds the VM is killed and 124 returned, as timeout(1) does. The kernel's release goes
    to stderr first, so that a log says which kernel it came from.
    """
    image = find_kernel(kernel)
    if image is None:
        raise FileNotFoundError(f"no kernel image for {kernel!r}")
    print(f"afalg vm: booting {kernel_release(image)} ({image})", file=sys.stderr, flush=True)
    cwd = cwd or os.getcwd()
    bindir = str(Path(sys.executable).parent)
    guest_env = {"PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    guest_env.update(env or {})
    host_env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    # A loaded host occasionally loses a boot (vng exits 255 before the command ran): the guest
    # marks the start of the command in a file, and a lost boot is retried once.
    marker = Path(cwd, f".afalg-vm-started-{os.getpid()}-{os.urandom(4).hex()}")
    cmd = command_line(
        argv,
        image,
        cwd=cwd,
        env=guest_env,
        cpus=cpus,
        memory=memory,
        started=str(marker),
        sysctls=sysctls,
    )
    rc, booted = _run_vng(cmd, host_env, timeout, marker)
    if rc == 255 and not booted:
        print("afalg vm: the guest did not boot (vng exit 255); trying once more", file=sys.stderr)
        rc, booted = _run_vng(cmd, host_env, timeout, marker)
    return rc


def _run_vng(
    cmd: list[str], env: Mapping[str, str], timeout: float | None, marker: Path
) -> tuple[int, bool]:
    """Run vng; return its exit status and whether the guest got as far as the command."""
    try:
        return _wait(cmd, env, timeout), marker.exists()
    finally:
        marker.unlink(missing_ok=True)


def _wait(cmd: list[str], env: Mapping[str, str], timeout: float | None) -> int:
    # QEMU reopens /proc/self/fd/1 and 2 for the guest's output, truncating a regular file
    # there (``afalg vm ... > log`` would lose what came before, as NUL bytes): its output
    # goes through pipes, copied to ours.
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    copiers = [
        threading.Thread(
            target=_copy, args=(pipe, sys.stdout if pipe is proc.stdout else sys.stderr)
        )
        for pipe in (proc.stdout, proc.stderr)
    ]
    for copier in copiers:
        copier.start()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"afalg vm: timed out after {timeout:.0f} s", file=sys.stderr)
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        for copier in copiers:
            copier.join()


def _copy(pipe: IO[bytes], out: TextIO) -> None:
    """Copy ``pipe`` to ``out`` as it comes (line by line for a terminal) until EOF."""
    out.flush()
    fd = out.fileno()
    with pipe:
        while chunk := os.read(pipe.fileno(), 65536):
            with contextlib.suppress(BrokenPipeError):
                os.write(fd, chunk)
