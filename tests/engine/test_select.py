"""Engine choice at init, the recorded config, and size parsing."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers.images import mounted_image
from vmtreefs.engine.base import EngineError
from vmtreefs.engine.reflink import ReflinkEngine
from vmtreefs.engine.select import (
    EngineConfig,
    choose_engine,
    dmthin_available,
    format_size,
    make_engine,
    parse_size,
    supports_reflink,
)
from vmtreefs.store import Store

GiB = 1 << 30


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A store to be the engines' ledger."""
    with Store.open(tmp_path / "vmtree.db") as opened:
        yield opened


@contextmanager
def expect_errno(code: int) -> Iterator[None]:
    """Expect an EngineError carrying ``code``; a different errno fails with the reason shown."""
    with pytest.raises(EngineError) as info:
        yield
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value}"


def test_supports_reflink(xfs_dir: Path, ext4_dir: Path) -> None:
    assert supports_reflink(xfs_dir)
    assert not supports_reflink(ext4_dir)
    assert [n for n in os.listdir(xfs_dir) if "probe" in n] == []
    assert [n for n in os.listdir(ext4_dir) if "probe" in n] == []


def test_supports_reflink_on_missing_directory(tmp_path: Path) -> None:
    with expect_errno(errno.ENOENT):
        supports_reflink(tmp_path / "absent")


DMTHIN_HERE = dmthin_available()[0]


@pytest.mark.skipif(DMTHIN_HERE, reason="auto picks dm-thin where the kernel has it")
def test_auto_on_xfs_is_inplace(xfs_dir: Path, store: Store) -> None:
    config, reason = choose_engine(xfs_dir, "auto", 20 * GiB)
    assert config == EngineConfig(engine="reflink", layout="inplace", image_size=None)
    assert reason.startswith(f"reflink in place: {xfs_dir} is on xfs, which supports FICLONE")
    assert "dm-thin" in reason
    config, reason = choose_engine(xfs_dir, "reflink", 20 * GiB)
    assert config.layout == "inplace"
    assert "dm-thin" not in reason
    engine = make_engine(xfs_dir, config, store)
    assert isinstance(engine, ReflinkEngine)
    assert engine.layout == "inplace"


@pytest.mark.skipif(DMTHIN_HERE, reason="auto picks dm-thin where the kernel has it")
def test_auto_on_ext4_is_an_xfs_image(ext4_dir: Path, store: Store) -> None:
    config, reason = choose_engine(ext4_dir, "auto", 20 * GiB)
    assert config == EngineConfig(engine="reflink", layout="xfs-image", image_size=20 * GiB)
    assert "ext4" in reason
    assert reason.startswith("reflink on a 20.0 GiB sparse XFS image:")
    assert "dm-thin is not usable" in reason
    engine = make_engine(ext4_dir, config, store)
    assert isinstance(engine, ReflinkEngine)
    assert (engine.layout, engine.image_size) == ("xfs-image", 20 * GiB)
    # Choosing changes nothing in SOURCE.
    assert sorted(os.listdir(ext4_dir)) == ["lost+found"]


@pytest.mark.skipif(DMTHIN_HERE, reason="auto picks dm-thin where the kernel has it")
def test_image_below_xfs_minimum_is_einval(ext4_dir: Path) -> None:
    with expect_errno(errno.EINVAL):
        choose_engine(ext4_dir, "auto", 100 << 20)


def test_bad_engine_name_is_einval(xfs_dir: Path) -> None:
    for name in ("zfs", "", "Reflink", "thin"):
        with expect_errno(errno.EINVAL):
            choose_engine(xfs_dir, name, GiB)


def test_missing_source_is_enoent(tmp_path: Path) -> None:
    with expect_errno(errno.ENOENT):
        choose_engine(tmp_path / "absent", "auto", GiB)


def test_dmthin_availability_says_why() -> None:
    ok, reason = dmthin_available()
    assert reason.startswith("device-mapper: ") or "is not installed" in reason
    assert ok == Path("/sys/module/dm_thin_pool").exists()


@pytest.mark.skipif(DMTHIN_HERE, reason="only where the kernel has no dm-thin")
def test_asking_for_dm_thin_without_it_is_enotsup(xfs_dir: Path) -> None:
    with expect_errno(errno.ENOTSUP):
        choose_engine(xfs_dir, "dm-thin", 20 * GiB)
    with expect_errno(errno.ENOTSUP):
        choose_engine(xfs_dir, "auto", 20 * GiB, "/dev/loop0", "/dev/loop1")
    with expect_errno(errno.EINVAL):
        choose_engine(xfs_dir, "auto", 20 * GiB, "/dev/loop0", None)


def test_make_engine_refuses_unknown_engines(tmp_path: Path, store: Store) -> None:
    with expect_errno(errno.EINVAL):
        make_engine(tmp_path, EngineConfig("zfs", "pool", GiB), store)
    with expect_errno(errno.EINVAL):
        make_engine(tmp_path, EngineConfig("dmthin", "loop-files", GiB, {"pool": "Bad Id"}), store)
    with expect_errno(errno.EINVAL):
        make_engine(tmp_path, EngineConfig("reflink", "zfs", None), store)


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig("reflink", "inplace", None),
        EngineConfig("reflink", "xfs-image", 20 * GiB),
    ],
)
def test_config_round_trips_through_json(config: EngineConfig) -> None:
    assert EngineConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        '{"engine": "reflink"}',
        '{"engine": 1, "layout": "inplace"}',
        '{"engine": "reflink", "layout": "xfs-image", "image_size": -5}',
        '{"engine": "reflink", "layout": "xfs-image", "image_size": "20G"}',
        '{"engine": "reflink", "layout": "xfs-image", "image_size": true}',
    ],
)
def test_damaged_config_is_einval(text: str) -> None:
    with expect_errno(errno.EINVAL):
        EngineConfig.from_json(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("1B", 1),
        ("1K", 1024),
        ("1KiB", 1024),
        ("512M", 512 << 20),
        ("512MiB", 512 << 20),
        ("20G", 20 * GiB),
        ("20g", 20 * GiB),
        ("20GiB", 20 * GiB),
        (" 20 G ", 20 * GiB),
        ("1.5G", 3 * GiB // 2),
        ("2T", 2 << 40),
        ("2TiB", 2 << 40),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "G", "0", "0G", "-1G", "20X", "20GB", "1e9", "1.5", "0.1K", "20 G B", "½G"]
)
def test_parse_size_refuses_garbage(text: str) -> None:
    with pytest.raises(EngineError) as info:
        parse_size(text)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (300 << 20, "300.0 MiB"),
        (20 * GiB, "20.0 GiB"),
        (3 << 40, "3.0 TiB"),
        (5 << 50, "5.0 PiB"),
        (5 << 60, "5120.0 PiB"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.skipif(DMTHIN_HERE, reason="auto picks dm-thin where the kernel has it")
def test_auto_on_btrfs_is_inplace() -> None:
    with mounted_image("btrfs", "1G") as mnt:
        config, reason = choose_engine(mnt, "auto", 20 * GiB)
        assert config.layout == "inplace"
        assert f"{mnt} is on btrfs" in reason
