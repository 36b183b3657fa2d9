"""Disposable VMs from one libvirt savestate, for real (vmtreefs.saveimage).

The demo guest (scripts/build-demo-guest.sh) boots in a libvirt domain (TCG),
prints its ticks on a serial log, and is saved once. Two copies of the save
image are rewritten with a new name, uuid, disks and serial log each, and both
are restored at the same time with a plain ``virDomainRestore``: both must run
at once, under their own identities, and go on ticking from where the original
stopped (no new boot). A third copy with ``was_running`` cleared comes back
paused, and ticks on once resumed.

One copy is made in /var/tmp (ext4 here: a plain copy), the other on a
loop-mounted XFS (a reflink, whose extents must show as shared). Everything is
under one 0755 directory /var/tmp/vmtree-test-XXXX: ``qemu:///system`` runs
QEMU as ``libvirt-qemu``, which cannot reach pytest's 0700 tmp_path.

libvirt's daemons are started if need be (tests/helpers/libvirt.py) and stopped
again at exit if this run started them; a libvirt that cannot start fails the
test. Every domain this test defines or restores carries a prefix of its own and
is destroyed and undefined at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.helpers.images import make_image, run, unmount_and_detach
from tests.helpers.libvirt import connection, removing_domains, unique_prefix
from vmtreefs.engine import fiemap
from vmtreefs.saveimage import SaveHeader, read_header, rewrite_xml, set_running

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-demo-guest.sh"
BOOT_TIMEOUT = 180.0
TICK_TIMEOUT = 60.0
TICK = re.compile(r"VMTREE-TICK (\d+)\r?\n")


@dataclass
class Workspace:
    top: Path
    """A 0755 directory under /var/tmp (ext4 here)."""
    xfs: Path
    """The root of a fresh XFS with reflink, mounted in ``top``."""
    prefix: str
    """Every domain of this test is named with it."""


@dataclass
class Disposable:
    name: str
    uid: str
    where: Path
    source: Path
    """The savestate it is copied from."""
    image: Path
    """Its own rewritten copy."""
    log: Path
    disks: tuple[Path, Path]


@pytest.fixture(scope="module")
def conn() -> Iterator[Any]:
    with connection() as c:
        yield c


@contextlib.contextmanager
def shared_directory(top: Path) -> Iterator[None]:
    """``top`` bind-mounted on itself as a shared mount, for mounts made beneath it.

    libvirt starts each QEMU in a mount namespace of its own, a copy of the
    host's mounts. Without systemd the host's mounts are private, so an XFS
    mounted in /tmp while anyone's QEMU starts stays mounted in that QEMU's copy
    after the test unmounts it, and its loop device stays busy until that QEMU
    exits. Beneath a shared mount, the copy is a slave and the unmount reaches
    it too.
    """
    run("mount", "--bind", str(top), str(top))
    try:
        run("mount", "--make-rshared", str(top))
        yield
    finally:
        done = subprocess.run(["umount", str(top)], capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(top)], check=False)
            raise AssertionError(f"{top} was busy at teardown: {done.stderr.strip()}")


@contextlib.contextmanager
def mounted_xfs(mnt: Path, image: Path) -> Iterator[None]:
    """A fresh XFS with reflink on a sparse ``image``, loop-mounted at ``mnt``."""
    make_image(image, "xfs", "1G")
    mnt.mkdir(mode=0o755)
    run("mount", "-t", "xfs", "-o", "loop", str(image), str(mnt))
    try:
        os.chmod(mnt, 0o755)
        yield
    finally:
        unmount_and_detach(mnt, image)


@pytest.fixture
def workspace(conn: Any) -> Iterator[Workspace]:
    """/var/tmp/vmtree-test-XXXX (0755), an XFS mounted in it, a domain prefix; all removed."""
    top = Path(tempfile.mkdtemp(prefix="vmtree-test-", dir="/var/tmp"))
    try:
        os.chmod(top, 0o755)
        with (
            shared_directory(top),
            mounted_xfs(top / "xfs", top / "xfs.img"),
            removing_domains(conn, unique_prefix()) as prefix,
        ):
            # Domains go first: the with statement ends them before the XFS is unmounted.
            yield Workspace(top, top / "xfs", prefix)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def domain_xml(name: str, guest: Path, vda: Path, vdb: Path, log: Path) -> str:
    """The demo guest under TCG: direct kernel boot, two raw virtio disks, serial to a file."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{guest / "vmlinuz"}</kernel>
    <initrd>{guest / "initrd.img"}</initrd>
    <cmdline>console=ttyS0 vmtree.private=vdb</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{vda}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{vdb}'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{log}' append='off'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
"""


def new_identity(xml: str, name: str, uid: str, paths: dict[str, Path], log: Path) -> str:
    """``xml`` with another name, uuid, disk files (old path -> new) and serial log."""
    root = ET.fromstring(xml)
    for tag, value in (("name", name), ("uuid", uid)):
        element = root.find(tag)
        assert element is not None, f"no <{tag}> in the saved XML"
        element.text = value
    for source in root.findall("./devices/disk/source"):
        source.set("file", str(paths[source.get("file", "")]))
    for source in root.findall("./devices/serial/source") + root.findall(
        "./devices/console/source"
    ):
        source.set("path", str(log))
    return ET.tostring(root, encoding="unicode")


def console(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def wait_for(log: Path, pattern: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, console(log)):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {pattern!r} in {log} after {timeout:.0f} s:\n{console(log)[-2000:]}"
            )
        time.sleep(0.2)


def ticks(log: Path) -> list[int]:
    return [int(n) for n in TICK.findall(console(log))]


def make_disks(where: Path) -> tuple[Path, Path]:
    """vda: a small empty disk; vdb: the 1 MiB private volume (boot counter at its start)."""
    vda, vdb = where / "vda.img", where / "vdb.img"
    for disk in (vda, vdb):
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
    return vda, vdb


def shared_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(e.length for e in fiemap.extents(f.fileno()) if e.shared)


def test_two_disposables_restored_at_once_from_one_savestate(
    conn: Any, workspace: Workspace
) -> None:
    timings: dict[str, float] = {}
    guest = workspace.top / "guest"
    built = subprocess.run(["bash", str(BUILD), str(guest)], capture_output=True, text=True)
    assert built.returncode == 0, f"building the demo guest failed: {built.stderr}"
    for directory in (guest, workspace.top):
        os.chmod(directory, 0o755)

    # -- the original: boot, let it tick, save ------------------------------------------
    orig_dir = workspace.top / "orig"
    orig_dir.mkdir(mode=0o755)
    vda, vdb = make_disks(orig_dir)
    orig_log = orig_dir / "serial.log"
    orig_name = f"{workspace.prefix}orig"
    dom = conn.defineXML(domain_xml(orig_name, guest, vda, vdb, orig_log))
    started = time.monotonic()
    dom.create()
    wait_for(orig_log, "VMTREE-READY", BOOT_TIMEOUT)
    timings["boot to VMTREE-READY"] = time.monotonic() - started
    wait_for(orig_log, r"VMTREE-TICK 3\r?\n", TICK_TIMEOUT)
    assert "VMTREE-BOOT 1" in console(orig_log)

    save = orig_dir / "save.img"
    started = time.monotonic()
    dom.save(str(save))
    timings["save"] = time.monotonic() - started
    assert not dom.isActive()
    before = ticks(orig_log)
    assert before, console(orig_log)
    last_before = before[-1]
    saved = read_header(save)
    assert saved.version == 2
    assert saved.was_running
    assert f"<name>{orig_name}</name>" in saved.xml
    assert saved.cookie.startswith(b"<cookie>")

    # A second copy of the savestate on XFS, where the disposable's copy is a reflink.
    xfs_save = workspace.xfs / "save.img"
    started = time.monotonic()
    shutil.copyfile(save, xfs_save)
    with open(xfs_save, "rb") as f:
        os.fsync(f.fileno())  # on disk, as a savestate is: FICLONE flushes dirty pages first
    timings["copy the savestate to XFS (setup)"] = time.monotonic() - started

    def disposable(i: int, where: Path, source: Path) -> Disposable:
        where.mkdir(mode=0o755)
        disks = (where / "vda.img", where / "vdb.img")
        shutil.copyfile(vda, disks[0])
        shutil.copyfile(vdb, disks[1])
        return Disposable(
            name=f"{workspace.prefix}disp{i}",
            uid=str(uuid.uuid4()),
            where=where,
            source=source,
            image=where / "disp.save",
            log=where / "serial.log",
            disks=disks,
        )

    def rewrite(d: Disposable) -> SaveHeader:
        xml = new_identity(
            saved.xml, d.name, d.uid, {str(vda): d.disks[0], str(vdb): d.disks[1]}, d.log
        )
        made = rewrite_xml(d.source, d.image, xml)
        assert made.cookie == saved.cookie
        assert made.data_len == saved.data_len
        return made

    # -- two disposables ---------------------------------------------------------------
    disposables = [
        disposable(0, workspace.top / "disp0", save),
        disposable(1, workspace.xfs / "disp1", xfs_save),
    ]
    fs_kind = ["copy, ext4", "reflink, XFS"]
    for d, kind in zip(disposables, fs_kind, strict=True):
        started = time.monotonic()
        rewrite(d)
        timings[f"copy+rewrite {d.name} ({kind})"] = time.monotonic() - started
    assert shared_bytes(disposables[1].image) > saved.data_len  # really a reflink
    assert read_header(save).xml == saved.xml  # the savestate itself is untouched

    # -- restore both at the same time ----------------------------------------------------
    errors: list[BaseException] = []

    def restore(d: Disposable) -> None:
        try:
            began = time.monotonic()
            conn.restore(str(d.image))
            timings[f"restore {d.name}"] = time.monotonic() - began
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=restore, args=(d,)) for d in disposables]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    timings["restore both (concurrently)"] = time.monotonic() - started
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    # -- both run at once, each as itself, ticking on from where the original was ------------
    running = {r.name(): r for r in conn.listAllDomains(0) if r.isActive()}
    for d in disposables:
        assert d.name in running, f"{d.name} is not running: {sorted(running)}"
        restored = running[d.name]
        assert restored.UUIDString() == d.uid
        live = ET.fromstring(restored.XMLDesc(0))
        sources = [s.get("file") for s in live.findall("./devices/disk/source")]
        assert sources == [str(p) for p in d.disks]
        serial = live.find("./devices/serial/source")
        assert serial is not None and serial.get("path") == str(d.log)
    assert not dom.isActive()  # the original stays saved
    assert len({d.uid for d in disposables} | {dom.UUIDString()}) == 3

    for d in disposables:
        wait_for(d.log, r"VMTREE-TICK \d+\r?\n(?s:.*)VMTREE-TICK \d+\r?\n", TICK_TIMEOUT)
    for d in disposables:
        after = ticks(d.log)
        text = console(d.log)
        assert "VMTREE-BOOT" not in text and "VMTREE-READY" not in text, text  # no new boot
        assert last_before < after[0] <= last_before + 5, (last_before, after)
        assert after == list(range(after[0], after[0] + len(after))), after
        assert conn.lookupByName(d.name).isActive()  # still both at once

    # -- a third one, restored paused (was_running cleared), runs on when resumed -------------
    paused = disposable(2, workspace.xfs / "disp2", xfs_save)
    rewrite(paused)
    set_running(paused.image, False)
    started = time.monotonic()
    conn.restore(str(paused.image))
    timings[f"restore {paused.name} (paused)"] = time.monotonic() - started
    restored = conn.lookupByName(paused.name)
    assert restored.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    time.sleep(2)
    assert ticks(paused.log) == [], console(paused.log)  # paused: no tick
    restored.resume()
    wait_for(paused.log, r"VMTREE-TICK \d+\r?\n", TICK_TIMEOUT)
    assert last_before < ticks(paused.log)[0] <= last_before + 5
    running_now = {r.name() for r in conn.listAllDomains(0) if r.isActive()}
    assert {d.name for d in [*disposables, paused]} <= running_now  # three at once

    print("\nsavestate timings (TCG, 128 MiB guest):")
    print(f"  save image: {save.stat().st_size / 2**20:.1f} MiB, data_len {saved.data_len}")
    print(f"  ticks: last before save {last_before}; first after restore", end="")
    print(" " + ", ".join(str(ticks(d.log)[0]) for d in disposables))
    for what, seconds in timings.items():
        print(f"  {what}: {seconds * 1000:.0f} ms")
