"""dm-thin specific engine tests: crash windows, foreign pools, the ledger, the pool watcher.

Skipped where the kernel has no dm-thin; ``tests/dmthin`` runs them inside a guest
with a real dm-thin and fails if any is skipped there. A "crash" is the engine
call stopped dead at a chosen point (a BaseException, so no cleanup of ours
runs), then a new engine on the same store and pool, as a remount after kill -9
would make; the kernel's pool state is real throughout.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.engine.test_reflink import expect_errno, read, write
from vmtreefs.engine.base import EngineError, NewVolume
from vmtreefs.engine.dmthin import PENDING, TRANSACTION, DmThinEngine
from vmtreefs.engine.select import dmthin_available
from vmtreefs.store import Store

MiB = 1 << 20
POOL_SIZE = 128 * MiB


class Crash(BaseException):
    """The daemon dying at this point: nothing after it runs, no except clause catches it."""


class Rig:
    """A pool on loop files with its store; ``restart`` abandons the engine as a crash would."""

    def __init__(self) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="vmtree-dmthin-", dir="/tmp"))
        self.store = Store.open(self.top / "vmtree.db")
        self.pool_id = secrets.token_hex(4)
        self.engine = DmThinEngine.initialise(
            self.top, "loop-files", POOL_SIZE, self.pool_id, self.store
        )
        self.engine.start()

    def fresh_engine(self) -> DmThinEngine:
        return DmThinEngine(self.top, "loop-files", POOL_SIZE, self.pool_id, self.store)

    def restart(self) -> DmThinEngine:
        """A new engine on the same pool (left assembled, as kill -9 leaves it)."""
        if self.engine.watcher is not None:  # a dead daemon's children die with it
            self.engine.watcher.stop()
        self.engine = self.fresh_engine()
        self.engine.start()
        return self.engine

    def pool_devices(self) -> set[int]:
        """Thin device ids the kernel's pool holds: thin_ls on a metadata snapshot, by hand
        (the engine may have refused to start)."""
        meta_dev = self.engine.pool.meta_dev
        self.message("reserve_metadata_snap")
        try:
            out = subprocess.run(
                ["thin_ls", "--metadata-snap", "--no-headers", "-o", "DEV", meta_dev],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        finally:
            self.message("release_metadata_snap")
        return {int(field) for field in out.split()}

    def message(self, text: str) -> None:
        subprocess.run(
            ["dmsetup", "message", self.engine.pool_name, "0", text],
            check=True,
            capture_output=True,
        )

    def close(self) -> None:
        try:
            self.engine.stop()  # also thin_checks the metadata
        finally:
            self.store.close()
            self._force_teardown()
            shutil.rmtree(self.top, ignore_errors=True)

    def _force_teardown(self) -> None:
        """Whatever a failed test left: our pool's devices and loops, by name and path."""
        prefix = f"vmtree-{self.pool_id}-"
        out = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True).stdout
        names = [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
        for name in sorted(names, key=lambda n: n.endswith("-pool")):
            subprocess.run(["dmsetup", "remove", "--retry", name], capture_output=True)
        for path in self.top.glob("thin/*.img"):
            out = subprocess.run(
                ["losetup", "--noheadings", "-O", "NAME", "-j", str(path)],
                capture_output=True,
                text=True,
            ).stdout
            for dev in out.split():
                subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def rig() -> Iterator[Rig]:
    ok, why = dmthin_available()
    if not ok:
        pytest.skip(f"no dm-thin here ({why}); tests/dmthin runs this in a guest")
    rig = Rig()
    try:
        yield rig
    finally:
        rig.close()


def crash_on_message(
    monkeypatch: pytest.MonkeyPatch, engine: DmThinEngine, when: Callable[[str], bool]
) -> None:
    """Die when the engine is about to send a pool message ``when`` picks."""
    real = engine.pool.dm.message

    def message(name: str, text: str, what: str) -> None:
        if when(text):
            raise Crash(text)
        real(name, text, what)

    monkeypatch.setattr(engine.pool.dm, "message", message)


def crash_on_record(monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    """Die after the pool took the change and its transaction id, before the store says so."""
    real = store.save_engine_state

    def save(
        meta: Mapping[str, str | None] | None = None,
        sizes: Mapping[int, int | None] | None = None,
    ) -> None:
        if meta and meta.get(TRANSACTION):
            raise Crash("recording the new transaction id")
        real(meta, sizes)

    monkeypatch.setattr(store, "save_engine_state", save)


def sets_transaction(text: str) -> bool:
    return text.startswith("set_transaction_id")


def test_create_cut_before_the_transaction_id_is_rolled_back(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.engine.create(1, MiB)
    with monkeypatch.context() as m:
        crash_on_message(m, rig.engine, sets_transaction)
        with pytest.raises(Crash):
            rig.engine.create(2, MiB)
    assert rig.pool_devices() == {1, 2}  # the kernel made it; nothing recorded it
    engine = rig.restart()
    assert rig.pool_devices() == {1}
    assert engine.inventory() == {1: MiB}
    assert PENDING not in rig.store.load_engine_state()[0]
    engine.create(2, 2 * MiB)  # the id is free again
    assert engine.inventory() == {1: MiB, 2: 2 * MiB}


def test_snapshot_cut_after_the_transaction_id_is_kept(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.engine.create(1, MiB)
    write(rig.engine, 1, b"origin")
    with monkeypatch.context() as m:
        crash_on_record(m, rig.store)
        with pytest.raises(Crash):
            rig.engine.snapshot(1, 2)
    engine = rig.restart()
    assert engine.inventory() == {1: MiB, 2: MiB}
    assert read(engine, 2, 6) == b"origin"
    meta, sizes = rig.store.load_engine_state()
    assert PENDING not in meta and sizes == {1: MiB, 2: MiB}
    assert int(meta[TRANSACTION]) == engine.status().transaction_id


def test_delete_cut_before_the_transaction_id_is_finished(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.engine.create(1, MiB)
    rig.engine.create(2, MiB)
    with monkeypatch.context() as m:
        crash_on_message(m, rig.engine, sets_transaction)
        with pytest.raises(Crash):
            rig.engine.delete(1)
    engine = rig.restart()
    assert rig.pool_devices() == {2}
    assert engine.inventory() == {2: MiB}
    assert rig.store.load_engine_state()[1] == {2: MiB}


def test_change_cut_before_its_message_leaves_the_pool_as_it_was(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.engine.create(1, MiB)
    with monkeypatch.context() as m:
        crash_on_message(m, rig.engine, lambda text: text.startswith("create_snap"))
        with pytest.raises(Crash):
            rig.engine.snapshot(1, 2)
    assert json.loads(rig.store.load_engine_state()[0][PENDING])["sizes"] == {"2": MiB}
    engine = rig.restart()
    assert rig.pool_devices() == {1}
    assert engine.inventory() == {1: MiB}
    assert PENDING not in rig.store.load_engine_state()[0]


def test_a_vms_volumes_are_one_change_and_one_transaction_id(rig: Rig) -> None:
    rig.engine.create(1, MiB)
    before = rig.engine.status().transaction_id
    rig.engine.make_volumes([NewVolume(2, 4 * MiB), NewVolume(3, source=1), NewVolume(4, MiB)])
    assert rig.engine.status().transaction_id == before + 1
    assert rig.engine.inventory() == {1: MiB, 2: 4 * MiB, 3: MiB, 4: MiB}
    assert rig.pool_devices() == {1, 2, 3, 4}


def test_a_batch_cut_before_its_transaction_id_is_undone_whole(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig.engine.create(1, MiB)
    with monkeypatch.context() as m:
        crash_on_message(m, rig.engine, sets_transaction)
        with pytest.raises(Crash):
            rig.engine.make_volumes([NewVolume(2, source=1), NewVolume(3, source=1)])
    assert rig.pool_devices() == {1, 2, 3}
    engine = rig.restart()
    assert rig.pool_devices() == {1}
    assert engine.inventory() == {1: MiB}


@pytest.mark.parametrize(
    "before", [[], [NewVolume(7, source=1), NewVolume(8, MiB)]], ids=["alone", "after-two"]
)
def test_a_change_the_kernel_refuses_records_nothing_and_takes_back_the_rest(
    rig: Rig, before: list[NewVolume]
) -> None:
    rig.engine.create(1, MiB)
    transaction = rig.engine.status().transaction_id
    rig.message("create_thin 9")  # another program's device in our pool, by our id 9
    with expect_errno(errno.EEXIST):
        rig.engine.make_volumes([*before, NewVolume(9, MiB)])
    assert rig.pool_devices() == {1, 9}  # any made before the refusal were taken back
    meta, sizes = rig.store.load_engine_state()
    assert PENDING not in meta and sizes == {1: MiB}
    assert rig.engine.status().transaction_id == transaction
    rig.message("delete 9")


def test_a_pool_whose_transaction_id_moved_is_refused_and_left_alone(rig: Rig) -> None:
    rig.engine.create(1, MiB)
    ours = rig.engine.status().transaction_id
    rig.message(f"set_transaction_id {ours} {ours + 5}")
    with expect_errno(errno.EINVAL) as refused:
        rig.restart()
    assert "not this tree's pool" in str(refused.value)
    assert rig.engine.status().transaction_id == ours + 5
    assert rig.pool_devices() == {1}
    rig.message(f"set_transaction_id {ours + 5} {ours}")
    assert rig.restart().inventory() == {1: MiB}


def test_a_pool_recorded_in_the_old_state_file_is_imported(rig: Rig) -> None:
    rig.engine.create(1, 3 * MiB)
    meta, sizes = rig.store.load_engine_state()
    legacy = {
        "transaction": int(meta[TRANSACTION]),
        "data_size": POOL_SIZE,
        "sizes": {str(k): v for k, v in sizes.items()},
    }
    (rig.top / "thin" / "state.json").write_text(json.dumps(legacy))
    rig.store.save_engine_state(dict.fromkeys(meta), dict.fromkeys(sizes))
    engine = rig.restart()
    assert engine.inventory() == {1: 3 * MiB}
    assert not (rig.top / "thin" / "state.json").exists()
    assert (rig.top / "thin" / "state.json.imported").exists()
    assert rig.store.load_engine_state()[1] == {1: 3 * MiB}


def test_missing_loop_files_are_enoent_with_the_way_back(rig: Rig) -> None:
    rig.engine.stop()
    data = rig.top / "thin" / "data.img"
    data.rename(data.with_suffix(".moved"))
    try:
        with expect_errno(errno.ENOENT) as refused:
            rig.fresh_engine().start()
        assert "losetup -l" in str(refused.value)
    finally:
        data.with_suffix(".moved").rename(data)
    rig.engine = rig.fresh_engine()
    rig.engine.start()


def test_loop_files_deleted_while_mounted_keep_the_pool_up(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.engine.create(1, MiB)
    write(rig.engine, 1, b"precious")
    loops = {loop_file(dev): dev for dev in rig.engine.pool.loops}
    files = sorted(rig.top.glob("thin/*.img"))
    for path in files:
        path.unlink()
    with caplog.at_level(logging.ERROR, logger="vmtreefs.engine.dmthin"):
        rig.engine.stop()
    assert "were deleted while mounted" in caplog.text
    assert rig.engine.pool.active()  # the data is still reachable through the loops
    # What the log tells the administrator to do: take the pool down, copy the loops back.
    subprocess.run(["dmsetup", "remove", rig.engine.pool_name], check=True)
    for path in files:
        loop = loops[str(path)]
        assert f"dd if={loop} of={path}" in caplog.text
        subprocess.run(["dd", f"if={loop}", f"of={path}", "bs=1M", "conv=sparse"], check=True)
        subprocess.run(["losetup", "-d", loop], check=True)
    rig.engine = rig.fresh_engine()
    rig.engine.start()
    assert read(rig.engine, 1, 8) == b"precious"


def loop_file(device: str) -> str:
    """The file a loop device was attached to (without the "(deleted)" mark)."""
    text = (Path("/sys/block") / Path(device).name / "loop" / "backing_file").read_text()
    return text.strip().removesuffix(" (deleted)")


def test_the_watcher_logs_the_low_water_mark_a_full_pool_and_room_again(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmtreefs.engine.dmthin")
    rig.engine.create(1, 2 * POOL_SIZE)
    vol = rig.engine.open(1, writable=True)
    offset = 0
    try:
        while offset < POOL_SIZE * 95 // 100:  # past the low-water mark (10% free)
            offset += vol.pwrite(b"\xee" * MiB, offset)
        vol.fsync()
        wait_for_log(caplog, "passed its low-water mark")
        assert "is full" not in caplog.text
        with pytest.raises((OSError, EngineError)) as info:
            while offset < 2 * POOL_SIZE:
                offset += vol.pwrite(b"\xee" * MiB, offset)
            vol.fsync()
        assert isinstance(info.value, (OSError, EngineError))
        assert info.value.errno == errno.ENOSPC
    finally:
        vol.close()
    wait_for_log(caplog, "is full")
    with expect_errno(errno.ENOSPC):
        rig.engine.create(2, MiB)
    rig.engine.delete(1)
    wait_for_log(caplog, "has room again")


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 30) -> None:
    """The watcher logs from its own thread, a moment after the kernel's event."""
    deadline = time.monotonic() + timeout
    while text not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.2)
    assert text in caplog.text


def test_a_volume_a_vm_still_uses_is_adopted_after_a_crash(rig: Rig) -> None:
    """kill -9 of the daemon while a VM runs on dm-thin: the device stays open by
    QEMU; the next engine keeps it, attaches it again and sees the VM's writes."""
    engine = rig.engine
    engine.create(5, 4 * MiB)
    attached = engine.attach(5)
    fd = os.open(attached.path, os.O_RDWR)  # QEMU holding its disk
    try:
        engine = rig.restart()
        assert os.path.exists(attached.path), "a device in use must stay"
        again = engine.attach(5)
        assert again.path == attached.path
        os.pwrite(fd, b"written after the crash", MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    engine.detach(5)  # the VM stopped: the device goes
    assert not os.path.exists(attached.path)
    vol = engine.open(5, writable=False)
    try:
        assert vol.pread(23, MiB) == b"written after the crash"
    finally:
        vol.close()


def test_writes_past_the_end_a_crash_cut_before_their_record_are_found_again(
    rig: Rig,
) -> None:
    """kill -9 between writes past the end (their size only in memory, the table a step
    ahead) and their record: the recorded size stays what the engine reports, and
    ``written_end`` (what recovery rolls forward to) is the end of the last pool block
    written, not the table's length. A grow past that reads zeros."""
    engine = rig.engine
    engine.create(3, MiB)
    vol = engine.open(3, writable=True)
    engine.reserve(3, 2 * MiB)
    vol.pwrite(b"first", MiB)
    engine.reserve(3, 5 * MiB + 512)  # past the device's table: grown a step ahead
    vol.pwrite(b"last write", 5 * MiB)
    vol.fsync()  # the data reached the pool; no commit_size: the daemon died first
    os.close(vol.fd)  # the kernel closes a dead daemon's files
    engine = rig.restart()
    assert engine.size(3) == MiB  # as recorded
    assert engine.written_end(3) == 5 * MiB + 64 * 1024  # the 64 KiB block of the write
    engine.resize(3, 5 * MiB + 64 * 1024)  # what recovery records
    engine.resize(3, 80 * MiB)
    vol = engine.open(3, writable=False)
    try:
        assert vol.pread(10, 5 * MiB) == b"last write"
        assert vol.pread(5, MiB) == b"first"
        assert vol.pread(75 * MiB, 5 * MiB + 10) == bytes(75 * MiB - 10)
    finally:
        vol.close()
