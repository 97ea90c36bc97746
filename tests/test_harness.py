"""The test harness itself: the VM runner and the guarantee that kernel tests saw a kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The VM runner's boot, output, exit status and install list: tests/test_vm_install.py.


@pytest.mark.kernel
def test_running_under_a_kernel_with_af_alg_and_ktls() -> None:
    """Under AFALG_REQUIRE_KERNEL (the test command's VM runs) this must pass, never skip."""
    from afalg.probe import probe

    caps = probe()
    if not os.environ.get("AFALG_REQUIRE_KERNEL") and not caps.af_alg:
        pytest.skip(f"this kernel lacks AF_ALG: {caps.af_alg_reason}")
    assert caps.af_alg, caps.af_alg_reason
    assert all(caps.alg_types.values()), caps.alg_types
    assert caps.tls_ulp, caps.tls_ulp_reason
    for version in ("TLSv1.2", "TLSv1.3"):
        assert {"AES_GCM_128", "AES_GCM_256", "CHACHA20_POLY1305"} <= set(
            caps.ktls_ciphers[version]
        ), caps.ktls_ciphers


@pytest.mark.kernel
def test_afalg_info_cli_reports_the_kernel() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "afalg", "info"], capture_output=True, text=True, check=False
    )
    if not os.environ.get("AFALG_REQUIRE_KERNEL") and result.returncode:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    assert f"kernel: {os.uname().release}" in result.stdout
    assert "AF_ALG: yes" in result.stdout
    assert "tls ULP: yes" in result.stdout
    from afalg.ktls import supports_rekey

    expected = "yes" if supports_rekey() else "no"
    assert f"kTLS rekey (KeyUpdate): {expected}" in result.stdout


def test_afalg_info_without_af_alg_says_why_and_fails() -> None:
    from afalg.probe import probe

    if probe().af_alg:
        pytest.skip("this kernel has AF_ALG: the failure path cannot be shown here")
    result = subprocess.run(
        [sys.executable, "-m", "afalg", "info"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "AF_ALG is not usable here" in result.stderr


def test_probe_is_the_package_api() -> None:
    import afalg

    caps = afalg.probe()
    assert isinstance(caps, afalg.Capabilities)
    assert caps.kernel_release == os.uname().release
    assert caps.af_alg == bool(caps.alg_types)
    assert caps.ktls == (caps.tls_ulp and any(caps.ktls_ciphers.values()))


def test_missing_tls_ulp_reason_names_the_capability() -> None:
    """The kernel loads the tls module on demand only for CAP_NET_ADMIN: an unprivileged
    process is told to modprobe it; a privileged one gets the plain reason."""
    code = "from afalg.ktls import missing_ulp_reason; print(missing_ulp_reason())"
    if os.path.exists("/sys/module/tls"):
        pytest.skip("the tls module is loaded here: the reason is about something else")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    dropped = subprocess.run(
        ["setpriv", "--bounding-set=-all", "--inh-caps=-all", sys.executable, "-c", code],
        capture_output=True,
        text=True,
    )
    assert dropped.returncode == 0, dropped.stderr
    assert "CAP_NET_ADMIN" in dropped.stdout and "modprobe tls" in dropped.stdout
    if os.geteuid() == 0:
        assert "modprobe" not in plain.stdout and "CONFIG_TLS" in plain.stdout


# --- tests/run.py: what makes `make test` fail -------------------------------------------------


def _runner():
    """tests/run.py as a module (it is a script, not a package module)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("run.py")
    spec = importlib.util.spec_from_file_location("afalg_tests_run", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _pytest_stage(runner, tmp_path, source: str, name: str = "stage", **kwargs):
    """Run pytest on one test file made of ``source``, the way run.py runs a stage."""
    test = tmp_path / f"test_{name}.py"
    test.write_text(source)
    junit = tmp_path / f"junit-{name}.xml"
    argv = runner.pytest_argv(junit, ["-p", "no:cacheprovider", "-q", str(test)])
    run = runner.Run(name, argv, junit, log=tmp_path / f"{name}.log", **kwargs)
    run.start()
    run.wait()
    return run


def test_a_stage_that_collects_nothing_fails_unless_declared_possibly_empty(tmp_path, capsys):
    """pytest's exit status 5 (nothing collected) used to pass a stage: a stage whose marker or
    path selects nothing would have been green. Only a narrowed run (--select) may have one."""
    runner = _runner()
    passing = _pytest_stage(runner, tmp_path, "def test_ok():\n    pass\n", "passing")
    empty = _pytest_stage(runner, tmp_path, "X = 1\n", "empty")
    assert (passing.rc, empty.rc) == (0, runner.NOTHING_COLLECTED)
    assert runner.stage_failure(empty.rc, runner.counts(empty.junit), may_be_empty=False)
    assert runner.summarize([passing, empty], skips_fail=True, caveat=None) == 1
    assert "empty: no test collected (exit 5)" in capsys.readouterr().out
    empty.may_be_empty = True
    assert runner.summarize([passing, empty], skips_fail=True, caveat=None) == 0
    assert runner.summarize([empty], skips_fail=True, caveat=None) == 1  # nothing ran at all


def test_possibly_empty_only_when_the_run_is_narrowed() -> None:
    runner = _runner()
    assert not runner.narrowed(None, [])
    assert not runner.narrowed(None, ["-x", "--timeout=60"])
    assert runner.narrowed("stress", [])
    assert runner.narrowed(None, ["tests/test_alg_aead.py"])
    assert runner.narrowed(None, ["-k", "gcm"])


def test_native_runs_are_held_to_the_vm_rule(tmp_path, capsys) -> None:
    """As root a native run requires the kernel (a kernel test's skip fails, as in the VM) and
    any skip fails the run; as another user the run says it is partial and fails."""
    runner = _runner()
    env, caveat = runner.native_privilege(0)
    assert env == {"AFALG_REQUIRE_KERNEL": "1"} and caveat is None
    env, caveat = runner.native_privilege(1000)
    assert not env and caveat and "partial" in caveat
    skipping = "import pytest\ndef test_ok():\n    pass\ndef test_skip():\n    pytest.skip('x')\n"
    run = _pytest_stage(runner, tmp_path, skipping, "skips")
    assert run.rc == 0 and runner.counts(run.junit)["skipped"] == 1
    assert runner.summarize([run], skips_fail=True, caveat=None) == 1
    assert runner.summarize([run], skips_fail=False, caveat=None) == 0
    passing = _pytest_stage(runner, tmp_path, "def test_ok():\n    pass\n", "passing")
    assert runner.summarize([passing], skips_fail=False, caveat=caveat) == 1
    assert f"FAILED: {caveat}" in capsys.readouterr().out


def test_a_native_root_run_sets_afalg_require_kernel(tmp_path) -> None:
    """The environment native_privilege gives reaches pytest: a kernel test that skips fails."""
    import shutil
    from pathlib import Path

    runner = _runner()
    tests = Path(__file__).parent
    # The skip must be judged by this suite's conftest.py (the AFALG_REQUIRE_KERNEL rule).
    probe_dir = tmp_path / "suite"
    probe_dir.mkdir()
    for name in ("conftest.py", "_env.py"):
        shutil.copy(tests / name, probe_dir / name)
    env, _ = runner.native_privilege(0)
    source = "import pytest\n@pytest.mark.kernel\ndef test_k():\n    pytest.skip('no kernel')\n"
    run = _pytest_stage(runner, probe_dir, source, "kernel", env=env)
    assert (run.rc, runner.counts(run.junit)["failed"]) == (1, 1)


def test_xfails_are_counted_and_the_slowest_tests_reported(tmp_path, capsys) -> None:
    runner = _runner()
    source = (
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "@pytest.mark.xfail(strict=True, reason='known')\n"
        "def test_known_bug():\n    assert False\n"
    )
    run = _pytest_stage(runner, tmp_path, source, "xfail")
    run.seconds = 3.0
    assert runner.counts(run.junit) == {"passed": 1, "failed": 0, "skipped": 0, "xfailed": 1}
    assert runner.summarize([run], skips_fail=True, caveat=None) == 0
    assert "total: 1 passed, 0 failed, 0 skipped, 1 xfailed" in capsys.readouterr().out
    times = runner.test_times(run.junit)
    assert sorted(name.rsplit("::", 1)[1] for name, _ in times) == ["test_known_bug", "test_ok"]
    report = runner.durations_report([run])
    assert "| xfail | 3 |" in report and "the 15 slowest tests" in report
    assert "test_known_bug" in report and "junit-xfail.xml" in report


def test_a_wrong_kernel_independent_marker_fails(tmp_path) -> None:
    """conftest.py fails a ``kernel_independent`` test that opens an AF_ALG socket (even one the
    kernel refuses, as here on a host without AF_ALG), sets the tls ULP, or has a module fixture
    that does; an honest one, and an unmarked one that opens AF_ALG, pass."""
    import shutil
    from pathlib import Path

    runner = _runner()
    tests = Path(__file__).parent
    suite = tmp_path / "suite"
    suite.mkdir()
    for name in ("conftest.py", "_env.py"):
        shutil.copy(tests / name, suite / name)
    source = (
        "import contextlib, socket, pytest\n"
        "once = pytest.mark.kernel_independent\n"
        "def alg():\n"
        "    with contextlib.suppress(OSError):\n"
        "        socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET).close()\n"
        "@pytest.fixture(scope='module')\n"
        "def shared():\n"
        "    alg()\n"
        "@once\ndef test_alg():\n    alg()\n"
        "@once\ndef test_ulp():\n"
        "    with socket.socket() as s, contextlib.suppress(OSError):\n"
        "        s.setsockopt(socket.SOL_TCP, 31, b'tls')\n"
        "@once\ndef test_module_fixture(shared):\n    pass\n"
        "@once\ndef test_honest():\n"
        "    with socket.socket() as s:\n"
        "        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "def test_unmarked():\n    alg()\n"
    )
    run = _pytest_stage(runner, suite, source, "marked")
    assert runner.counts(run.junit)["failed"] == 3, run.log.read_text()
    log = run.log.read_text()
    for name in ("test_alg", "test_ulp", "test_module_fixture"):
        assert f"ERROR at teardown of {name}" in log, log
    assert "reached the kernel (socket(AF_ALG))" in log
    assert "reached the kernel (setsockopt(6, 31))" in log
    assert "ERROR at teardown of test_honest" not in log
    assert "ERROR at teardown of test_unmarked" not in log
    assert "3 errors" in log, log  # each call passed: its teardown fails it


def test_kernel_independent_tests_run_under_one_kernel() -> None:
    """ONCE_KERNEL's stage selects every kernel test; the others' leave the kernel_independent
    ones out, and the 7.3 allowlist run keeps its own selection."""
    runner = _runner()
    markers = {s.name: s.marker for k in runner.KERNELS for s in runner.stages(k)}
    once = f"kernel-{runner.ONCE_KERNEL}"
    assert markers.pop(once) == "kernel"
    assert markers.pop("kernel-7.3-restricted") == "kernel and restricted"
    assert markers and set(markers.values()) == {"kernel and not kernel_independent"}


def test_stages_start_longest_first(tmp_path) -> None:
    """The scheduler's order: the last whole run's wall time where recorded, else the estimate."""
    runner = _runner()

    def run(name: str, estimate: float):
        return runner.Run(name, ["true"], tmp_path / f"junit-{name}.xml", estimate=estimate)

    runs = [run("host", 170), run("kernel-6.1", 1300), run("kernel-6.12", 900), run("py", 110)]
    assert [r.name for r in runner.longest_first(runs, {})] == [
        "kernel-6.1", "kernel-6.12", "host", "py"
    ]  # fmt: skip
    for r, seconds in zip(runs, (40, 500, 1000, 200), strict=True):
        r.seconds = seconds
    runner.record_seconds(tmp_path, runs[1:])  # host not recorded: its estimate stays
    recorded = runner.recorded_seconds(tmp_path)
    assert recorded == {"junit-kernel-6.1": 500, "junit-kernel-6.12": 1000, "junit-py": 200}
    order = [r.name for r in runner.longest_first(runs, recorded)]
    assert order == ["kernel-6.12", "kernel-6.1", "py", "host"]


def test_a_split_kernel_runs_every_test_file_once(monkeypatch) -> None:
    """A kernel in SPLIT runs as two VM stages: the first ignores the files SPLIT names, the
    second names them, so each file (a new one too) runs in exactly one; the second part's
    command stays short (it goes through the guest kernel's command line)."""
    runner = _runner()
    monkeypatch.setattr(runner, "SPLIT", {"6.12": ("tests/test_aio.py", "tests/test_docs.py")})
    first, second = runner.stages("6.12")
    assert (first.name, second.name) == ("kernel-6.12", "kernel-6.12-2")
    files = set(runner.suite_files())
    assert "tests/test_harness.py" in files and len(files) > 10
    assert set(first.ignore) == set(second.paths) == {"tests/test_aio.py", "tests/test_docs.py"}
    assert not first.paths and not second.ignore
    argv = runner.vm_command(second, 1, Path("junit.xml"), [], None, 60)
    assert argv[-2:] == ["tests/test_aio.py", "tests/test_docs.py"]
    assert not any(arg.startswith("--ignore") for arg in argv)
    assert len(" ".join(argv)) < 1000
    argv = runner.vm_command(first, 1, Path("junit.xml"), [], None, 60)
    assert "--ignore=tests/test_aio.py" in argv and "tests/test_harness.py" not in argv
    assert [s.name for s in runner.stages("6.12", split=False)] == ["kernel-6.12"]


def test_prepared_runs_start_once_ready_and_a_failed_install_fails(tmp_path, capsys) -> None:
    """A run's ``prepare`` (a virtualenv, sid's root) goes in the background while the runs
    that need none start; it renames the run, or says why it cannot go (the run is named and
    left out), or fails (the run counts as failed)."""
    import subprocess

    runner = _runner()
    order: list[str] = []

    def stage(name: str, prepare=None):
        return runner.Run(name, ["true"], tmp_path / f"junit-{name}.xml",
                          log=tmp_path / f"{name}.log", prepare=prepare)  # fmt: skip

    def ready(run):
        order.append(run.name)
        run.name += " (Python 9.9)"

    def missing(run):
        order.append(run.name)
        return "no CPython 9.8"

    def broken(run):
        order.append(run.name)
        raise subprocess.CalledProcessError(1, ["pip"])

    runs = [stage("kernel"), stage("py", ready), stage("gone", missing), stage("bad", broken)]
    ran = runner.run_all(runs)
    assert order == ["py", "gone", "bad"]  # one after another, in the runs' order
    assert [r.name for r in ran] == ["kernel", "py (Python 9.9)", "bad"]
    assert [r.rc for r in ran[:2]] == [0, 0] and ran[2].proc is None
    out = capsys.readouterr().out
    assert "afalg tests: no CPython 9.8" in out and "bad: preparing it failed" in out
    assert runner.counts(ran[2].junit)["failed"] == 1
