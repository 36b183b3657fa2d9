"""Fixtures for tests that go through a real FUSE mount on a loop-mounted XFS SOURCE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.images import mounted_image
from tests.helpers.tree import Tree


@pytest.fixture
def workdir() -> Iterator[Path]:
    with mounted_image("xfs", "4G") as mnt:
        yield mnt


@pytest.fixture
def tree(workdir: Path) -> Iterator[Tree]:
    t = Tree(workdir)
    t.mount()
    try:
        yield t
    finally:
        t.unmount()


@pytest.fixture
def vms(tree: Tree) -> Path:
    return tree.vms
