"""Parsing the thin-pool status line the kernel gives (field meanings in docs/engines.md)."""

from __future__ import annotations

import errno

import pytest

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin import PoolStatus
from vmtreefs.engine.dmthin.devices import parse_thin_status
from vmtreefs.engine.dmthin.metadata import parse_thin_ls


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


@pytest.mark.parametrize(
    "line",
    [
        "",
        "0 262144 thin 7",
        "0 262144 linear /dev/loop0 0",
        # Found by the fuzzer: int() of these raised ValueError, not EngineError.
        "0 \x17\x00\x00\x0044 thin-pool Fail",
        "0 262144 thin-pool 7 1042/10240/3 2048/2048 - rw",
        "0 262144 thin-pool 7 1042 2048/2048 - rw",
        "0 262144 thin-pool \u00b2 1042/10240 2048/2048 - rw",
    ],
)
def test_something_else_is_eio(line: str) -> None:
    with pytest.raises(EngineError) as refused:
        PoolStatus.parse(line)
    assert refused.value.errno == errno.EIO


def test_thin_device_status_and_thin_ls() -> None:
    assert parse_thin_status(["0 2097152 thin 2048 4095"], "t") == (2097152 * 512, 4096 * 512)
    assert parse_thin_status(["0 2097152 thin 0 -"], "t") == (2097152 * 512, 0)
    assert parse_thin_ls("1 65536 0\n2 131072 65536\n") == {1: (65536, 0), 2: (131072, 65536)}


@pytest.mark.parametrize("lines", [["0 2097152 thin 2048 40x5"], ["0 -1 thin 0 -"], ["0 1 thin"]])
def test_a_thin_device_status_with_bad_numbers_is_eio(lines: list[str]) -> None:
    with pytest.raises(EngineError) as refused:
        parse_thin_status(lines, "vmtree-t-1")
    assert refused.value.errno == errno.EIO


def test_a_thin_ls_line_with_bad_numbers_is_eio() -> None:
    # Found by the fuzzer: int() of the second field raised ValueError.
    with pytest.raises(EngineError) as refused:
        parse_thin_ls("0 26214655;36 0\n")
    assert refused.value.errno == errno.EIO
