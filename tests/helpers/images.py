"""Sparse filesystem images, loop-mounted for a test and always torn down afterwards.

Tests run as root and share the machine's loop devices with other test runs, so
teardown detaches only the devices backing its own image and fails loudly if any
is left: a leak would otherwise surface much later as a confusing EBUSY.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MKFS: dict[str, list[str]] = {
    "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def run(*argv: str) -> str:
    """Run a tool; on failure the assertion shows its stderr."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}"
    return done.stdout


def loop_devices(image: Path) -> list[str]:
    """Loop devices backed by ``image``."""
    out = run("losetup", "--noheadings", "--output", "NAME", "--associated", str(image))
    return [line.strip() for line in out.splitlines() if line.strip()]


def is_mountpoint(path: Path) -> bool:
    """Whether anything is mounted exactly at ``path`` (by /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        # mountinfo writes a space in a path as \040 (and tab, newline, backslash alike).
        return any(
            re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) == real
            for line in f
        )


def make_image(image: Path, fstype: str, size: str = "1G") -> None:
    """A sparse file of ``size`` (truncate syntax) formatted as ``fstype``."""
    run("truncate", "-s", size, str(image))
    run(*MKFS[fstype], str(image))


def unmount_and_detach(mountpoint: Path, image: Path) -> None:
    """Unmount (lazily if busy, then fail) and detach every loop device of ``image``."""
    busy = ""
    while is_mountpoint(mountpoint):
        done = subprocess.run(
            ["umount", "--recursive", str(mountpoint)], capture_output=True, text=True
        )
        if done.returncode != 0:
            busy = done.stderr.strip()
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
            break
    # The kernel lets go of a loop device only when its last user is gone (an
    # unmount still finishing, udev's probe): detaching may need a moment.
    deadline = time.monotonic() + 10
    while (left := loop_devices(image)) and time.monotonic() < deadline:
        for dev in left:
            subprocess.run(["losetup", "--detach", dev], check=False, capture_output=True)
        time.sleep(0.2)
    left = loop_devices(image)
    assert not busy, f"{mountpoint} was busy at teardown (left lazily unmounted): {busy}"
    assert not left, f"loop devices {left} still hold {image}"


@contextmanager
def mounted_image(fstype: str, size: str = "1G") -> Iterator[Path]:
    """Yield the mount point of a fresh ``fstype`` filesystem on a sparse loop-mounted image.

    The directory lives under /tmp with mode 0755 so that a QEMU run by libvirt
    as another user can reach files in it (pytest's own tmp_path is 0700).

    It is a shared bind mount of itself: libvirt starts each QEMU in a copy of
    the host's mounts, and without systemd (which makes / shared) that copy
    would keep the filesystem mounted, and its loop device busy, after we
    unmount it. Beneath a shared mount the copy is a slave, and the unmount
    reaches it.
    """
    top = Path(tempfile.mkdtemp(prefix=f"vmtree-{fstype}-", dir="/tmp"))
    os.chmod(top, 0o755)
    image = top / f"image.{fstype}"
    mnt = top / "mnt"
    mnt.mkdir()
    run("mount", "--bind", str(top), str(top))
    try:
        run("mount", "--make-rshared", str(top))
        make_image(image, fstype, size)
        run("mount", "-t", fstype, "-o", "loop", str(image), str(mnt))
        try:
            yield mnt
        finally:
            unmount_and_detach(mnt, image)
    finally:
        if not is_mountpoint(mnt):
            subprocess.run(["umount", str(top)], check=False, capture_output=True)
            if is_mountpoint(top):
                subprocess.run(["umount", "-l", str(top)], check=False)
            shutil.rmtree(top, ignore_errors=True)
