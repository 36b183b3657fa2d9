"""A new pool: how big its metadata must be, the refusals, and its first write.

``check_request`` runs before the store records the choice of engine, so a request
that cannot be met leaves nothing behind; given devices are refused while they are
in use or hold anything, because vmtreefs never formats another program's data.
"""

from __future__ import annotations

import errno
import os

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin.pool import BLOCK_SECTORS, SECTOR, ThinPool, check_block_device
from vmtreefs.engine.tools import run

MAX_THIN_DEVICES = 10000  # sizes the metadata (thin_metadata_size -m)
MIN_DATA_SIZE = 64 * 1024 * 1024
THIN_MAGIC = 27022010  # thin_disk_superblock.magic, a little-endian u64 at byte 32


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


def check_request(
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
    return _check_given_devices(data_device, metadata_device)


def check_no_thin_metadata(path: str) -> None:
    with open(path, "rb") as f:
        f.seek(32)
        if int.from_bytes(f.read(8), "little") == THIN_MAGIC:
            raise EngineError(
                errno.EEXIST,
                f"metadata device {path} already holds a dm-thin pool's metadata "
                "(another program's?): vmtreefs will not format it (zero its first 4 KiB "
                "if it is really free)",
            )


def _check_given_devices(data: str | None, metadata: str | None) -> int:
    """Refuse devices that are missing, in use, too small or someone else's; returns
    the data size."""
    for role, path in (("data", data), ("metadata", metadata)):
        check_block_device(role, path)
        try:
            fd = os.open(path or "", os.O_RDONLY | os.O_EXCL)
        except OSError as e:
            raise EngineError(
                errno.EBUSY, f"{role} device {path} is in use: {e.strerror}"
            ) from None
        os.close(fd)
        if role == "metadata":
            check_no_thin_metadata(path or "")
        found = run(["wipefs", "--noheadings", "--output", "TYPE", path or ""], "wipefs")
        if found.split():
            raise EngineError(
                errno.EEXIST,
                f"{role} device {path} holds {', '.join(found.split())}: vmtreefs will "
                "not overwrite it (wipefs -a it first if it is really free)",
            )
    data_bytes = int(run(["blockdev", "--getsize64", data or ""], "size data"))
    meta_bytes = int(run(["blockdev", "--getsize64", metadata or ""], "size metadata"))
    if data_bytes < MIN_DATA_SIZE:
        raise EngineError(
            errno.EINVAL,
            f"data device {data} has {data_bytes} bytes; a pool needs at least {MIN_DATA_SIZE}",
        )
    needed = metadata_size(data_bytes)
    if meta_bytes < needed:
        raise EngineError(
            errno.EINVAL,
            f"metadata device {metadata} has {meta_bytes} bytes; a pool of "
            f"{data_bytes} bytes of data needs {needed}",
        )
    return data_bytes


def prepare_storage(pool: ThinPool) -> None:
    """Sparse loop files for the pool, or zeroed metadata on a given device: either way
    the kernel formats the metadata when the pool is first assembled."""
    pool.dir.mkdir(exist_ok=True)
    if pool.layout == "loop-files":
        for path, size in (
            (pool.data_file, pool.data_size),
            (pool.meta_file, metadata_size(pool.data_size)),
        ):
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            finally:
                os.close(fd)
    else:
        with open(pool.given_meta or "", "r+b") as f:
            f.write(bytes(4096))
            f.flush()
            os.fsync(f.fileno())
