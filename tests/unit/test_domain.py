"""domain.xml rules and rendering, and the lifecycle state table: pure code, no libvirt."""

from __future__ import annotations

import errno
import xml.etree.ElementTree as ET

import pytest

from vmtreefs.errors import VmtreeError
from vmtreefs.rules import commands, domain, states
from vmtreefs.rules.domain import Disk, Identity

IDENTITY = Identity("vmtree-ab12cd34-7", domain.domain_uuid("ab12cd34", 7), "/s/run/console-7.log")


def child(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path)
    assert found is not None, f"no {path} in {ET.tostring(element, encoding='unicode')}"
    return found


def refusal(raw: bytes) -> int:
    with pytest.raises(VmtreeError) as info:
        domain.check_base(raw)
    return info.value.errno


def test_the_default_description_is_accepted_and_boots_the_demo_guest() -> None:
    text = domain.demo_domain("/var/lib/guest", "qemu")
    assert domain.check_base(text.encode()) == text
    root = ET.fromstring(text)
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/var/lib/guest/vmlinuz"
    assert root.find("features/acpi") is not None  # without it the guest never hears shutdown


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<domain",
        b"<vm type='qemu'><os><type>hvm</type></os></vm>",
        b"<domain type='lxc'><os><type>exe</type></os></domain>",
        b"<domain type='qemu'></domain>",
        b"<!DOCTYPE d [<!ENTITY a 'b'>]><domain type='qemu'><os><type>hvm</type></os></domain>",
        b"\xff\xfe",
    ],
)
def test_bad_descriptions_are_einval(raw: bytes) -> None:
    assert refusal(raw) == errno.EINVAL


def test_a_huge_description_is_efbig() -> None:
    assert refusal(b" " * (domain.MAX_DOMAIN_XML + 1)) == errno.EFBIG


def test_render_puts_in_identity_resources_disks_and_console() -> None:
    base = """<domain type='kvm'>
      <name>whatever</name><uuid>00000000-0000-0000-0000-000000000000</uuid>
      <memory>1</memory><vcpu>9</vcpu>
      <os>
        <type>hvm</type><kernel>/k</kernel><cmdline>console=ttyS0 vmtree.private=vdz</cmdline>
      </os>
      <devices>
        <disk type='file' device='disk'><source file='/etc/passwd'/><target dev='vda'/></disk>
        <disk type='file' device='cdrom'><source file='/iso'/><target dev='hdc'/></disk>
        <serial type='pty'/>
        <interface type='network'><source network='default'/></interface>
      </devices>
    </domain>"""
    disks = [
        Disk("data", "/pool/vol-9.img", block=False),
        Disk("private", "/pool/vol-8.img", block=False),
        Disk("root", "/dev/mapper/vmtree-p-7", block=True, readonly=True),
    ]
    ordered = [
        next(d for d in disks if d.volume == n)
        for n in domain.disk_targets(["data", "private", "root"])
    ]
    root = ET.fromstring(domain.render(base, IDENTITY, 512, 2, ordered))
    assert root.findtext("name") == IDENTITY.name
    assert root.findtext("uuid") == IDENTITY.uuid
    assert [e.text for e in root.findall("memory")] == ["512"]
    assert root.findtext("vcpu") == "2"
    got = [
        (
            child(d, "target").get("dev"),
            d.get("type"),
            child(d, "source").attrib,
            d.find("readonly") is not None,
        )
        for d in root.findall("devices/disk[@device='disk']")
    ]
    assert got == [
        ("vda", "block", {"dev": "/dev/mapper/vmtree-p-7"}, True),
        ("vdb", "file", {"file": "/pool/vol-8.img"}, False),
        ("vdc", "file", {"file": "/pool/vol-9.img"}, False),
    ]
    assert root.find("devices/disk[@device='cdrom']") is not None  # the user's other devices stay
    assert root.find("devices/interface") is not None
    assert [s.get("type") for s in root.findall("devices/serial")] == ["file"]
    assert child(root, "devices/serial/source").get("path") == IDENTITY.console_log
    assert root.findtext("os/cmdline") == "console=ttyS0 vmtree.private=vdb"


def test_retarget_moves_a_saved_description_to_another_vm() -> None:
    saved = domain.render(
        domain.demo_domain("/g", "qemu"),
        IDENTITY,
        256,
        1,
        [Disk("root", "/pool/vol-1.img", False), Disk("private", "/pool/vol-2.img", False)],
    )
    other = Identity("vmtree-ab12cd34-9", domain.domain_uuid("ab12cd34", 9), "/s/run/console-9.log")
    moved = ET.fromstring(
        domain.retarget(
            saved, other, [Disk("root", "/pool/vol-5.img", False), Disk("private", "/dev/x", True)]
        )
    )
    assert moved.findtext("name") == other.name and moved.findtext("uuid") == other.uuid
    assert [child(d, "source").attrib for d in moved.findall("devices/disk")] == [
        {"file": "/pool/vol-5.img"},
        {"dev": "/dev/x"},
    ]
    assert {s.get("path") for s in moved.findall("devices/*/source[@path]")} == {other.console_log}
    with pytest.raises(VmtreeError) as info:
        domain.retarget(saved, other, [Disk("root", "/pool/vol-5.img", False)])
    assert info.value.errno == errno.EINVAL


def test_a_guest_with_acpi_gets_an_empty_genid_that_libvirt_fills_in() -> None:
    """Every start asks for a vmgenid device, so savestates carry it and restores renew it."""
    demo = ET.fromstring(domain.render(domain.demo_domain("/g", "qemu"), IDENTITY, 64, 1, []))
    assert [(g.text, g.attrib) for g in demo.findall("genid")] == [(None, {})]
    own = "<genid>11111111-2222-3333-4444-555555555555</genid>"
    kvm = domain.demo_domain("/g", "kvm").replace("<os>", own + "<os>")
    given = ET.fromstring(domain.render(kvm, IDENTITY, 64, 1, []))
    assert [g.text for g in given.findall("genid")] == [None]  # clones must not share a value
    no_acpi = domain.demo_domain("/g", "qemu").replace("<acpi/>", "")
    assert ET.fromstring(domain.render(no_acpi, IDENTITY, 64, 1, [])).find("genid") is None
    xen = domain.demo_domain("/g", "xen")
    assert ET.fromstring(domain.render(xen, IDENTITY, 64, 1, [])).find("genid") is None


def test_retarget_keeps_the_saved_genid() -> None:
    """libvirt refuses a restore whose description changed the genid, and renews it itself."""
    genid = "0fe68009-6b73-49ee-bb4f-c2537ee3d8f0"
    saved = domain.render(
        domain.demo_domain("/g", "qemu"), IDENTITY, 64, 1, [Disk("root", "/p/1", False)]
    ).replace("<genid />", f"<genid>{genid}</genid>")
    assert f"<genid>{genid}</genid>" in saved
    other = Identity("vmtree-ab12cd34-9", domain.domain_uuid("ab12cd34", 9), "/s/run/console-9.log")
    moved = ET.fromstring(domain.retarget(saved, other, [Disk("root", "/p/5", False)]))
    assert [g.text for g in moved.findall("genid")] == [genid]


def test_domain_names_are_internal_and_parse_back() -> None:
    name = domain.domain_name("ab12cd34", 42)
    assert domain.parse_domain_name("ab12cd34", name) == 42
    assert domain.parse_domain_name("ffffffff", name) is None
    for foreign in ("vmtree-ab12cd34-", "vmtree-ab12cd34-x", "vmtree-ab12cd34-042", "fedora"):
        assert domain.parse_domain_name("ab12cd34", foreign) is None
    assert domain.domain_uuid("ab12cd34", 1) != domain.domain_uuid("ab12cd35", 1)
    assert domain.domain_uuid("ab12cd34", 1) == domain.domain_uuid("ab12cd34", 1)


def test_targets_are_vda_to_vdz_then_vdaa() -> None:
    assert domain.disk_targets(["b", "root", "a", "private"]) == ["root", "private", "a", "b"]
    names = [f"v{i:02d}" for i in range(28)]
    disks = [Disk(n, f"/p/{n}", False) for n in names]
    root = ET.fromstring(domain.render(domain.demo_domain("/g", "qemu"), IDENTITY, 64, 1, disks))
    targets = [child(d, "target").get("dev") for d in root.findall("devices/disk")]
    assert targets[0] == "vda" and targets[25] == "vdz" and targets[26:] == ["vdaa", "vdab"]


@pytest.mark.parametrize(
    ("verb", "state", "allowed"),
    [
        ("start", "halted", True),
        ("start", "running", False),
        ("shutdown", "running", True),
        ("shutdown", "halted", False),
        ("kill", "paused", True),
        ("kill", "halted", False),
        ("pause", "running", True),
        ("pause", "paused", False),
        ("resume", "paused", True),
        ("resume", "running", False),
    ],
)
def test_commands_in_the_wrong_state_are_ebusy(verb: str, state: str, allowed: bool) -> None:
    if allowed:
        states.check_command("w", verb, state)
        return
    with pytest.raises(VmtreeError) as info:
        states.check_command("w", verb, state)
    assert info.value.errno == errno.EBUSY
    assert f"it is {state}" in info.value.reason


def test_shutdown_takes_an_optional_timeout() -> None:
    assert commands.parse_shutdown_args(()) == commands.DEFAULT_SHUTDOWN_TIMEOUT
    assert commands.parse_shutdown_args(("--timeout", "5")) == 5
    for bad in (("5",), ("--timeout",), ("--timeout", "-1"), ("--timeout", "99999"), ("--t", "5")):
        with pytest.raises(VmtreeError) as info:
            commands.parse_shutdown_args(bad)
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("saved", ["", "<domain", "<domain><name>a</name></domain>junk"])
def test_a_saved_description_that_is_not_xml_is_einval(saved: str) -> None:
    # Found by the fuzzer: a crafted save image's XML raised ParseError, not VmtreeError.
    with pytest.raises(VmtreeError) as info:
        domain.saved_name(saved)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(VmtreeError) as info:
        domain.retarget(saved, IDENTITY, [])
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("tag", ["os", "features", "devices"])
def test_a_second_os_features_or_devices_is_refused(tag: str) -> None:
    # Found beside the fuzzer: a second <devices> kept its disks through render, which
    # then failed retarget; libvirt would have given the guest those disks too.
    base = (
        "<domain type='qemu'><os><type>hvm</type></os><features/><devices/>"
        f"<{tag}><disk device='disk'><target dev='vdz'/><source file='/x'/></disk></{tag}>"
        "</domain>"
    )
    assert refusal(base.encode()) == errno.EINVAL
