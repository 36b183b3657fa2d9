"""The ``vmtreefs`` command: init, mount, umount, fsck."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from vmtreefs import mountinfo
from vmtreefs.app import deadmount, forest, fuseconn
from vmtreefs.app.source import (
    LOG_NAME,
    SourceLock,
    check_empty,
    check_mountpoint,
    check_source,
    initialise,
    is_initialised,
)
from vmtreefs.engine.select import parse_size
from vmtreefs.errors import VmtreeError

log = logging.getLogger("vmtreefs")

MOUNT_TIMEOUT = 300.0
UMOUNT_TIMEOUT = 120.0


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )


def _fail(error: VmtreeError) -> int:
    print(f"vmtreefs: {error.reason} ({error.errname})", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    source = Path(args.source).resolve()
    check_source(source)
    lock = SourceLock(source)
    lock.acquire(None)
    try:
        store, reason = initialise(
            source, args.engine, parse_size(args.size), args.data, args.metadata
        )
        store.close()
    finally:
        lock.release(remove=not is_initialised(source))
    print(f"initialised {source}: {reason}")
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    from vmtreefs.app.daemon import parse_mount_options, serve

    source = Path(args.source).resolve()
    options = parse_mount_options(args.options)
    _setup_logging(options.debug)
    # Before resolve(): a stat of a dead mount may hang until its connection is ended.
    deadmount.clear_dead_mount(Path(os.path.abspath(args.mountpoint)))
    mountpoint = Path(args.mountpoint).resolve()
    if args.foreground:
        ready_fd = args.ready_fd
        return serve(source, mountpoint, options, ready_fd)
    # Check what we can here, so the user sees the reason on the terminal.
    check_source(source)
    check_mountpoint(mountpoint)
    if not is_initialised(source):
        check_empty(source)
    probe = SourceLock(source)
    probe.acquire(None)  # EBUSY, naming the holder, while a daemon serves SOURCE
    probe.release(remove=not is_initialised(source))
    return _spawn_daemon(source, mountpoint, args.options)


def _spawn_daemon(source: Path, mountpoint: Path, option_groups: list[str]) -> int:
    """Run the daemon in its own session, logging to SOURCE/vmtreefs.log; return once it answers."""
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "vmtreefs", "mount", str(source), str(mountpoint), "-f"]
    command += ["--ready-fd", str(write_end)]
    for group in option_groups:
        command += ["-o", group]
    log_path = source / LOG_NAME
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(log_fd, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_end,),
            start_new_session=True,
        )
    os.close(write_end)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    answer = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while b"\n" not in answer and time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 1.0)
            if ready:
                chunk = pipe.read(64)
                if not chunk:
                    break
                answer += chunk
    if not answer.startswith(b"ready"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)  # the pipe closes a moment before the process is gone
    if answer.startswith(b"ready"):
        print(f"mounted {source} at {mountpoint} (pid {process.pid}, log {log_path})")
        return 0
    if process.poll() is None:
        print(f"vmtreefs: the daemon did not answer in {MOUNT_TIMEOUT:.0f} s", file=sys.stderr)
        return 1
    print(f"vmtreefs: mount failed; the end of {log_path}:", file=sys.stderr)
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    for line in tail:
        print(f"  {line}", file=sys.stderr)
    return 1


def cmd_umount(args: argparse.Namespace) -> int:
    # Not resolve(): a stat of a dead mount can hang until its connection is aborted.
    mountpoint = Path(os.path.abspath(args.mountpoint))
    entry = mountinfo.mounted_at(str(mountpoint), "fuse.vmtreefs")
    if entry is None:
        raise VmtreeError(errno.EINVAL, f"{mountpoint} is not a vmtreefs mount")
    pid = deadmount.daemon_pid(entry)
    if deadmount.is_dead(mountpoint, entry):
        deadmount.end_connection(mountpoint, entry)
    result = subprocess.run(
        ["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise VmtreeError(
            errno.EBUSY, f"cannot unmount {mountpoint}: {result.stderr.strip() or 'failed'}"
        )
    if pid is not None:
        deadline = time.monotonic() + UMOUNT_TIMEOUT
        while fuseconn.running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    print(f"unmounted {mountpoint}")
    return 0


def _progress_bar(what: str, done: int, total: int) -> None:
    """A one-line bar on a terminal, redrawn in place; nothing when stderr is not one."""
    if not sys.stderr.isatty():
        return
    width = 30
    filled = width if total == 0 else width * done // total
    end = "\n" if done >= total else ""
    sys.stderr.write(f"\r{what:<18} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
    sys.stderr.flush()


def cmd_fsck(args: argparse.Namespace) -> int:
    """Exit 0: clean; 1: problems found and all repaired; 4: problems left (as fsck(8))."""
    from vmtreefs.app.fsck import FsckReport, fsck
    from vmtreefs.app.source import STORE_NAME, open_source
    from vmtreefs.rules.invariants import Finding

    source = Path(args.source).resolve()
    check_source(source)
    if not is_initialised(source):
        raise VmtreeError(errno.ENOENT, f"{source} holds no vmtreefs tree ({STORE_NAME} missing)")
    lock = SourceLock(source)
    lock.acquire(None)  # EBUSY while mounted: fsck works offline
    report = FsckReport()
    try:
        try:
            store, engine, _ = open_source(source)
        except VmtreeError as e:
            if e.errno != errno.EUCLEAN:
                raise
            # Checked before anything is written; nothing else is, nor repaired.
            print(f"store: {e.reason}")
            print(f"{source}: the store is damaged: 1 problem, 0 repaired, 1 left")
            return 4
        try:
            report = fsck(store, engine, source / "savestates", args.repair, _progress_bar)
        finally:
            try:
                # dm-thin takes the pool down (unless a running VM holds one of its
                # devices) and runs thin_check on the inactive metadata too.
                engine.stop()
            except VmtreeError as e:
                report.findings.append(Finding("engine", f"{engine.name}: {e.reason}"))
            if engine.name == "dmthin" and not any(f.check == "engine" for f in report.findings):
                print("engine: thin_check found the pool's metadata sound")
            store.close()
    finally:
        lock.release()
    for finding in report.findings:
        print(finding.line())
    for line in report.pending:
        print(f"pending: {line}")
    for line in report.checked:
        print(f"checked: {line}")
    counts = ", ".join(f"{n} {what}" for what, n in report.counts.items())
    if report.clean:
        print(f"{source}: clean ({counts})")
        return 0
    left = report.left
    print(
        f"{source}: {len(report.findings)} problems, "
        f"{len(report.findings) - len(left)} repaired, {len(left)} left ({counts})"
    )
    return 4 if left else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmtreefs", description="Virtual machines as directories: a FUSE filesystem."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_init = sub.add_parser("init", help="make SOURCE a new, empty tree")
    p_init.add_argument("source")
    p_init.add_argument("--engine", default="auto", choices=["auto", "reflink", "dm-thin"])
    p_init.add_argument("--data", help="dm-thin: an existing block device for the pool's data")
    p_init.add_argument("--metadata", help="dm-thin: an existing block device for its metadata")
    p_init.add_argument("--size", default="20G", help="pool size where an image is made (20G)")
    p_init.set_defaults(func=cmd_init)

    p_mount = sub.add_parser("mount", help="mount SOURCE at MOUNTPOINT")
    p_mount.add_argument("source")
    p_mount.add_argument("mountpoint")
    p_mount.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p_mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        help="allow_other, debug; for an empty SOURCE: engine=auto|reflink|dm-thin, size=20G, "
        "data=DEV,metadata=DEV (dm-thin on given devices)",
    )
    p_mount.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p_mount.set_defaults(func=cmd_mount)

    p_umount = sub.add_parser("umount", help="unmount and wait for the daemon to finish")
    p_umount.add_argument("mountpoint")
    p_umount.set_defaults(func=cmd_umount)

    p_fsck = sub.add_parser("fsck", help="check an unmounted SOURCE (and --repair it)")
    p_fsck.add_argument("source")
    p_fsck.add_argument(
        "--repair", action="store_true", help="fix what can be fixed without guessing"
    )
    p_fsck.set_defaults(func=cmd_fsck)

    p_tree = sub.add_parser("tree", help="draw the forest of VMs of a mounted tree")
    p_tree.add_argument("mountpoint", nargs="?", help="the mount (default: the only one)")
    p_tree.add_argument("--format", choices=["text", "dot"], default="text")
    p_tree.set_defaults(func=cmd_tree)
    return parser


SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _ensure_system_path() -> None:
    """mount(8) and systemd may start us with no PATH; mkfs.xfs and losetup live in sbin."""
    current = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    os.environ["PATH"] = os.pathsep.join(current + [p for p in SYSTEM_PATH if p not in current])


def cmd_tree(args: argparse.Namespace) -> int:
    if args.mountpoint is not None:
        vms = Path(args.mountpoint).resolve()
    else:
        found = [m.mount_point for m in mountinfo.mounts() if m.fstype == "fuse.vmtreefs"]
        if len(found) != 1:
            where = ", ".join(found) if found else "none"
            print(f"vmtreefs tree: name the MOUNTPOINT (vmtreefs mounts: {where})", file=sys.stderr)
            return 2
        vms = Path(found[0])
    if mountinfo.mounted_at(str(vms), "fuse.vmtreefs") is None:
        print(f"vmtreefs tree: {vms} is not a mounted vmtreefs", file=sys.stderr)
        return 2
    nodes = forest.read(vms)
    sys.stdout.write(forest.dot(nodes) if args.format == "dot" else forest.text(nodes))
    return 0


def main(argv: list[str] | None = None) -> int:
    _ensure_system_path()
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
        return status
    except VmtreeError as e:
        log.debug("refused", exc_info=True)
        return _fail(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
