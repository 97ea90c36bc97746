"""The test command behind ``make test``: run the whole suite where it can run.

- If this kernel has AF_ALG and the ``tls`` ULP, everything runs natively, once.
- Otherwise the tests that need no kernel run on the host, and the ``kernel``-marked ones run
  inside a VM on each Debian kernel (``afalg vm``), with AFALG_REQUIRE_KERNEL=1 so that a kernel
  test that skips there fails instead.

Every pytest run prints its own summary; the last line adds them up, and the exit status is
non-zero if any run failed. Usage: ``python tests/run.py [--kernel 6.1] [PYTEST ARGS...]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ("6.1", "6.12")
VM_TIMEOUT = 40 * 60  # seconds for one kernel's whole run, so a hang fails fast


def counts(junit: Path) -> dict[str, int]:
    """passed/failed/skipped from a pytest JUnit XML file (all failed if there is none)."""
    if not junit.exists():
        return {"passed": 0, "failed": 1, "skipped": 0}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def pytest_argv(junit: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", f"--junitxml={junit}", *extra]


def run_host(marker: str | None, junit: Path, extra: list[str]) -> int:
    args = ["-m", marker] if marker else []
    return subprocess.run(pytest_argv(junit, args + extra), cwd=ROOT).returncode


def run_vm(kernel: str, junit: Path, extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "afalg", "vm", "--install", "--kernel", kernel,
           "--timeout", str(VM_TIMEOUT), "--env", "AFALG_IN_VM=1",
           "--env", "AFALG_REQUIRE_KERNEL=1", "--env", "PYTHONDONTWRITEBYTECODE=1",
           "--", *pytest_argv(junit, ["-m", "kernel", "-p", "no:cacheprovider", *extra])]
    return subprocess.run(cmd, cwd=ROOT).returncode


def kernel_is_capable() -> bool:
    from afalg.probe import probe

    caps = probe()
    return caps.af_alg and caps.ktls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", choices=KERNELS, help="VM kernel(s) only")
    parser.add_argument("--vm", action="store_true", help="use the VM even if the host could")
    args, extra = parser.parse_known_args()

    outdir = ROOT / ".vmtmp"
    outdir.mkdir(exist_ok=True)
    runs: list[tuple[str, int, Path, float]] = []

    def step(name: str, fn, *fargs) -> None:
        junit = outdir / f"junit-{name}.xml"
        junit.unlink(missing_ok=True)
        print(f"\n===== afalg tests: {name} =====", flush=True)
        start = time.monotonic()
        rc = fn(*fargs, junit, extra)
        runs.append((name, rc, junit, time.monotonic() - start))

    native = not args.vm and not args.kernel and kernel_is_capable()
    if native:
        step("native", run_host, None)
    else:
        from afalg import vm

        for kernel in args.kernel or KERNELS:  # before the host tests: they boot the VM too
            if vm.missing(kernel):
                print(f"afalg tests: installing the VM for kernel {kernel}", flush=True)
                vm.install(kernel)
        step("host", run_host, "not kernel")
        for kernel in args.kernel or KERNELS:
            step(f"kernel-{kernel}", run_vm, kernel)

    total = {"passed": 0, "failed": 0, "skipped": 0}
    print("\n===== afalg tests: summary =====")
    for name, rc, junit, seconds in runs:
        c = counts(junit)
        if rc not in (0, 5) and c["failed"] == 0:  # a crash or timeout with no failure recorded
            c["failed"] = 1
        for key in total:
            total[key] += c[key]
        print(f"{name}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped "
              f"in {seconds:.0f} s (exit {rc})")  # fmt: skip
    print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    # Under the VM every capability is there: a skip anywhere means a test did not run.
    crashed = any(rc not in (0, 5) for _, rc, _, _ in runs)
    bad = total["failed"] or (not native and total["skipped"]) or crashed or not total["passed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
