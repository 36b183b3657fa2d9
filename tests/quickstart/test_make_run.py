"""The README's first command, as a newcomer runs it: ``make run`` in a fresh clone.

The committed HEAD is cloned (``git clone``, so no untracked build output of this
checkout leaks in) into a directory under /var/tmp that libvirt's QEMU user can
reach. ``make run`` runs there in its own process group, exactly as the README
says: it makes a new venv in the clone, builds the demo guest into the clone's
``build/``, starts the libvirt daemons if none run, and mounts ``state`` at
``vms``. The test then does what the README's quick start shows (``echo start >
vms/demo/ctl``, ``VMTREE-READY`` on ``vms/demo/console``, ``echo shutdown``),
stops ``make run`` with Ctrl-C (SIGINT to its process group) and checks that
nothing it started is left: the mount and the engine's pool mount, the loop
device, the libvirt domains, the daemons it started and its own processes.

The Debian packages are installed by then (``make test`` installs them first).
The fresh venv shares pip's cache in the home directory with the checkout's own
venv, which ``make test`` made first, so pyfuse3 and libvirt-python come as
built wheels rather than being compiled again.

Cost, measured on the 2-core test machine with a warm pip cache: 37-47 s in all
(``vms/demo`` 21-29 s after ``make run`` starts: the venv, virtme-ng, the demo
guest, libvirtd and the mount; ``VMTREE-READY`` 9 s after ``start`` under TCG;
the shutdown; ``make run`` gone 3.9 s after Ctrl-C). With a cold cache pip
compiles pyfuse3 and libvirt-python first (the 20-minute setup timeout allows for it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmtreefs import mountinfo

REPO = Path(__file__).resolve().parents[2]

SETUP_TIMEOUT = 1200.0  # a cold pip cache compiles pyfuse3 and libvirt-python
BOOT_TIMEOUT = 240.0  # TCG, with the dm-thin guest tests busy on the other CPU
SHUTDOWN_TIMEOUT = 120.0
STOP_TIMEOUT = 120.0
LOG_TAIL = 120

# What a parent `make` or venv would hand down; a newcomer's shell has none of it.
INHERITED = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKE_TERMOUT", "MAKE_TERMERR", "VIRTUAL_ENV")


class MakeRun:
    """``make run`` in a clone, in its own process group, its output kept in a file."""

    def __init__(self, clone: Path) -> None:
        self.clone = clone
        self.vms = clone / "vms"
        self.state = clone / "state"
        self.pidfile = clone / "build" / "libvirt-started.pids"
        self.log_path = clone.parent / "make-run.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in INHERITED}
        own_bin = str(REPO / ".venv" / "bin")
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", "").split(os.pathsep) if p != own_bin
        )
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["make", "run"],
                cwd=self.clone,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def output(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(lines[-LOG_TAIL:])

    def fail(self, what: str) -> None:
        pytest.fail(
            f"{what}\n--- make run (last {LOG_TAIL} lines) ---\n{self.output()}", pytrace=False
        )

    def wait_for(self, what: str, ready: Callable[[], bool], timeout: float) -> float:
        """Poll ``ready()`` until it is true; fails with make run's output if it exits first."""
        started = time.monotonic()
        while not ready():
            assert self.proc is not None
            if self.proc.poll() is not None:
                self.fail(f"make run exited ({self.proc.returncode}) before {what}")
            if time.monotonic() - started > timeout:
                self.fail(f"no {what} after {timeout:.0f} s")
            time.sleep(0.2)
        return time.monotonic() - started

    def interrupt(self, timeout: float) -> int | None:
        """Ctrl-C: SIGINT to the process group; make's exit status, or None if it hangs."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def group_members(self) -> list[str]:
        """The processes still in make run's process group: ``PID COMMAND``."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == self.pgid and fields[0] != "Z":
                found.append(f"{entry.name} {stat[stat.index('(') + 1 : stat.rindex(')')]}")
        return found


def started_daemons(pidfile: Path) -> list[tuple[str, int, str]]:
    """The lines ``NAME PID STARTTIME`` of the daemons make run's script started."""
    try:
        lines = pidfile.read_text().split("\n")
    except FileNotFoundError:
        return []
    daemons = []
    for line in lines:
        fields = line.split()
        if len(fields) == 3:
            daemons.append((fields[0], int(fields[1]), fields[2]))
    return daemons


def still_running(name: str, pid: int, starttime: str) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return comm == name and stat[stat.rindex(")") + 2 :].split()[19] == starttime


def loops_under(directory: Path) -> list[str]:
    """Loop devices whose backing file lies under ``directory``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(f"{directory}/"):
                found.append(f"/dev/{backing.parts[3]}")
    return found


def mounts_under(directory: Path) -> list[str]:
    return [
        m.mount_point
        for m in mountinfo.mounts()
        if m.mount_point == str(directory) or m.mount_point.startswith(f"{directory}/")
    ]


def qemu_processes(domain_prefix: str) -> list[str]:
    """QEMU processes of the tree's domains (they outlive a libvirtd that is gone)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and b"qemu" in cmdline[0] and any(domain_prefix.encode() in a for a in cmdline):
            found.append(entry.name)
    return found


def libvirt_domains(domain_prefix: str) -> list[str]:
    """Domains with the prefix, when libvirt answers (it need not run any more)."""
    try:
        import libvirt
    except ImportError:
        return []
    # libvirt prints a failed connection to stderr: ask the socket first.
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect("/run/libvirt/libvirt-sock")
        except OSError:
            return []
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError:
        return []
    try:
        return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(domain_prefix)]
    finally:
        conn.close()


def clean_up(run: MakeRun, domain_prefix: str | None) -> None:
    """Whatever a failed run left behind, removed by what it is, never by name."""
    if run.proc is not None and run.proc.poll() is None and run.interrupt(STOP_TIMEOUT) is None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(timeout=30)
                break
    if domain_prefix:
        for name in libvirt_domains(domain_prefix):
            subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], check=False)
            subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name], check=False)
    for point in sorted(mounts_under(run.clone), reverse=True):
        if point == str(run.vms):
            subprocess.run(["fusermount3", "-u", "-z", point], check=False)
        else:
            subprocess.run(["umount", "-l", point], check=False)
    for loop in loops_under(run.clone):
        subprocess.run(["losetup", "-d", loop], check=False)
    if run.pidfile.exists():
        subprocess.run(
            ["bash", str(run.clone / "scripts" / "libvirt-daemons.sh"), "stop", str(run.pidfile)],
            check=False,
        )


@pytest.fixture
def fresh_clone() -> Iterator[Path]:
    """A clone of this checkout's HEAD in a directory that libvirt's QEMU user can reach."""
    if not (REPO / ".git").exists():
        pytest.fail(f"{REPO} is not a git checkout: this test clones its HEAD", pytrace=False)
    top = Path(tempfile.mkdtemp(prefix="vmtree-make-run-", dir="/var/tmp"))
    try:
        os.chmod(top, 0o755)
        clone = top / "vmtreefs"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        yield clone
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_make_run_from_a_fresh_clone_boots_the_demo_vm_and_ctrl_c_leaves_nothing(
    fresh_clone: Path,
) -> None:
    run = MakeRun(fresh_clone)
    prefix: str | None = None
    try:
        run.start()
        demo = run.vms / "demo"
        setup = run.wait_for("vms/demo", demo.is_dir, SETUP_TIMEOUT)
        status = dict(
            line.split(": ", 1)
            for line in (run.vms / ".vmtree" / "status").read_text().splitlines()
            if ": " in line
        )
        prefix = f"vmtree-{status['tree_id']}-"
        daemons = started_daemons(run.pidfile)

        (demo / "ctl").write_text("start\n")
        if (demo / "state").read_text().strip() != "running":
            run.fail(
                f"after `echo start > vms/demo/ctl` the state is {(demo / 'state').read_text()!r}"
            )
        boot = run.wait_for(
            "VMTREE-READY on vms/demo/console",
            lambda: b"VMTREE-READY" in (demo / "console").read_bytes(),
            BOOT_TIMEOUT,
        )
        (demo / "ctl").write_text("shutdown\n")
        run.wait_for(
            "state halted after `echo shutdown`",
            lambda: (demo / "state").read_text().strip() == "halted",
            SHUTDOWN_TIMEOUT,
        )

        started = time.monotonic()
        exit_status = run.interrupt(STOP_TIMEOUT)
        if exit_status is None:
            run.fail(
                f"make run still runs {STOP_TIMEOUT:.0f} s after Ctrl-C: {run.group_members()}"
            )
        stop = time.monotonic() - started
        left = {
            "mounts": mounts_under(run.clone),
            "loop devices": loops_under(run.clone),
            "libvirt domains": libvirt_domains(prefix),
            "QEMU processes": qemu_processes(prefix),
            "daemons it started": [f"{n} {p}" for n, p, st in daemons if still_running(n, p, st)],
            "its processes": run.group_members(),
        }
        left = {what: items for what, items in left.items() if items}
        if left:
            run.fail(f"after Ctrl-C, make run left behind: {left}")
        if "unmounted" not in run.output():
            run.fail("make run's output does not say that the daemon unmounted")
        print(
            f"make run: demo VM after {setup:.0f} s, READY {boot:.0f} s after start, "
            f"stopped {stop:.1f} s after Ctrl-C; daemons it started: {daemons}"
        )
    finally:
        clean_up(run, prefix)
