"""libvirtd dies (SIGKILL) in the middle of a save (in its pause, and in its save job), a
restore, a disposable and a hot savestate's making, and is started again: the tree
reconnects and settles each one.

The libvirtd killed is one of this test's own (tests/helpers/libvirtd.py), never
the machine's, which other test runs may be using. Each fault is injected while
libvirt is at the command's work (its save job runs, the restored domain is
being loaded), found by watching libvirt, not by a timer. After libvirtd is
back, what a user would check: the ctl call returned (an error with a reason,
or success); no intent is left open; every domain of the tree runs and is a VM
the tree lists as running, none paused, none twice; a VM that ran before a save
runs after it; a savestate is whole and restorable, or not there; a disposable
runs or is gone; fsck is clean after the unmount.

``VMTREE_LIBVIRT_FAULT_ROUNDS`` repeats the five faults (1); the rounds after the
first kill a random moment (``VMTREE_CRASH_SEED``) up to 2 s later, so that
libvirt may finish some of the work first.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.crash.test_kill_vm_ops import (
    MARK_AT,
    running_domains,
    start_w_and_r,
    vms_running,
    wait_alive,
)
from tests.helpers.crash import sound_after_recovery
from tests.helpers.images import mounted_image
from tests.helpers.libvirt import cleanup_domains, connection
from tests.helpers.libvirtd import PrivateLibvirt, private_libvirt
from tests.helpers.tree import head, listing, read_at, write_at
from tests.vm.conftest import VmTree

ROUNDS = int(os.environ.get("VMTREE_LIBVIRT_FAULT_ROUNDS", "1"))
SEED = int(os.environ.get("VMTREE_CRASH_SEED", str(int(time.time()))))
MAX_LATER = 2.0  # seconds after libvirt is at it, for the rounds after the first
CALL_TIMEOUT = 180.0
SETTLE_TIMEOUT = 180.0
HOT_TIMEOUT = 600.0  # a hot savestate boots a runner: TCG on a busy host


class FaultTree(VmTree):
    """A tree whose VMs run under a libvirtd of the test's own."""

    def __init__(self, workdir: Path, guest: Path, libvirtd: PrivateLibvirt) -> None:
        super().__init__(workdir, guest)
        self.libvirtd = libvirtd
        self.options.append(f"libvirt={libvirtd.uri}")

    def domains(self) -> dict[str, int]:
        """Every domain of this tree libvirt has, active or not: name -> libvirt state."""
        prefix = f"vmtree-{self.status()['tree_id']}-"
        found = {}
        with connection(self.libvirtd.uri) as conn:
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):  # gone meanwhile
                    if dom.name().startswith(prefix):
                        found[dom.name()] = dom.state()[0]
        return found


@pytest.fixture
def faults_tree(demo_guest: Path) -> Iterator[FaultTree]:
    with mounted_image("xfs", "4G") as workdir, private_libvirt() as libvirtd:
        tree = FaultTree(workdir, demo_guest, libvirtd)
        try:
            tree.mount()
            yield tree
        finally:
            try:
                if "libvirtd" not in libvirtd.pids:
                    libvirtd.start()
                with connection(libvirtd.uri) as conn:
                    for tree_id in tree.tree_ids:
                        cleanup_domains(conn, f"vmtree-{tree_id}-")
            finally:
                tree.unmount()


def _wait_for(what: str, test: Callable[[Any], bool], uri: str, timeout: float) -> None:
    """Poll libvirt (a connection of our own) until ``test(conn)`` holds."""
    deadline = time.monotonic() + timeout
    with connection(uri) as conn:
        while not test(conn):
            assert time.monotonic() < deadline, f"libvirt never showed {what}"
            time.sleep(0.02)


def _has_job(conn: Any, name_part: str) -> bool:
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        if name_part in dom.name():
            with contextlib.suppress(libvirt.libvirtError):
                if dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                    return True
    return False


def _new_domain(before: set[str]) -> Callable[[Any], bool]:
    return lambda conn: bool({d.name() for d in conn.listAllDomains(0)} - before)


class Fault:
    """One ctl call with libvirtd killed in the middle of it, and started again."""

    def __init__(self, tree: FaultTree, vm: str, command: str) -> None:
        self.tree, self.vm, self.command = tree, vm, command
        self.result: str | None = None
        self.error: OSError | None = None
        self.waited = 0.0
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        started = time.monotonic()
        try:
            self.result = self.tree.ctl(self.vm, self.command)
        except OSError as e:
            self.error = e
        self.waited = time.monotonic() - started

    def inject(
        self, when: Callable[[Any], bool], what: str, later: float = 0.0, timeout: float = 120.0
    ) -> None:
        """Start the call, SIGKILL libvirtd ``later`` seconds after libvirt shows ``when``,
        start it again."""
        self._thread.start()
        _wait_for(what, when, self.tree.libvirtd.uri, timeout)
        time.sleep(later)
        self.tree.libvirtd.kill9()
        time.sleep(1.0)  # libvirt stays away a moment: the tree sees the drop
        self.tree.libvirtd.start()
        self._thread.join(CALL_TIMEOUT)
        assert not self._thread.is_alive(), f"ctl {self.command} still blocks"

    def inject_frozen(self, wait: float) -> None:
        """Stop libvirtd, start the call, SIGKILL libvirtd ``wait`` seconds later (the
        call is then waiting for libvirt's answer), start it again."""
        self.tree.libvirtd.freeze()
        self._thread.start()
        time.sleep(wait)
        self.tree.libvirtd.kill9()
        time.sleep(1.0)
        self.tree.libvirtd.start()
        self._thread.join(CALL_TIMEOUT)
        assert not self._thread.is_alive(), f"ctl {self.command} still blocks"

    def outcome(self) -> str:
        if self.error is not None:
            return f"error {os.strerror(self.error.errno or 0)} after {self.waited:.1f} s"
        return f"{self.result!r} after {self.waited:.1f} s"


def settled(tree: FaultTree) -> None:
    """Until no intent is open and libvirt runs exactly the VMs the tree lists running,
    none paused by anyone (no test here pauses), and no .hot- runner is left."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        status = tree.status()
        domains = tree.domains()
        listed = vms_running(tree)
        active = running_domains(tree, tree.libvirtd.uri)
        if (
            status["libvirt"] == "connected"
            and status["open_intents"] == "0"
            and len(active) == len(listed)
            and all(s == "running" for s in listed.values())
            and all(state == libvirt.VIR_DOMAIN_RUNNING for state in domains.values())
            and not [n for n in listing(tree.vms) if n.startswith(".hot-")]
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not settled: status {status}, libvirt {domains}, the tree lists {listed}"
            )
        time.sleep(0.5)


def whole(savestate: Path) -> bool:
    return head(savestate / "memory", 16) == b"LibvirtQemudSave"


def saved_or_not(tree: FaultTree, fault: Fault, label: str) -> str:
    """After a save's fault: w runs on, and its savestate is whole or not there."""
    settled(tree)
    assert tree.state("w") == "running", "w ran before the save: it must run after it"
    wait_alive(tree, "w")
    saved = tree.vms / "w" / "savestates" / label
    assert fault.error is not None or saved.exists(), f"save returned but {label} is not there"
    if saved.exists():
        assert whole(saved), f"{label} is listed but its image is not whole"
    return f"{fault.outcome()}, savestate {'kept' if saved.exists() else 'rolled back'}"


def fault_save(tree: FaultTree, n: int, later: float) -> str:
    fault = Fault(tree, "w", f"save s{n}")
    fault.inject(lambda conn: _has_job(conn, ""), "a save job", later)
    return "save: " + saved_or_not(tree, fault, f"s{n}")


def fault_save_pause(tree: FaultTree, n: int, later: float) -> str:
    """libvirtd dies while the save waits for the pause: whether QEMU paused is not known."""
    fault = Fault(tree, "w", f"save p{n}")
    fault.inject_frozen(1.0 + later)
    return "save, in its pause: " + saved_or_not(tree, fault, f"p{n}")


def fault_restore(tree: FaultTree, n: int, later: float) -> str:
    if tree.state("r") != "halted":
        tree.ctl("r", "kill")
    write_at(tree.vms / "r" / "volumes" / "private.img", f"OLD{n:04d}".encode(), MARK_AT)
    fault = Fault(tree, "r", "restore base")
    fault.inject(_new_domain(set(tree.domains())), "the restored domain", later)
    settled(tree)
    state = tree.state("r")
    assert state == "running" or fault.error is not None, "restore returned but r does not run"
    mark = read_at(tree.vms / "r" / "volumes" / "private.img", 8, MARK_AT)
    if state == "running":
        wait_alive(tree, "r")
        assert "VMTREE-BOOT" not in tree.console("r"), "a restore must not boot"
        assert mark == b"BASE0000", "r runs from the savestate with other disks"
    else:
        assert mark == f"OLD{n:04d}".encode(), "r is halted but its disks are not its own"
    return f"restore: {fault.outcome()}, r {state}"


def fault_disposable(tree: FaultTree, n: int, later: float) -> str:
    before = set(listing(tree.vms))
    fault = Fault(tree, "d", "disposable")
    fault.inject(_new_domain(set(tree.domains())), "the disposable's domain", later)
    settled(tree)
    made = sorted(set(listing(tree.vms)) - before)
    assert all(name.startswith("d-disp") for name in made), made
    assert fault.result is None or fault.result in made, f"{fault.result} is not there"
    for name in made:
        assert tree.state(name) == "running"
        wait_alive(tree, name)
        tree.ctl(name, "kill")
    settled(tree)
    return f"disposable: {fault.outcome()}, {len(made)} running after"


def fault_hot_savestate(tree: FaultTree, n: int, later: float) -> str:
    hot = tree.vms / "h" / "savestates" / "hot"
    if hot.exists():
        os.removexattr(tree.vms / "h", "user.vmtree.hot_savestate")
        deadline = time.monotonic() + 60
        while hot.exists():
            assert time.monotonic() < deadline, "the hot savestate was not dropped"
            time.sleep(0.2)
    kept_line = "interrupted save h hot: libvirt finished the image"
    kept_before = tree.log().count(kept_line)
    started = time.monotonic()
    os.setxattr(tree.vms / "h", "user.vmtree.hot_savestate", b"1")
    _wait_for("the hot savestate's save", lambda c: _has_job(c, ""), tree.libvirtd.uri, HOT_TIMEOUT)
    time.sleep(later)
    tree.libvirtd.kill9()
    time.sleep(1.0)
    tree.libvirtd.start()
    # Kept if libvirt finished the image; made again otherwise.
    deadline = time.monotonic() + HOT_TIMEOUT
    while not hot.exists():
        assert time.monotonic() < deadline, f"no hot savestate:\n{tree.log()[-3000:]}"
        time.sleep(0.5)
    took = time.monotonic() - started
    settled(tree)
    assert whole(hot)
    disposable = tree.ctl("h", "disposable")
    wait_alive(tree, disposable)
    assert "VMTREE-BOOT" not in tree.console(disposable), "a disposable from hot must not boot"
    tree.ctl(disposable, "kill")
    settled(tree)
    kept = tree.log().count(kept_line) > kept_before
    return (
        f"hot savestate: {'kept' if kept else 'rolled back and made again'}, there "
        f"{took:.0f} s after it was asked for, restorable"
    )


def test_libvirtd_killed_during_vm_commands(
    faults_tree: FaultTree, capsys: pytest.CaptureFixture[str]
) -> None:
    tree = faults_tree
    vms = tree.vms
    start_w_and_r(tree, ("d", "h"))
    tree.ctl("r", "save base --stop")
    lines = []
    rng = random.Random(SEED)
    for n in range(ROUNDS):
        # The first round kills as soon as libvirt is at it; later ones a moment after.
        later = 0.0 if n == 0 else rng.uniform(0, MAX_LATER)
        faults = (fault_save_pause, fault_save, fault_restore, fault_disposable)
        for fault in (*faults, fault_hot_savestate):
            try:
                lines.append(f"round {n} (+{later:.2f} s): " + fault(tree, n, later))
            except AssertionError as e:
                what = f"{fault.__name__}, round {n}"
                raise AssertionError(f"{what}: {e}\n{tree.log()[-4000:]}") from e
    # Every savestate listed restores (the ones a fault kept too).
    tree.ctl("w", "kill")
    for label in listing(vms / "w" / "savestates"):
        assert tree.ctl("w", f"restore {label}") == label
        wait_alive(tree, "w")
        tree.ctl("w", "kill")
    settled(tree)
    sound_after_recovery(tree, "after the libvirtd kills")
    with capsys.disabled():
        print(
            f"\nlibvirtd killed {tree.libvirtd.starts - 1} times (seed {SEED}): "
            + "; ".join(lines),
            flush=True,
        )
