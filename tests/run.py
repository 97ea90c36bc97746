"""The test command behind ``make test``: run the whole suite where it can run.

- If this kernel has AF_ALG and the ``tls`` ULP, everything runs natively, once.
- Otherwise the tests that need no kernel run on the host, and the ``kernel``-marked ones run
  inside a VM on each Debian kernel (``afalg vm``: 6.1, 6.12 and 7.3), with
  AFALG_REQUIRE_KERNEL=1 so that a kernel test that skips there fails instead. 7.3 runs twice:
  the whole kernel suite with ``crypto.af_alg_restrict=0``, and the ``restricted``-marked tests
  with the sysctl at its default (1, the allowlist). The ``kernel_independent`` tests (kernel
  tests of which nothing reaches AF_ALG or kTLS, so that their outcome cannot differ between
  kernels; conftest.py checks the claim) run under one kernel, ``ONCE_KERNEL``. All stages,
  host and VM, go two at a time (one vCPU per VM), longest first by the last whole run's
  times, their output printed whole as each finishes.

The host stage runs again under each other CPython at hand (pyenv's 3.12 and 3.13, in
``~/.pyenv/versions``; as root, Debian sid's 3.14 and 3.15 with its OpenSSL, in a chroot that
tests/_sid.py makes; those missing are named and left out), each from its own virtualenv
(``.venv-3.12``, made and installed here; lint, docs and packaging run once, in the first).
The kernel tests that depend on ssl or asyncio run under sid's 3.15 on 7.3 too
(``kernel-7.3-py3.15``). ``--kernel`` (a partial run) leaves them out unless ``--python`` names
them.

Every pytest run prints its own summary; the last line adds them up (strict xfails, known
kernel bugs, apart), and the exit status is non-zero if any run failed, if a stage collected
nothing (unless the run was narrowed: ``--select``, ``-k``, paths), if a test skipped (in the VM,
and natively as root, where AFALG_REQUIRE_KERNEL is set too), or if the run was partial (natively
as non-root). Then each stage's times and slowest tests (``--durations-report FILE``).

Usage: ``python tests/run.py [--kernel 6.1] [--scale full] [--select stress]
[--python 3.13] [--durations-report FILE] [PYTEST ARGS...]`` (``make stress`` and ``make fuzz``
are the last two).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import _sid

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("6.1", "6.12", "7.3")
# seconds for one kernel's whole run, so a hang fails: a run took 22 to 25 minutes at 629 tests
# (2026-12-06, beside other VMs), the old 25-minute bound with no margin under load
VM_TIMEOUT = 50 * 60
PARALLEL = 2  # VM runs at once: TCG is CPU-bound and pytest is one thread
# --scale full: per test (the longest, a kernel fuzz target or 10,000 RNG cycles, take about
# 1.5 to 2 hours under TCG) and per VM run (make stress K=7.3 runs for 3.5 to 4.5 hours)
FULL_TEST_TIMEOUT = 5 * 60 * 60
FULL_VM_TIMEOUT = 16 * 60 * 60
PASSED_ENV = ("AFALG_TEST_SCALE", "AFALG_FUZZ_EXAMPLES")  # exported into the VM when set
# The kernel that runs the kernel_independent tests too (the others run only the rest): 6.1,
# Debian 12's own kernel, the one whose userland the VM shares, and the shortest stage.
ONCE_KERNEL = "6.1"
INDEPENDENT = "kernel_independent"
PYTHONS = ("3.12", "3.13", *_sid.SERIES)  # host stages beside this one: pyenv's, Debian sid's
# Run under one Python only: lint, docs and packaging, and the VM's install (its own extra)
ONCE = (
    "tests/test_lint.py",
    "tests/test_docs.py",
    "tests/test_packaging.py",
    "tests/test_vm_install.py",
)


@dataclass(frozen=True)
class Stage:
    """One VM run of the kernel tests: a kernel, a marker expression, sysctls set first."""

    kernel: str
    marker: str = "kernel"
    sysctls: tuple[tuple[str, str], ...] = ()
    suffix: str = ""
    estimate: float = 0.0  # seconds, when no whole run has recorded this stage's (STAGE_SECONDS)
    ignore: tuple[str, ...] = ()  # test files left to the kernel's other part (SPLIT)
    paths: tuple[str, ...] = ()  # the test files of the kernel's second part (SPLIT), by name
    python: str | None = None  # Debian sid's (tests/_sid.py), on _sid.KERNEL_TESTS only

    @property
    def name(self) -> str:
        return f"kernel-{self.kernel}{self.suffix}"


def suite_files() -> tuple[str, ...]:
    """Every test file, relative to the checkout (``tests/test_x.py``)."""
    return tuple(sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")))


def stages(kernel: str, *, split: bool = True) -> list[Stage]:
    """The VM runs for one kernel: 7.3 (AF_ALG allowlisted by default) runs twice. Only
    ``ONCE_KERNEL`` runs the ``kernel_independent`` tests; the allowlist run has none (each
    ``restricted`` test is about AF_ALG). A kernel in ``SPLIT`` runs its kernel tests in two VM
    runs, by test file: the files SPLIT names, and all the others (new files included), unless
    ``split`` is False (a narrowed run: its test paths would run in both parts). The second
    part names its files rather than ignoring the others: the VM's command goes through the
    guest kernel's command line, which a list of every other file overflows (the guest then
    sat idle until the timeout)."""
    whole = "kernel" if kernel == ONCE_KERNEL else f"kernel and not {INDEPENDENT}"
    estimate = ESTIMATES["kernel"] + (ESTIMATES[INDEPENDENT] if kernel == ONCE_KERNEL else 0)
    sysctls = (("crypto.af_alg_restrict", "0"),) if kernel == "7.3" else ()
    if split and kernel in SPLIT:
        second = tuple(path for path in SPLIT[kernel] if path in suite_files())
        runs = [
            Stage(kernel, whole, sysctls, estimate=estimate * (1 - SPLIT_SHARE), ignore=second),
            Stage(kernel, whole, sysctls, "-2", estimate=estimate * SPLIT_SHARE, paths=second),
        ]
    else:
        runs = [Stage(kernel, whole, sysctls, estimate=estimate)]
    if kernel == "7.3":
        runs.append(Stage(kernel, "kernel and restricted", suffix="-restricted",
                          estimate=ESTIMATES["restricted"]))  # fmt: skip
    return runs


def sid_label(stage: Stage) -> str:
    """``, Python 3.15.2, OpenSSL 3.6.5 ...`` for a stage under sid's Python, else empty."""
    if not stage.python:
        return ""
    return ", " + python_label(_sid.python(stage.python), _sid.host_wrap(stage.python))


def _sid_kernel(stage: Stage) -> Callable[[Run], str | None]:
    """The ``prepare`` of a kernel stage under sid's Python: its root and virtualenv, then the
    label that names them."""
    assert stage.python

    def prepare(run: Run) -> str | None:
        why = _sid.setup(stage.python)
        if why:
            return f"{stage.name} is not run: {why}"
        run.name = run.name.removesuffix(")") + sid_label(stage) + ")"
        return None

    return prepare


def sid_stage() -> Stage:
    """The ssl- and asyncio-dependent kernel tests under sid's newest Python, on 7.3."""
    newest = _sid.SERIES[-1]
    return Stage("7.3", sysctls=(("crypto.af_alg_restrict", "0"),), suffix=f"-py{newest}",
                 python=newest, estimate=ESTIMATES["sid-kernel"])  # fmt: skip


def counts(junit: Path) -> dict[str, int]:
    """passed/failed/skipped/xfailed from a pytest JUnit XML file (all failed if there is none).

    Strict xfails (known bugs, each with its reason) are counted apart from real skips."""
    if not junit.exists():
        return {"passed": 0, "failed": 1, "skipped": 0, "xfailed": 0}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    xfailed = sum(1 for s in suite.iter("skipped") if s.get("type") == "pytest.xfail")
    return {"passed": total - failed - skipped, "failed": failed,
            "skipped": skipped - xfailed, "xfailed": xfailed}  # fmt: skip


# --- verdicts: what makes a run fail -----------------------------------------------------------

NOTHING_COLLECTED = 5  # pytest's exit status when no test was selected


def narrowed(select: str | None, extra: list[str]) -> bool:
    """Whether the run was narrowed (``--select``, ``-k``, or test paths given): then one stage
    may select nothing (``--select stress`` has no stress test in the 7.3 allowlist run), and
    only the run as a whole must have run a test. ``make test`` narrows nothing."""
    paths = [arg for arg in extra if not arg.startswith("-")]
    return bool(select) or bool(paths) or any(arg.startswith("-k") for arg in extra)


def stage_failure(rc: int, c: dict[str, int], *, may_be_empty: bool) -> str | None:
    """Why one stage failed (None if it did not): a test failed, pytest itself failed (a crash,
    a timeout, bad usage), or nothing was collected in a stage not declared possibly empty."""
    if c["failed"]:
        return f"{c['failed']} failed"
    if rc == NOTHING_COLLECTED:
        return None if may_be_empty else "no test collected (exit 5)"
    if rc != 0:
        return f"pytest exited {rc} with no failure recorded"
    return None


def native_privilege(euid: int) -> tuple[dict[str, str], str | None]:
    """The environment and the caveat of a native run (no VM), by the user running it.

    As root everything can run: AFALG_REQUIRE_KERNEL turns a kernel test's skip into a failure,
    as in the VM, and any other skip fails the run too. As another user the network-namespace
    tests (conformance, interop, netns) and whatever needs CAP_NET_ADMIN skip: the run is
    partial, says so, and fails, so that ``make test`` never reports it as the whole suite."""
    if euid == 0:
        return {"AFALG_REQUIRE_KERNEL": "1"}, None
    return {}, (
        "partial run: not root, so the network-namespace, conformance and interop tests skip; "
        "run `make test` as root (or in the VM: tests/run.py --vm) for the whole suite"
    )


def pytest_argv(junit: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", f"--junitxml={junit}", *extra]


def host_command(marker: str | None, junit: Path, extra: list[str]) -> list[str]:
    return pytest_argv(junit, (["-m", marker] if marker else []) + extra)


def selected(marker: str, select: str | None) -> str:
    """``marker`` narrowed to the tests ``--select`` names (e.g. stress)."""
    return f"({marker}) and ({select})" if select else marker


def vm_command(
    stage: Stage, cpus: int, junit: Path, extra: list[str], select: str | None, timeout: int
) -> list[str]:
    sysctls = [arg for key, value in stage.sysctls for arg in ("--sysctl", f"{key}={value}")]
    passed = [f"{k}={os.environ[k]}" for k in PASSED_ENV if k in os.environ]
    marker = selected(stage.marker, select)
    ignored = [f"--ignore={path}" for path in stage.ignore]
    command = pytest_argv(
        junit, ["-m", marker, "-p", "no:cacheprovider", *ignored, *extra, *stage.paths]
    )
    if stage.python:
        command = _sid.vm_argv(stage.python, command[1:])
    return [
        sys.executable, "-m", "afalg", "vm", "--kernel", stage.kernel, "--cpus", str(cpus),
        "--timeout", str(timeout), *sysctls,
        "--env", "AFALG_IN_VM=1", "--env", "AFALG_REQUIRE_KERNEL=1",
        "--env", "PYTHONDONTWRITEBYTECODE=1", *(arg for kv in passed for arg in ("--env", kv)),
        "--", *command,
    ]  # fmt: skip


@dataclass
class Run:
    """One pytest run: its command, and once finished its exit status and duration."""

    name: str
    argv: list[str]
    junit: Path
    log: Path | None = None  # output goes here (then printed) when runs overlap
    env: dict[str, str] = field(default_factory=dict)  # set on top of this process's
    may_be_empty: bool = False  # exit 5 (nothing collected) is no failure here
    estimate: float = 0.0  # seconds it should take (the scheduler starts the longest first)
    # What the run needs first (a virtualenv, sid's root), made in the background while other
    # runs go; it may rename the run (its Python's version) and returns why the run cannot go
    prepare: Callable[[Run], str | None] | None = None
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    seconds: float = 0.0
    rc: int = -1

    def start(self) -> None:
        self.junit.unlink(missing_ok=True)
        out = open(self.log, "wb") if self.log else None  # noqa: SIM115 - closed in wait()
        if not out:
            print(f"\n===== afalg tests: {self.name} =====", flush=True)
        self.started = time.monotonic()
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=out, env=env)
        if out:
            out.close()

    def wait(self) -> None:
        assert self.proc is not None
        self.rc = self.proc.wait()
        self.seconds = time.monotonic() - self.started
        if self.log:
            print(f"\n===== afalg tests: {self.name} =====", flush=True)
            sys.stdout.buffer.write(self.log.read_bytes())
            sys.stdout.flush()


def python_label(python: str | Path, wrap: Callable[[list[str]], list[str]] = list) -> str:
    """``Python 3.12.1, OpenSSL 3.0.19 27 Jan 2026``: what ``python`` runs (through ``wrap``,
    e.g. into the sid root), asked of it."""
    code = "import platform as p, ssl; print(f'Python {p.python_version()},', ssl.OPENSSL_VERSION)"
    argv = wrap([str(python), "-c", code])
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()


def pyenv_python(series: str) -> Path | None:
    """pyenv's newest CPython of ``series`` (``3.12``: ``~/.pyenv/versions/3.12.N``), or None."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = [
        path for path in root.glob(f"{series}.*")
        if re.fullmatch(rf"{re.escape(series)}\.\d+", path.name) and (path / "bin/python3").exists()
    ]  # fmt: skip
    if not found:
        return None
    newest = max(found, key=lambda path: int(path.name.rsplit(".", 1)[1]))
    return newest / "bin/python3"


def python_venv(series: str, base: Path) -> Path:
    """The python of ``.venv-<series>``, made from ``base`` and given afalg (editable, with its
    test extra) when missing or older than the package's metadata."""
    venv = ROOT / f".venv-{series}"
    stamp = venv / ".installed"
    newest = max((ROOT / name).stat().st_mtime for name in ("setup.cfg", "pyproject.toml"))
    if not stamp.exists() or stamp.stat().st_mtime < newest:
        print(f"afalg tests: installing {venv.name} ({base})", flush=True)
        subprocess.run([str(base), "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
        stamp.touch()
    return venv / "bin/python"


def python_runs(
    series: list[str], select: str | None, outdir: Path, extra: list[str], may_be_empty: bool
) -> list[Run]:
    """The host stage under each of ``series``: pyenv's, or Debian sid's in its root
    (tests/_sid.py); a missing pyenv Python named. Each run's virtualenv (and sid's root) is
    made by its ``prepare``, in the background, while the kernel stages run."""
    runs = []
    for name in series:
        base = None
        if name not in _sid.SERIES and (base := pyenv_python(name)) is None:
            print(f"afalg tests: no CPython {name} in pyenv: its host stage is not run", flush=True)
            continue
        junit = outdir / f"junit-host-{name}.xml"
        runs.append(Run(f"host-{name}", [], junit, log=outdir / f"host-{name}.log",
                        may_be_empty=may_be_empty, estimate=ESTIMATES["host-other"],
                        prepare=_host_python(name, base, select, extra)))  # fmt: skip
    return runs


def _host_python(
    name: str, base: Path | None, select: str | None, extra: list[str]
) -> Callable[[Run], str | None]:
    """The ``prepare`` of the host stage under ``name``: its virtualenv (from pyenv's ``base``),
    or sid's root and virtualenv; then the run's command and label."""

    def prepare(run: Run) -> str | None:
        wrap: Callable[[list[str]], list[str]] = list
        if base is None:
            why = _sid.setup(name)
            if why:
                return f"Debian sid's CPython {name}: its host stage is not run: {why}"
            python, wrap = _sid.python(name), _sid.host_wrap(name)
        else:
            python = python_venv(name, base)
        ignored = [f"--ignore={path}" for path in ONCE]
        run.argv = wrap([str(python), "-m", "pytest", f"--junitxml={run.junit}",
                         "-m", selected("not kernel", select), *ignored, *extra])  # fmt: skip
        run.name = f"host-{name} ({python_label(python, wrap)})"
        return None

    return prepare


def release(kernel: str) -> str:
    """The release the VM boots for a kernel name (``uname -r`` there)."""
    from afalg import _vm as vm

    image = vm.find_kernel(kernel)
    return vm.kernel_release(image) if image else "not installed"


def kernel_is_capable() -> bool:
    from afalg.probe import probe

    caps = probe()
    return caps.af_alg and caps.ktls


# --- where the time goes ------------------------------------------------------------------------

SLOWEST = 15  # tests listed per stage


def test_times(junit: Path) -> list[tuple[str, float]]:
    """Each test of a JUnit XML file with its time in seconds (setup, call and teardown: a
    module fixture's setup counts for the module's first test), slowest first."""
    if not junit.exists():
        return []
    times = [
        (f"{case.get('classname', '')}::{case.get('name', '')}", float(case.get("time") or 0))
        for case in ET.parse(junit).getroot().iter("testcase")
    ]
    return sorted(times, key=lambda item: -item[1])


def durations_report(runs: list[Run]) -> str:
    """Markdown: each stage's wall time, its tests' summed time and count, and its
    ``SLOWEST`` slowest tests (the JUnit XML files stay in .vmtmp for more)."""
    lines = ["# afalg tests: where the time goes", ""]
    lines += ["| stage | wall s | tests s | tests | JUnit XML |", "|---|---:|---:|---:|---|"]
    per_stage = [(run, test_times(run.junit)) for run in runs]
    for run, times in per_stage:
        summed = sum(t for _, t in times)
        row = [run.name, f"{run.seconds:.0f}", f"{summed:.0f}", str(len(times)), run.junit.name]
        lines.append(f"| {' | '.join(row)} |")
    for run, times in per_stage:
        lines += ["", f"## {run.name}: the {SLOWEST} slowest tests", ""]
        lines += [f"- {seconds:8.1f} s  {name}" for name, seconds in times[:SLOWEST]]
    return "\n".join(lines) + "\n"


# --- scheduling: every stage shares PARALLEL slots, the longest first ---------------------------

# Seconds per stage (wall, VM boot included) when no whole run has recorded its own yet (a
# clean clone, as in CI): a kernel stage without the kernel_independent tests, what those add,
# the 7.3 allowlist run, the host stage (lint, docs and packaging included), the host stage
# under another Python, and the ssl- and asyncio-dependent kernel tests under sid's Python.
# From the quiet 2-core run at 368841b (docs/guides/testing.md, "Budget").
ESTIMATES = {"kernel": 950.0, INDEPENDENT: 10.0, "restricted": 90.0, "host": 115.0,
             "host-other": 80.0, "sid-kernel": 380.0}  # fmt: skip
# A kernel whose kernel tests run as two VM runs (the files named here, and the rest), so that
# three kernel stages of about the same length do not leave one slot idle while the other runs
# two of them end to end; SPLIT_SHARE: the named files' share of the kernel's time.
# 7.3, the longest; the files: the hostile load, aio, the guides' shell blocks, adversarial TLS
# and skcipher (an estimate from test counts and the known slow tests: docs/guides/testing.md).
SPLIT: dict[str, tuple[str, ...]] = {
    "7.3": (
        "tests/test_adversarial_tls.py", "tests/test_aio.py", "tests/test_alg_skcipher.py",
        "tests/test_docs.py", "tests/test_hostile_load.py",
    ),
}  # fmt: skip
SPLIT_SHARE = 0.5
STAGE_SECONDS = "stage-seconds.json"  # in .vmtmp: each stage's wall time in the last whole run


def recorded_seconds(outdir: Path) -> dict[str, float]:
    """Each stage's wall time in the last whole run, by JUnit file stem (none if unreadable)."""
    try:
        data = json.loads((outdir / STAGE_SECONDS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}


def record_seconds(outdir: Path, runs: list[Run]) -> None:
    """Keep each finished stage's wall time for the next run's order (a whole run's only: a
    narrowed one's stages are shorter than they will be)."""
    data = {**recorded_seconds(outdir), **{run.junit.stem: round(run.seconds, 1) for run in runs}}
    (outdir / STAGE_SECONDS).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def longest_first(runs: list[Run], recorded: dict[str, float]) -> list[Run]:
    """``runs`` in the order to start them: the longest expected first (the last whole run's
    wall time where recorded, else the run's estimate). Greedy longest-first on ``PARALLEL``
    slots: the long kernel stages start at once, the short ones fill the gaps they leave."""
    for run in runs:
        run.estimate = recorded.get(run.junit.stem, run.estimate)
    return sorted(runs, key=lambda run: -run.estimate)


def run_all(runs: list[Run]) -> list[Run]:
    """``runs`` ``PARALLEL`` at a time, in their order (:func:`longest_first`), and those that
    ran. The ``prepare`` steps go one after another in a background thread, in the same order,
    while the runs that need none start: a run starts when it is first in line among the
    prepared ones, and one whose step says why it cannot go is named and left out."""
    pool = ThreadPoolExecutor(max_workers=1)
    prepared = {id(r): pool.submit(r.prepare, r) for r in runs if r.prepare}
    pool.shutdown(wait=False)
    pending, active, ran = list(runs), [], []
    while pending or active:
        ready = [r for r in pending if id(r) not in prepared or prepared[id(r)].done()]
        while ready and len(active) < PARALLEL:
            run = ready.pop(0)
            pending.remove(run)
            try:
                why = prepared[id(run)].result() if id(run) in prepared else None
            except Exception as exc:  # a failed install (or a bug in it) fails its stage
                print(f"afalg tests: {run.name}: preparing it failed: {exc}", flush=True)
                run.junit.unlink(missing_ok=True)  # so that it counts as failed
                ran.append(run)
                continue
            if why:
                print(f"afalg tests: {why}", flush=True)
                continue
            run.start()
            active.append(run)
            ran.append(run)
        done = next((r for r in active if r.proc and r.proc.poll() is not None), None)
        if done is None:
            time.sleep(0.5)
            continue
        active.remove(done)
        done.wait()
    return [run for run in runs if any(run is r for r in ran)]


def summarize(runs: list[Run], *, skips_fail: bool, caveat: str | None) -> int:
    """Print each run's counts and the totals; the exit status of the whole test command.

    It fails if a stage failed (:func:`stage_failure`), if nothing passed at all, if
    ``skips_fail`` (the VM, or a native run as root) and a test skipped, or if ``caveat`` says
    the run was partial. Strict xfails (known bugs, SECURITY.md) are counted apart."""
    total = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    failures = []
    print("\n===== afalg tests: summary =====")
    for run in runs:
        c = counts(run.junit)
        why = stage_failure(run.rc, c, may_be_empty=run.may_be_empty)
        if why:
            failures.append(f"{run.name}: {why}")
            c["failed"] = max(c["failed"], 1)
        for key in total:
            total[key] += c[key]
        print(f"{run.name}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped, "
              f"{c['xfailed']} xfailed in {run.seconds:.0f} s (exit {run.rc})")  # fmt: skip
    print("total: " + ", ".join(f"{total[key]} {key}" for key in total))
    if skips_fail and total["skipped"]:
        failures.append(f"{total['skipped']} skipped: every capability is here, so none may")
    if not total["passed"]:
        failures.append("no test passed")
    if caveat:
        failures.append(caveat)
    for failure in failures:
        print(f"afalg tests: FAILED: {failure}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="VM kernel(s) only")
    parser.add_argument("--vm", action="store_true", help="use the VM even if the host could")
    parser.add_argument(
        "--scale", choices=("smoke", "full"), default=None,
        help="size of the load, soak and fuzz tests (AFALG_TEST_SCALE; smoke by default)",
    )  # fmt: skip
    parser.add_argument("--select", metavar="EXPR", help="only tests matching this marker expr")
    parser.add_argument(
        "--python", action="append", choices=PYTHONS,
        help="host stage under this pyenv CPython too (default: all, unless --kernel)",
    )  # fmt: skip
    parser.add_argument(
        "--durations-report",
        metavar="FILE",
        type=Path,
        help="also write the per-stage times and slowest tests here (always: .vmtmp/durations.md)",
    )
    args, extra = parser.parse_known_args()
    may_be_empty = narrowed(args.select, extra)
    timeout = VM_TIMEOUT
    if args.scale:
        os.environ["AFALG_TEST_SCALE"] = args.scale
    if args.scale == "full":
        timeout = FULL_VM_TIMEOUT
        extra = [f"--timeout={FULL_TEST_TIMEOUT}", *extra]

    outdir = ROOT / ".vmtmp"
    outdir.mkdir(exist_ok=True)

    def junit(name: str) -> Path:
        return outdir / f"junit-{name}.xml"

    native = not args.vm and not args.kernel and kernel_is_capable()
    caveat = None
    if native:
        env, caveat = native_privilege(os.geteuid())
        native_run = host_command(args.select, junit("native"), extra)
        runs = [Run("native", native_run, junit("native"), env=env, may_be_empty=may_be_empty)]
        if caveat:
            print(f"afalg tests: {caveat}", flush=True)
    else:
        from afalg import _vm as vm

        kernels = args.kernel or list(KERNELS)
        for kernel in kernels:  # before the host tests: they boot the VM too
            if vm.missing(kernel):
                print(f"afalg tests: installing the VM for kernel {kernel}", flush=True)
                vm.install(kernel)
        host_run = host_command(selected("not kernel", args.select), junit("host"), extra)
        host = Run(
            f"host ({python_label(sys.executable)})", host_run, junit("host"),
            log=outdir / "host.log", may_be_empty=may_be_empty, estimate=ESTIMATES["host"],
        )  # fmt: skip
        todo = [stage for k in kernels for stage in stages(k, split=not may_be_empty)]
        pythons = args.python or ([] if args.kernel else list(PYTHONS))
        python_stages = python_runs(pythons, args.select, outdir, extra, may_be_empty)
        newest = sid_stage()
        if newest.kernel in kernels and newest.python in pythons:
            todo.append(newest)
        cpus = 1 if len(todo) > 1 else 2
        runs = [host] + [
            Run(f"{s.name} ({release(s.kernel)})",
                vm_command(s, cpus, junit(s.name), extra, args.select, timeout),
                junit(s.name), log=outdir / f"{s.name}.log", may_be_empty=may_be_empty,
                estimate=s.estimate, prepare=_sid_kernel(s) if s.python else None)
            for s in todo
        ]  # fmt: skip
        runs[1:1] = python_stages
    whole = not may_be_empty and not args.kernel and not args.python and args.scale != "full"
    order = longest_first(runs, recorded_seconds(outdir))
    print("afalg tests: " + ", ".join(f"{r.name} ~{r.estimate:.0f} s" for r in order), flush=True)
    ran = {id(run) for run in run_all(order)}
    runs = [run for run in runs if id(run) in ran]
    if whole:
        record_seconds(outdir, [run for run in runs if run.proc is not None])  # not a failed set-up
    # Under the VM, and natively as root, every capability is there: a skip means a test did
    # not run.
    status = summarize(runs, skips_fail=not native or caveat is None, caveat=caveat)
    report = durations_report(runs)
    print(report)
    for path in {outdir / "durations.md", args.durations_report} - {None}:
        assert path is not None
        path.write_text(report)
    return status


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
