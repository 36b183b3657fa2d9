"""The dm-log-writes replayer on a log written here in the kernel's format (the guest test
runs it on real logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.logwrites import (
    DISCARD,
    ENTRY,
    FLUSH,
    FUA,
    MAGIC,
    MARK,
    SUPER,
    LogError,
    Replay,
    flush_points,
    read_log,
)

SECTOR = 512


def write_log(path: Path, entries: list[tuple[int, int, int, bytes]]) -> None:
    """(sector, sectors, flags, data or mark text) in order, as dm-log-writes lays them out."""
    out = bytearray(SUPER.pack(MAGIC, 1, len(entries), SECTOR).ljust(SECTOR, b"\0"))
    for sector, sectors, flags, data in entries:
        inline = data if flags & MARK else b""
        out += (ENTRY.pack(sector, sectors, flags, len(data)) + inline).ljust(SECTOR, b"\0")
        if not flags & (MARK | DISCARD):
            assert len(data) == sectors * SECTOR
            out += data
    path.write_bytes(bytes(out))


LOG = [
    (0, 2, 0, b"a" * 1024),  # 0
    (4, 1, 0, b"b" * 512),  # 1
    (0, 0, FLUSH, b""),  # 2: a flush after two writes
    (0, 0, FLUSH, b""),  # 3: nothing new: the same disk as at 2
    (0, 0, MARK, b"op1"),  # 4
    (1, 1, FLUSH | FUA, b"c" * 512),  # 5: a flush with its own data
    (0, 2, DISCARD, b""),  # 6
    (0, 0, MARK, b"op2"),  # 7
    (0, 0, FLUSH, b""),  # 8
]


def test_entries_marks_and_points(tmp_path: Path) -> None:
    write_log(tmp_path / "log", LOG)
    sectorsize, entries = read_log(tmp_path / "log")
    assert sectorsize == SECTOR and len(entries) == len(LOG)
    assert [e.mark for e in entries if e.mark] == ["op1", "op2"]
    assert [e.index for e in entries if e.flushes] == [2, 3, 5, 8]
    points = [(e.index, marks) for e, marks in flush_points(entries, after_mark="op1")]
    assert points == [(5, ["op1"]), (8, ["op1", "op2"])]
    assert [e.index for e, _ in flush_points(entries, after_mark="")] == []  # no such mark


def test_replay_applies_writes_and_discards_in_order(tmp_path: Path) -> None:
    write_log(tmp_path / "log", LOG)
    replay = Replay(tmp_path / "log", tmp_path / "disk", 8 * SECTOR)
    try:
        replay.to(2)
        disk = (tmp_path / "disk").read_bytes()
        assert disk == b"a" * 1024 + bytes(1024) + b"b" * 512 + bytes(3 * 512)
        replay.to(5)
        assert (tmp_path / "disk").read_bytes()[512:1024] == b"c" * 512
        replay.to(8)
        disk = (tmp_path / "disk").read_bytes()
        assert disk[:1024] == bytes(1024) and disk[2048:2560] == b"b" * 512
        with pytest.raises(ValueError):
            replay.to(3)
    finally:
        replay.close()


def test_a_device_without_a_log_is_refused(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(bytes(4096))
    with pytest.raises(LogError, match="no dm-log-writes log"):
        read_log(tmp_path / "log")
    write_log(tmp_path / "log", LOG)
    data = (tmp_path / "log").read_bytes()
    (tmp_path / "log").write_bytes(data[: 3 * SECTOR])
    with pytest.raises(LogError, match="ends in entry"):
        read_log(tmp_path / "log")
