"""Copy a libvirt QEMU save image under a new domain identity, for disposable VMs.

Many disposable VMs are meant to start from one savestate: one VM is booted and
saved once (``virDomainSave``), and every disposable is a restore of that image.
libvirt does not allow it as such. A save image carries the domain XML of the
VM that was saved, and ``virDomainRestore`` brings back exactly that domain:
same name, same uuid, same disk and log paths. ``virDomainRestoreFlags`` with
another XML is refused as soon as the name or uuid differ ("Target domain name
... does not match source"), and two running domains cannot share a uuid. So
each disposable gets its own copy of the image, whose embedded XML is rewritten
(new name, uuid, disks, serial log) before a plain restore.

The copy is a reflink (``FICLONE``) where the filesystem can (XFS, btrfs), so it
costs a few milliseconds whatever the memory size; elsewhere it is a full copy
with ``copy_file_range``. Only the header region at the start of the copy is
written; the QEMU migration stream after it is left as it is.

The layout, as libvirt 9.0 writes it (``src/qemu/qemu_saveimage.[ch]``, save
format version 2, host byte order, little-endian on x86)::

    0    16 bytes  magic "LibvirtQemudSave" ("LibvirtQemudPart" while incomplete)
    16   uint32    version (2)
    20   uint32    data_len: bytes of XML, cookie and padding after the header
    24   uint32    was_running (1: restore running, 0: restore paused)
    28   uint32    compressed: format of the stream (0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop)
    32   uint32    cookieOffset: where the cookie starts, counted from byte 92 (0: none)
    36   14 x uint32 unused, zero
    92   the domain XML, NUL-terminated
    92 + cookieOffset   the migration cookie (XML text), NUL-terminated
         zeros up to 92 + data_len (libvirt leaves 64 KiB there for edited XML)
    92 + data_len       the QEMU migration stream

Anything else (another magic, version, field value, or a region that does not
parse) is refused with ``EINVAL`` before the image is touched: this module only
rewrites what it knows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from vmtreefs.errors import VmtreeError

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"
"""The magic of an image libvirt has not finished writing."""
RESTORE_COPY_PREFIX = ".restore-"
"""Names of the rewritten copies a restore makes next to the images (removed after it)."""

SUPPORTED_VERSIONS = frozenset({2})
"""Save format versions this module reads and writes (libvirt 9.0 writes 2)."""

COMPRESSION_FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop")
"""libvirt 9.0's values of the ``compressed`` field, by index. The stream itself is never read."""

HEADER_SIZE = 92
_HEADER = struct.Struct("<16s5I14I")
assert _HEADER.size == HEADER_SIZE

WAS_RUNNING_OFFSET = 24
"""Byte offset of the ``was_running`` word."""

MAX_DATA_LEN = 64 << 20
"""Larger ``data_len`` values are refused: libvirt's are the XML plus 64 KiB."""

FICLONE = 0x40049409
"""``_IOW(0x94, 9, int)``: clone all of the source file's extents into the destination."""

_NO_REFLINK_ERRNOS = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)
_NO_COPY_FILE_RANGE_ERRNOS = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
)
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class SaveHeader:
    """What a save image says before its migration stream."""

    version: int
    data_len: int
    """Bytes after the 92-byte header that hold the XML, the cookie and padding."""
    was_running: bool
    compressed: int
    """The stream's compression (an index into :data:`COMPRESSION_FORMATS`)."""
    cookie_offset: int
    """Where the cookie starts, counted from the end of the header; 0 if there is none."""
    xml: str
    cookie: bytes
    """The migration cookie without its terminating NUL; empty if there is none."""

    @property
    def stream_offset(self) -> int:
        """Where QEMU's migration stream starts in the file."""
        return HEADER_SIZE + self.data_len

    @property
    def has_cookie(self) -> bool:
        return self.cookie_offset != 0


def read_header(path: str | os.PathLike[str]) -> SaveHeader:
    """Read and check the header of the save image at ``path``.

    Raises :class:`VmtreeError` with ``EINVAL`` for anything that is not a
    complete libvirt QEMU save image of a known version, or with the errno of a
    failed open or read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, f"open save image {os.fspath(path)}") from e
    try:
        return _read_header_fd(fd, os.fspath(path))
    finally:
        os.close(fd)


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Has libvirt finished writing this image? It writes the final magic last, so an
    image whose save a crash interrupted (or that is still being written) says no."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except FileNotFoundError:
        return False


def rewrite_xml(
    src_path: str | os.PathLike[str], dst_path: str | os.PathLike[str], new_xml: str
) -> SaveHeader:
    """Make ``dst_path`` a copy of the save image ``src_path`` whose domain XML is ``new_xml``.

    The copy is a reflink when the filesystem supports it, else a plain copy.
    Its header region is then rewritten: ``new_xml``, the cookie byte for byte
    right after it (``cookieOffset`` updated), zeros up to the unchanged
    ``data_len``; the stream after it stays as it was. The file is built under
    a temporary name in the same directory, fsynced, and only then linked as
    ``dst_path``, so no half-made image ever has that name.

    Raises :class:`VmtreeError`: ``EINVAL`` if ``src_path`` is not a known save
    image or ``new_xml`` contains a NUL, ``EFBIG`` if the new XML and the cookie
    do not fit in ``data_len``, ``EEXIST`` if ``dst_path`` exists, or the errno
    of a failed system call. Returns the header of the new image.
    """
    src = os.fspath(src_path)
    dst = Path(dst_path)
    if "\0" in new_xml:
        raise VmtreeError(errno.EINVAL, "the new domain XML contains a NUL character")
    xml_bytes = new_xml.encode("utf-8") + b"\0"

    try:
        src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, f"open save image {src}") from e
    try:
        old = _read_header_fd(src_fd, src)
        region = _header_region(old, xml_bytes, src)
        src_stat = os.fstat(src_fd)
        what = f"copy save image {src} to {dst}"
        if os.path.lexists(dst):  # fail before copying; the link below is the real check
            raise VmtreeError(errno.EEXIST, f"{what}: {dst} already exists")
        tmp = dst.with_name(f".{dst.name}.tmp-{secrets.token_hex(4)}")
        try:
            dst_fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                stat.S_IMODE(src_stat.st_mode),
            )
        except OSError as e:
            raise _os_error(e, what) from e
        try:
            try:
                clone_or_copy(src_fd, dst_fd)
                _pwrite_all(dst_fd, region, 0)
                os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
            os.link(tmp, dst)
        except FileExistsError as e:
            raise VmtreeError(errno.EEXIST, f"{what}: {dst} already exists") from e
        except OSError as e:
            raise _os_error(e, what) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    finally:
        os.close(src_fd)
    _fsync_dir(dst.parent)
    xml_len = len(xml_bytes)
    return SaveHeader(
        version=old.version,
        data_len=old.data_len,
        was_running=old.was_running,
        compressed=old.compressed,
        cookie_offset=xml_len if old.has_cookie else 0,
        xml=new_xml,
        cookie=old.cookie,
    )


def set_running(path: str | os.PathLike[str], was_running: bool) -> None:
    """Set whether libvirt restores the image at ``path`` running (True) or paused (False).

    The image is checked first, as :func:`read_header` does; only the
    ``was_running`` word changes. The file is fsynced.
    """
    name = os.fspath(path)
    what = f"set was_running in save image {name}"
    try:
        fd = os.open(name, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, what) from e
    try:
        _read_header_fd(fd, name)
        _pwrite_all(fd, struct.pack("<I", 1 if was_running else 0), WAS_RUNNING_OFFSET)
        os.fsync(fd)
    except OSError as e:
        raise _os_error(e, what) from e
    finally:
        os.close(fd)


def clone_or_copy(src_fd: int, dst_fd: int) -> bool:
    """Make the empty file ``dst_fd`` a copy of the file ``src_fd``.

    A reflink (``FICLONE``) where the filesystem supports it, which returns True;
    otherwise ``copy_file_range`` (or read and write where even that is not
    possible), which returns False.
    """
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as e:
        if e.errno not in _NO_REFLINK_ERRNOS:
            raise
    else:
        return True
    _copy(src_fd, dst_fd, os.fstat(src_fd).st_size)
    return False


# -- internals --------------------------------------------------------------------


def _read_header_fd(fd: int, name: str) -> SaveHeader:
    def refuse(reason: str) -> VmtreeError:
        return VmtreeError(errno.EINVAL, f"{name}: {reason}")

    try:
        raw = os.pread(fd, HEADER_SIZE, 0)
    except OSError as e:
        raise _os_error(e, f"read save image {name}") from e
    if len(raw) < HEADER_SIZE:
        raise refuse(f"{len(raw)} bytes, shorter than a save image header")
    magic, version, data_len, was_running, compressed, cookie_offset, *unused = _HEADER.unpack(raw)
    if magic == PARTIAL_MAGIC:
        raise refuse("incomplete save image (libvirt did not finish writing it)")
    if magic != MAGIC:
        raise refuse(f"not a libvirt QEMU save image (magic {magic!r})")
    if version not in SUPPORTED_VERSIONS:
        known = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
        shown = str(version) if version < 256 else f"{version:#x}"
        raise refuse(f"save image version {shown} is not supported (known: {known})")
    if was_running not in (0, 1):
        raise refuse(f"was_running is {was_running}, neither 0 nor 1")
    if compressed >= len(COMPRESSION_FORMATS):
        raise refuse(f"unknown stream compression {compressed}")
    if any(unused):
        raise refuse("unknown fields set in the header's unused words")
    if not 0 < data_len <= MAX_DATA_LEN:
        raise refuse(f"data_len {data_len} out of range (1..{MAX_DATA_LEN})")
    if cookie_offset >= data_len:
        raise refuse(f"cookieOffset {cookie_offset} is not below data_len {data_len}")

    try:
        data = os.pread(fd, data_len, HEADER_SIZE)
    except OSError as e:
        raise _os_error(e, f"read save image {name}") from e
    if len(data) < data_len:
        raise refuse(f"truncated: data_len is {data_len}, the file has {len(data)} bytes after it")

    xml_end = data.find(b"\0", 0, cookie_offset or data_len)
    if xml_end < 0:
        raise refuse("the domain XML has no terminating NUL before the cookie or data_len")
    try:
        xml = data[:xml_end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse(f"the domain XML is not UTF-8: {e}") from e
    if not xml.lstrip().startswith("<domain"):
        raise refuse("the embedded XML is not a <domain>")

    cookie = b""
    if cookie_offset:
        cookie_end = data.find(b"\0", cookie_offset)
        if cookie_end < 0:
            raise refuse("the migration cookie has no terminating NUL before data_len")
        cookie = data[cookie_offset:cookie_end]

    return SaveHeader(
        version=version,
        data_len=data_len,
        was_running=bool(was_running),
        compressed=compressed,
        cookie_offset=cookie_offset,
        xml=xml,
        cookie=cookie,
    )


def _header_region(old: SaveHeader, xml_bytes: bytes, name: str) -> bytes:
    """Bytes 0 to 92 + data_len of the rewritten image: header, XML, cookie, zeros."""
    cookie_bytes = old.cookie + b"\0" if old.has_cookie else b""
    used = len(xml_bytes) + len(cookie_bytes)
    if used > old.data_len:
        raise VmtreeError(
            errno.EFBIG,
            f"{name}: the new XML ({len(xml_bytes)} bytes with its NUL) and the cookie "
            f"({len(cookie_bytes)}) need {used} bytes; the image has room for {old.data_len}",
        )
    header = _HEADER.pack(
        MAGIC,
        old.version,
        old.data_len,
        1 if old.was_running else 0,
        old.compressed,
        len(xml_bytes) if old.has_cookie else 0,
        *([0] * 14),
    )
    return header + xml_bytes + cookie_bytes + bytes(old.data_len - used)


def _copy(src_fd: int, dst_fd: int, size: int) -> None:
    offset = 0
    use_copy_file_range = True
    while offset < size:
        count = min(size - offset, 1 << 30)
        if use_copy_file_range:
            try:
                done = os.copy_file_range(src_fd, dst_fd, count, offset, offset)
            except OSError as e:
                if e.errno not in _NO_COPY_FILE_RANGE_ERRNOS:
                    raise
                use_copy_file_range = False
                continue
        else:
            chunk = os.pread(src_fd, min(count, _COPY_CHUNK), offset)
            _pwrite_all(dst_fd, chunk, offset)
            done = len(chunk)
        if done == 0:
            raise OSError(errno.EIO, f"the source ended at {offset} bytes, {size} expected")
        offset += done


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise _os_error(e, f"open directory {directory}") from e
    try:
        os.fsync(fd)
    except OSError as e:
        raise _os_error(e, f"fsync directory {directory}") from e
    finally:
        os.close(fd)


def _os_error(e: OSError, what: str) -> VmtreeError:
    return VmtreeError(e.errno or errno.EIO, f"{what}: {e.strerror or e}")
