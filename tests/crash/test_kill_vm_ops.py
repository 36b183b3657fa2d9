"""The kill -9 loop over what runs VMs: save, restore, disposable start and stop.

A real demo guest runs under libvirt (QEMU, TCG). Each round starts one
command through a ``ctl`` file and sends the daemon SIGKILL after a random
delay (seeded: ``VMTREE_CRASH_SEED``, printed), within the time the command
took when it ran uninterrupted. libvirt carries on with a save or a restore
whose client died, so the next mount has to wait for it and finish the
command's story; the checks are what a user would look at:

- a VM that ran before a save runs after it, whatever became of the save, and
  a savestate that is listed is whole (its image restores);
- a restore that was interrupted has either not begun (the VM is halted with
  the disks it had) or runs from the savestate (memory and disks of the save);
- a disposable is either running or gone with its volumes and its domain;
- every running domain of the tree is a VM listed as running, and the reverse;
- no open intent, the engine holds exactly the store's volumes, fsck is clean.

``make test`` runs a short loop; ``make crash-test`` a longer one
(``VMTREE_CRASH_VM_KILLS``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.helpers.crash import killed_during, sound_after_recovery
from tests.helpers.libvirt import URI, connection
from tests.helpers.tree import head, listing, read_at, write_at
from tests.vm.conftest import VmTree
from vmtreefs.store import Store

KILLS = int(os.environ.get("VMTREE_CRASH_VM_KILLS", "8"))
SEED = int(os.environ.get("VMTREE_CRASH_SEED", str(int(time.time()))))
# A comma-separated choice of the operations below, by name (all when unset).
ONLY = [name for name in os.environ.get("VMTREE_CRASH_VM_OPS", "").split(",") if name]
MARK_AT = 1 << 20  # past the boot counter the demo guest keeps at the start of private.img
SETTLE_TIMEOUT = 120.0
# What the daemon logs when it settles an interrupted command (counted for the report).
RECOVERY_LINES = {
    "save kept": "libvirt finished the image, the savestate is kept",
    "save rolled back": "the image is not whole, the savestate is rolled back",
    "restore done again": "the VM does not run, restoring it again",
    "VM ran on": ": runs on from savestate",
    "disposable destroyed": "stopped while vmtreefs was away: destroying it",
}


@dataclass
class VmOperation:
    """``prepare`` brings the tree to the state the command needs and returns its target;
    ``run`` is interrupted; ``check`` looks afterwards (``done``: run returned)."""

    name: str
    prepare: Callable[[VmTree, int], str]
    run: Callable[[VmTree, str, int], str]
    check: Callable[[VmTree, str, int, bool, str], None]


def running_domains(vmtree: VmTree, uri: str = URI) -> set[str]:
    prefix = f"vmtree-{vmtree.status()['tree_id']}-"
    with connection(uri) as conn:
        return {d.name() for d in conn.listAllDomains(1) if d.name().startswith(prefix)}


def vms_running(vmtree: VmTree) -> dict[str, str]:
    """Every listed VM that is not halted, with its state."""
    found = {}
    for name in listing(vmtree.vms):
        if (vmtree.vms / name).is_symlink():
            continue
        state = vmtree.state(name)
        if state != "halted":
            found[name] = state
    return found


def wait_alive(vmtree: VmTree, vm: str, timeout: float = 60.0) -> None:
    """The guest ticks on: a tick line that was not on its console before appears."""
    before = vmtree.console(vm)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = vmtree.console(vm)
        fresh = now[len(before) :] if now.startswith(before) else now
        if re.search(r"VMTREE-TICK \d+", fresh):
            return
        time.sleep(0.2)
    raise AssertionError(f"{vm} does not tick: its console ends with\n{vmtree.console(vm)[-500:]}")


# save: w runs; `save sN` (it runs on)


def _save_prepare(vmtree: VmTree, n: int) -> str:
    assert vmtree.state("w") == "running"
    return "w"


def _save_run(vmtree: VmTree, target: str, n: int) -> str:
    return vmtree.ctl(target, f"save s{n}")


def _save_check(vmtree: VmTree, target: str, n: int, done: bool, result: str) -> None:
    labels = listing(vmtree.vms / "w" / "savestates")
    assert f"s{n}" in labels or not done, "save returned but the savestate is not there"
    if f"s{n}" in labels:
        saved = vmtree.vms / "w" / "savestates" / f"s{n}"
        assert head(saved / "memory", 16) == b"LibvirtQemudSave"
        assert "vm: w\n" in (saved / "info").read_text()
    assert vmtree.state("w") == "running", "w ran before the save: it must run after it"
    wait_alive(vmtree, "w")


# restore: r halted with a mark on its disk; `restore base`


def _restore_prepare(vmtree: VmTree, n: int) -> str:
    if vmtree.state("r") != "halted":
        vmtree.ctl("r", "kill")
    write_at(vmtree.vms / "r" / "volumes" / "private.img", f"OLD{n:04d}".encode(), MARK_AT)
    return "r"


def _restore_run(vmtree: VmTree, target: str, n: int) -> str:
    return vmtree.ctl(target, "restore base")


def _restore_check(vmtree: VmTree, target: str, n: int, done: bool, result: str) -> None:
    state = vmtree.state("r")
    assert state in ("running", "halted"), state
    assert state == "running" or not done, "restore returned but r does not run"
    if state == "running":
        wait_alive(vmtree, "r")
        assert "VMTREE-BOOT" not in vmtree.console("r"), "a restore must not boot"
        vmtree.ctl("r", "kill")
        mark = b"BASE0000"  # the disks of the savestate came with its memory
    else:
        mark = f"OLD{n:04d}".encode()  # not begun: the disks it had
    private = vmtree.vms / "r" / "volumes" / "private.img"
    with open(private, "rb") as f:
        f.seek(MARK_AT)
        assert f.read(8) == mark


# disposable start: `disposable` of the halted d


def _dispose_prepare(vmtree: VmTree, n: int) -> str:
    return "d"


def _dispose_run(vmtree: VmTree, target: str, n: int) -> str:
    return vmtree.ctl(target, "disposable")


def _disposables(vmtree: VmTree) -> list[str]:
    return [name for name in listing(vmtree.vms) if name.startswith("d-disp")]


def _dispose_check(vmtree: VmTree, target: str, n: int, done: bool, result: str) -> None:
    names = _disposables(vmtree)
    assert result in names or not done, f"disposable returned {result} but it is not there"
    for name in names:
        assert vmtree.state(name) == "running", f"{name} is {vmtree.state(name)}"


# disposable stop: `kill` of a running disposable


def _stop_prepare(vmtree: VmTree, n: int) -> str:
    names = _disposables(vmtree)
    return names[0] if names else vmtree.ctl("d", "disposable")


def _stop_run(vmtree: VmTree, target: str, n: int) -> str:
    return vmtree.ctl(target, "kill")


def _stop_check(vmtree: VmTree, target: str, n: int, done: bool, result: str) -> None:
    there = target in listing(vmtree.vms)
    assert not (there and done), f"kill returned but {target} is still there"
    if there:
        assert vmtree.state(target) == "running"


OPERATIONS = [
    VmOperation("save", _save_prepare, _save_run, _save_check),
    VmOperation("restore", _restore_prepare, _restore_run, _restore_check),
    VmOperation("disposable start", _dispose_prepare, _dispose_run, _dispose_check),
    VmOperation("disposable stop", _stop_prepare, _stop_run, _stop_check),
]


def start_w_and_r(vmtree: VmTree, others: tuple[str, ...]) -> None:
    """VMs w and r running and ready (r's disk carries the mark BASE0000), and ``others``
    made, halted."""
    vms = vmtree.vms
    for name in ("w", "r", *others):
        (vms / name).mkdir()
    write_at(vms / "r" / "volumes" / "private.img", b"BASE0000", MARK_AT)
    vmtree.ctl("w", "start")
    vmtree.ctl("r", "start")
    vmtree.wait_console("w", r"VMTREE-READY")
    vmtree.wait_console("r", r"VMTREE-READY")


def setup_tree(vmtree: VmTree) -> dict[str, float]:
    """w runs; r has a savestate `base` whose disk carries a mark; d is halted.
    Returns how long each command took uninterrupted (the kill delays scale with it)."""
    start_w_and_r(vmtree, ("d",))
    took: dict[str, float] = {}
    started = time.monotonic()
    vmtree.ctl("w", "save first")
    took["save"] = time.monotonic() - started
    vmtree.ctl("r", "save base --stop")
    started = time.monotonic()
    vmtree.ctl("r", "restore base")
    took["restore"] = time.monotonic() - started
    vmtree.ctl("r", "kill")
    started = time.monotonic()
    disposable = vmtree.ctl("d", "disposable")
    took["disposable start"] = time.monotonic() - started
    started = time.monotonic()
    vmtree.ctl(disposable, "kill")
    took["disposable stop"] = time.monotonic() - started
    return took


def settled(vmtree: VmTree) -> None:
    """The mount answers once libvirt's states are taken; a disposable that stopped while
    the daemon was dead goes then too. Wait until libvirt and the tree agree."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        domains = running_domains(vmtree)
        listed = vms_running(vmtree)
        if len(domains) == len(listed) and all(s in ("running", "paused") for s in listed.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"libvirt runs {sorted(domains)}, the tree lists {listed}")
        time.sleep(0.5)


def test_kill9_loop_over_vm_commands(vmtree: VmTree, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    took = setup_tree(vmtree)
    with capsys.disabled():
        print(
            f"\nkill -9 loop over VM commands: seed {SEED} (VMTREE_CRASH_SEED), {KILLS} kills; "
            "uninterrupted: " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items())
        )
    chosen = [op for op in OPERATIONS if not ONLY or op.name in ONLY]
    tally: dict[str, list[int]] = {op.name: [0, 0] for op in chosen}
    for n in range(KILLS):
        op = chosen[n % len(chosen)]
        target = op.prepare(vmtree, n)
        delay = rng.uniform(0, took[op.name] * 1.2)
        done, result = killed_during(vmtree, functools.partial(op.run, vmtree, target, n), delay)
        tally[op.name][0 if done else 1] += 1
        what = f"round {n}: {op.name} of {target} killed after {delay:.2f} s, seed {SEED}"
        vmtree.mount()  # recovery settles an interrupted save or restore with libvirt
        try:
            settled(vmtree)
            op.check(vmtree, target, n, done, result or "")
            settled(vmtree)
        except AssertionError as e:
            state = "returned" if done else "interrupted"
            raise AssertionError(f"{what} ({state}): {e}\n{vmtree.log()[-3000:]}") from e
        sound_after_recovery(vmtree, what)
    assert not set(os.listdir(vmtree.source / "savestates")) - {
        p.name for p in (vmtree.source / "savestates").iterdir() if p.name.startswith("ss-")
    }, "a restore's copy of an image was left behind"
    log = vmtree.log()
    recoveries = {what: log.count(line) for what, line in RECOVERY_LINES.items()}
    with capsys.disabled():
        print(
            "kill -9 loop over VM commands: "
            + ", ".join(f"{name} {d} returned/{i} interrupted" for name, (d, i) in tally.items())
            + "; recoveries: "
            + ", ".join(f"{what} {n}" for what, n in recoveries.items())
        )


# The two outcomes the random kills rarely reach (their windows are a few milliseconds
# wide), made exactly: the state a crash at that point leaves, then a mount.


def _row_id(vmtree: VmTree, query: str, *args: object) -> int:
    with contextlib.closing(sqlite3.connect(vmtree.source / "vmtree.db")) as db:
        (found,) = db.execute(query, args).fetchone()
    return int(found)


def _open_intent(vmtree: VmTree, kind: str, payload: dict[str, object]) -> None:
    with Store.open(vmtree.source / "vmtree.db") as store, store.transaction() as tx:
        tx.begin_intent(kind, payload)


def test_a_save_cut_before_libvirt_wrote_the_image_is_undone_and_the_vm_resumed(
    vmtree: VmTree,
) -> None:
    vms = vmtree.vms
    (vms / "w").mkdir()
    vmtree.ctl("w", "start")
    vmtree.wait_console("w", r"VMTREE-READY")
    vm_id = _row_id(vmtree, "SELECT id FROM vms WHERE name = 'w'")
    vmtree.unmount()  # w runs on under libvirt
    # The crash: w paused for the save, the intent open, libvirt's image begun.
    with connection() as conn:
        (tree_id,) = vmtree.tree_ids
        conn.lookupByName(f"vmtree-{tree_id}-{vm_id}").suspend()
    image = f"ss-{vm_id}-000000000001.save"
    (vmtree.source / "savestates").mkdir(exist_ok=True)
    (vmtree.source / "savestates" / image).write_bytes(b"LibvirtQemudPart" + bytes(100))
    saved = {"vm_id": vm_id, "owner_id": vm_id, "label": "s", "image": image, "info": {}}
    _open_intent(
        vmtree,
        "save",
        {
            "what": "save w s",
            "volumes": [],
            "files": [str(vmtree.source / "savestates" / image)],
            "savestate": {**saved, "stop": False, "was_paused": False},
        },
    )
    vmtree.mount()
    assert vmtree.state("w") == "running"
    wait_alive(vmtree, "w")
    assert listing(vms / "w" / "savestates") == []
    assert not (vmtree.source / "savestates" / image).exists()
    assert "the image is not whole, the savestate is rolled back" in vmtree.log()
    assert (vmtree.status()["inventory"], vmtree.status()["open_intents"]) == ("ok", "0")


def test_a_restore_cut_before_the_domain_ran_is_done_again(vmtree: VmTree) -> None:
    vms = vmtree.vms
    (vms / "r").mkdir()
    write_at(vms / "r" / "volumes" / "private.img", b"BASE0000", MARK_AT)
    vmtree.ctl("r", "start")
    vmtree.wait_console("r", r"VMTREE-READY")
    vmtree.ctl("r", "save base --stop")
    vm_id = _row_id(vmtree, "SELECT id FROM vms WHERE name = 'r'")
    savestate_id = _row_id(vmtree, "SELECT id FROM savestates WHERE label = 'base'")
    vmtree.unmount()
    # The crash: the restore journalled (its volumes may be swapped), no domain yet.
    _open_intent(
        vmtree, "restore", {"what": "restore r base", "vm_id": vm_id, "savestate_id": savestate_id}
    )
    vmtree.mount()
    assert vmtree.state("r") == "running"
    wait_alive(vmtree, "r")
    assert "VMTREE-BOOT" not in vmtree.console("r"), "a restore must not boot"
    assert "the VM does not run, restoring it again" in vmtree.log()
    assert (vmtree.status()["inventory"], vmtree.status()["open_intents"]) == ("ok", "0")
    vmtree.ctl("r", "kill")
    assert read_at(vms / "r" / "volumes" / "private.img", 8, MARK_AT) == b"BASE0000"
