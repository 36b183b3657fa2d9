"""Device-mapper ioctls for the hot path: pool messages, status, suspend and resume.

``dmsetup`` costs a process per call (2-5 ms on a host, a third of a second in a
TCG guest), and every clone reads the pool's status and sends it messages. These are the
ioctls dmsetup itself makes (``linux/dm-ioctl.h``), on ``/dev/mapper/control``.
Creating, loading and removing devices stays with dmsetup, which also makes
their ``/dev/mapper`` nodes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

from vmtreefs.engine.base import EngineError

CONTROL = "/dev/mapper/control"
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7]: 312 bytes.
_HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]: 40 bytes.
_SPEC = struct.Struct("=QQiI16s")
_VERSION = (4, 0, 0)  # the interface version we speak; the kernel accepts any 4.x
_SUSPEND_FLAG = 1 << 1
_BUFFER_FULL_FLAG = 1 << 8
_STATUS_ROOM = 4096


def _iowr(number: int) -> int:
    return (3 << 30) | (_HEADER.size << 16) | (0xFD << 8) | number


_DEV_SUSPEND = _iowr(6)
_TABLE_STATUS = _iowr(12)
_TARGET_MSG = _iowr(14)


class DmControl:
    """An open ``/dev/mapper/control``; safe to share between threads."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()

    def _control(self) -> int:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
                except OSError as e:
                    raise EngineError(
                        e.errno or errno.EIO, f"cannot open {CONTROL}: {e.strerror}"
                    ) from None
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _call(
        self,
        request: int,
        name: str,
        what: str,
        flags: int = 0,
        payload: bytes = b"",
        room: int = 0,
    ) -> bytearray:
        encoded = name.encode()
        if not 0 < len(encoded) < 128:
            raise EngineError(errno.EINVAL, f"{what}: bad device name {name!r}")
        size = _HEADER.size + max(len(payload), room)
        buf = bytearray(size)
        _HEADER.pack_into(
            buf, 0, *_VERSION, size, _HEADER.size, 0, 0, flags, 0, 0, 0, encoded, b"", b""
        )
        buf[_HEADER.size : _HEADER.size + len(payload)] = payload
        try:
            fcntl.ioctl(self._control(), request, buf, True)
        except OSError as e:
            code = e.errno or errno.EIO
            if code == errno.ENODATA:  # a thin device id the pool does not hold
                code = errno.ENOENT
            raise EngineError(code, f"{what}: {e.strerror}") from None
        return buf

    def message(self, name: str, text: str, what: str) -> None:
        """``dmsetup message NAME 0 TEXT``."""
        payload = struct.pack("=Q", 0) + text.encode() + b"\0"
        self._call(_TARGET_MSG, name, what, payload=payload)

    def suspend(self, name: str, what: str) -> None:
        self._call(_DEV_SUSPEND, name, what, flags=_SUSPEND_FLAG)

    def resume(self, name: str, what: str) -> None:
        self._call(_DEV_SUSPEND, name, what)

    def status(self, name: str, what: str) -> list[str]:
        """``dmsetup status NAME``: one line per target, ``START LENGTH TYPE PARAMS``."""
        room = _STATUS_ROOM
        while True:
            buf = self._call(_TABLE_STATUS, name, what, room=room)
            fields = _HEADER.unpack_from(buf)
            data_start, target_count, flags = fields[4], fields[5], fields[7]
            if not flags & _BUFFER_FULL_FLAG:
                break
            room *= 4
        lines = []
        offset = data_start
        for _ in range(target_count):
            start, length, _status, following, kind = _SPEC.unpack_from(buf, offset)
            params_at = offset + _SPEC.size
            params = buf[params_at : buf.index(b"\0", params_at)].decode()
            target_type = kind.split(b"\0", 1)[0].decode()
            lines.append(f"{start} {length} {target_type} {params}")
            offset = data_start + following
        return lines
