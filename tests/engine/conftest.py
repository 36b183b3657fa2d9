"""Real filesystems for engine tests: XFS with reflink, ext4 without, each on a loop image."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.fakes.memory_engine import MemoryEngine
from tests.helpers.images import mounted_image
from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.engine.dmthin import DmThinEngine
from vmtreefs.engine.reflink import ReflinkEngine
from vmtreefs.engine.select import dmthin_available
from vmtreefs.store import Store


@pytest.fixture
def xfs_dir() -> Iterator[Path]:
    """A fresh 1 GiB XFS filesystem with reflink, unmounted and detached afterwards."""
    with mounted_image("xfs", "1G") as mnt:
        yield mnt


@pytest.fixture
def ext4_dir() -> Iterator[Path]:
    """A fresh 1 GiB ext4 filesystem (no reflink), unmounted and detached afterwards."""
    with mounted_image("ext4", "1G") as mnt:
        yield mnt


E = TypeVar("E", bound=SnapshotEngine)


def _started(engine: E) -> Iterator[E]:
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def reflink_inplace(xfs_dir: Path) -> Iterator[ReflinkEngine]:
    """A started reflink engine keeping its files directly on XFS."""
    source = xfs_dir / "source"
    source.mkdir()
    yield from _started(ReflinkEngine.initialise(source, "inplace"))


@pytest.fixture
def reflink_image(ext4_dir: Path) -> Iterator[ReflinkEngine]:
    """A started reflink engine on a 1 GiB XFS image inside an ext4 SOURCE."""
    yield from _started(ReflinkEngine.initialise(ext4_dir, "xfs-image", 1 << 30))


@pytest.fixture
def dmthin() -> Iterator[DmThinEngine]:
    """A started dm-thin engine on two sparse loop files, torn down and thin_check'ed after.

    Skipped where the kernel has no dm-thin: ``tests/dmthin`` runs these same tests
    inside a guest with a real dm-thin and fails if any of them is skipped there.
    """
    ok, why = dmthin_available()
    if not ok:
        pytest.skip(f"no dm-thin here ({why}); tests/dmthin runs this in a guest")
    top = Path(tempfile.mkdtemp(prefix="vmtree-dmthin-", dir="/tmp"))
    try:
        with Store.open(top / "vmtree.db") as store:
            engine = DmThinEngine.initialise(
                top, "loop-files", 256 << 20, secrets.token_hex(4), store
            )
            yield from _started(engine)
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def memory() -> Iterator[MemoryEngine]:
    """The in-memory test engine: held to this same contract so that the fast tests of the
    orchestrator (tests/unit/test_core.py) may stand on it."""
    yield from _started(MemoryEngine())


@pytest.fixture(params=["reflink_inplace", "reflink_image", "dmthin", "memory"])
def engine(request: pytest.FixtureRequest) -> SnapshotEngine:
    """Every engine under the contract tests; add new engines' fixtures to ``params``."""
    eng: SnapshotEngine = request.getfixturevalue(request.param)
    return eng
