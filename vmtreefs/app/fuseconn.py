"""A FUSE connection and the daemon behind it, seen from outside: is the daemon alive,
dying or gone, and ending a connection that nobody will answer.

Standard library only: the watchdog (``app/watchdog.py``) imports this and must start
in a moment and stay small.
"""

from __future__ import annotations

import errno
import logging
import re
import signal
import subprocess
from pathlib import Path

log = logging.getLogger("vmtreefs.fuseconn")

FUSECTL = Path("/sys/fs/fuse/connections")
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
_PENDING = re.compile(r"^(?:SigPnd|ShdPnd):\s*([0-9a-f]+)$", re.M)


def _state(stat_path: Path) -> str | None:
    """The one-letter state of /proc/PID[/task/TID]/stat, None if it is gone."""
    try:
        return stat_path.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def running(pid: int) -> bool:
    """Alive and not a zombie: a daemon reparented to init may linger unreaped."""
    return _state(Path(f"/proc/{pid}/stat")) not in (None, "Z", "X")


def dying(pid: int) -> bool:
    """The process is being killed but has not finished: a fatal signal is pending in a
    thread (the kernel marks every thread with SIGKILL), or its main thread is a zombie
    while other threads live on. Such a process still holds ``/dev/fuse`` open."""
    tasks = Path(f"/proc/{pid}/task")
    try:
        threads = list(tasks.iterdir())
    except OSError:
        return False  # gone: its files, /dev/fuse among them, are closed
    live_threads = 0
    for task in threads:
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        if any(int(mask, 16) & _SIGKILL_BIT for mask in _PENDING.findall(status)):
            return True
        if _state(task / "stat") not in (None, "Z", "X"):
            live_threads += 1
    return live_threads > 0 and _state(Path(f"/proc/{pid}/stat")) in ("Z", "X")


def connection_of(device: str) -> int | None:
    """The fusectl number of a FUSE mount's device ``0:MINOR`` (its st_dev)."""
    major, _, minor = device.partition(":")
    if major != "0" or not minor.isdigit():
        return None
    return int(minor)


def abort(connection: int) -> bool:
    """End a FUSE connection through fusectl: every waiting request gets ENOTCONN.

    Returns whether it was there to abort. fusectl is mounted if it is not yet (the
    kernel makes its directory; systemd mounts it at boot, a bare machine may not).
    """
    directory = FUSECTL / str(connection)
    if not directory.exists() and FUSECTL.is_dir() and not any(FUSECTL.iterdir()):
        subprocess.run(
            ["mount", "-t", "fusectl", "none", str(FUSECTL)], check=False, capture_output=True
        )
    try:
        (directory / "abort").write_text("1")
    except OSError as e:
        if e.errno != errno.ENOENT:  # ENOENT: the connection is gone already
            log.warning("cannot abort FUSE connection %d: %s", connection, e.strerror or e)
        return False
    return True
