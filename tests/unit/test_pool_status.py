"""Parsing the thin-pool status line the kernel gives (field meanings in docs/engines.md)."""

from __future__ import annotations

import errno

import pytest

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin import PoolStatus


def test_a_working_pool() -> None:
    line = "0 262144 thin-pool 7 1042/10240 2048/2048 - out_of_data_space discard_passdown "
    line += "error_if_no_space - 1024"
    assert PoolStatus.parse(line) == PoolStatus(
        262144, 7, 1042, 10240, 2048, 2048, "out_of_data_space"
    )


def test_a_failed_pool() -> None:
    assert PoolStatus.parse("0 262144 thin-pool Fail").mode == "Fail"
    # What the kernel gives once it cannot even read the failed pool's status.
    assert PoolStatus.parse("0 524288 thin-pool Error").mode == "Fail"


def test_a_pool_that_needs_a_check() -> None:
    line = "0 262144 thin-pool 7 1042/10240 20/2048 - ro discard_passdown "
    line += "error_if_no_space needs_check 1024"
    status = PoolStatus.parse(line)
    assert (status.mode, status.needs_check) == ("ro", True)


@pytest.mark.parametrize("line", ["", "0 262144 thin 7", "0 262144 linear /dev/loop0 0"])
def test_something_else_is_eio(line: str) -> None:
    with pytest.raises(EngineError) as refused:
        PoolStatus.parse(line)
    assert refused.value.errno == errno.EIO
