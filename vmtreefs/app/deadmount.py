"""A vmtreefs mount whose daemon is gone: recognised without touching the mount (a stat
of a hung one never returns), its connection ended, its mount point cleared."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from pathlib import Path

from vmtreefs import mountinfo
from vmtreefs.app import fuseconn
from vmtreefs.app.source import read_lock_info
from vmtreefs.errors import VmtreeError

log = logging.getLogger("vmtreefs")

STAT_TIMEOUT = 2.0
"""How long a mount whose daemon is unknown may take to answer a stat before it counts
as hung."""


def daemon_pid(entry: mountinfo.MountEntry) -> int | None:
    """The pid in SOURCE's lock file (SOURCE is the mount's fsname)."""
    pid = read_lock_info(Path(entry.source)).get("pid")
    return pid if isinstance(pid, int) else None


def answers(mountpoint: Path) -> bool | None:
    """True if a stat of the mount point works, False if the connection is cut (ENOTCONN),
    None if it does not answer in :data:`STAT_TIMEOUT`."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            os.stat(mountpoint)
            outcome.append(True)
        except OSError as e:
            outcome.append(e.errno not in (errno.ENOTCONN, errno.ECONNABORTED))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(STAT_TIMEOUT)
    return outcome[0] if outcome else None


def is_dead(mountpoint: Path, entry: mountinfo.MountEntry) -> bool:
    pid = daemon_pid(entry)
    if pid is not None:
        return not fuseconn.running(pid) or fuseconn.dying(pid)
    return answers(mountpoint) is False


def end_connection(mountpoint: Path, entry: mountinfo.MountEntry) -> None:
    """Abort the connection of a dead mount: the clients a dying daemon left waiting get
    ENOTCONN, and a thread of it stuck in the kernel on its own mount can finish dying."""
    connection = fuseconn.connection_of(entry.device)
    if connection is not None and fuseconn.abort(connection):
        log.info("aborted the FUSE connection of %s: its daemon is dead", mountpoint)


def clear_dead_mount(mountpoint: Path) -> None:
    """Make room for a new mount where a vmtreefs daemon died: end its connection and
    detach it (``fusermount3 -u -z``). A mount that still has its daemon is EBUSY."""
    entry = mountinfo.mounted_at(str(mountpoint), "fuse.vmtreefs")
    if entry is None:
        return
    if not is_dead(mountpoint, entry):
        pid = daemon_pid(entry)
        served = f"served by pid {pid}" if pid is not None else "its daemon still answers"
        raise VmtreeError(errno.EBUSY, f"{mountpoint} is mounted ({served})")
    end_connection(mountpoint, entry)
    done = subprocess.run(
        ["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise VmtreeError(
            errno.EBUSY,
            f"cannot detach the dead mount at {mountpoint}: {done.stderr.strip() or 'failed'}",
        )
    log.warning("detached the dead mount at %s (its daemon had died) to mount again", mountpoint)
