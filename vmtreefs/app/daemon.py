"""The mounted filesystem's process: open SOURCE, recover, serve FUSE until unmounted."""

from __future__ import annotations

import errno
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from vmtreefs import mountinfo
from vmtreefs.app.source import (
    SourceLock,
    check_mountpoint,
    check_source,
    is_initialised,
    open_source,
)
from vmtreefs.app.watchdog import Guard
from vmtreefs.core.tree import VmTree
from vmtreefs.engine.select import parse_size
from vmtreefs.errors import VmtreeError
from vmtreefs.fs.operations import Operations
from vmtreefs.runtime.accel import ACCEL_CHOICES
from vmtreefs.runtime.hypervisor import DEFAULT_URI, LibvirtHypervisor
from vmtreefs.runtime.lifecycle import Lifecycle

log = logging.getLogger("vmtreefs.daemon")

# Options passed on to FUSE as they are; mount(8)'s own options are dropped.
FUSE_OPTIONS = frozenset({"allow_other", "nodev", "nosuid", "noexec", "noatime"})
IGNORED_OPTIONS = frozenset(
    {"rw", "dev", "suid", "exec", "atime", "relatime", "defaults", "auto", "noauto", "_netdev"}
)


ENGINE_CHOICES = ("auto", "reflink", "dm-thin")


@dataclass
class MountOptions:
    engine: str = "auto"
    size: int = 20 * 1024**3
    debug: bool = False
    data_device: str | None = None
    metadata_device: str | None = None
    fuse: set[str] = field(default_factory=set)
    libvirt: str | None = DEFAULT_URI  # None: run no VMs
    guest_dir: Path | None = None  # None: SOURCE/guest
    accel: str = "auto"


def parse_mount_options(groups: list[str]) -> MountOptions:
    """``-o a,b=c`` groups into options; an unknown option is an error, not a silent no-op."""
    options = MountOptions()
    for group in groups:
        for item in filter(None, group.split(",")):
            key, _, value = item.partition("=")
            if key == "engine" and value:
                if value not in ENGINE_CHOICES:
                    raise VmtreeError(
                        errno.EINVAL, f"engine must be one of {', '.join(ENGINE_CHOICES)}"
                    )
                options.engine = value
            elif key == "size" and value:
                options.size = parse_size(value)
            elif key == "data" and value:
                options.data_device = value
            elif key == "metadata" and value:
                options.metadata_device = value
            elif key == "libvirt" and value:
                options.libvirt = None if value == "none" else value
            elif key == "guest" and value:
                options.guest_dir = Path(value)
            elif key == "accel" and value:
                if value not in ACCEL_CHOICES:
                    raise VmtreeError(
                        errno.EINVAL, f"accel must be one of {', '.join(ACCEL_CHOICES)}"
                    )
                options.accel = value
            elif key == "debug" and not value:
                options.debug = True
            elif key in FUSE_OPTIONS and not value:
                options.fuse.add(key)
            elif key in IGNORED_OPTIONS or key.startswith("x-"):
                continue
            else:
                raise VmtreeError(errno.EINVAL, f"unknown mount option {item!r}")
    return options


def fuse_options(source: Path, options: MountOptions) -> set[str]:
    opts = {"default_permissions", "subtype=vmtreefs", *options.fuse}
    if "," not in str(source):
        opts.add(f"fsname={source}")
    if options.debug:
        opts.add("debug")
    return opts


READAHEAD_KB = 1024
"""The mount's read-ahead: one FUSE read request of the largest size (256 pages).

The kernel gives a FUSE mount 128 KiB, so a sequential export is read in 128 KiB
requests and their round trips, not the copies, set its speed. 1 MiB measured
here: 2.4 GB/s against 0.3; 4 MiB and more were no faster and less steady.
"""


def widen_readahead(mountpoint: Path) -> None:
    """Raise the mount's read-ahead (its backing_dev_info, named by the mount's st_dev)."""
    entry = mountinfo.mounted_at(str(mountpoint), "fuse.vmtreefs")
    if entry is None:
        log.warning("read-ahead left as it is: %s is not in mountinfo", mountpoint)
        return
    knob = Path("/sys/class/bdi") / entry.device / "read_ahead_kb"
    try:
        knob.write_text(f"{READAHEAD_KB}\n")
    except OSError as e:
        log.warning("read-ahead left as it is: cannot write %s: %s", knob, e.strerror or e)


def serve(source: Path, mountpoint: Path, options: MountOptions, ready_fd: int | None) -> int:
    """Mount and serve until unmounted or signalled; returns the process exit status."""
    source = source.resolve()
    mountpoint = mountpoint.resolve()
    check_source(source)
    check_mountpoint(mountpoint)
    lock = SourceLock(source)
    lock.acquire(mountpoint)
    try:
        store, engine, reason = open_source(
            source, options.engine, options.size, options.data_device, options.metadata_device
        )
        try:
            log.info("engine: %s (%s)", engine.describe(), reason)
            tree = VmTree(store, engine, source / "savestates")
            tree.defer_vm_intents = bool(options.libvirt)
            report = tree.recover()
            log.info(
                "recovered: %d rolled back, %d rolled forward, %d left open, %d inventory "
                "differences, %d saves or restores to settle with libvirt",
                len(report.rolled_back),
                len(report.rolled_forward),
                len(report.left_open),
                len(report.differences),
                len(report.deferred),
            )
            hypervisor = LibvirtHypervisor(options.libvirt) if options.libvirt else None
            lifecycle = Lifecycle(
                tree,
                hypervisor,
                run_dir=source / "run",
                guest_dir=(options.guest_dir or source / "guest").resolve(),
                accel=options.accel,
            )
            tree.runner = lifecycle
            ops = Operations(tree, lifecycle)
            guard = Guard()
            guard.start()
            try:
                pyfuse3.init(ops, str(mountpoint), fuse_options(source, options))
            except BaseException:
                guard.unmounted()
                raise
            guard.mounted(mountpoint)
            log.info("mounted %s at %s (%d VMs)", source, mountpoint, len(tree.ns))
            try:
                trio.run(_run, ops, lifecycle, mountpoint, ready_fd)
            finally:
                pyfuse3.close(unmount=True)
                guard.unmounted()
                ops.close_all()
                if hypervisor is not None:
                    hypervisor.close()
                log.info("unmounted %s", mountpoint)
        finally:
            engine.stop()
            store.close()
    finally:
        lock.release(remove=not is_initialised(source))
    return 0


async def _run(
    ops: Operations, lifecycle: Lifecycle, mountpoint: Path, ready_fd: int | None
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.run_invalidations)
        nursery.start_soon(lifecycle.run)
        nursery.start_soon(_stop_on_signal)
        nursery.start_soon(_announce_ready, lifecycle, mountpoint, ready_fd)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _announce_ready(lifecycle: Lifecycle, mountpoint: Path, ready_fd: int | None) -> None:
    """Tell the waiting `vmtreefs mount` once the mount really answers a request
    and every VM's state is libvirt's (or libvirt did not answer)."""
    await lifecycle.settled.wait()
    await trio.to_thread.run_sync(os.stat, mountpoint / ".vmtree" / "status")
    # Only now: the kernel sets the read-ahead when FUSE's INIT is answered.
    widen_readahead(mountpoint)
    log.info("ready: %s answers", mountpoint)
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"ready\n")
        except OSError as e:  # EPIPE: `vmtreefs mount` stopped waiting; the mount serves on
            log.warning("could not tell the waiting mount command: %s", e.strerror or e)
        finally:
            os.close(ready_fd)
