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
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.guest import (
    GuestRunner,
    GuestUnavailable,
    bootable_kernel,
    in_guest,
    native_dmthin,
    vng_path,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "guest: runs a script in a virtme-ng guest with Debian's kernel (or natively "
        "where the host kernel has dm-thin); about 15-60 s each under TCG",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this directory is a guest test."""
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.guest)


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
def shared_dir() -> Iterator[Path]:
    """A host directory the guest may write (an --rwdir): 0755 under /tmp, removed after."""
    path = Path(tempfile.mkdtemp(prefix="vmtree-guest-rw-", dir="/tmp"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
