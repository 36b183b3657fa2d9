"""A VM's libvirt domain description: the user's base, checked, and what libvirt gets; no I/O.

Users own the base description (``domain.xml``): machine type, kernel, devices.
vmtreefs owns what ties a domain to the tree, and writes it in at every start,
so a rename, a clone or a volatile VM never needs libvirt to know more than an
internal name: the name and uuid, memory and vcpus (properties), one disk per
volume, the serial console going to a log file the tree can read, and an empty
``<genid/>`` (see :func:`render`).
"""

from __future__ import annotations

import errno
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from vmtreefs.errors import VmtreeError

MAX_DOMAIN_XML = 256 * 1024
DOMAIN_TYPES = ("qemu", "kvm", "xen")
# Elements whose content vmtreefs decides; the user's copies are replaced.
OWNED = ("name", "uuid", "genid", "memory", "currentMemory", "vcpu", "title")
# Domain types whose guests get a VM generation ID (QEMU's vmgenid device).
GENID_TYPES = ("qemu", "kvm")
OWNED_DEVICES = ("serial", "console")
# At most one each: vmtreefs puts its disks and console in the first <devices> and reads
# the first <os>; libvirt would take the disks of a second <devices> too.
SINGLE = ("os", "features", "devices")
# A namespace for the uuids of VMs: stable for a VM, different across trees.
_UUID_NAMESPACE = uuidlib.UUID("5d1f0c52-3f43-4a0e-9a45-0f3c9f1d7a10")

DEMO_KERNEL = "vmlinuz"
DEMO_INITRD = "initrd.img"


@dataclass(frozen=True)
class Disk:
    """One volume as the guest sees it."""

    volume: str
    path: str
    block: bool
    readonly: bool = False


@dataclass(frozen=True)
class Identity:
    """What names a running VM to libvirt and where its console goes."""

    name: str
    uuid: str
    console_log: str


def domain_name(tree_id: str, vm_id: int) -> str:
    """libvirt's name for a VM: internal, so renames and volatile hiding never touch libvirt."""
    return f"vmtree-{tree_id}-{vm_id}"


def domain_uuid(tree_id: str, vm_id: int) -> str:
    return str(uuidlib.uuid5(_UUID_NAMESPACE, f"{tree_id}/{vm_id}"))


def parse_domain_name(tree_id: str, name: str) -> int | None:
    """The VM id in one of this tree's domain names, or None for anyone else's domain."""
    prefix = f"vmtree-{tree_id}-"
    tail = name[len(prefix) :] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() and not tail.startswith("0") else None


def demo_domain(guest_dir: str, domain_type: str) -> str:
    """The base description of a new VM: the demo guest booted straight from its kernel.

    ``no_timer_check``: under TCG on a loaded host the kernel's IO-APIC timer check can
    miss its ticks and panic ("IO-APIC + timer doesn't work") at boot."""
    return f"""<domain type='{domain_type}'>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{guest_dir}/{DEMO_KERNEL}</kernel>
    <initrd>{guest_dir}/{DEMO_INITRD}</initrd>
    <cmdline>console=ttyS0 quiet no_timer_check</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
  </devices>
</domain>
"""


def _refuse(reason: str) -> VmtreeError:
    return VmtreeError(errno.EINVAL, f"domain.xml: {reason}")


def check_base(raw: bytes) -> str:
    """The base description a user wrote, or EINVAL saying what is wrong with it."""
    if len(raw) > MAX_DOMAIN_XML:
        raise VmtreeError(
            errno.EFBIG, f"domain.xml is {len(raw)} bytes, over {MAX_DOMAIN_XML} bytes"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse("not UTF-8 text") from None
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise _refuse("DOCTYPE and ENTITY declarations are not accepted")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise _refuse(f"not well-formed XML: {e}") from None
    if root.tag != "domain":
        raise _refuse(f"the root element is <{root.tag}>, not <domain>")
    if root.get("type") not in DOMAIN_TYPES:
        raise _refuse(
            f"<domain type={root.get('type')!r}>: the type must be one of {', '.join(DOMAIN_TYPES)}"
        )
    os_element = root.find("os")
    if os_element is None or os_element.find("type") is None:
        raise _refuse("an <os> element with a <type> is needed")
    for tag in SINGLE:
        if len(root.findall(tag)) > 1:
            raise _refuse(f"more than one <{tag}> element")
    return text


def disk_targets(volume_names: list[str]) -> list[str]:
    """The order volumes appear in the guest: root, private, then by name (vda, vdb, ...)."""
    first = [n for n in ("root", "private") if n in volume_names]
    return first + sorted(n for n in volume_names if n not in first)


def _target_dev(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return "vd" + letters


def render(base: str, identity: Identity, memory_mib: int, vcpus: int, disks: list[Disk]) -> str:
    """The description libvirt is given: the base with vmtreefs' own parts put in.

    An empty ``<genid/>`` asks for QEMU's vmgenid device with a value libvirt
    generates. It is there so that savestates carry the device: libvirt gives a
    domain restored from a save image a new generation ID (the guest's kernel
    reseeds its RNG when it changes), but only one that had the device when it
    was saved. A user's own ``<genid>`` value is dropped: clones would share it.
    Not for a guest without ACPI (``<features><acpi/>``), where the guest could
    not find the device, nor for Xen.
    """
    root = ET.fromstring(base)
    for tag in OWNED:
        for element in root.findall(tag):
            root.remove(element)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    for element in list(devices):
        if element.tag in OWNED_DEVICES or (
            element.tag == "disk" and element.get("device", "disk") == "disk"
        ):
            devices.remove(element)
    head = [_element("name", identity.name), _element("uuid", identity.uuid)]
    if root.get("type") in GENID_TYPES and root.find("features/acpi") is not None:
        head.append(ET.Element("genid"))
    head += [
        _element("memory", str(memory_mib), unit="MiB"),
        _element("currentMemory", str(memory_mib), unit="MiB"),
        _element("vcpu", str(vcpus)),
    ]
    for position, element in enumerate(head):
        root.insert(position, element)
    targets: dict[str, str] = {}
    for index, disk in enumerate(disks):
        targets[disk.volume] = _target_dev(index)
        devices.append(_disk(disk, targets[disk.volume]))
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=identity.console_log, append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=identity.console_log, append="on")
    ET.SubElement(console, "target", type="serial", port="0")
    _name_private_disk(root, targets)
    return ET.tostring(root, encoding="unicode")


def _element(tag: str, text: str, **attrs: str) -> ET.Element:
    element = ET.Element(tag, attrs)
    element.text = text
    return element


def _disk(disk: Disk, target: str) -> ET.Element:
    element = ET.Element("disk", type="block" if disk.block else "file", device="disk")
    if disk.block:
        ET.SubElement(element, "driver", name="qemu", type="raw", cache="none", io="native")
    else:
        ET.SubElement(element, "driver", name="qemu", type="raw")
    ET.SubElement(element, "source", {"dev" if disk.block else "file": disk.path})
    ET.SubElement(element, "target", dev=target, bus="virtio")
    if disk.readonly:
        ET.SubElement(element, "readonly")
    return element


def _name_private_disk(root: ET.Element, targets: dict[str, str]) -> None:
    """Tell a direct-boot guest where its private volume is (the demo guest reads it)."""
    cmdline = root.find("os/cmdline")
    if cmdline is None or "private" not in targets:
        return
    words = [w for w in (cmdline.text or "").split() if not w.startswith("vmtree.private=")]
    cmdline.text = " ".join([*words, f"vmtree.private={targets['private']}"])


def _parse_saved(saved_xml: str) -> ET.Element:
    """A saved description, as a save image holds it: a crafted image may hold anything."""
    try:
        return ET.fromstring(saved_xml)
    except ET.ParseError as e:
        raise _refuse(f"the saved description is not well-formed XML: {e}") from None


def saved_name(saved_xml: str) -> str:
    """The domain name a saved description carries."""
    return _parse_saved(saved_xml).findtext("name") or ""


def retarget(saved_xml: str, identity: Identity, disks: list[Disk]) -> str:
    """A saved domain's description moved to another identity and other disks.

    Used to restore a save image somewhere else (a disposable, a clone): the
    devices the guest saw stay as they were, only what they point at changes.
    The ``<genid>`` stays too: libvirt refuses a restore whose description has
    another one ("Target domain genid ... does not match source"), and gives the
    restored domain a new one itself.
    """
    root = _parse_saved(saved_xml)
    for tag, text in (("name", identity.name), ("uuid", identity.uuid)):
        element = root.find(tag)
        if element is None:
            raise _refuse(f"the saved description has no <{tag}>")
        element.text = text
    by_target = {_target_dev(i): d for i, d in enumerate(disks)}
    for element in root.findall("devices/disk"):
        target = element.find("target")
        source = element.find("source")
        if target is None or source is None or element.get("device", "disk") != "disk":
            continue
        disk = by_target.get(target.get("dev", ""))
        if disk is None:
            raise _refuse(f"the saved description has a disk {target.get('dev')} not in the VM")
        element.set("type", "block" if disk.block else "file")
        source.attrib.clear()
        source.set("dev" if disk.block else "file", disk.path)
    for tag in OWNED_DEVICES:
        for element in root.findall(f"devices/{tag}"):
            source = element.find("source")
            if source is not None and source.get("path") is not None:
                source.set("path", identity.console_log)
    return ET.tostring(root, encoding="unicode")
