"""The dm-thin engine against a real kernel's dm-thin: the engine contract tests and the
end-to-end story through a FUSE mount, run inside a guest (or natively where the host
kernel has dm-thin). Nothing may be skipped there: a skip would hide a missing kernel."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.guest import GuestRunner, run_pytest

DMTHIN_TESTS = [
    "tests/engine/test_reflink.py",
    "tests/engine/test_dmthin.py",
    "tests/fs/test_engines.py",
    "tests/fs/test_dmthin_mount.py",
    "tests/crash/test_kill_loop.py",
    "-k",
    "dmthin",
]


def test_dmthin_engine_in_a_real_kernel(guest: GuestRunner, shared_dir: Path) -> None:
    report = run_pytest(
        ["-q", "-rs", *DMTHIN_TESTS],
        results_dir=shared_dir,
        native=guest.native,
        timeout=3000,
        memory="3G",  # the guest's /tmp lives in its memory, and the tests fill pools
        log_path=guest.log_dir / "dmthin-contract.log",
    )
    out = report.result.script_output
    assert report.tests >= 40, out
    assert (report.failures, report.errors, report.skipped) == (0, 0, 0), out
    assert report.result.returncode == 0, out
