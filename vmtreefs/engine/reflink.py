"""The reflink engine: each volume is a sparse file; a snapshot is a FICLONE copy of it.

Two layouts share the code. ``inplace`` keeps the files in ``SOURCE/pool`` on
SOURCE's own filesystem (XFS or btrfs). ``xfs-image`` is for a SOURCE without
reflink (ext4): a sparse file ``SOURCE/reflink.xfs`` formatted with reflink and
loop-mounted at ``SOURCE/pool``.

New files are built under a temporary name and hard-linked to ``vol-<id>.img``
only when complete, so a failure or a crash never leaves a half-made volume under
a real name; :meth:`ReflinkEngine.start` sweeps temporaries a crash left behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

from vmtreefs.engine import fiemap
from vmtreefs.engine.base import (
    Attachment,
    EngineError,
    NewVolume,
    OpenVolume,
    PoolUsage,
    SnapshotEngine,
)
from vmtreefs.engine.tools import run
from vmtreefs.mountinfo import MountEntry, mounts
from vmtreefs.rules import blockmap

FICLONE = 0x40049409
"""``_IOW(0x94, 9, int)``: clone all of the source file's extents into the destination."""

LAYOUTS = ("inplace", "xfs-image")
IMAGE_NAME = "reflink.xfs"
POOL_NAME = "pool"
XFS_MIN_IMAGE_SIZE = 300 * 1024 * 1024
LOOP_DETACH_WAIT = 5.0  # seconds a detached loop device may take to go
"""mkfs.xfs refuses smaller filesystems."""

_VOL_RE = re.compile(r"vol-(0|[1-9][0-9]*)\.img")
_TMP_PREFIX = ".tmp-vol-"


def mount_of(path: Path) -> MountEntry:
    """The mount that holds ``path``: the longest mount point above it, the latest on a tie."""
    real = os.path.realpath(path)
    best: MountEntry | None = None
    for entry in mounts():
        mp = entry.mount_point
        inside = real == mp or mp == "/" or real.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = entry
    if best is None:
        raise EngineError(errno.ENOENT, f"no mount found for {path}")
    return best


def filesystem_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` ('xfs', 'ext4', 'btrfs'...)."""
    return mount_of(path).fstype


run_command = run  # the engine's tools all go through one wrapper


def loop_devices_of(image: Path) -> list[str]:
    """Loop devices backed by ``image`` (losetup matches by inode, so path aliases are found)."""
    out = run_command(["losetup", "--noheadings", "--output", "NAME", "--associated", str(image)])
    return [line.strip() for line in out.splitlines() if line.strip()]


def _fsync_dir(directory: Path) -> None:
    """Make a name created or removed in ``directory`` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _error(e: OSError, what: str) -> EngineError:
    return EngineError(e.errno or errno.EIO, f"{what}: {e.strerror or e}")


def check_empty_device(device: str) -> None:
    """A given device must be a block device without a filesystem or other signature."""
    if not Path(device).is_block_device():
        raise EngineError(errno.EINVAL, f"{device} is not a block device")
    found = run_command(["wipefs", "--noheadings", "--output", "TYPE", device]).split()
    if found:
        raise EngineError(
            errno.EINVAL,
            f"{device} holds {', '.join(found)}: vmtreefs makes its XFS only on an empty "
            f"device (wipefs -a {device} empties it)",
        )


def _cannot_create(directory: Path) -> bool:
    """Whether creating a file in ``directory`` fails with EIO (a shut-down XFS)."""
    probe = directory / f"{_TMP_PREFIX}probe-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        os.unlink(probe)
    except OSError as e:
        return e.errno == errno.EIO
    return False


def _shut_down_advice(engine: ReflinkEngine, mount_point: str) -> str:
    """What a user must do once the pool's filesystem has shut itself down."""
    if engine.layout == "inplace":
        remount = f"unmount and mount {mount_point} again (it replays its log)"
    else:
        remount = "the tree's next mount mounts its XFS again, which replays its log"
    return (
        f"the filesystem holding {engine.pool} has shut down after an I/O error: nothing "
        "in the pool can be read, written, made or deleted until it is mounted again. "
        f"Unmount the tree, make the disk healthy; {remount}; run `vmtreefs fsck "
        f"--repair {engine.source}`, then mount the tree again"
    )


class ReflinkEngine(SnapshotEngine):
    """Volumes as sparse files in ``SOURCE/pool``; snapshots are FICLONE copies."""

    name: ClassVar[str] = "reflink"

    def __init__(
        self, source: Path, layout: str, image_size: int | None = None, device: str | None = None
    ) -> None:
        if layout not in LAYOUTS:
            raise EngineError(
                errno.EINVAL, f"unknown reflink layout {layout!r} (expected one of {LAYOUTS})"
            )
        self.source = Path(source)
        self.layout = layout
        self.image_size = image_size
        self.pool = self.source / POOL_NAME
        self.image = self.source / IMAGE_NAME
        self.device = device  # xfs-image on a given block device instead of reflink.xfs
        self._started = False
        self.shut_down: str | None = None  # why the pool's filesystem takes no I/O
        # Set in the thread making a VM's volumes: its pool directory fsync waits for all.
        self._batch = threading.local()

    # -- set-up ---------------------------------------------------------------

    @classmethod
    def initialise(
        cls, source: Path, layout: str, image_size: int | None = None, device: str | None = None
    ) -> ReflinkEngine:
        """Prepare an empty SOURCE for ``layout``; returns the engine, not started yet."""
        engine = cls(source, layout, image_size, device)
        if not engine.source.is_dir():
            raise EngineError(errno.ENOENT, f"SOURCE {source} is not a directory")
        if layout == "inplace":
            engine.pool.mkdir(exist_ok=True)
            _fsync_dir(engine.source)
            return engine
        if device is not None:
            check_empty_device(device)
            run_command(["mkfs.xfs", "-q", "-m", "reflink=1", device])
            engine.pool.mkdir(exist_ok=True)
            _fsync_dir(engine.source)
            return engine
        if image_size is None or image_size < XFS_MIN_IMAGE_SIZE:
            raise EngineError(
                errno.EINVAL,
                f"an XFS image needs a size of at least {_gib(XFS_MIN_IMAGE_SIZE)}, "
                f"got {image_size}",
            )
        try:
            fd = os.open(engine.image, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _error(e, f"create XFS image {engine.image}") from e
        try:
            try:
                os.ftruncate(fd, image_size)
            finally:
                os.close(fd)
            run_command(["mkfs.xfs", "-q", "-m", "reflink=1", str(engine.image)])
            engine.pool.mkdir(exist_ok=True)
            _fsync_dir(engine.source)
        except BaseException:
            engine.image.unlink(missing_ok=True)
            raise
        return engine

    def describe(self) -> str:
        if self.layout == "inplace":
            return f"reflink in place on {self.pool} ({filesystem_type(self.source)})"
        if self.device is not None:
            return f"reflink on XFS on {self.device} mounted at {self.pool}"
        size = self.image_size
        if size is None:
            try:
                size = self.image.stat().st_size
            except OSError:
                size = 0
        return f"reflink on XFS image {self.image} ({_gib(size)}) mounted at {self.pool}"

    def _pool_mount(self) -> MountEntry | None:
        """The mount on top of the pool directory, if it is a mount point at all."""
        pool = os.path.realpath(self.pool)
        found: MountEntry | None = None
        for entry in mounts():
            if entry.mount_point == pool:
                found = entry
        return found

    def _mounted_here(self) -> bool:
        """Whether the pool directory is a mount of our image (a loop device backed by it)."""
        entry = self._pool_mount()
        return entry is not None and self._holds(entry)

    def _holds(self, entry: MountEntry) -> bool:
        """Whether a mount is of the pool's XFS: the device, or a loop device of the image."""
        if self.device is None:
            return entry.source in loop_devices_of(self.image)
        try:
            return os.stat(entry.source).st_rdev == os.stat(self.device).st_rdev
        except OSError:
            return False

    def start(self) -> None:
        """Mount the image (reusing a mount a killed daemon left) or make the pool directory."""
        if self.layout == "inplace":
            try:
                self.pool.mkdir(exist_ok=True)
            except OSError as e:
                raise _error(e, f"create pool directory {self.pool}") from e
        else:
            if self.device is not None and not Path(self.device).is_block_device():
                raise EngineError(errno.ENOENT, f"{self.device} is not a block device")
            if self.device is None and not self.image.is_file():
                raise EngineError(errno.ENOENT, f"XFS image {self.image} is missing")
            self.pool.mkdir(exist_ok=True)
            entry = self._pool_mount()
            if entry is None:
                what = ["-o", "loop", str(self.image)] if self.device is None else [self.device]
                run_command(["mount", "-t", "xfs", *what, str(self.pool)])
            elif not self._holds(entry):
                raise EngineError(
                    errno.EBUSY,
                    f"{self.pool} is already a mount point of {entry.source} ({entry.fstype}), "
                    f"not of {self.device or self.image}",
                )
        self._sweep_temporaries()
        self.shut_down = None
        self._started = True

    def stop(self) -> None:
        """Unmount the image and make sure no loop device for it is left attached."""
        self._started = False
        if self.layout == "inplace":
            return
        # A killed daemon restarted twice could have stacked mounts: peel them all.
        for _ in range(8):
            if not self._mounted_here():
                break
            run_command(["umount", str(self.pool)])
        if self.device is not None or not self.image.exists():
            return
        for dev in loop_devices_of(self.image):
            run_command(["losetup", "--detach", dev])
        # A device someone still has open (udev's blkid probe after the umount) is only
        # marked to go when they close it: give them a moment before calling it stuck.
        deadline = time.monotonic() + LOOP_DETACH_WAIT
        while (left := loop_devices_of(self.image)) and time.monotonic() < deadline:
            time.sleep(0.05)
        if left:
            raise EngineError(
                errno.EIO, f"loop devices {', '.join(left)} still hold {self.image} after stop"
            )

    def _sweep_temporaries(self) -> None:
        """Remove the half-made files of an operation a crash interrupted."""
        try:
            names = os.listdir(self.pool)
        except OSError as e:
            raise _error(e, f"list pool {self.pool}") from e
        removed = False
        for name in names:
            if name.startswith(_TMP_PREFIX):
                (self.pool / name).unlink(missing_ok=True)
                removed = True
        if removed:
            _fsync_dir(self.pool)

    def _require_started(self) -> None:
        """Refuse I/O before start(): it would land in the empty directory under the mount."""
        if not self._started:
            raise EngineError(errno.EIO, f"reflink engine on {self.source} is not started")
        if self.shut_down is not None:
            raise EngineError(errno.EIO, self.shut_down)
        if self.layout == "xfs-image" and not os.path.ismount(self.pool):
            try:
                os.stat(self.pool)
            except OSError as e:
                if e.errno == errno.EIO:  # a shut-down XFS fails even a stat of its root
                    self.shut_down = _shut_down_advice(self, str(self.pool))
                    raise EngineError(errno.EIO, self.shut_down) from None
            raise EngineError(errno.EIO, f"XFS image is no longer mounted at {self.pool}")

    def check_writable(self) -> None:
        self._require_started()

    def diagnose_io_error(self) -> str | None:
        """Whether the pool's filesystem shut down (XFS does after an I/O error on its
        metadata or log): a file it can no longer create says so."""
        try:
            self._require_started()
        except EngineError as e:
            return e.reason
        if _cannot_create(self.pool):
            self.shut_down = _shut_down_advice(self, mount_of(self.pool).mount_point)
            return self.shut_down
        return (
            f"{self.pool} still takes changes: the error was in the data of a volume, and "
            "that I/O works again once the disk is healthy"
        )

    # -- volumes --------------------------------------------------------------

    def path(self, vol_id: int) -> Path:
        """Where the volume's file lives (given to libvirt as the disk path)."""
        if isinstance(vol_id, bool) or not isinstance(vol_id, int) or vol_id < 0:
            raise EngineError(errno.EINVAL, f"bad volume id {vol_id!r}")
        return self.pool / f"vol-{vol_id}.img"

    def attach(self, vol_id: int) -> Attachment:
        """The file itself: QEMU opens it, and snapshots of it stay copy-on-write."""
        self._require_started()
        path = self.path(vol_id)
        if not path.exists():
            raise EngineError(errno.ENOENT, f"volume {vol_id} does not exist")
        return Attachment(str(path), block=False)

    def detach(self, vol_id: int) -> None:
        """Nothing was set up for the VM."""

    def _temporary(self, vol_id: int) -> Path:
        return self.pool / f"{_TMP_PREFIX}{vol_id}-{os.getpid()}-{secrets.token_hex(4)}.img"

    def _build(self, vol_id: int, fill: Callable[[int], None], what: str) -> None:
        """Make a file under a temporary name, then give it its real name only if complete."""
        final = self.path(vol_id)
        if os.path.lexists(final):
            raise EngineError(errno.EEXIST, f"{what}: volume {vol_id} already exists")
        tmp = self._temporary(vol_id)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _error(e, what) from e
        try:
            try:
                fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            # link() refuses to replace an existing name, unlike rename().
            os.link(tmp, final)
        except OSError as e:
            raise _error(e, what) from e
        finally:
            tmp.unlink(missing_ok=True)
            if not getattr(self._batch, "active", False):
                _fsync_dir(self.pool)

    def make_volumes(self, volumes: Sequence[NewVolume]) -> None:
        """A VM's volumes with one fsync of the pool directory after all their names,
        not one per volume (each file is still fsync'd before it is named)."""
        self._require_started()
        self._batch.active = True
        try:
            super().make_volumes(volumes)
        finally:
            self._batch.active = False
            _fsync_dir(self.pool)

    def create(self, vol_id: int, size: int) -> None:
        self._require_started()
        if size < 0:
            raise EngineError(errno.EINVAL, f"create volume {vol_id}: negative size {size}")

        def fill(fd: int) -> None:
            os.ftruncate(fd, size)

        self._build(vol_id, fill, f"create volume {vol_id}")

    def snapshot(self, src_id: int, new_id: int) -> None:
        self._require_started()
        what = f"snapshot volume {src_id} as {new_id}"
        try:
            src_fd = os.open(self.path(src_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _error(e, what) from e
        try:

            def fill(fd: int) -> None:
                fcntl.ioctl(fd, FICLONE, src_fd)

            self._build(new_id, fill, what)
        finally:
            os.close(src_fd)

    def delete(self, vol_id: int, missing_ok: bool = False) -> None:
        self._require_started()
        try:
            os.unlink(self.path(vol_id))
        except FileNotFoundError as e:
            if missing_ok:
                return
            raise _error(e, f"delete volume {vol_id}") from e
        except OSError as e:
            raise _error(e, f"delete volume {vol_id}") from e
        _fsync_dir(self.pool)

    def _change_file(self, vol_id: int, what: str, change: Callable[[int], None]) -> None:
        """Open a volume's file for writing, ``change`` it, close it; errors name ``what``."""
        try:
            fd = os.open(self.path(vol_id), os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _error(e, what) from e
        try:
            change(fd)
        except OSError as e:
            raise _error(e, what) from e
        finally:
            os.close(fd)

    def discard(self, vol_id: int, size: int) -> None:
        """Drop every block (shared ones stay with the snapshots that hold them)."""
        self._require_started()
        what = f"discard volume {vol_id}"
        if size < 0:
            raise EngineError(errno.EINVAL, f"{what}: negative size")

        def empty(fd: int) -> None:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, size)
            os.fsync(fd)

        self._change_file(vol_id, what, empty)

    def resize(self, vol_id: int, new_size: int) -> None:
        self._require_started()
        what = f"resize volume {vol_id} to {new_size} bytes"
        if new_size < 0:
            raise EngineError(errno.EINVAL, f"{what}: negative size")

        def grow(fd: int) -> None:
            current = os.fstat(fd).st_size
            if new_size < current:
                raise EngineError(errno.EINVAL, f"{what}: volumes only grow (now {current})")
            if new_size > current:
                os.ftruncate(fd, new_size)
                os.fsync(fd)

        self._change_file(vol_id, what, grow)

    def reserve(self, vol_id: int, end: int) -> None:
        """A truncate up, without the fsync of :meth:`resize`: that fsync would flush the
        data of every write so far, at every write past the end of a copy."""
        self._require_started()
        path = self.path(vol_id)
        try:
            if os.stat(path).st_size < end:
                os.truncate(path, end)
        except OSError as e:
            raise _error(e, f"reserve volume {vol_id} to {end} bytes") from e

    def size(self, vol_id: int) -> int:
        self._require_started()
        try:
            return os.stat(self.path(vol_id)).st_size
        except OSError as e:
            raise _error(e, f"size of volume {vol_id}") from e

    def open(self, vol_id: int, writable: bool) -> OpenVolume:
        self._require_started()
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(self.path(vol_id), flags)
        except OSError as e:
            raise _error(e, f"open volume {vol_id}") from e
        return OpenVolume(vol_id, fd, writable)

    def inventory(self) -> dict[int, int]:
        self._require_started()
        found: dict[int, int] = {}
        try:
            with os.scandir(self.pool) as it:
                for entry in it:
                    m = _VOL_RE.fullmatch(entry.name)
                    if m is None:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while we looked
                    if entry.is_file(follow_symlinks=False):
                        found[int(m.group(1))] = st.st_size
        except OSError as e:
            raise _error(e, f"list pool {self.pool}") from e
        return found

    def usage(self) -> PoolUsage:
        self._require_started()
        try:
            st = os.statvfs(self.pool)
        except OSError as e:
            raise _error(e, f"statvfs {self.pool}") from e
        return PoolUsage(
            total_bytes=st.f_blocks * st.f_frsize,
            used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize,
        )

    def changed_ranges(self, vol_id: int, other_id: int) -> list[tuple[int, int]]:
        """Compare the two files' extent maps (FIEMAP): a range both map to the same
        disk address is shared, so identical; a range both leave unmapped reads zeros."""
        self._require_started()
        (a, a_size), (b, b_size) = self._mappings(vol_id, 1), self._mappings(other_id, 2)
        return blockmap.differences(a, a_size, b, b_size)

    def _mappings(self, vol_id: int, side: int) -> tuple[list[blockmap.Mapping], int]:
        try:
            fd = os.open(self.path(vol_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _error(e, f"open volume {vol_id}") from e
        try:
            size = os.fstat(fd).st_size
            found: list[blockmap.Mapping] = []
            for n, extent in enumerate(fiemap.extents(fd)):
                physical: int | None = extent.physical
                if extent.unwritten:
                    physical = None  # allocated, never written: reads zeros, like a hole
                elif extent.flags & fiemap.FIEMAP_EXTENT_UNKNOWN:
                    physical = -2 * n - side  # nowhere known: equal to nothing on the other side
                found.append(blockmap.Mapping(extent.logical, extent.length, physical))
            return found, size
        finally:
            os.close(fd)

    def exclusive_bytes(self, vol_id: int) -> int:
        """The total length of the volume file's extents that FIEMAP does not mark SHARED.

        A reflink filesystem marks an extent SHARED while more than one file maps
        its blocks (XFS marks every sharer, origin and clone alike, and splits
        extents where sharing starts and stops), so the unshared extents are
        exactly the blocks that unlinking this file would free.

        UNWRITTEN extents (fallocated space that reads as zeros) are counted:
        they hold real blocks until the file goes. They are also never shared,
        because FICLONE on XFS leaves the clone a hole where the source has an
        unwritten extent. Sharing with a file outside the pool (a user's ``cp
        --reflink`` of a disk image) also counts as shared, rightly: deleting the
        volume would not free those blocks either.

        FIEMAP_FLAG_SYNC flushes this file's own dirty data first, but not the
        other files': a snapshot's write still in the page cache has not been
        copied on write yet, so the origin's old block keeps counting as shared
        until the snapshot's data reaches the disk (fsync, or writeback within
        about 30 s). Likewise after a delete: XFS frees an unlinked file's blocks
        in the background (inode inactivation, a few milliseconds later), and
        until then the volumes it shared with still see those blocks as SHARED.
        """
        self._require_started()
        what = f"exclusive bytes of volume {vol_id}"
        try:
            fd = os.open(self.path(vol_id), os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise _error(e, what) from e
        try:
            return sum(e.length for e in fiemap.extents(fd) if not e.shared)
        except EngineError as e:
            raise EngineError(e.errno, f"{what}: {e.reason}") from e
        finally:
            os.close(fd)
