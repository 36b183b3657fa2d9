"""Real filesystems for engine tests: XFS with reflink, ext4 without, each on a loop image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.images import mounted_image
from vmtreefs.engine.base import SnapshotEngine
from vmtreefs.engine.reflink import ReflinkEngine


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


def _started(engine: ReflinkEngine) -> Iterator[ReflinkEngine]:
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


@pytest.fixture(params=["reflink_inplace", "reflink_image"])
def engine(request: pytest.FixtureRequest) -> SnapshotEngine:
    """Every engine under the contract tests; add new engines' fixtures to ``params``."""
    eng: SnapshotEngine = request.getfixturevalue(request.param)
    return eng
