"""Run a command under a Debian kernel booted with virtme-ng.

Hosts whose kernel lacks AF_ALG or kTLS (containers, sandboxes) can still use and test afalg: the
kernel is booted under QEMU over the host's own filesystem (read-only), with the current
directory writable, and the command's output and exit status come back unchanged.

What it needs, and where it comes from:

==========================  ==========================================================
``qemu-system-x86_64``      Debian package ``qemu-system-x86`` (without recommends)
``vng`` (virtme-ng)         PyPI package ``virtme-ng``, in the running Python's environment
``/boot/vmlinuz-6.1.*``     Debian package ``linux-image-amd64`` (bookworm: 6.1)
``/boot/vmlinuz-6.12.*``    Debian package ``linux-image-6.12-amd64``
==========================  ==========================================================
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["KERNELS", "Missing", "find_kernel", "install", "missing", "run"]

# Short names for the Debian kernels the project is tested on, and the package that brings each.
KERNELS: dict[str, tuple[str, str]] = {
    "6.1": ("/boot/vmlinuz-6.1.*", "linux-image-amd64"),
    "6.12": ("/boot/vmlinuz-6.12.*", "linux-image-6.12-amd64"),
}
DEFAULT_KERNEL = "6.12"


@dataclass(frozen=True)
class Missing:
    """One thing the VM needs that this host lacks, and how to get it."""

    what: str
    apt: str | None = None
    pip: str | None = None

    def __str__(self) -> str:
        how = f"apt-get install --no-install-recommends {self.apt}" if self.apt else ""
        if self.pip:
            how = f"{shlex.quote(sys.executable)} -m pip install {self.pip}"
        return f"{self.what} (get it with: {how})"


def find_kernel(spec: str) -> Path | None:
    """The kernel image for a short name ("6.1", "6.12") or a path; None if absent."""
    if spec in KERNELS:
        images = sorted(glob.glob(KERNELS[spec][0]))
        return Path(images[-1]) if images else None
    path = Path(spec)
    return path if path.is_file() else None


def _vng() -> str | None:
    here = Path(sys.executable).parent / "vng"
    return str(here) if here.exists() else shutil.which("vng")


def missing(kernel: str = DEFAULT_KERNEL) -> list[Missing]:
    """What the VM for ``kernel`` still needs on this host (empty when ready)."""
    lacking = []
    if not shutil.which("qemu-system-x86_64"):
        lacking.append(Missing("qemu-system-x86_64", apt="qemu-system-x86"))
    if not _vng():
        lacking.append(Missing("virtme-ng (vng)", pip="virtme-ng"))
    if find_kernel(kernel) is None:
        package = KERNELS[kernel][1] if kernel in KERNELS else None
        lacking.append(Missing(f"kernel image {kernel}", apt=package))
    return lacking


def install(kernel: str = DEFAULT_KERNEL) -> None:
    """Install what :func:`missing` names (apt needs root). Raises CalledProcessError."""
    lacking = missing(kernel)
    apt = [m.apt for m in lacking if m.apt]
    pip = [m.pip for m in lacking if m.pip]
    if any(m.apt is None and m.pip is None for m in lacking):
        raise FileNotFoundError(f"cannot install: {', '.join(m.what for m in lacking)}")
    if apt:
        if os.geteuid() != 0:
            raise PermissionError(f"installing {' '.join(apt)} needs root")
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


def command_line(
    argv: Sequence[str],
    kernel_image: Path,
    *,
    cwd: str,
    env: Mapping[str, str] | None = None,
    cpus: int = 2,
    memory: str = "2G",
    started: str | None = None,
) -> list[str]:
    """The ``vng`` command line that runs ``argv`` in ``cwd`` (made writable) under the VM.
    The guest creates the file ``started`` (if given) before it runs ``argv``."""
    vng = _vng()
    if vng is None:
        raise FileNotFoundError("virtme-ng (vng) is not installed")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    script = f"cd {shlex.quote(cwd)} && exec env {exports} {shlex.join(argv)}"
    if started:
        script = f": > {shlex.quote(started)} && {script}"
    return [
        vng, "--run", str(kernel_image), "--user", "root", "--disable-kvm",
        "--cpus", str(cpus), "--memory", memory, "--rwdir", cwd, "--exec", script,
    ]  # fmt: skip


def run(
    argv: Sequence[str],
    *,
    kernel: str = DEFAULT_KERNEL,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cpus: int = 2,
    memory: str = "2G",
) -> int:
    """Run ``argv`` under the kernel ``kernel``; return its exit status.

    Output is passed through unchanged; stdin is /dev/null (there is no terminal). ``env`` is
    exported inside the VM, with the running Python's ``bin`` first on PATH. On ``timeout``
    seconds the VM is killed and 124 returned, as timeout(1) does.
    """
    image = find_kernel(kernel)
    if image is None:
        raise FileNotFoundError(f"no kernel image for {kernel!r}")
    cwd = cwd or os.getcwd()
    bindir = str(Path(sys.executable).parent)
    guest_env = {"PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    guest_env.update(env or {})
    host_env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    # A loaded host occasionally loses a boot (vng exits 255 before the command ran): the guest
    # marks the start of the command in a file, and a lost boot is retried once.
    marker = Path(cwd, f".afalg-vm-started-{os.getpid()}-{os.urandom(4).hex()}")
    cmd = command_line(
        argv, image, cwd=cwd, env=guest_env, cpus=cpus, memory=memory, started=str(marker)
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
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
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
