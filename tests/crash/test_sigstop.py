"""The daemon stopped (SIGSTOP) under load for a while, then continued: clients wait and go on.

A stopped daemon is not a dead one: the kernel keeps every client's request
queued, nothing may give up on it (no abort, no error), and once it runs again
every call returns, once. Four kinds of client run in threads, each making its
own system calls, before, during and after the stop: linked clones by
``mkdir``, ``rmdir`` of VMs made for it, writes to a volume, and reads of
``.vmtree/status``, a VM's ``state`` and ``ctl`` commands (``clone NEW``).
Afterwards every call has returned, each clone that returned success exists
once, each VM whose ``rmdir`` returned is gone, every written block reads back,
no intent is open and fsck is clean.

``VMTREE_SIGSTOP_SECONDS`` sets how long the daemon stays stopped (30).
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers.crash import sound_after_recovery
from tests.helpers.tree import Tree, listing, read_at, write_at

STOP_SECONDS = float(os.environ.get("VMTREE_SIGSTOP_SECONDS", "30"))
BEFORE_SECONDS = 2.0  # load before the stop, and again after the continue
RMDIR_VMS = 40
BLOCK = 4096


@dataclass
class Client:
    """One thread's calls: what returned, and how long the longest call took."""

    name: str
    done: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    longest: float = 0.0
    calls: int = 0

    def call(self, what: str, fn: Callable[[], object]) -> bool:
        started = time.monotonic()
        try:
            fn()
        except OSError as e:
            self.errors.append(f"{what}: {e}")
            return False
        finally:
            self.longest = max(self.longest, time.monotonic() - started)
            self.calls += 1
        self.done.append(what)
        return True


def _clones(vms: Path, client: Client, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        client.call(f"c{n}", functools.partial(os.mkdir, vms / "base" / "clones" / f"c{n}"))
        n += 1


def _rmdirs(vms: Path, client: Client, stop: threading.Event) -> None:
    for n in range(RMDIR_VMS):
        if stop.is_set():
            return
        client.call(f"r{n}", functools.partial(os.rmdir, vms / f"r{n}"))
        time.sleep(0.05)


def _writes(vms: Path, client: Client, stop: threading.Event) -> None:
    private = vms / "w" / "volumes" / "private.img"
    n = 0
    while not stop.is_set():
        data = f"block {n:08d}".encode().ljust(BLOCK, b".")
        client.call(str(n), functools.partial(write_at, private, data, n * BLOCK))
        n += 1


def _reads(vms: Path, client: Client, stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        client.call("status", (vms / ".vmtree" / "status").read_text)
        client.call("state", (vms / "w" / "state").read_text)

        def clone(n: int = n) -> None:
            fd = os.open(vms / "base" / "ctl", os.O_RDWR)
            try:
                os.write(fd, f"clone k{n}\n".encode())
                result = os.read(fd, 4096).decode().strip()
            finally:
                os.close(fd)
            if result != f"k{n}":
                raise OSError(0, f"ctl answered {result!r}")

        client.call(f"k{n}", clone)
        n += 1
        time.sleep(0.05)


def test_clients_wait_for_a_stopped_daemon_and_go_on(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = Tree(workdir)
    vms = tree.mount(["libvirt=none"])
    try:
        for name in ("base", "w", *(f"r{n}" for n in range(RMDIR_VMS))):
            os.mkdir(vms / name)
        stop = threading.Event()
        workers = {
            "clones": _clones,
            "rmdirs": _rmdirs,
            "writes": _writes,
            "reads": _reads,
        }
        clients = {name: Client(name) for name in workers}
        threads = [
            threading.Thread(target=work, args=(vms, clients[name], stop), name=name)
            for name, work in workers.items()
        ]
        for thread in threads:
            thread.start()
        assert tree.daemon is not None
        pid = tree.daemon.pid
        time.sleep(BEFORE_SECONDS)
        before = sum(c.calls for c in clients.values())
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            time.sleep(STOP_SECONDS)
            # Stopped, not dead: the mount is still there and nobody was told an error.
            assert tree.daemon.process is not None and tree.daemon.process.poll() is None
            during = sum(c.calls for c in clients.values()) - before
        finally:
            os.kill(pid, signal.SIGCONT)
        stopped_for = time.monotonic() - stopped_at
        time.sleep(BEFORE_SECONDS)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        hung = [t.name for t in threads if t.is_alive()]
        assert not hung, f"clients still blocked 120 s after SIGCONT: {hung}"
        for client in clients.values():
            assert not client.errors, f"{client.name}: {client.errors[:5]}"

        # Each clone that returned exists, once; each VM removed is gone; the data reads back.
        names = listing(vms)
        made = clients["clones"].done + [n for n in clients["reads"].done if n.startswith("k")]
        assert len(names) == len(set(names))
        assert not set(made) - set(names), f"clones that returned are missing: {made}"
        removed = set(clients["rmdirs"].done)
        assert not removed & set(names), f"VMs whose rmdir returned are there: {removed}"
        assert (
            set(names) == {"base", "w"} | set(made) | {f"r{n}" for n in range(RMDIR_VMS)} - removed
        ), names
        clones_listed = set(listing(vms / "base" / "clones"))
        assert clones_listed == set(made), clones_listed ^ set(made)
        private = vms / "w" / "volumes" / "private.img"
        for n in map(int, clients["writes"].done):
            want = f"block {n:08d}".encode().ljust(BLOCK, b".")
            assert read_at(private, BLOCK, n * BLOCK) == want, f"block {n} does not read back"

        assert tree.daemon.process.poll() is None, "the daemon died"
        # The fault took: the process stopped is the one that serves the mount.
        longest = max(c.longest for c in clients.values())
        assert during == 0 and longest >= STOP_SECONDS * 0.9, (
            f"{during} calls returned while the daemon was stopped, the longest waited "
            f"{longest:.1f} s: pid {pid} is not what serves the mount"
        )
        sound_after_recovery(tree, "after SIGSTOP and SIGCONT")
        with capsys.disabled():
            print(
                f"\nSIGSTOP of the daemon for {stopped_for:.1f} s: "
                + ", ".join(f"{c.name} {len(c.done)} calls" for c in clients.values())
                + f"; {during} calls returned while it was stopped; "
                f"the longest call waited {longest:.1f} s; 0 errors, 0 lost"
            )
    finally:
        process = tree.daemon.process if tree.daemon is not None else None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # never leave our daemon stopped
        tree.unmount()
