"""KVM or TCG for new VMs: ask the machine once, by booting the demo guest under KVM.

``/dev/kvm`` existing is not enough: on some hosts (nested virtualisation
without the CPU features a kernel wants) a guest resets in a loop under KVM.
The only honest test is to boot one: the demo guest prints VMTREE-READY in
about a second where KVM works; where it does not, QEMU stops at the first
reset (``-no-reboot``) or the probe gives up after ten seconds. The answer is
kept in /run until the machine reboots.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vmtreefs.accel")

ACCEL_CHOICES = ("auto", "kvm", "tcg")
PROBE_SECONDS = 10.0
# The answer holds until the machine reboots: /run is emptied at boot.
CACHE = Path("/run/vmtreefs/accel")
READY = b"VMTREE-READY"

_probed: dict[str, str] = {}


def resolve_domain_type(accel: str, guest_dir: Path) -> str:
    """libvirt's domain type for new VMs: ``kvm`` or ``qemu`` (TCG)."""
    if accel == "kvm":
        return "kvm"
    if accel == "tcg":
        return "qemu"
    key = str(guest_dir)
    if key not in _probed:
        _probed[key] = _cached() or _remember(_probe(guest_dir))
    return _probed[key]


def _cached() -> str | None:
    try:
        answer = CACHE.read_text().strip()
    except OSError:
        return None
    return answer if answer in ("kvm", "qemu") else None


def _remember(answer: str) -> str:
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        CACHE.write_text(answer + "\n")
    except OSError as e:
        log.info("accel: cannot remember the answer in %s: %s", CACHE, e)
    return answer


def _probe(guest_dir: Path) -> str:
    kernel, initrd = guest_dir / "vmlinuz", guest_dir / "initrd.img"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        log.info("accel: /dev/kvm is not usable here: new VMs run under TCG (domain type qemu)")
        return "qemu"
    if not (kernel.exists() and initrd.exists()):
        log.info("accel: no demo guest in %s to try KVM with: new VMs use TCG", guest_dir)
        return "qemu"
    with tempfile.TemporaryDirectory(prefix="vmtreefs-accel-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            "qemu-system-x86_64",
            "-accel", "kvm", "-m", "128", "-no-reboot",
            "-nodefaults", "-display", "none", "-serial", f"file:{console}",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        except OSError as e:
            log.info("accel: cannot run QEMU to try KVM (%s): new VMs use TCG", e)
            return "qemu"
        try:
            while time.monotonic() - started < PROBE_SECONDS:
                if console.exists() and READY in console.read_bytes():
                    log.info(
                        "accel: KVM booted the demo guest in %.1f s: new VMs use KVM",
                        time.monotonic() - started,
                    )
                    return "kvm"
                if process.poll() is not None:
                    break
                time.sleep(0.1)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
    log.info("accel: a guest does not boot under KVM here: new VMs run under TCG")
    return "qemu"
