"""``make powercut-test``: the power-cut test at every flush point, each engine in a guest.

``python -m tests.crash.powercut_guests`` runs ``tests/crash/test_power_cut.py`` once per
engine, the two guests side by side (each keeps about one CPU busy under TCG), and
prints each run's counts: log entries, flushes, points, points checked, and any
point that was not clean. ``VMTREE_POWERCUT_POINTS`` (default ``all``) and
``VMTREE_CRASH_SEED`` go into the guests; ``VMTREE_POWERCUT_ENGINES`` picks the engines
(``reflink,dmthin``). Logs go to ``VMTREE_GUEST_LOG_DIR`` (/tmp/vmtree-guest-logs).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.helpers.guest import LOG_DIR, PytestReport, run_pytest

TIMEOUT = 4 * 3600.0


def run_engine(engine: str, env: dict[str, str]) -> tuple[PytestReport | BaseException, Path]:
    shared = Path(tempfile.mkdtemp(prefix=f"vmtree-powercut-{engine}-", dir="/tmp"))
    os.chmod(shared, 0o755)
    log = LOG_DIR / f"powercut-{engine}.log"
    try:
        report: PytestReport | BaseException = run_pytest(
            ["-q", "-s", "tests/crash/test_power_cut.py", "-k", engine],
            results_dir=shared,
            timeout=TIMEOUT,
            memory="3G",
            log_path=log,
            env=env,
        )
    except BaseException as e:
        report = e
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return report, log


def main() -> int:
    engines = os.environ.get("VMTREE_POWERCUT_ENGINES", "reflink,dmthin").split(",")
    env = {"VMTREE_POWERCUT_POINTS": os.environ.get("VMTREE_POWERCUT_POINTS", "all")}
    if "VMTREE_CRASH_SEED" in os.environ:
        env["VMTREE_CRASH_SEED"] = os.environ["VMTREE_CRASH_SEED"]
    started = time.monotonic()
    outcomes: dict[str, tuple[PytestReport | BaseException, Path]] = {}

    def run(engine: str) -> None:
        outcomes[engine] = run_engine(engine, env)

    threads = [threading.Thread(target=run, args=(e,), name=e) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failed = False
    for engine in engines:
        report, log = outcomes[engine]
        print(f"== {engine} (log {log})")
        if isinstance(report, BaseException):
            print(f"   the guest run failed: {report!r}")
            failed = True
            continue
        for line in report.result.script_output.splitlines():
            if line.startswith("power cut on") and not line.endswith(": clean"):
                print("   " + line)
        clean = report.result.script_output.count(": clean\n")
        print(f"   {clean} points clean; pytest: {report.tests} tests, {report.failures} failed")
        failed = failed or not report.ok
    print(f"{time.monotonic() - started:.0f} s in all")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
