"""A real vmtreefs mount for a test: a daemon subprocess we know by pid, always cleaned up."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from tests.helpers.images import is_mountpoint
from vmtreefs import mountinfo

READY_TIMEOUT = 120.0
DYING_TIMEOUT = 10.0
"""How long a killed daemon may take to die once its mount point is cleared."""


class MountFailed(Exception):
    """The daemon exited before its mount answered; the message holds its log."""


class Process(Protocol):
    """What the tests ask of a daemon's process: a :class:`subprocess.Popen`, or a fork."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class Forked:
    """A child of this process, waited for like a :class:`subprocess.Popen`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def fork_daemon(argv: list[str], log_path: Path, keep_fd: int) -> Forked:
    """``vmtreefs ARGV`` in a fork of this process, which has imported vmtreefs already.

    The daemon runs the same code as ``python -m vmtreefs``; only the interpreter's
    start and imports are skipped, which take most of a minute in a TCG guest, where
    the power-cut test mounts hundreds of times. Its output goes to ``log_path``.
    """
    import vmtreefs.app.daemon  # noqa: F401 - imported once here, not in every child
    from vmtreefs.app.cli import main

    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.fork()
    if pid:
        os.close(log_fd)
        return Forked(pid)
    code = 1
    try:  # the child: never back into the test's code, whatever happens here
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.closerange(3, keep_fd)
        os.closerange(keep_fd + 1, 1 << 16)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        for handler in logging.root.handlers[:]:  # pytest's, which hold its captures
            logging.root.removeHandler(handler)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class Daemon:
    """``vmtreefs mount -f`` in a subprocess, with its log in a file the test can read."""

    def __init__(
        self,
        source: Path,
        mountpoint: Path,
        options: list[str] | None = None,
        *,
        fork: bool = False,
    ) -> None:
        """``fork``: start the daemon by :func:`fork_daemon` rather than a new interpreter."""
        self.source = source
        self.mountpoint = mountpoint
        self.options = options or []
        self.fork = fork
        self.log_path = mountpoint.parent / f"{mountpoint.name}.daemon.log"
        self.process: Process | None = None
        self.connection: int | None = None  # its fusectl number, once mounted

    def start(self) -> None:
        read_end, write_end = os.pipe()
        argv = ["mount", str(self.source), str(self.mountpoint), "-f"]
        argv += ["--ready-fd", str(write_end)]
        for option in self.options:
            argv += ["-o", option]
        if self.fork:
            self.process = fork_daemon(argv, self.log_path, write_end)
        else:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "vmtreefs", *argv],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    pass_fds=(write_end,),
                )
        os.close(write_end)
        answer = b""
        deadline = time.monotonic() + READY_TIMEOUT
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while b"\n" not in answer and time.monotonic() < deadline:
                if select.select([pipe], [], [], 0.5)[0]:
                    chunk = pipe.read(64)
                    if not chunk:
                        break
                    answer += chunk
        if not answer.startswith(b"ready"):
            self.stop()
            raise MountFailed(self.log())
        entry = mountinfo.mounted_at(str(self.mountpoint), "fuse.vmtreefs")
        self.connection = None if entry is None else int(entry.device.split(":")[1])

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill9(self) -> None:
        """Simulate a crash: SIGKILL the daemon, then clear the dead mount the way an
        administrator would (:meth:`clear_dead`)."""
        self.kill()
        self.clear_dead()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    def clear_dead(self) -> None:
        """A plain ``fusermount3 -u -z`` of the killed daemon's mount, then its death.

        The daemon's watchdog must have ended the connection, so that a daemon thread
        stuck in the kernel on its own mount can finish dying; if the daemon does not die,
        its clients would hang for good: the connection is aborted here so that the
        test fails instead of hanging.
        """
        assert self.process is not None
        subprocess.run(
            ["fusermount3", "-u", "-z", str(self.mountpoint)],
            check=False,
            capture_output=True,
            timeout=30,
        )
        try:
            self.process.wait(timeout=DYING_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.abort_connection()
            self.process.wait(timeout=30)
            raise AssertionError(
                f"the killed daemon (pid {self.pid}) did not finish dying in "
                f"{DYING_TIMEOUT:.0f} s: its mount hung until the test aborted it"
            ) from None

    def abort_connection(self) -> None:
        """What the watchdog should have done: end the mount's FUSE connection."""
        if self.connection is not None:
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{self.connection}/abort").write_text("1")

    def stop(self) -> None:
        """Unmount and wait for the daemon; escalate only against our own pid."""
        if is_mountpoint(self.mountpoint):
            subprocess.run(
                ["fusermount3", "-u", str(self.mountpoint)], check=False, capture_output=True
            )
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.send_signal(signal.SIGKILL)
                    self.process.wait(timeout=30)
        if is_mountpoint(self.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)
        # A daemon that was killed cannot unmount the reflink image it attached.
        pool = self.source / "pool"
        if (self.source / "reflink.xfs").exists() and is_mountpoint(pool):
            subprocess.run(["umount", str(pool)], check=False)


@contextmanager
def mounted(source: Path, mountpoint: Path, options: list[str] | None = None) -> Iterator[Daemon]:
    mountpoint.mkdir(exist_ok=True)
    daemon = Daemon(source, mountpoint, options)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
