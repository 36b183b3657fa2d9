"""A libvirtd of a test's own, to kill and start again without touching anyone else's.

The machine's libvirtd (tests/helpers/libvirt.py) may serve other test runs at
the same time, so a test that kills libvirtd kills this one instead: a real
``libvirtd`` (and ``virtlogd``) run as root, each in a mount namespace of its
own in which ``/run/libvirt``, ``/var/lib/libvirt/qemu`` and
``/var/cache/libvirt`` are directories of this instance. Its socket is in a
directory both namespaces see, so it is ``qemu:///system?socket=…``. Every
start makes a fresh namespace over the same directories: a libvirtd started
again finds its domains' status there and takes the running QEMUs back, as
after a crash of the machine's own.

A namespace copies the mounts there are when it is made; mounts made later
under a shared mount (tests/helpers/images.py makes each image's directory
one) reach it too. So start it after the image is mounted.

The daemons are known by the pid each writes to its pidfile here, and only
those pids are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

PRIVATE = {
    "run": Path("/run/libvirt"),
    "lib": Path("/var/lib/libvirt/qemu"),
    "cache": Path("/var/cache/libvirt"),
}
START_TIMEOUT = 60.0


def _alive(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process named ``name``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return comm == name and stat[stat.rindex(")") + 2] != "Z"


def _copy_dirs(src: Path, dst: Path) -> None:
    """The directories of ``src`` (not its domains' runtime ones), owners and modes kept."""
    dst.mkdir(exist_ok=True)
    st = src.stat()
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)
    for child in src.iterdir():
        if child.is_dir() and not child.is_symlink() and not child.name.startswith("domain-"):
            _copy_dirs(child, dst / child.name)


class PrivateLibvirt:
    """virtlogd and libvirtd of this test's own."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="vmtree-libvirtd-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        for name, where in PRIVATE.items():
            if name == "cache":
                shutil.copytree(where, self.root / name, symlinks=True)
            elif where.exists():
                _copy_dirs(where, self.root / name)
            else:
                (self.root / name).mkdir()
        (self.root / "sock").mkdir()
        self.config = self.root / "libvirtd.conf"
        self.config.write_text(f'unix_sock_dir = "{self.root / "sock"}"\n')
        self.uri = f"qemu:///system?socket={self.root / 'sock' / 'libvirt-sock'}"
        self.pids: dict[str, int] = {}
        self.starts = 0

    def _spawn(self, name: str, *args: str) -> int:
        """``name -d`` in a fresh mount namespace over this instance's directories."""
        pidfile = self.root / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        binds = " && ".join(
            f"mount --bind {self.root / key} {where}" for key, where in PRIVATE.items()
        )
        script = f"{binds} && exec {name} -d -p {pidfile} {' '.join(args)}"
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
        )
        assert done.returncode == 0, f"starting {name}: {done.stdout}{done.stderr}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int(pidfile.read_text().split()[0])
                if _alive(pid, name):
                    return pid
            assert time.monotonic() < deadline, f"{name} wrote no pid to {pidfile}"
            time.sleep(0.1)

    def start(self) -> None:
        """Start virtlogd (unless it runs) and libvirtd; return once libvirtd answers."""
        if not _alive(self.pids.get("virtlogd", 0), "virtlogd"):
            self.pids["virtlogd"] = self._spawn("virtlogd")
        self.pids["libvirtd"] = self._spawn("libvirtd", "-f", str(self.config))
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError:
                assert time.monotonic() < deadline, f"libvirt at {self.uri} does not answer"
                time.sleep(0.2)

    @property
    def libvirtd_pid(self) -> int:
        return self.pids["libvirtd"]

    def freeze(self) -> None:
        """SIGSTOP this instance's libvirtd: every call to it waits until it runs or dies."""
        os.kill(self.pids["libvirtd"], signal.SIGSTOP)

    def kill9(self) -> None:
        """SIGKILL this instance's libvirtd (its QEMUs run on), and wait until it is gone."""
        pid = self.pids.pop("libvirtd")
        assert _alive(pid, "libvirtd"), f"libvirtd {pid} is not running"
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _alive(pid, "libvirtd"):
            assert time.monotonic() < deadline, f"libvirtd {pid} outlived SIGKILL"
            time.sleep(0.05)

    def stop(self) -> None:
        """TERM (then KILL) each daemon started here, by its pid; remove the directories."""
        for name in ("libvirtd", "virtlogd"):
            pid = self.pids.pop(name, 0)
            if not _alive(pid, name):
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while _alive(pid, name) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, name):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_libvirt() -> Iterator[PrivateLibvirt]:
    """A started :class:`PrivateLibvirt`, stopped when the block ends, however it ends."""
    instance = PrivateLibvirt()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
