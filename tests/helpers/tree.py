"""A mounted tree for a test: SOURCE, mount point and daemon, plus small readers."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from tests.helpers.mounts import Daemon
from vmtreefs.rules import status


class Tree:
    """A mounted tree: SOURCE, the mount point, and the daemon serving it."""

    def __init__(self, workdir: Path, source: Path | None = None, *, fork: bool = False) -> None:
        """``source`` elsewhere than ``workdir/source``: on a filesystem of its own.
        ``fork``: daemons start as forks of this process (:func:`mounts.fork_daemon`)."""
        self.workdir = workdir
        self.fork = fork
        self.source = source or workdir / "source"
        self.vms = workdir / "vms"
        self.source.mkdir(exist_ok=True)
        self.vms.mkdir(exist_ok=True)
        self.daemon: Daemon | None = None

    def mount(self, options: list[str] | None = None) -> Path:
        self.daemon = Daemon(self.source, self.vms, options, fork=self.fork)
        self.daemon.start()
        return self.vms

    def unmount(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def remount(self) -> Path:
        self.unmount()
        return self.mount()

    def status(self) -> dict[str, str]:
        fields = status.parse((self.vms / ".vmtree" / "status").read_text())
        return {k: v for k, v in fields if not k.startswith(("inventory_", "intent_"))}

    def intents_begun(self) -> int:
        """How many intents the store ever began (ids are never reused), read from
        ``SOURCE/vmtree.db`` as an administrator can; each is a synchronous commit to
        begin and one to complete."""
        conn = sqlite3.connect(f"file:{self.source / 'vmtree.db'}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'intents'").fetchone()
            return int(row[0]) if row else 0
        finally:
            conn.close()

    def log(self) -> str:
        """Everything the daemons of this tree logged, also after they stopped."""
        try:
            return (self.vms.parent / f"{self.vms.name}.daemon.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""


def listing(directory: Path) -> list[str]:
    """What `ls` shows: the names, sorted, without the hidden .vmtree."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("."))


def write_at(path: Path, data: bytes, offset: int = 0) -> None:
    """pwrite into a file; the close syncs a volume, so a refused write fails here at the latest."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def read_at(path: Path, size: int, offset: int = 0) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def head(path: Path, size: int) -> bytes:
    """The first bytes of a file, without reading a multi-GiB volume to the end."""
    with open(path, "rb") as f:
        return f.read(size)


def error_of(fn: Callable[..., object], *args: object) -> int:
    """The errno a call fails with; a call that succeeds fails the test."""
    try:
        fn(*args)
    except OSError as e:
        assert e.errno is not None
        return e.errno
    raise AssertionError(f"{fn} did not fail")


def ctl(vms: Path, vm: str, command: str) -> str:
    """`exec 3<>ctl; echo CMD >&3; read -u 3`: write a command, read back its result line."""
    fd = os.open(vms / vm / "ctl", os.O_RDWR)
    try:
        os.write(fd, command.encode() + b"\n")
        return os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
