"""A small process beside the daemon that ends the mount's FUSE connection when the
daemon dies, so that no client is left hanging.

A daemon killed while one of its threads waits in the kernel for a directory lock that
a client's request to its own mount holds (an entry invalidation during a ``mkdir``)
cannot finish dying: ``/dev/fuse`` stays open, the kernel never learns that nobody will
answer, and every process that touches the mount hangs for good. Neither ``umount -l``,
``fusermount3 -u -z`` nor systemd ends such a connection. The watchdog sees the daemon
dying (a fatal signal pending, or its main thread a zombie while a thread lives on) and
writes to the connection's fusectl ``abort``: every waiting client gets ENOTCONN, the
stuck thread gets its lock, and the daemon finishes dying.

The daemon starts it (``python -m vmtreefs.app.watchdog PID``) and writes to its stdin
``conn N`` (the fusectl number) once the mount is made and ``bye`` once it unmounted.
End of file without ``bye`` means every thread of the daemon has exited and the kernel
closed the connection itself. The watchdog ignores SIGTERM, SIGINT and SIGHUP: it ends
when the daemon does, however that happens.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from vmtreefs import mountinfo
from vmtreefs.app import fuseconn

log = logging.getLogger("vmtreefs.watchdog")

POLL_SECONDS = 0.1
"""How often the daemon's state is read: a dying daemon's clients are freed within this."""

LINGER_SECONDS = 60.0
"""How long to wait, after an abort, for the daemon to finish dying before leaving."""


GONE_SECONDS = 5.0
"""How long a daemon may be gone before its pipe closes (a child may hold it a moment)."""


class Watchdog:
    """The daemon's state, read every :data:`POLL_SECONDS`, and what it said on the pipe."""

    def __init__(self, pid: int, commands: int) -> None:
        self.pid = pid
        self.commands = commands
        self.buffer = b""
        self.connection: int | None = None
        self.said_bye = False
        self.closed = False
        self.aborted_at: float | None = None
        self.gone_since: float | None = None

    def read_commands(self, timeout: float) -> None:
        if not select.select([self.commands], [], [], timeout)[0]:
            return
        chunk = os.read(self.commands, 256)
        if not chunk:
            self.closed = True
            return
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            word, _, value = line.decode(errors="replace").partition(" ")
            if word == "conn" and value.isdigit():
                self.connection = int(value)
            elif word == "bye":
                self.said_bye = True

    def step(self) -> bool:
        """One look at the daemon; False once there is nothing left to watch."""
        self.read_commands(POLL_SECONDS)
        if self.said_bye:
            return False
        if self.closed:
            if self.aborted_at is None and self.connection is not None:
                log.warning(
                    "the daemon (pid %d) died without unmounting; the kernel ended its "
                    "connection: clear the mount point with fusermount3 -u -z, or mount again",
                    self.pid,
                )
            return False
        if self.aborted_at is not None:
            if time.monotonic() - self.aborted_at > LINGER_SECONDS:
                log.warning("the daemon (pid %d) is still not gone; leaving it", self.pid)
                return False
            return True
        if self.connection is not None and fuseconn.dying(self.pid):
            self.aborted_at = time.monotonic()
            if fuseconn.abort(self.connection):
                log.warning(
                    "the daemon (pid %d) is dying with a request unanswered: aborted its "
                    "FUSE connection %d, so its clients get ENOTCONN instead of hanging; "
                    "clear the mount point with fusermount3 -u -z, or mount again",
                    self.pid,
                    self.connection,
                )
        elif fuseconn.running(self.pid):
            self.gone_since = None
        elif self.gone_since is None:
            self.gone_since = time.monotonic()
        elif time.monotonic() - self.gone_since > GONE_SECONDS:
            # End of file should have come: another process holds the pipe open.
            return False
        return True


class Guard:
    """The daemon's end: starts the watchdog, then tells it the connection and the goodbye.

    Without a watchdog the mount works as before; the failure to start one is logged.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.pipe: int | None = None

    def start(self) -> None:
        read_end, write_end = os.pipe()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vmtreefs.app.watchdog", str(os.getpid())],
                stdin=read_end,
                cwd="/",
                start_new_session=True,
            )
        except OSError as e:
            os.close(write_end)
            log.warning("no watchdog (%s): a crash may leave the mount hanging", e)
            return
        finally:
            os.close(read_end)
        self.pipe = write_end

    def mounted(self, mountpoint: Path) -> None:
        """Name the connection to abort; read from mountinfo, as a stat would ask the
        mount itself before it serves."""
        entry = mountinfo.mounted_at(str(mountpoint), "fuse.vmtreefs")
        connection = None if entry is None else fuseconn.connection_of(entry.device)
        if connection is None:
            log.warning("no FUSE connection found for %s: the watchdog cannot help", mountpoint)
            return
        self._tell(f"conn {connection}")

    def unmounted(self) -> None:
        self._tell("bye")
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.warning("the watchdog (pid %d) did not stop", self.process.pid)

    def _tell(self, line: str) -> None:
        if self.pipe is None:
            return
        try:
            os.write(self.pipe, f"{line}\n".encode())
        except OSError as e:
            log.warning("the watchdog does not listen (%s)", e.strerror or e)


def main(argv: list[str]) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    watchdog = Watchdog(int(argv[0]), sys.stdin.fileno())
    while watchdog.step():
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
