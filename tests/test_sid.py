"""tests/_sid.py and its hooks in tests/run.py: Debian sid's Pythons, how their commands are
made (a private mount namespace, the binds, the VM's tmpfs), the kernel tests they run in the
VM, and setup.cfg naming every Python the suite runs under."""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

import _sid
import pytest
from test_harness import _runner

ROOT = Path(__file__).resolve().parent.parent


def test_each_kernel_test_named_exists() -> None:
    for entry in _sid.KERNEL_TESTS:
        path, _, name = entry.partition("::")
        source = (ROOT / path).read_text()
        assert not name or re.search(rf"^def {re.escape(name)}\(", source, re.M), entry


def test_the_vm_stage_runs_the_kernel_tests_in_the_root(tmp_path: Path) -> None:
    runner = _runner()
    stage = runner.sid_stage()
    assert (stage.kernel, stage.python, stage.name) == ("7.3", "3.15", "kernel-7.3-py3.15")
    junit = tmp_path / "junit.xml"
    argv = runner.vm_command(stage, 1, junit, [], None, 60)
    vm_part, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    assert vm_part[4:6] == ["--kernel", "7.3"]
    assert "crypto.af_alg_restrict=0" in vm_part and "AFALG_REQUIRE_KERNEL=1" in vm_part
    assert command[:5] == [sys.executable, str(ROOT / "tests/_sid.py"), "--vm", "3.15", "--"]
    assert command[5] == str(ROOT / ".venv-3.15/bin/python")
    assert command[6:9] == ["-m", "pytest", f"--junitxml={junit}"]
    assert command[-len(_sid.KERNEL_TESTS) :] == list(_sid.KERNEL_TESTS)
    # test paths given: those run instead
    named = runner.vm_command(stage, 1, junit, ["tests/test_tls_interop.py", "-x"], None, 60)
    assert named[-2:] == ["tests/test_tls_interop.py", "-x"]
    assert not set(_sid.KERNEL_TESTS) - {"tests/test_tls_interop.py"} & set(named)


@pytest.mark.parametrize("in_vm", [False, True], ids=["host", "vm"])
def test_commands_run_in_a_mount_namespace_of_their_own(
    in_vm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_FIND_LINKS", "/nowhere")
    argv = _sid.chroot_argv(["python3", "-c", "pass"], "3.14", in_vm=in_vm)
    assert argv[:5] == ["unshare", "--mount", "--propagation", "private", "--"]
    script = argv[argv.index("-ec") + 1]
    assert argv[-4:] == ["sh", "python3", "-c", "pass"]  # "$@" of the script
    mounts = re.findall(r"^mount (.*)$", script, re.M)
    binds = [f'--rbind {d} "$root"{d}' for d in ("/proc", "/sys", "/dev", str(ROOT))]
    tmpfs = [f'-t tmpfs tmpfs "$root"/{d}' for d in ("tmp", "run")]
    # in the VM, /var/cache is a tmpfs: the root is reached through a bind of / alone; its
    # /tmp gets a tmpfs before the checkout is bound (a checkout under /tmp stays visible)
    assert mounts == (['--bind / "$top"', *tmpfs, *binds] if in_vm else binds)
    assert f'mkdir -p "$root"{ROOT}' in script.splitlines()
    root = f'root="$top"{_sid.SID}' if in_vm else f"root={_sid.SID}"
    assert root in script.splitlines()
    last = script.splitlines()[-1]
    assert last.startswith('exec chroot "$root" /usr/bin/env -u ')
    assert " -u PIP_FIND_LINKS " in last  # the host's pip settings name paths the root lacks
    assert f"PATH={ROOT}/.venv-3.14/bin:" in last and f"cd {ROOT}" in last


def test_setup_needs_root_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sid.os, "geteuid", lambda: 1000)
    _sid.setup.cache_clear()
    try:
        assert "not root" in (_sid.setup("3.15") or "")
    finally:
        _sid.setup.cache_clear()


def test_setup_cfg_names_every_python_the_suite_runs_under() -> None:
    """python_requires starts at the oldest tested Python (the one running make test's .venv
    at the least), and the version classifiers are exactly the Pythons of the host stages."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    classifiers = cfg["metadata"]["classifiers"].split("\n")
    versions = {c.rsplit(" :: ", 1)[1] for c in classifiers if re.search(r":: 3\.\d+$", c)}
    oldest = cfg["options"]["python_requires"].removeprefix(">=")
    assert versions == {oldest, *_runner().PYTHONS}
    assert "Programming Language :: Python :: Implementation :: CPython" in classifiers
