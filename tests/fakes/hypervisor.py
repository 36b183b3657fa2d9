"""An in-memory libvirt for fast tests of the lifecycle, held to the hypervisor contract.

:class:`FakeLibvirt` stands for the daemon: the domains it runs, the save images
it writes, and one event thread that hands every connection the same
:class:`DomainEvent` s libvirt's event loop does, in the order the domains
changed (a boot is ``resumed`` then ``booted``, a kill ``stopping`` then
``killed``…). :class:`FakeHypervisor` is one connection to it, with the public
methods of ``LibvirtHypervisor`` and the same errnos and messages.
``tests/vm/test_hypervisor_contract.py`` runs one suite on both (param
``libvirt``, a real QEMU guest, and ``fake``): passing it is what makes this a
fair stand-in. It is never the proof that a feature works; tests/vm is.

The guest in each domain is the demo guest cut down to what the tree can see:
at a boot it counts the boot in the first 32 bytes of its private disk (the one
``vmtree.private=`` names, ``vdb`` by default) and writes ``VMTREE-BOOT N`` and
``VMTREE-READY`` to its serial log; at the power button it writes
``VMTREE-SHUTDOWN`` and powers off. A restored guest goes on without a boot.
Save images have libvirt's header (``vmtreefs.saveimage``), so ``is_complete``
and ``rewrite_xml`` work on them. A domain described with ``<genid/>`` gets a
generation ID at its start and a fresh one at every restore, as libvirt gives
it; a restore with a description whose genid is not the saved one is refused.

The demo guest runs no guest agent: ``agent_ping`` on a domain with the agent's
channel is False, as libvirt's "QEMU guest agent is not connected", and EINVAL
without the channel. :attr:`FakeLibvirt.agent_delay` makes guests run one that
answers that many seconds after each boot or restore, and
:meth:`FakeLibvirt.start_agent` starts one in a running guest.

The world outside has knobs on :class:`FakeLibvirt`: a guest that powers off or
dies by itself, one that ignores the power button, guests that run a guest agent,
libvirt going away and coming back, a save that libvirt goes on with after its
client died, and a raw event.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmtreefs import saveimage
from vmtreefs.rules.states import HALTED, PAUSED, RUNNING, STOPPING
from vmtreefs.runtime.hypervisor import AGENT_CHANNEL, DomainEvent, HypervisorError

FAKE_URI = "fake:///system"
POWER_OFF_SECONDS = 0.02  # from the power button to the guest's power-off
_PAD = 1024  # room after the XML in a save image (libvirt leaves 64 KiB)

# The events libvirt 9.0 sends, as (state, reason), in its order.
BOOTED = ((RUNNING, "resumed"), (RUNNING, "booted"))
KILLED = ((STOPPING, "event 6/2"), (HALTED, "killed"))
SHUT_DOWN = ((STOPPING, "event 6/1"), (HALTED, "shut down"))
FAILED = ((HALTED, "failed"),)
SUSPENDED = ((PAUSED, "paused"),)
RESUMED = ((RUNNING, "resumed"),)
SAVED = ((HALTED, "saved"),)
RESTORED = ((RUNNING, "restored"), (RUNNING, "event 4/2"))
RESTORED_PAUSED = ((RUNNING, "restored"), (PAUSED, "restored paused"))


@dataclass
class _Domain:
    name: str
    uuid: str
    xml: str
    state: str
    console: Path | None
    private: Path | None
    agent_channel: bool = False  # the description has the guest agent's virtio port
    agent_from: float | None = None  # time.monotonic() its agent answers from; None: none runs
    job: bool = False
    button_pressed: bool = False  # while paused: the guest hears it when it runs again


class FakeLibvirt:
    """The fake daemon: its domains, its connections and its event thread."""

    def __init__(self) -> None:
        self.available = True
        self._die_in_suspend = False
        self.deaf: set[str] = set()  # guests that ignore the power button
        # Seconds from a boot or restore until a guest's agent answers (on a domain
        # with the agent's channel); None: guests run no agent, as the demo guest.
        self.agent_delay: float | None = None
        self._domains: dict[str, _Domain] = {}
        self._connections: list[FakeHypervisor] = []
        self._lock = threading.RLock()
        # Each event with the connections that were open when it happened.
        self._queue: queue.Queue[tuple[DomainEvent, list[FakeHypervisor]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []

    def stop(self) -> None:
        """End the event thread and the guests' pending power-offs (the domains stay)."""
        for timer in self._timers:
            timer.cancel()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    # The world outside

    def power_off(self, name: str) -> None:
        """The guest shuts itself down."""
        with self._lock:
            domain = self._domains.get(name)
            if domain is None:
                return
            _append(domain.console, "VMTREE-SHUTDOWN\r\n")
            self._remove(domain, SHUT_DOWN)

    def qemu_dies(self, name: str) -> None:
        with self._lock:
            if name in self._domains:
                self._remove(self._domains[name], FAILED)

    def go_away(self) -> None:
        """libvirtd stops: every connection drops, and no new one is possible until
        :meth:`come_back` (the domains run on, as QEMU does without libvirtd)."""
        with self._lock:
            self.available = False
            for connection in self._connections:
                connection._connected = False
            # Each hears it on the event thread, after what happened before.
            self._queue.put((DomainEvent("", "disconnected", "reason 1"), self._connections))
            self._connections = []

    def come_back(self) -> None:
        self.available = True

    def dies_in_next_suspend(self) -> None:
        """libvirtd dies inside the next pause: QEMU has paused the domain, the caller
        hears ENOTCONN (what a real libvirtd killed between the two does)."""
        self._die_in_suspend = True

    def emit(self, name: str, state: str, reason: str) -> None:
        """An event as it is, whatever the domain's state (a late one, say)."""
        with self._lock:
            self._queue.put((DomainEvent(name, state, reason), list(self._connections)))

    def drain(self) -> None:
        """Until every event that happened so far was delivered."""
        self._queue.join()

    def save_in_background(self, name: str, image: str, seconds: float) -> None:
        """A save libvirt goes on with, its client gone: the job shows until it is done."""
        with self._lock:
            domain = self._find(name)
            domain.job = True
        threading.Thread(
            target=self._save, args=(domain, image, seconds), name="fake-libvirt-job", daemon=True
        ).start()

    # What a connection asks

    def _connect(self, connection: FakeHypervisor) -> None:
        with self._lock:
            if not self.available:
                raise HypervisorError(
                    errno.ENOTCONN,
                    f"cannot reach libvirt at {connection.uri}: Failed to connect socket: "
                    "No such file or directory; is libvirtd running?",
                )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._deliver_events, name="fake-libvirt-events", daemon=True
                )
                self._thread.start()
            if connection not in self._connections:
                self._connections.append(connection)

    def _disconnect(self, connection: FakeHypervisor) -> None:
        with self._lock:
            if connection in self._connections:
                self._connections.remove(connection)

    def domains(self, prefix: str) -> dict[str, str]:
        with self._lock:
            return {n: d.state for n, d in self._domains.items() if n.startswith(prefix)}

    def state(self, name: str) -> str:
        with self._lock:
            domain = self._domains.get(name)
            return domain.state if domain is not None else HALTED

    def job_running(self, name: str) -> bool:
        with self._lock:
            domain = self._domains.get(name)
            return domain is not None and domain.job

    def saved_description(self, image: str) -> str:
        return _read_image(image, f"read save image {image}").xml

    def create(self, xml: str) -> None:
        with self._lock:
            domain = self._define(xml, "start the domain")
            _boot(domain)
            self._start_agent(domain)
            self._add(domain, BOOTED)

    def shutdown(self, name: str) -> None:
        with self._lock:
            domain = self._find(name)
            if domain.state == PAUSED:
                domain.button_pressed = True
            else:
                self._press_button(domain)

    def destroy(self, name: str) -> None:
        with self._lock:
            self._remove(self._find(name), KILLED)

    def suspend(self, name: str) -> None:
        with self._lock:
            domain = self._find(name)
            if domain.state != PAUSED:  # libvirt pauses a paused domain without a word
                self._change(domain, PAUSED, SUSPENDED)
            dying, self._die_in_suspend = self._die_in_suspend, False
        if dying:
            self.go_away()
            raise HypervisorError(
                errno.ENOTCONN, f"pause {name}: End of file while reading data: Input/output error"
            )

    def resume(self, name: str) -> None:
        with self._lock:
            domain = self._find(name)
            if domain.state != PAUSED:
                raise HypervisorError(
                    errno.EBUSY,
                    f"resume {name}: Requested operation is not valid: domain is already running",
                )
            self._change(domain, RUNNING, RESUMED)
            if domain.button_pressed:
                domain.button_pressed = False
                self._press_button(domain)

    def save(self, name: str, image: str) -> None:
        with self._lock:
            domain = self._find(name)
            domain.job = True
        self._save(domain, image, 0.0)

    def restore(self, image: str, xml: str | None, paused: bool) -> None:
        what = f"restore from {image}"
        saved = _read_image(image, what).xml
        if xml is not None:
            _check_abi(saved, xml, what)
        with self._lock:
            # libvirt restores with VIR_QEMU_PROCESS_START_GEN_VMID: a new generation ID.
            domain = self._define(_with_genid(xml or saved, fresh=True), what)
            domain.state = PAUSED if paused else RUNNING
            self._start_agent(domain)
            self._add(domain, RESTORED_PAUSED if paused else RESTORED)

    # The domains

    def agent_ping(self, name: str, timeout: int) -> bool:
        with self._lock:
            domain = self._find(name)
            if domain.state != RUNNING:
                return False  # libvirt: "domain is not running"
            if not domain.agent_channel:
                raise HypervisorError(
                    errno.EINVAL,
                    f"ping the guest agent of {name}: argument unsupported: "
                    "QEMU guest agent is not configured",
                )
            return domain.agent_from is not None and time.monotonic() >= domain.agent_from

    def start_agent(self, name: str) -> None:
        """The guest's agent starts now: it answers from then on (until a stop)."""
        with self._lock:
            self._find(name).agent_from = time.monotonic()

    def _start_agent(self, domain: _Domain) -> None:
        if self.agent_delay is not None:
            domain.agent_from = time.monotonic() + self.agent_delay

    def _find(self, name: str) -> _Domain:
        """libvirt looks the domain up first: its refusal names the look-up."""
        domain = self._domains.get(name)
        if domain is None:
            raise HypervisorError(
                errno.ENOENT,
                f"find domain {name}: Domain not found: no domain with matching name '{name}'",
            )
        return domain

    def _define(self, xml: str, what: str) -> _Domain:
        """A domain from its description, refused as libvirt refuses it."""
        try:
            root = ET.fromstring(xml)
        except ET.ParseError as e:
            raise HypervisorError(errno.EINVAL, f"{what}: (domain_definition): {e}") from None
        name, uid = root.findtext("name") or "", root.findtext("uuid") or ""
        if name in self._domains:
            raise HypervisorError(
                errno.EBUSY,
                f"{what}: Requested operation is not valid: domain '{name}' is already active",
            )
        for other in self._domains.values():
            if other.uuid == uid:
                raise HypervisorError(
                    errno.EIO,
                    f"{what}: operation failed: domain '{other.name}' is already defined "
                    f"with uuid {uid}",
                )
        if root.find("genid") is not None:
            xml = _with_genid(xml, fresh=False)
        kernel = root.findtext("os/kernel")
        if kernel and not os.path.exists(kernel):
            raise HypervisorError(
                errno.EIO, f"{what}: unable to stat: {kernel}: No such file or directory"
            )
        disks: dict[str, Path] = {}
        for disk in root.findall("devices/disk"):
            source, target = disk.find("source"), disk.find("target")
            path = source.get("file") or source.get("dev") if source is not None else None
            if path is None or target is None:
                continue
            if not os.path.exists(path):
                raise HypervisorError(
                    errno.EIO,
                    f"{what}: Cannot access storage file '{path}': No such file or directory",
                )
            disks[target.get("dev", "")] = Path(path)
        found = re.search(r"vmtree\.private=(\w+)", root.findtext("os/cmdline") or "")
        console = root.find("devices/serial/source")
        log = console.get("path") if console is not None else None
        channels = root.findall("devices/channel/target[@type='virtio']")
        return _Domain(
            name,
            uid,
            xml,
            RUNNING,
            Path(log) if log else None,
            disks.get(found.group(1) if found else "vdb"),
            agent_channel=any(c.get("name") == AGENT_CHANNEL for c in channels),
        )

    def _press_button(self, domain: _Domain) -> None:
        if domain.name in self.deaf:
            return
        timer = threading.Timer(POWER_OFF_SECONDS, self.power_off, (domain.name,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _save(self, domain: _Domain, image: str, seconds: float) -> None:
        with self._lock:
            was_running = domain.state == RUNNING
            if was_running:
                self._change(domain, PAUSED, SUSPENDED)
        time.sleep(seconds)
        _write_image(image, domain.xml, was_running)
        with self._lock:
            domain.job = False
            self._remove(domain, SAVED)

    def _add(self, domain: _Domain, events: tuple[tuple[str, str], ...]) -> None:
        self._domains[domain.name] = domain
        self._announce(domain.name, events)

    def _change(self, domain: _Domain, state: str, events: tuple[tuple[str, str], ...]) -> None:
        domain.state = state
        self._announce(domain.name, events)

    def _remove(self, domain: _Domain, events: tuple[tuple[str, str], ...]) -> None:
        if self._domains.get(domain.name) is domain:
            del self._domains[domain.name]
            self._announce(domain.name, events)

    def _announce(self, name: str, events: tuple[tuple[str, str], ...]) -> None:
        """Queued under the lock, so events leave in the order the domains changed, to the
        connections open then (one opened later does not hear what happened before)."""
        for state, reason in events:
            self._queue.put((DomainEvent(name, state, reason), list(self._connections)))

    def _deliver_events(self) -> None:
        while (item := self._queue.get()) is not None:
            event, listeners = item
            for connection in listeners:
                connection._hear(event)
            self._queue.task_done()


class FakeHypervisor:
    """One connection to a :class:`FakeLibvirt`, as ``LibvirtHypervisor`` is to libvirtd."""

    def __init__(self, libvirt: FakeLibvirt, uri: str = FAKE_URI) -> None:
        self.uri = uri
        self.libvirt = libvirt
        self._deliver: Callable[[DomainEvent], None] | None = None
        self._connected = False

    def connect(self, deliver: Callable[[DomainEvent], None]) -> None:
        if self._connected:
            return
        self.libvirt._connect(self)
        self._deliver = deliver
        self._connected = True

    def close(self) -> None:
        self._connected = False
        self.libvirt._disconnect(self)

    def _hear(self, event: DomainEvent) -> None:
        if self._deliver is not None and (self._connected or event.state == "disconnected"):
            self._deliver(event)

    def _connection(self) -> FakeLibvirt:
        if not self._connected:
            if self._deliver is None:
                raise HypervisorError(errno.ENOTCONN, f"not connected to libvirt at {self.uri}")
            self.connect(self._deliver)
        return self.libvirt

    def domains(self, prefix: str) -> dict[str, str]:
        return self._connection().domains(prefix)

    def state(self, name: str) -> str:
        return self._connection().state(name)

    def job_running(self, name: str) -> bool:
        return self._connection().job_running(name)

    def saved_description(self, image: str) -> str:
        return self._connection().saved_description(image)

    def create(self, xml: str) -> None:
        self._connection().create(xml)

    def shutdown(self, name: str) -> None:
        self._connection().shutdown(name)

    def destroy(self, name: str) -> None:
        self._connection().destroy(name)

    def suspend(self, name: str) -> None:
        self._connection().suspend(name)

    def resume(self, name: str) -> None:
        self._connection().resume(name)

    def save(self, name: str, image: str) -> None:
        self._connection().save(name, image)

    def restore(self, image: str, xml: str | None = None, paused: bool = False) -> None:
        self._connection().restore(image, xml, paused)

    def agent_ping(self, name: str, timeout: int) -> bool:
        return self._connection().agent_ping(name, timeout)


# The guest and its files


def _boot(domain: _Domain) -> None:
    """The demo guest's boot: one more on its counter, then ready."""
    boots = 1
    if domain.private is not None:
        with open(domain.private, "r+b") as f:
            digits = re.sub(rb"\D", b"", f.read(32))
            boots = int(digits or b"0") + 1
            f.seek(0)
            f.write(f"{boots:<31}\n".encode())
    _append(domain.console, f"VMTREE-BOOT {boots}\r\nVMTREE-READY\r\n")


def _append(log: Path | None, text: str) -> None:
    if log is not None:
        with open(log, "a") as f:
            f.write(text)


def _with_genid(xml: str, fresh: bool) -> str:
    """The description with its ``<genid>`` filled in: libvirt generates one for an empty
    element, and a new one for every restore (``fresh``). One without a genid stays so."""
    root = ET.fromstring(xml)
    genid = root.find("genid")
    if genid is None or (genid.text and not fresh):
        return xml
    genid.text = str(uuid.uuid4())
    return ET.tostring(root, encoding="unicode")


def _check_abi(saved: str, xml: str, what: str) -> None:
    """libvirt's check of a description given to a restore, in its order: the uuid,
    the generation ID (an empty ``<genid/>`` is a generated value, never the saved
    one), then the name."""
    source, target = ET.fromstring(saved), ET.fromstring(xml)

    def refuse(detail: str) -> HypervisorError:
        return HypervisorError(errno.EINVAL, f"{what}: unsupported configuration: {detail}")

    if source.findtext("uuid") != target.findtext("uuid"):
        raise refuse(
            f"Target domain uuid {target.findtext('uuid')} does not match source "
            f"{source.findtext('uuid')}"
        )
    saved_genid, genid = source.find("genid"), target.find("genid")
    if (saved_genid is None) != (genid is None):
        raise refuse("Target domain requested genid does not match source")
    if saved_genid is not None and genid is not None:
        wanted = genid.text or str(uuid.uuid4())
        if wanted != saved_genid.text:
            raise refuse(f"Target domain genid {wanted} does not match source {saved_genid.text}")
    if source.findtext("name") != target.findtext("name"):
        raise refuse(
            f"Target domain name {target.findtext('name')!r} does not match source "
            f"{source.findtext('name')!r}"
        )


def _write_image(image: str, xml: str, was_running: bool) -> None:
    """libvirt's layout: the partial magic first, the final magic last."""
    data = xml.encode() + b"\0"
    data_len = len(data) + _PAD
    header = struct.pack(
        "<16s5I14I", saveimage.PARTIAL_MAGIC, 2, data_len, int(was_running), 0, 0, *[0] * 14
    )
    with open(image, "wb") as f:
        f.write(header + data + bytes(_PAD) + b"fake QEMU migration stream")
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        f.write(saveimage.MAGIC)


def _read_image(image: str, what: str) -> saveimage.SaveHeader:
    if not os.path.exists(image):
        raise HypervisorError(
            errno.EIO, f"{what}: Failed to open file '{image}': No such file or directory"
        )
    if not saveimage.is_complete(image):
        raise HypervisorError(errno.EIO, f"{what}: operation failed: save image is incomplete")
    return saveimage.read_header(image)
