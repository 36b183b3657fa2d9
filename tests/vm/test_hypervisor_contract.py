"""The hypervisor contract: what the lifecycle relies on, checked on libvirt and on the fake.

The ``hypervisor`` fixture (tests/vm/conftest.py) is parametrised: ``libvirt`` is
``LibvirtHypervisor`` on ``qemu:///system`` with the demo guest under TCG,
``fake`` the in-memory libvirt of tests/fakes/hypervisor.py. Each test drives a
domain through the calls the lifecycle makes and checks the states, the errnos
and the events: the same ones, in the same order, delivered on another thread
than the caller's. The lifecycle's fast tests (tests/unit/test_runtime.py) stand
on the fake because it passes this suite.
"""

from __future__ import annotations

import errno
import shutil
import threading
import time
import uuid
import xml.etree.ElementTree as ET

import pytest

from tests.fakes.hypervisor import (
    BOOTED,
    KILLED,
    RESTORED,
    RESTORED_PAUSED,
    RESUMED,
    SAVED,
    SHUT_DOWN,
    SUSPENDED,
)
from tests.vm.conftest import Domains
from vmtreefs import saveimage
from vmtreefs.rules import domain
from vmtreefs.rules.domain import Disk, Identity
from vmtreefs.runtime.hypervisor import HypervisorError


def heard(hv: Domains, name: str, expected: tuple[tuple[str, str], ...]) -> None:
    """The domain's next events are ``expected``, each delivered on another thread."""
    events = hv.heard.of(name, len(expected))
    assert [(e.state, e.reason) for _, e in events] == list(expected)
    assert threading.current_thread().name not in {thread for thread, _ in events}


def refused(call: object, *args: object) -> HypervisorError:
    assert callable(call)
    with pytest.raises(HypervisorError) as caught:
        call(*args)
    return caught.value


def booted(hv: Domains, name: str) -> str:
    xml = hv.xml(name)
    hv.hypervisor.create(xml)
    heard(hv, name, BOOTED)
    return xml


def test_a_boot_is_heard_as_resumed_then_booted_from_another_thread(hypervisor: Domains) -> None:
    hv, name = hypervisor, hypervisor.prefix + "boot"
    booted(hv, name)
    assert hv.hypervisor.state(name) == "running"
    assert hv.hypervisor.domains(hv.prefix) == {name: "running"}
    assert not hv.hypervisor.job_running(name)


def test_pause_and_resume_and_what_they_refuse(hypervisor: Domains) -> None:
    hv, name = hypervisor, hypervisor.prefix + "pause"
    booted(hv, name)
    hv.hypervisor.suspend(name)
    heard(hv, name, SUSPENDED)
    assert hv.hypervisor.state(name) == "paused"
    assert hv.hypervisor.domains(hv.prefix) == {name: "paused"}
    hv.hypervisor.suspend(name)  # already paused: no error, and no event
    hv.hypervisor.resume(name)
    heard(hv, name, RESUMED)
    assert hv.hypervisor.state(name) == "running"
    again = refused(hv.hypervisor.resume, name)
    assert again.errno == errno.EBUSY and "already running" in again.reason
    heard(hv, name, ())


def test_a_kill_stops_the_domain_and_it_is_forgotten(hypervisor: Domains) -> None:
    hv, name = hypervisor, hypervisor.prefix + "kill"
    booted(hv, name)
    hv.hypervisor.destroy(name)
    heard(hv, name, KILLED)
    assert hv.hypervisor.state(name) == "halted"
    assert hv.hypervisor.domains(hv.prefix) == {}
    assert not hv.hypervisor.job_running(name)
    image = str(hv.workdir / "never.save")
    for call, args in (
        (hv.hypervisor.destroy, (name,)),
        (hv.hypervisor.shutdown, (name,)),
        (hv.hypervisor.suspend, (name,)),
        (hv.hypervisor.resume, (name,)),
        (hv.hypervisor.save, (name, image)),
    ):
        gone = refused(call, *args)
        assert gone.errno == errno.ENOENT
        assert gone.reason == (
            f"find domain {name}: Domain not found: no domain with matching name '{name}'"
        )


def test_the_power_button_shuts_the_guest_down(hypervisor: Domains) -> None:
    hv, name = hypervisor, hypervisor.prefix + "button"
    booted(hv, name)
    hv.wait_console(name, "VMTREE-READY")
    hv.hypervisor.shutdown(name)
    heard(hv, name, SHUT_DOWN)
    assert hv.hypervisor.state(name) == "halted"
    assert "VMTREE-SHUTDOWN" in hv.console(name)


def test_a_save_stops_the_domain_and_a_restore_runs_it_on_without_a_boot(
    hypervisor: Domains,
) -> None:
    hv, name = hypervisor, hypervisor.prefix + "save"
    booted(hv, name)
    hv.wait_console(name, "VMTREE-READY")
    running, paused = str(hv.workdir / "running.save"), str(hv.workdir / "paused.save")
    hv.hypervisor.save(name, running)  # a running domain is paused first
    heard(hv, name, SUSPENDED + SAVED)
    assert hv.hypervisor.state(name) == "halted"
    assert saveimage.is_complete(running)
    assert domain.saved_name(hv.hypervisor.saved_description(running)) == name
    hv.hypervisor.restore(running)
    heard(hv, name, RESTORED)
    assert hv.hypervisor.state(name) == "running"
    hv.hypervisor.suspend(name)
    heard(hv, name, SUSPENDED)
    hv.hypervisor.save(name, paused)
    heard(hv, name, SAVED)
    hv.hypervisor.restore(paused, paused=True)
    heard(hv, name, RESTORED_PAUSED)
    assert hv.hypervisor.state(name) == "paused"
    hv.hypervisor.resume(name)
    heard(hv, name, RESUMED)
    assert hv.console(name).count("VMTREE-BOOT") == 1


def test_what_a_restore_refuses(hypervisor: Domains) -> None:
    hv, name = hypervisor, hypervisor.prefix + "refuse"
    booted(hv, name)
    image = str(hv.workdir / "image.save")
    hv.hypervisor.save(name, image)
    heard(hv, name, SUSPENDED + SAVED)
    saved = hv.hypervisor.saved_description(image)  # with the genid libvirt gave it
    renamed = refused(hv.hypervisor.restore, image, saved.replace(name, name + "x"))
    assert renamed.errno == errno.EINVAL
    assert f"Target domain name '{name}x' does not match source '{name}'" in renamed.reason
    missing = str(hv.workdir / "missing.save")
    for call in (hv.hypervisor.restore, hv.hypervisor.saved_description):
        absent = refused(call, missing)
        assert absent.errno == errno.EIO
        assert f"Failed to open file '{missing}': No such file or directory" in absent.reason
    partial = hv.workdir / "partial.save"
    shutil.copyfile(image, partial)
    with open(partial, "r+b") as f:
        f.write(saveimage.PARTIAL_MAGIC)
    cut = refused(hv.hypervisor.restore, str(partial))
    assert cut.errno == errno.EIO and "save image is incomplete" in cut.reason
    hv.hypervisor.restore(image)
    heard(hv, name, RESTORED)
    twice = refused(hv.hypervisor.restore, image)
    assert twice.errno == errno.EBUSY and f"domain '{name}' is already active" in twice.reason
    heard(hv, name, ())


def test_a_save_image_rewritten_for_another_identity_restores_as_that_domain(
    hypervisor: Domains,
) -> None:
    """What a disposable from a hot savestate is: a copy of the image, under its own name."""
    hv, name, other = hypervisor, hypervisor.prefix + "source", hypervisor.prefix + "copy"
    booted(hv, name)
    image, copy = str(hv.workdir / "source.save"), hv.workdir / "copy.save"
    hv.hypervisor.save(name, image)
    heard(hv, name, SUSPENDED + SAVED)
    disks = [
        Disk(volume, str(hv.workdir / f"{name}-{volume}.img"), block=False)
        for volume in ("root", "private")
    ]
    identity = Identity(other, str(uuid.uuid4()), str(hv.log(other)))
    saved = hv.hypervisor.saved_description(image)
    saveimage.rewrite_xml(image, copy, domain.retarget(saved, identity, disks))
    hv.hypervisor.restore(str(copy))
    heard(hv, other, RESTORED)
    assert hv.hypervisor.domains(hv.prefix) == {other: "running"}


AGENT_CHANNEL = (
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
)


def test_the_guest_agent_is_einval_without_its_channel_and_silent_with_no_agent(
    hypervisor: Domains,
) -> None:
    """What ready=agent stands on. The demo guest runs no agent: with the channel in its
    description libvirt says "not connected" at once (False), and the same while it is
    paused (libvirt: "domain is not running"); without it no agent could ever answer."""
    hv, plain, channel = hypervisor, hypervisor.prefix + "plain", hypervisor.prefix + "agent"
    booted(hv, plain)
    hv.hypervisor.create(hv.xml(channel, devices=AGENT_CHANNEL))
    heard(hv, channel, BOOTED)
    absent = refused(hv.hypervisor.agent_ping, plain, 2)
    assert absent.errno == errno.EINVAL
    assert absent.reason == (
        f"ping the guest agent of {plain}: argument unsupported: QEMU guest agent is not configured"
    )
    hv.wait_console(channel, "VMTREE-READY")
    asked = time.monotonic()
    assert hv.hypervisor.agent_ping(channel, 2) is False
    assert time.monotonic() - asked < 2, "no agent connected: libvirt does not wait"
    hv.hypervisor.suspend(channel)
    heard(hv, channel, SUSPENDED)
    assert hv.hypervisor.agent_ping(channel, 2) is False
    hv.hypervisor.destroy(channel)
    heard(hv, channel, KILLED)
    gone = refused(hv.hypervisor.agent_ping, channel, 2)
    assert gone.errno == errno.ENOENT and gone.reason.startswith(f"find domain {channel}: ")


def genid(xml: str) -> str | None:
    return ET.fromstring(xml).findtext("genid")


def test_a_restore_gives_the_domain_a_new_generation_id(hypervisor: Domains) -> None:
    """A domain started with an empty <genid/> gets one; each restore another one (libvirt
    restores with VIR_QEMU_PROCESS_START_GEN_VMID), and a description given to a restore
    must keep the saved one (libvirt's ABI check)."""
    hv, name = hypervisor, hypervisor.prefix + "genid"
    booted(hv, name)
    first_image, second_image = str(hv.workdir / "first.save"), str(hv.workdir / "second.save")
    hv.hypervisor.save(name, first_image)
    heard(hv, name, SUSPENDED + SAVED)
    saved = hv.hypervisor.saved_description(first_image)
    first = genid(saved)
    assert first is not None and str(uuid.UUID(first)) == first
    other = str(uuid.uuid4())
    changed = refused(hv.hypervisor.restore, first_image, saved.replace(first, other))
    assert changed.errno == errno.EINVAL
    assert f"Target domain genid {other} does not match source {first}" in changed.reason
    fresh = refused(hv.hypervisor.restore, first_image, hv.xml(name))  # an empty <genid/>
    assert fresh.errno == errno.EINVAL
    assert f"does not match source {first}" in fresh.reason
    root = ET.fromstring(saved)
    root.remove(root.find("genid"))  # type: ignore[arg-type]
    dropped = refused(hv.hypervisor.restore, first_image, ET.tostring(root, encoding="unicode"))
    assert dropped.errno == errno.EINVAL
    assert "Target domain requested genid does not match source" in dropped.reason
    hv.hypervisor.restore(first_image, saved)  # a VM's restore of its own savestate
    heard(hv, name, RESTORED)
    hv.hypervisor.save(name, second_image)
    heard(hv, name, SUSPENDED + SAVED)
    second = genid(hv.hypervisor.saved_description(second_image))
    assert second is not None and second != first
    hv.hypervisor.restore(second_image)
    heard(hv, name, RESTORED)


def test_create_refuses_a_bad_description_and_a_name_or_uuid_in_use(hypervisor: Domains) -> None:
    hv, name = hypervisor, hypervisor.prefix + "create"
    bad = refused(hv.hypervisor.create, "<domain>")
    assert bad.errno == errno.EINVAL and bad.reason.startswith("start the domain: ")
    xml = booted(hv, name)
    again = refused(hv.hypervisor.create, xml)
    assert again.errno == errno.EBUSY and f"domain '{name}' is already active" in again.reason
    twin = refused(hv.hypervisor.create, hv.xml(name + "-twin", hv.uuids[name]))
    assert twin.errno == errno.EIO
    assert f"domain '{name}' is already defined with uuid {hv.uuids[name]}" in twin.reason
    disk = str(hv.workdir / f"{name}-lost-root.img")
    no_disk = hv.xml(name + "-lost").replace(disk, "/nonexistent/root.img")
    lost = refused(hv.hypervisor.create, no_disk)
    assert lost.errno == errno.EIO
    assert "Cannot access storage file '/nonexistent/root.img'" in lost.reason
    assert hv.hypervisor.domains(hv.prefix) == {name: "running"}


def test_an_absent_hypervisor_is_ENOTCONN(hypervisor: Domains) -> None:
    away = refused(hypervisor.unreachable().connect, hypervisor.heard)
    assert away.errno == errno.ENOTCONN
    assert away.reason.endswith("; is libvirtd running?")
    fresh = hypervisor.connection()
    never = refused(fresh.domains, hypervisor.prefix)
    assert never.errno == errno.ENOTCONN
    assert never.reason == f"not connected to libvirt at {fresh.uri}"
