"""dm-thin tests: each runs a shell script in a virtme-ng guest, or natively where it can.

Where the scripts run:

- the host kernel has dm-thin (``/sys/module/dm_thin_pool``, or ``modprobe -n
  dm-thin-pool`` succeeds): natively, as root, on this machine;
- otherwise: in a guest booted from Debian's kernel (``tests/helpers/guest.py``),
  which ``scripts/guest-deps.sh`` installs; a missing kernel or vng fails the
  test with that hint rather than skipping it;
- already inside a virtme-ng guest: skipped (guests do not nest here).

``VMTREE_GUEST_MODE=guest`` or ``=native`` overrides the choice.
Select or leave out these tests with ``-m guest`` / ``-m 'not guest'``.

The longest of them, the engine contract run in a guest (about 20 minutes under
TCG), starts as soon as the session's tests are collected and runs alongside
the host's tests: each side keeps about one of this machine's two CPUs busy.
Its test is moved to the end of the session and collects the result there.
``VMTREE_GUEST_EARLY=0`` runs it in its turn instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.guest import (
    GuestRunner,
    GuestUnavailable,
    PytestReport,
    bootable_kernel,
    in_guest,
    native_dmthin,
    run_pytest,
    stop_all_guests,
    vng_path,
)

CONTRACT_TEST = "test_dmthin_engine_in_a_real_kernel"
DMTHIN_TESTS = [
    "tests/engine/test_reflink.py",
    "tests/engine/test_dmthin.py",
    "tests/engine/test_change_ranges.py",
    "tests/fs/test_engines.py",
    "tests/fs/test_change_maps.py",
    "tests/fs/test_dmthin_mount.py",
    "tests/fs/test_dmthin_import.py",
    "tests/fs/test_dmthin_ioerrors.py",
    "tests/crash/test_kill_loop.py",
    "tests/crash/test_power_cut.py",
    "-k",
    "dmthin or power_cut",
]
CONTRACT_LOG = "dmthin-contract.log"
PASSED_ENV = ("VMTREE_POWERCUT_POINTS", "VMTREE_CRASH_SEED")
"""Knobs of the tests in the guest that a host's environment sets (the guest gets none)."""


def run_contract(shared_dir: Path, native: bool, log_path: Path) -> PytestReport:
    """The dm-thin engine's tests, run by pytest where dm-thin works."""
    return run_pytest(
        ["-q", "-rs", "--durations=15", *DMTHIN_TESTS],
        results_dir=shared_dir,
        native=native,
        timeout=3000,
        memory="3G",  # the guest's /tmp lives in its memory, and the tests fill pools
        log_path=log_path,
        env={name: os.environ[name] for name in PASSED_ENV if name in os.environ},
    )


class EarlyContract:
    """The contract run, started in a thread before its turn."""

    def __init__(self, native: bool) -> None:
        self.native = native
        self.shared_dir = Path(tempfile.mkdtemp(prefix="vmtree-guest-rw-", dir="/tmp"))
        os.chmod(self.shared_dir, 0o755)
        self.log_path = self.shared_dir / CONTRACT_LOG
        self._outcome: list[PytestReport | BaseException] = []
        self._thread = threading.Thread(target=self._run, name="dmthin-contract", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome.append(run_contract(self.shared_dir, self.native, self.log_path))
        except BaseException as e:
            self._outcome.append(e)

    def result(self, log_dir: Path) -> PytestReport:
        """Wait for the run; its console log is copied into ``log_dir``."""
        self._thread.join()
        with_log = log_dir / CONTRACT_LOG
        if self.log_path.exists():
            shutil.copyfile(self.log_path, with_log)
        outcome = self._outcome[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self) -> None:
        stop_all_guests()
        self._thread.join(timeout=60)
        shutil.rmtree(self.shared_dir, ignore_errors=True)


_early: list[EarlyContract] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "guest: runs a script in a virtme-ng guest with Debian's kernel (or natively "
        "where the host kernel has dm-thin); about 15-60 s each under TCG",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory is a guest test; the contract run goes last when it
    runs early (it only waits for its result there)."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.guest)
    if _early_wanted(items):
        items.sort(key=lambda item: item.name == CONTRACT_TEST)


def _early_wanted(items: list[pytest.Item]) -> bool:
    if os.environ.get("VMTREE_GUEST_EARLY", "1") == "0" or in_guest():
        return False
    return len(items) > 1 and any(item.name == CONTRACT_TEST for item in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if not _early_wanted(session.items):
        return
    try:
        native = _mode_without_skip() == "native"
    except GuestUnavailable:
        return  # the test fails in its turn, with the hint
    _early.append(EarlyContract(native))


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _early:
        _early.pop().close()


def _mode_without_skip() -> str:
    forced = os.environ.get("VMTREE_GUEST_MODE", "")
    if forced in ("guest", "native"):
        return forced
    if native_dmthin():
        return "native"
    vng_path()
    bootable_kernel()
    return "guest"


def _mode() -> str:
    forced = os.environ.get("VMTREE_GUEST_MODE", "")
    if forced in ("guest", "native"):
        return forced
    if in_guest():
        pytest.skip("already inside a virtme-ng guest: guests do not nest")
    return "native" if native_dmthin() else "guest"


@pytest.fixture(scope="session")
def guest_mode() -> str:
    """'native' or 'guest': where the dm-thin scripts of this session run."""
    mode = _mode()
    if mode == "guest":
        try:
            vng_path()
            bootable_kernel()
        except GuestUnavailable as e:
            pytest.fail(str(e), pytrace=False)
    return mode


@pytest.fixture
def guest(guest_mode: str, tmp_path: Path) -> GuestRunner:
    """Run a script where dm-thin works; the console logs land in the test's tmp_path."""
    return GuestRunner(native=guest_mode == "native", log_dir=tmp_path)


@pytest.fixture
def dmthin_contract(guest: GuestRunner, shared_dir: Path) -> PytestReport:
    """The contract run's report: from the early run when there is one, else run now."""
    if _early:
        return _early[0].result(guest.log_dir)
    return run_contract(shared_dir, guest.native, guest.log_dir / CONTRACT_LOG)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A host directory the guest may write (an --rwdir): 0755 under /tmp, removed after."""
    path = Path(tempfile.mkdtemp(prefix="vmtree-guest-rw-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
