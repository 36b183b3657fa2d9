"""A dead daemon never leaves a hung mount.

As an administrator meets it: clients make clones in ``vms/base/clones/`` from three
threads and list the tree from a fourth, the daemon dies (SIGKILL as from the OOM
killer or ``systemctl kill -s KILL``, SIGSEGV as from a crash in libfuse), and then the
mount point is cleared with the ordinary tools and mounted again. Before the watchdog,
a daemon thread stuck in an entry invalidation kept ``/dev/fuse`` open and the clients
hung for good within a few rounds.

Each round checks that every client got ENOTCONN (or ECONNABORTED) within
:data:`CLIENT_BOUND` seconds of the signal, that the way of clearing the mount point
chosen for the round works without ``vmtreefs umount`` (``fusermount3 -u -z``,
``umount -l``, plain ``fusermount3 -u``, or ``vmtreefs mount`` straight onto the dead
mount point), that the daemon finished dying, and that every clone acknowledged before
the signal is there after the remount. ``VMTREE_DEAD_ROUNDS`` sets the number of rounds.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.crash import sound_after_recovery
from tests.helpers.images import is_mountpoint
from tests.helpers.tree import Tree, write_at

ROUNDS = int(os.environ.get("VMTREE_DEAD_ROUNDS", "8"))
SEED = int(os.environ.get("VMTREE_CRASH_SEED", "19"))
CLIENT_BOUND = 2.0
CUT = (errno.ENOTCONN, errno.ECONNABORTED)
SIGNALS = [signal.SIGKILL, signal.SIGSEGV]
CLEARINGS = ["fusermount3 -u -z", "umount -l", "fusermount3 -u", "mount again"]


@dataclass
class Client:
    """A thread making clones (or listing) until the mount is cut off."""

    vms: Path
    name: str
    lister: bool = False
    made: list[str] = field(default_factory=list)
    error: BaseException | None = None
    ended_at: float | None = None

    def run(self) -> None:
        n = 0
        try:
            while True:
                if self.lister:
                    for entry in os.listdir(self.vms):
                        os.lstat(self.vms / entry)
                else:
                    clone = f"{self.name}-{n}"
                    os.mkdir(self.vms / "base" / "clones" / clone)
                    self.made.append(clone)
                n += 1
        except BaseException as e:
            self.error = e
        finally:
            self.ended_at = time.monotonic()


@pytest.fixture
def no_core_dumps() -> Iterator[None]:
    """A daemon killed by SIGSEGV must not leave a core file in the checkout."""
    saved = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, saved)


def clear(mountpoint: Path, how: str) -> None:
    """Clear a dead mount point the way the round says; ``mount again`` clears nothing."""
    commands = {
        "fusermount3 -u -z": ["fusermount3", "-u", "-z", str(mountpoint)],
        "umount -l": ["umount", "-l", str(mountpoint)],
        "fusermount3 -u": ["fusermount3", "-u", str(mountpoint)],
    }
    if how in commands:
        done = subprocess.run(commands[how], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{how}: {done.stderr}"
        assert not is_mountpoint(mountpoint), f"{how} left {mountpoint} mounted"


def test_clients_of_a_dead_daemon_get_ENOTCONN_and_the_mount_point_clears(
    workdir: Path, no_core_dumps: None, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    tree = Tree(workdir)
    tree.mount()
    waits: list[float] = []
    try:
        os.mkdir(tree.vms / "base")
        write_at(tree.vms / "base" / "volumes" / "private.img", b"base")
        acknowledged: list[str] = []
        for n in range(ROUNDS):
            sig = SIGNALS[n % len(SIGNALS)]
            how = CLEARINGS[n % len(CLEARINGS)]
            what = f"round {n}: {sig.name}, then {how} (seed {SEED})"
            clients = [Client(tree.vms, f"r{n}c{i}") for i in range(3)]
            clients.append(Client(tree.vms, f"r{n}ls", lister=True))
            threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.2, 1.0))
            assert tree.daemon is not None
            daemon = tree.daemon
            assert daemon.process is not None
            daemon.process.send_signal(sig)
            killed_at = time.monotonic()
            for thread in threads:
                thread.join(timeout=max(0.0, killed_at + CLIENT_BOUND - time.monotonic()))
            hung = [c.name for c, t in zip(clients, threads, strict=True) if t.is_alive()]
            if hung:
                daemon.abort_connection()  # so that the test fails rather than hangs
                raise AssertionError(f"{what}: clients still hang {CLIENT_BOUND} s after: {hung}")
            for client in clients:
                assert isinstance(client.error, OSError) and client.error.errno in CUT, (
                    f"{what}: {client.name} ended by {client.error!r}, not ENOTCONN"
                )
                assert client.ended_at is not None
                waits.append(client.ended_at - killed_at)
                acknowledged += client.made
            clear(tree.vms, how)
            daemon.process.wait(timeout=30)  # it finished dying: nothing holds it
            tree.daemon = None
            vms = tree.mount()  # `mount again`: straight onto the dead mount point
            present = set(os.listdir(vms))
            missing = [name for name in acknowledged if name not in present]
            assert not missing, f"{what}: acknowledged clones lost: {missing[:5]}"
            sound_after_recovery(tree, what)
    finally:
        tree.unmount()
    waits.sort()
    with capsys.disabled():
        print(
            f"\ndead daemon: {ROUNDS} rounds, {len(waits)} clients freed after at most "
            f"{waits[-1] * 1000:.0f} ms (median {waits[len(waits) // 2] * 1000:.0f} ms)"
        )


HELPER = Path("/sbin/mount.fuse.vmtreefs")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mount_helper() -> Iterator[None]:
    """``mount -t fuse.vmtreefs`` for this checkout, installed for the test only; an
    administrator's own helper is used as it is and left alone."""
    if HELPER.exists():
        yield
        return
    vmtreefs = Path(sys.executable).with_name("vmtreefs")
    text = (REPO / "mount" / "mount.fuse.vmtreefs").read_text()
    default = "DEFAULT_VMTREEFS=/usr/local/bin/vmtreefs"
    HELPER.write_text(text.replace(default, f"DEFAULT_VMTREEFS='{vmtreefs}'"))
    HELPER.chmod(0o755)
    try:
        yield
    finally:
        HELPER.unlink()


def test_mount_t_goes_straight_onto_a_dead_mount_point(workdir: Path, mount_helper: None) -> None:
    source, vms = workdir / "source", workdir / "vms"
    source.mkdir()
    vms.mkdir()

    def mount_t() -> tuple[int, str]:
        """``mount -t fuse.vmtreefs``: the daemon's pid, and what mount printed."""
        options = "engine=reflink,libvirt=none"
        command = ["mount", "-t", "fuse.vmtreefs", "-o", options, str(source), str(vms)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        pid = json.loads((source / "vmtreefs.lock").read_text())["pid"]
        assert isinstance(pid, int)
        return pid, done.stderr

    pid, _ = mount_t()
    try:
        os.mkdir(vms / "kept")
        os.kill(pid, signal.SIGKILL)  # the daemon this test's mount(8) started
        deadline = time.monotonic() + CLIENT_BOUND
        while time.monotonic() < deadline:
            try:
                os.listdir(vms)
            except OSError as e:
                assert e.errno in CUT
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the dead mount still answers {CLIENT_BOUND} s after SIGKILL")
        pid, said = mount_t()  # no unmount in between
        assert "kept" in os.listdir(vms)
        assert "detached the dead mount" in said
    finally:
        umount = [sys.executable, "-m", "vmtreefs", "umount", str(vms)]
        subprocess.run(umount, capture_output=True, timeout=150)
        if is_mountpoint(vms):
            subprocess.run(["fusermount3", "-u", "-z", str(vms)], check=False)
