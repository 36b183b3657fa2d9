"""The demo guest (scripts/build-demo-guest.sh) boots for real and keeps its boot counter.

It is booted here by QEMU directly (TCG where KVM is unusable), the way libvirt will
boot it: direct kernel boot, serial console to a file, the private volume as the
second virtio disk. It is shut down the way libvirt's virDomainShutdown does by
default, with an ACPI power-button press (QMP ``system_powerdown``), and must power
off by itself: QEMU exits with status 0. ``make test`` installs the kernel, busybox-static and QEMU
(``make deps-guest``); without them this fails with that hint, never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BOOT_TIMEOUT = 120.0
SHUTDOWN_TIMEOUT = 60.0  # from system_powerdown to QEMU's exit, under TCG


@pytest.fixture
def demo(demo_guest: Path) -> Path:
    """The demo guest's vmlinuz and initrd.img (built once per session, tests/vm/conftest.py)."""
    return demo_guest


class Boot:
    """One QEMU run of the demo guest, known by its pid, killed when done.

    Its QMP monitor listens on a Unix socket next to the serial log.
    """

    def __init__(self, demo: Path, disks: list[Path], serial: Path) -> None:
        self.serial = serial
        self.qmp_path = serial.with_name("qmp.sock")
        serial.unlink(missing_ok=True)
        self.qmp_path.unlink(missing_ok=True)
        argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "256", "-nodefaults"]
        argv += ["-display", "none", "-no-reboot", "-serial", f"file:{serial}"]
        argv += ["-kernel", str(demo / "vmlinuz"), "-initrd", str(demo / "initrd.img")]
        argv += ["-append", "console=ttyS0 quiet panic=-1"]
        for disk in disks:
            argv += ["-drive", f"file={disk},if=virtio,format=raw"]
        argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        self.process = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def console(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.console())
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} on the console:\n{self.console()[-2000:]}")

    def qmp(self, command: str) -> dict[str, Any]:
        """Run one QMP command on a fresh connection; its reply, events skipped."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(self.qmp_path))
            with sock.makefile("rwb") as stream:

                def reply() -> dict[str, Any]:
                    while True:
                        line = stream.readline()
                        if not line:
                            raise AssertionError(f"QMP closed before answering {command!r}")
                        message: dict[str, Any] = json.loads(line)
                        if "return" in message or "error" in message:
                            return message

                if "QMP" not in json.loads(stream.readline()):
                    raise AssertionError("no QMP greeting")
                for execute in ("qmp_capabilities", command):
                    stream.write(json.dumps({"execute": execute}).encode() + b"\n")
                    stream.flush()
                    answer = reply()
                    if "error" in answer:
                        raise AssertionError(f"QMP {execute!r} failed: {answer['error']}")
                return answer

    def power_down(self) -> None:
        """Press the ACPI power button, as virDomainShutdown does by default."""
        self.qmp("system_powerdown")

    def wait_exit(self, timeout: float) -> int:
        """QEMU's exit status once it exits by itself, within timeout seconds."""
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tail = self.console()[-2000:]
            message = f"QEMU still runs {timeout:.0f} s after the power button:\n{tail}"
            raise AssertionError(message) from None
        assert self.process.returncode == 0, f"QEMU exited {self.process.returncode}: {stderr}"
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def disks() -> Iterator[list[Path]]:
    """Sparse root and private volumes, as a VM's first two disks."""
    where = Path(tempfile.mkdtemp(prefix="vmtree-demo-disks-", dir="/tmp"))
    try:
        paths = [where / "root.img", where / "private.img"]
        for path, size in zip(paths, (64 << 20, 16 << 20), strict=True):
            with open(path, "wb") as f:
                f.truncate(size)
        yield paths
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_the_demo_guest_boots_counts_its_boots_and_ticks(demo: Path, disks: list[Path]) -> None:
    for expected_boot in (1, 2):
        boot = Boot(demo, disks, disks[0].parent / "serial.log")
        try:
            boot.wait_for("VMTREE-READY")
            assert f"VMTREE-BOOT {expected_boot}\n" in boot.console()
            boot.wait_for(r"VMTREE-TICK 3\b")
            ticks = [int(n) for n in re.findall(r"VMTREE-TICK (\d+)", boot.console())]
            assert ticks == list(range(1, len(ticks) + 1))
            assert "VMTREE-INSMOD-FAILED" not in boot.console()
            assert "VMTREE-NO-POWER-BUTTON" not in boot.console()
            shut_down_by_the_power_button(boot)
        finally:
            boot.kill()
    assert disks[1].read_bytes()[:32].split()[0] == b"2"  # the counter is on the volume


def test_the_demo_guest_hears_the_power_button_right_after_ready(
    demo: Path, disks: list[Path]
) -> None:
    boot = Boot(demo, disks, disks[0].parent / "serial.log")
    try:
        boot.wait_for("VMTREE-READY")
        shut_down_by_the_power_button(boot)
        assert "VMTREE-BOOT 1\n" in boot.console()
    finally:
        boot.kill()


def shut_down_by_the_power_button(boot: Boot) -> None:
    """system_powerdown: the guest says so, powers off, and QEMU exits with status 0."""
    boot.power_down()
    assert boot.wait_exit(SHUTDOWN_TIMEOUT) == 0
    console = boot.console()
    assert "VMTREE-SHUTDOWN\n" in console, console[-2000:]
    assert "VMTREE-POWER-BUTTON-FAILED" not in console
