"""The dm-thin engine: volumes are thin devices of a raw dm-thin pool that vmtreefs manages.

The pool is built from two sparse loop files in ``SOURCE/thin/`` (or from given
block devices). Thin device ids are the store's volume ids. A thin device has
no size of its own in the pool's metadata, so the engine keeps one small state
file beside it (``SOURCE/thin/state.json``: sizes and the pool's transaction
id), replaced atomically after every change.

Every message that changes the pool is followed by ``set_transaction_id``, and
the state file records the id. At start a pool whose transaction id is neither
the recorded one nor the next (a crash between message and state write) is not
ours and is refused: vmtreefs never touches another program's pool.

Devices are activated on demand as ``/dev/mapper/vmtree-<pool>-<id>`` and
removed when the last open file lets go.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from vmtreefs.engine.base import EngineError, OpenVolume, PoolUsage, SnapshotEngine
from vmtreefs.engine.tools import run

log = logging.getLogger("vmtreefs.engine.dmthin")

LAYOUTS = ("loop-files", "devices")
THIN_DIR = "thin"
DATA_NAME = "data.img"
META_NAME = "metadata.img"
STATE_NAME = "state.json"
SECTOR = 512
BLOCK_SECTORS = 128  # 64 KiB pool blocks: LVM's default for thin pools
MAX_THIN_DEVICES = 10000  # sizes the metadata (thin_metadata_size -m)
LOW_WATER_PERCENT = 10
MIN_DATA_SIZE = 64 * 1024 * 1024
MAX_ID = (1 << 24) - 1  # thin device ids are 24 bits


@dataclass(frozen=True)
class PoolStatus:
    transaction_id: int
    metadata_used: int  # blocks of 4 KiB
    metadata_total: int
    data_used: int  # pool blocks
    data_total: int
    mode: str  # rw, ro, out_of_data_space, or Fail

    @classmethod
    def parse(cls, line: str) -> PoolStatus:
        # 0 41943040 thin-pool 3 152/12800 2/327680 - rw discard_passdown ...
        fields = line.split()
        if len(fields) < 8 or fields[2] != "thin-pool":
            raise EngineError(errno.EIO, f"unexpected thin-pool status {line.strip()!r}")
        if fields[3] == "Fail":
            return cls(0, 0, 0, 0, 0, "Fail")
        meta_used, meta_total = (int(x) for x in fields[4].split("/"))
        data_used, data_total = (int(x) for x in fields[5].split("/"))
        return cls(int(fields[3]), meta_used, meta_total, data_used, data_total, fields[7])


class DmThinEngine(SnapshotEngine):
    """Thin devices in a dm-thin pool on loop files (or on given block devices)."""

    name: ClassVar[str] = "dmthin"

    def __init__(
        self,
        source: Path,
        layout: str,
        data_size: int,
        pool_id: str,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise EngineError(errno.EINVAL, f"unknown dm-thin layout {layout!r}")
        if not re.fullmatch(r"[a-z0-9]{1,16}", pool_id):
            raise EngineError(errno.EINVAL, f"bad pool id {pool_id!r}")
        self.source = Path(source)
        self.layout = layout
        self.data_size = data_size
        self.pool_id = pool_id
        self.dir = self.source / THIN_DIR
        self.data_file = self.dir / DATA_NAME
        self.meta_file = self.dir / META_NAME
        self.state_file = self.dir / STATE_NAME
        self.given_data = data_device
        self.given_meta = metadata_device
        self.pool_name = f"vmtree-{pool_id}-pool"
        self.pool_path = f"/dev/mapper/{self.pool_name}"
        self._sizes: dict[int, int] = {}
        self._transaction = 0
        self._users: dict[int, int] = {}  # open files per active device
        self._writable: set[int] = set()  # devices active read-write
        self._doomed: set[int] = set()  # deleted while open: removed at the last close
        self._lock = threading.RLock()  # engine calls come from several worker threads
        self._started = False

    # Set-up

    @staticmethod
    def metadata_size(data_size: int) -> int:
        """Bytes of metadata the kernel's tools ask for, rounded up to 4 MiB."""
        out = run(
            [
                "thin_metadata_size",
                "-b",
                f"{BLOCK_SECTORS * SECTOR // 1024}k",
                "-s",
                f"{data_size // 1024}k",
                "-m",
                str(MAX_THIN_DEVICES),
                "-u",
                "b",
                "-n",
            ],
            "size the pool metadata",
        )
        size = int(out.split()[0])
        step = 4 * 1024 * 1024
        return max(2 * step, -(-size // step) * step)

    @classmethod
    def check_request(
        cls,
        layout: str,
        data_size: int,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> int:
        """Refuse a pool that cannot be built, before anything is written; returns its data size."""
        if layout == "loop-files":
            if data_size < MIN_DATA_SIZE:
                raise EngineError(
                    errno.EINVAL, f"a dm-thin pool needs at least {MIN_DATA_SIZE} bytes of data"
                )
            return data_size
        probe = cls(Path("/"), layout, 0, "probe", data_device, metadata_device)
        probe._check_given_devices()
        return probe.data_size

    @classmethod
    def initialise(
        cls,
        source: Path,
        layout: str,
        data_size: int,
        pool_id: str,
        data_device: str | None = None,
        metadata_device: str | None = None,
    ) -> DmThinEngine:
        """Prepare a new, empty pool; returns the engine, not started."""
        data_size = cls.check_request(layout, data_size, data_device, metadata_device)
        engine = cls(source, layout, data_size, pool_id, data_device, metadata_device)
        engine.dir.mkdir(exist_ok=True)
        if layout == "loop-files":
            for path, size in (
                (engine.data_file, data_size),
                (engine.meta_file, cls.metadata_size(data_size)),
            ):
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
                try:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            # A new pool starts from zeroed metadata: the kernel then formats it.
            with open(engine.given_meta or "", "r+b") as f:
                f.write(bytes(4096))
                f.flush()
                os.fsync(f.fileno())
        engine._save_state()
        return engine

    def _check_given_devices(self) -> None:
        for role, path in (("data", self.given_data), ("metadata", self.given_meta)):
            if not path or not Path(path).exists():
                raise EngineError(errno.ENOENT, f"{role} device {path!r} does not exist")
            if not Path(path).is_block_device():
                raise EngineError(errno.EINVAL, f"{role} device {path} is not a block device")
            try:
                fd = os.open(path, os.O_RDONLY | os.O_EXCL)
            except OSError as e:
                raise EngineError(
                    errno.EBUSY, f"{role} device {path} is in use: {e.strerror}"
                ) from None
            os.close(fd)
        data_bytes = int(run(["blockdev", "--getsize64", self.given_data or ""], "size data"))
        meta_bytes = int(run(["blockdev", "--getsize64", self.given_meta or ""], "size metadata"))
        needed = self.metadata_size(data_bytes)
        if meta_bytes < needed:
            raise EngineError(
                errno.EINVAL,
                f"metadata device {self.given_meta} has {meta_bytes} bytes; the pool needs "
                f"{needed}",
            )
        self.data_size = data_bytes

    def describe(self) -> str:
        where = (
            f"loop files in {self.dir}"
            if self.layout == "loop-files"
            else f"data {self.given_data}, metadata {self.given_meta}"
        )
        return f"dm-thin pool {self.pool_name} ({self.data_size // 2**20} MiB) on {where}"

    def _loop_of(self, path: Path) -> str:
        """The loop device of ``path``, attaching one if there is none."""
        out = run(["losetup", "--noheadings", "-O", "NAME", "-j", str(path)], "find loop")
        devices = [line.strip() for line in out.splitlines() if line.strip()]
        if devices:
            return devices[0]
        return run(["losetup", "-f", "--show", str(path)], f"attach {path}").strip()

    def _devices(self) -> tuple[str, str]:
        if self.layout == "devices":
            return self.given_data or "", self.given_meta or ""
        for path in (self.data_file, self.meta_file):
            if not path.is_file():
                raise EngineError(errno.ENOENT, f"pool file {path} is missing")
        return self._loop_of(self.data_file), self._loop_of(self.meta_file)

    def _pool_active(self) -> bool:
        try:
            run(["dmsetup", "status", self.pool_name], "pool status")
        except EngineError:
            return False
        return True

    def status(self) -> PoolStatus:
        return PoolStatus.parse(run(["dmsetup", "status", self.pool_name], "pool status"))

    def start(self) -> None:
        with self._lock:
            self._load_state()
            data_dev, meta_dev = self._devices()
            self._meta_dev = meta_dev
            if not self._pool_active():
                sectors = self.data_size // SECTOR
                blocks = sectors // BLOCK_SECTORS
                low_water = max(1, blocks * LOW_WATER_PERCENT // 100)
                table = (
                    f"0 {sectors} thin-pool {meta_dev} {data_dev} {BLOCK_SECTORS} {low_water} "
                    "1 error_if_no_space"
                )
                run(["dmsetup", "create", self.pool_name, "--table", table], "assemble pool")
                log.info("assembled %s: %s", self.pool_name, table)
            self._clear_stale_devices()
            status = self.status()
            if status.mode == "Fail":
                raise EngineError(errno.EIO, f"pool {self.pool_name} has failed; run thin_check")
            if status.transaction_id == self._transaction + 1:
                log.warning("pool is one transaction ahead of %s: adopting it", self.state_file)
                self._transaction = status.transaction_id
                self._save_state()
            elif status.transaction_id != self._transaction:
                raise EngineError(
                    errno.EINVAL,
                    f"pool {self.pool_name} carries transaction id {status.transaction_id}, "
                    f"not {self._transaction} as recorded in {self.state_file}: "
                    "it is not this tree's pool",
                )
            self._started = True

    def _clear_stale_devices(self) -> None:
        """Thin devices a killed daemon left active: remove the idle ones so they can be
        activated afresh; one still open elsewhere (a running VM) stays and is reported."""
        for name in self._our_devices():
            try:
                run(["dmsetup", "remove", name], f"remove stale {name}")
                log.info("removed %s, left active by an earlier daemon", name)
            except EngineError as e:
                log.warning("%s stays active: %s", name, e.reason)

    def stop(self) -> None:
        """Remove idle thin devices and the pool, detach the loops, check the metadata."""
        with self._lock:
            self._started = False
            for vol_id in list(self._users):
                if self._users[vol_id] == 0:
                    self._deactivate(vol_id)
            if any(self._users.values()):
                log.warning("pool %s stays up: volumes are still open", self.pool_name)
                return
            for name in self._our_devices():
                run(["dmsetup", "remove", "--retry", name], f"remove {name}")
            if self._pool_active():
                run(["dmsetup", "remove", "--retry", self.pool_name], "remove pool")
            if self.layout == "loop-files":
                for path in (self.data_file, self.meta_file):
                    out = run(["losetup", "--noheadings", "-O", "NAME", "-j", str(path)], "loop")
                    for dev in out.split():
                        run(["losetup", "-d", dev], f"detach {dev}")
            self.check_metadata()

    def check_metadata(self) -> str:
        """thin_check the (inactive) metadata; EIO with its report if it finds damage.

        A loop file is checked through a read-only loop device: thin_check opens with
        O_DIRECT, which a file on tmpfs or an overlay refuses.
        """
        if self.layout != "loop-files":
            return run(["thin_check", self.given_meta or ""], "thin_check")
        dev = run(["losetup", "-f", "--show", "-r", str(self.meta_file)], "attach").strip()
        try:
            return run(["thin_check", dev], "thin_check")
        finally:
            run(["losetup", "-d", dev], f"detach {dev}")

    def _our_devices(self) -> list[str]:
        out = run(["dmsetup", "ls"], "list devices")
        prefix = f"vmtree-{self.pool_id}-"
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        return [n for n in names if n.startswith(prefix) and n != self.pool_name]

    # The state file

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_file.read_text())
        except FileNotFoundError:
            raise EngineError(errno.ENOENT, f"{self.state_file} is missing") from None
        except ValueError as e:
            raise EngineError(errno.EINVAL, f"{self.state_file} is damaged: {e}") from None
        self._transaction = int(data.get("transaction", 0))
        self.data_size = int(data.get("data_size", self.data_size))
        self._sizes = {int(k): int(v) for k, v in data.get("sizes", {}).items()}

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        data = {
            "transaction": self._transaction,
            "data_size": self.data_size,
            "sizes": {str(k): v for k, v in self._sizes.items()},
        }
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.state_file)
        dir_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _change(self, message: str, what: str) -> None:
        """Send a pool message and move the transaction id on with it."""
        self._require_started()
        run(["dmsetup", "message", self.pool_name, "0", message], what)
        new = self._transaction + 1
        run(
            [
                "dmsetup",
                "message",
                self.pool_name,
                "0",
                f"set_transaction_id {self._transaction} {new}",
            ],
            f"{what}: set transaction id",
        )
        self._transaction = new

    def _require_started(self) -> None:
        if not self._started:
            raise EngineError(errno.EIO, f"dm-thin pool {self.pool_name} is not started")

    def _full(self) -> bool:
        status = self.status()
        return status.mode == "out_of_data_space" or status.data_used >= status.data_total

    # Thin devices

    def device_name(self, vol_id: int) -> str:
        return f"vmtree-{self.pool_id}-{vol_id}"

    def path(self, vol_id: int) -> Path:
        return Path("/dev/mapper") / self.device_name(vol_id)

    def _table(self, vol_id: int) -> str:
        return f"0 {self._sizes[vol_id] // SECTOR} thin {self.pool_path} {vol_id}"

    def _activate(self, vol_id: int, writable: bool) -> None:
        name = self.device_name(vol_id)
        if vol_id in self._users:
            if writable and vol_id not in self._writable:
                run(["dmsetup", "suspend", name], f"suspend {name}")
                try:
                    run(["dmsetup", "reload", name, "--table", self._table(vol_id)], "reload")
                finally:
                    run(["dmsetup", "resume", name], f"resume {name}")
                self._writable.add(vol_id)
            return
        argv = ["dmsetup", "create", name, "--table", self._table(vol_id)]
        if not writable:
            argv.insert(2, "--readonly")
        run(argv, f"activate volume {vol_id}")
        self._users[vol_id] = 0
        if writable:
            self._writable.add(vol_id)

    def _deactivate(self, vol_id: int) -> None:
        run(["dmsetup", "remove", "--retry", self.device_name(vol_id)], f"deactivate {vol_id}")
        self._users.pop(vol_id, None)
        self._writable.discard(vol_id)

    @staticmethod
    def _check_id(vol_id: int) -> None:
        if isinstance(vol_id, bool) or not isinstance(vol_id, int) or not 0 <= vol_id <= MAX_ID:
            raise EngineError(errno.EINVAL, f"bad volume id {vol_id!r}: thin ids are 0..{MAX_ID}")

    def _check_known(self, vol_id: int) -> None:
        self._check_id(vol_id)
        if vol_id not in self._sizes:
            raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")

    def create(self, vol_id: int, size: int) -> None:
        with self._lock:
            self._check_id(vol_id)
            if vol_id in self._sizes:
                raise EngineError(errno.EEXIST, f"volume {vol_id} already exists")
            if size < 0 or size % SECTOR:
                raise EngineError(errno.EINVAL, f"volume size {size} is not whole sectors")
            self._change(f"create_thin {vol_id}", f"create volume {vol_id}")
            self._sizes[vol_id] = size
            self._save_state()

    def snapshot(self, src_id: int, new_id: int) -> None:
        with self._lock:
            self._check_known(src_id)
            self._check_id(new_id)
            if new_id in self._sizes:
                raise EngineError(errno.EEXIST, f"volume {new_id} already exists")
            if self._full():
                raise EngineError(errno.ENOSPC, f"pool {self.pool_name} is full")
            what = f"snapshot volume {src_id} as {new_id}"
            active = src_id in self._users
            if active:  # the origin must be quiet while the snapshot is taken
                run(["dmsetup", "suspend", self.device_name(src_id)], f"{what}: suspend")
            try:
                self._change(f"create_snap {new_id} {src_id}", what)
            finally:
                if active:
                    run(["dmsetup", "resume", self.device_name(src_id)], f"{what}: resume")
            self._sizes[new_id] = self._sizes[src_id]
            self._save_state()

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        with self._lock:
            self._check_id(vol_id)
            if vol_id not in self._sizes:
                if missing_ok:
                    return
                raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")
            if self._users.get(vol_id):
                self._doomed.add(vol_id)  # freed when its last open file closes
                return
            self._destroy(vol_id)

    def _destroy(self, vol_id: int) -> None:
        if vol_id in self._users:
            self._deactivate(vol_id)
        try:
            self._change(f"delete {vol_id}", f"delete volume {vol_id}")
        except EngineError as e:
            if e.errno != errno.ENOENT:
                raise
        self._sizes.pop(vol_id, None)
        self._doomed.discard(vol_id)
        self._save_state()

    def resize(self, vol_id: int, new_size: int) -> None:
        with self._lock:
            self._check_known(vol_id)
            if new_size < self._sizes[vol_id]:
                raise EngineError(errno.EINVAL, f"volume {vol_id}: volumes only grow")
            if new_size % SECTOR:
                raise EngineError(errno.EINVAL, f"volume size {new_size} is not whole sectors")
            self._sizes[vol_id] = new_size
            self._save_state()
            if vol_id in self._users:
                name = self.device_name(vol_id)
                argv = ["dmsetup", "reload", name, "--table", self._table(vol_id)]
                if vol_id not in self._writable:
                    argv.insert(2, "--readonly")
                run(argv, f"grow {name}")
                run(["dmsetup", "resume", name], f"grow {name}")

    def discard(self, vol_id: int, size: int) -> None:
        with self._lock:
            self._check_known(vol_id)
            self._sizes[vol_id] = max(self._sizes[vol_id], size)
            self._save_state()
            if self._sizes[vol_id] == 0:
                return
            was_active = vol_id in self._users
            self._activate(vol_id, writable=True)
            try:
                run(["blkdiscard", "-f", str(self.path(vol_id))], f"discard volume {vol_id}")
            finally:
                if not was_active:
                    self._deactivate(vol_id)

    def size(self, vol_id: int) -> int:
        with self._lock:
            self._check_known(vol_id)
            return self._sizes[vol_id]

    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        with self._lock:
            self._require_started()
            self._check_known(vol_id)
            return DmOpenVolume(self, vol_id, writable)

    def _acquire(self, vol_id: int, writable: bool) -> int:
        """An fd on the active device (activating it), counted until :meth:`_release`."""
        with self._lock:
            self._activate(vol_id, writable)
            flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
            fd = os.open(self.path(vol_id), flags)
            self._users[vol_id] += 1
            return fd

    def _release(self, vol_id: int, fd: int) -> None:
        with self._lock:
            os.close(fd)
            self._users[vol_id] -= 1
            if self._users[vol_id] == 0:
                if vol_id in self._doomed:
                    self._destroy(vol_id)
                else:
                    self._deactivate(vol_id)

    # Reports

    def _thin_ls(self) -> dict[int, tuple[int, int]]:
        """id -> (mapped bytes, exclusive bytes), from a metadata snapshot of the live pool."""
        with self._lock:
            self._require_started()
            run(["dmsetup", "message", self.pool_name, "0", "reserve_metadata_snap"], "reserve")
            try:
                out = run(
                    [
                        "thin_ls",
                        "--metadata-snap",
                        "--no-headers",
                        "-o",
                        "DEV,MAPPED_BYTES,EXCLUSIVE_BYTES",
                        self._meta_dev,
                    ],
                    "thin_ls",
                )
            finally:
                run(["dmsetup", "message", self.pool_name, "0", "release_metadata_snap"], "release")
        found: dict[int, tuple[int, int]] = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0].isdigit():
                found[int(fields[0])] = (int(fields[1]), int(fields[2]))
        return found

    def inventory(self) -> dict[int, int]:
        with self._lock:
            return {vol_id: self._sizes.get(vol_id, 0) for vol_id in self._thin_ls()}

    def exclusive_bytes(self, vol_id: int) -> int:
        with self._lock:
            self._check_known(vol_id)
            return self._thin_ls().get(vol_id, (0, 0))[1]

    def usage(self) -> PoolUsage:
        status = self.status()
        block = BLOCK_SECTORS * SECTOR
        meta_block = 4096
        return PoolUsage(
            status.data_total * block,
            status.data_used * block,
            status.metadata_total * meta_block,
            status.metadata_used * meta_block,
        )


class DmOpenVolume(OpenVolume):
    """An open thin device; a volume of size 0 has no device until it grows."""

    def __init__(self, engine: DmThinEngine, vol_id: int, writable: bool) -> None:
        super().__init__(vol_id, -1, writable)
        self.engine = engine

    def _fd(self) -> int:
        if self.fd < 0:
            if self.engine.size(self.vol_id) == 0:
                raise EngineError(errno.EINVAL, "volume has no size yet")
            self.fd = self.engine._acquire(self.vol_id, self.writable)
        return self.fd

    def pread(self, size: int, offset: int) -> bytes:
        if self.engine.size(self.vol_id) == 0:
            return b""
        return os.pread(self._fd(), size, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        try:
            return os.pwrite(self._fd(), data, offset)
        except OSError as e:
            if e.errno == errno.EIO and self.engine._full():
                raise EngineError(errno.ENOSPC, "the dm-thin pool is full") from None
            raise

    def fsync(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.fd >= 0:
                self.engine._release(self.vol_id, self.fd)
                self.fd = -1
