"""libvirt, seen from the tree: run, stop and save domains, and hear what happens to them.

Every method blocks (callers run them in worker threads). libvirt delivers
lifecycle events on its own event-loop thread, one per process; they are handed
to the ``deliver`` callback given at :meth:`Hypervisor.connect` as
:class:`DomainEvent`, which the tree forwards into trio, so a VM's ``state``
follows what libvirt says without polling.

:class:`Hypervisor` is what the lifecycle needs, as a protocol, so that the
fast tests can run it on an in-memory libvirt (``tests/fakes/hypervisor.py``);
:class:`LibvirtHypervisor` is the real one. One contract suite holds both
(``tests/vm/test_hypervisor_contract.py``): the same calls, errnos and events,
in the same order, from another thread.

Domains are transient: libvirt forgets one when it stops, so there is nothing
to undefine and no stale definition after a crash of vmtreefs.

The QEMU guest agent is reached through libvirt's agent channel
(``libvirt_qemu.qemuAgentCommand``), only to ask whether it answers
(:meth:`Hypervisor.agent_ping`, for ``ready=agent``).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import libvirt
import libvirt_qemu

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.states import HALTED, PAUSED, RUNNING, SAVED, STARTING, STOPPING

log = logging.getLogger("vmtreefs.hypervisor")

DEFAULT_URI = "qemu:///system"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
"""The virtio-serial port name libvirt talks to the QEMU guest agent on."""
_GUEST_PING = '{"execute":"guest-ping"}'


class HypervisorError(VmtreeError):
    """libvirt refused or failed; ``errno`` is what the user sees."""


@dataclass(frozen=True)
class DomainEvent:
    """A domain changed state: ``state`` is one of the tree's words, ``reason`` is for people."""

    name: str
    state: str
    reason: str


class Hypervisor(Protocol):
    """What the lifecycle asks of a hypervisor; every call blocks."""

    uri: str

    def connect(self, deliver: Callable[[DomainEvent], None]) -> None:
        """Open the connection; from then on ``deliver`` hears every domain's events, on
        another thread, and ``DomainEvent("", "disconnected", …)`` when the connection drops
        (the next call connects again). ENOTCONN when the hypervisor is away."""
        ...

    def close(self) -> None: ...

    def domains(self, prefix: str) -> dict[str, str]:
        """The running domains whose names start with ``prefix``: name -> state."""
        ...

    def state(self, name: str) -> str:
        """The domain's state; ``halted`` for one the hypervisor does not know."""
        ...

    def job_running(self, name: str) -> bool:
        """Is a save or restore of the domain going on (also for a client that is gone)?"""
        ...

    def saved_description(self, image: str) -> str: ...

    def create(self, xml: str) -> None: ...

    def shutdown(self, name: str) -> None:
        """Press the guest's power button; it may ignore it."""
        ...

    def destroy(self, name: str) -> None: ...

    def suspend(self, name: str) -> None: ...

    def resume(self, name: str) -> None: ...

    def save(self, name: str, image: str) -> None:
        """The guest's memory into ``image``; the domain stops."""
        ...

    def restore(self, image: str, xml: str | None = None, paused: bool = False) -> None: ...

    def agent_ping(self, name: str, timeout: int) -> bool:
        """Does the guest agent answer ``guest-ping`` within ``timeout`` seconds?

        False while it cannot answer yet: the domain has the agent's channel but no
        agent is connected to it (not started, or the guest still boots), or it does
        not answer in time, or the domain is paused. EINVAL when the domain has no
        agent channel at all (it never will answer); ENOENT when there is no such
        domain.
        """
        ...


# virDomainEventType -> (state word, {detail: reason}); unlisted details say "event N".
_EVENTS: dict[int, tuple[str, dict[int, str]]] = {
    libvirt.VIR_DOMAIN_EVENT_STARTED: (
        RUNNING,
        {
            libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED: "booted",
            libvirt.VIR_DOMAIN_EVENT_STARTED_RESTORED: "restored",
            libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED: "migrated in",
        },
    ),
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: (
        PAUSED,
        {
            libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED: PAUSED,
            libvirt.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR: "paused on an I/O error",
            libvirt.VIR_DOMAIN_EVENT_SUSPENDED_RESTORED: "restored paused",
        },
    ),
    libvirt.VIR_DOMAIN_EVENT_RESUMED: (
        RUNNING,
        {libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED: "resumed"},
    ),
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: (
        STOPPING,
        {libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED: "guest is shutting down"},
    ),
    libvirt.VIR_DOMAIN_EVENT_STOPPED: (
        HALTED,
        {
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "killed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: SAVED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
        },
    ),
    libvirt.VIR_DOMAIN_EVENT_CRASHED: (HALTED, {}),
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: (PAUSED, {}),
}

# virDomainState -> the tree's word.
_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: STOPPING,
    libvirt.VIR_DOMAIN_SHUTOFF: HALTED,
    libvirt.VIR_DOMAIN_CRASHED: HALTED,
}


def _state_of(dom: libvirt.virDomain) -> str:
    """Our word for the domain's state. One paused while libvirt still starts (or
    restores) it is ``starting``: it runs as soon as libvirt is done, also when the
    client that asked for it is gone."""
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_STARTING_UP:
        return STARTING
    return _STATES.get(state, RUNNING)


_ERRNO_OF_LIBVIRT = {
    libvirt.VIR_ERR_NO_DOMAIN: errno.ENOENT,
    libvirt.VIR_ERR_OPERATION_INVALID: errno.EBUSY,
    libvirt.VIR_ERR_OPERATION_TIMEOUT: errno.ETIMEDOUT,
    libvirt.VIR_ERR_XML_ERROR: errno.EINVAL,
    libvirt.VIR_ERR_XML_DETAIL: errno.EINVAL,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: errno.EINVAL,
    libvirt.VIR_ERR_INVALID_ARG: errno.EINVAL,
    libvirt.VIR_ERR_NO_CONNECT: errno.ENOTCONN,
    libvirt.VIR_ERR_SYSTEM_ERROR: errno.EIO,
}


def _translate(e: libvirt.libvirtError, what: str) -> HypervisorError:
    code = e.get_error_code()
    message = (e.get_error_message() or str(e)).strip()
    return HypervisorError(_ERRNO_OF_LIBVIRT.get(code, errno.EIO), f"{what}: {message}")


def _alive(conn: libvirt.virConnect | None) -> bool:
    if conn is None:
        return False
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """libvirt's default event loop, once per process, in its own thread (before any connection)."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _loop_started = True


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except libvirt.libvirtError as e:  # pragma: no cover - libvirt's own loop failing
            log.error("libvirt event loop: %s", e)


# libvirt reports its errors as exceptions; its default handler also prints them.
def _quiet(_ctx: Any, _err: Any) -> None:
    return None


class LibvirtHypervisor:
    """One connection to libvirt, reopened when it drops."""

    def __init__(self, uri: str = DEFAULT_URI) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._deliver: Callable[[DomainEvent], None] | None = None
        self._lock = threading.Lock()

    def connect(self, deliver: Callable[[DomainEvent], None]) -> None:
        """Open the connection and subscribe to lifecycle events; ENOTCONN when libvirt is away."""
        _ensure_event_loop()
        libvirt.registerErrorHandler(_quiet, None)
        with self._lock:
            if self._conn is not None:
                return
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise HypervisorError(
                    errno.ENOTCONN,
                    f"cannot reach libvirt at {self.uri}: {(e.get_error_message() or e)!s}; "
                    "is libvirtd running?",
                ) from None
            self._deliver = deliver
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
            )
            conn.registerCloseCallback(self._on_close, None)
            self._conn = conn
        log.info("connected to libvirt at %s (version %s)", self.uri, conn.getLibVersion())

    def close(self) -> None:
        """Close for good: no more events, and no call reconnects (see :meth:`_connection`)."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._deliver = None
            callback, self._callback_id = self._callback_id, None
            if conn is None:
                return
            try:
                if callback is not None:
                    conn.domainEventDeregisterAny(callback)
                conn.unregisterCloseCallback()
                conn.close()
            except libvirt.libvirtError as e:
                log.warning("closing the libvirt connection: %s", e)

    def _on_lifecycle(
        self, _conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any
    ) -> None:
        state, reasons = _EVENTS.get(event, ("", {}))
        if not state or self._deliver is None:
            return
        reason = reasons.get(detail, state if not reasons else f"event {event}/{detail}")
        self._deliver(DomainEvent(dom.name(), state, reason))

    def _on_close(self, conn: Any, reason: int, _opaque: Any) -> None:
        log.error("libvirt at %s closed the connection (reason %d)", self.uri, reason)
        with self._lock:
            # Unless it is an older connection's close, after a new one was made.
            if self._conn is conn or self._conn is None:
                self._conn = None
                self._callback_id = None  # it went with that connection
        # Either way the tree reconciles: what happened while it was away is unknown.
        if self._deliver is not None:
            self._deliver(DomainEvent("", "disconnected", f"reason {reason}"))

    def _failed(self, e: libvirt.libvirtError, what: str) -> HypervisorError:
        """libvirt's error as an errno; ENOTCONN when it is because libvirt went away
        (libvirtd died or restarted in the middle of the call)."""
        if _alive(self._conn):
            return _translate(e, what)
        message = (e.get_error_message() or str(e)).strip()
        return HypervisorError(
            errno.ENOTCONN, f"{what}: libvirt at {self.uri} went away ({message})"
        )

    def _connection(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None:
            if self._deliver is None:
                raise HypervisorError(errno.ENOTCONN, f"not connected to libvirt at {self.uri}")
            self.connect(self._deliver)
            conn = self._conn
            assert conn is not None
        return conn

    def _domain(self, name: str) -> libvirt.virDomain:
        try:
            return self._connection().lookupByName(name)
        except libvirt.libvirtError as e:
            raise self._failed(e, f"find domain {name}") from None

    # Questions

    def domains(self, prefix: str) -> dict[str, str]:
        """Every domain whose name starts with ``prefix`` that libvirt runs: name -> state."""
        try:
            found = self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            return {d.name(): _state_of(d) for d in found if d.name().startswith(prefix)}
        except libvirt.libvirtError as e:
            raise self._failed(e, "list domains") from None

    def state(self, name: str) -> str:
        """The domain's state; ``halted`` when libvirt does not know it (it stopped)."""
        try:
            return _state_of(self._connection().lookupByName(name))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return HALTED
            raise self._failed(e, f"ask the state of {name}") from None

    def job_running(self, name: str) -> bool:
        """Is libvirt carrying out a job on the domain (a save, a restore's load)? A job
        goes on when the client that asked for it is gone."""
        try:
            kind = self._connection().lookupByName(name).jobInfo()[0]
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise self._failed(e, f"ask about the jobs of {name}") from None
        return kind in (libvirt.VIR_DOMAIN_JOB_BOUNDED, libvirt.VIR_DOMAIN_JOB_UNBOUNDED)

    def saved_description(self, image: str) -> str:
        """The domain description inside a save image."""
        try:
            return str(self._connection().saveImageGetXMLDesc(image, 0))
        except libvirt.libvirtError as e:
            raise self._failed(e, f"read save image {image}") from None

    # Actions

    def create(self, xml: str) -> None:
        """Boot a transient domain from its description."""
        try:
            self._connection().createXML(xml, 0)
        except libvirt.libvirtError as e:
            raise self._failed(e, "start the domain") from None

    def shutdown(self, name: str) -> None:
        """Ask the guest to shut down (ACPI power button); it may ignore it."""
        self._act(name, "shut down", lambda d: d.shutdown())

    def destroy(self, name: str) -> None:
        self._act(name, "kill", lambda d: d.destroy())

    def suspend(self, name: str) -> None:
        self._act(name, "pause", lambda d: d.suspend())

    def resume(self, name: str) -> None:
        self._act(name, "resume", lambda d: d.resume())

    def save(self, name: str, image: str) -> None:
        """Write the guest's memory to ``image``; the domain stops."""
        self._act(name, f"save to {image}", lambda d: d.save(image))

    def restore(self, image: str, xml: str | None = None, paused: bool = False) -> None:
        """Start a domain from a save image, optionally with a changed description (disk paths)."""
        # The image remembers the guest as paused (it is paused to be saved): say which.
        flags = libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else libvirt.VIR_DOMAIN_SAVE_RUNNING
        try:
            self._connection().restoreFlags(image, xml, flags)
        except libvirt.libvirtError as e:
            raise self._failed(e, f"restore from {image}") from None

    def agent_ping(self, name: str, timeout: int) -> bool:
        """``guest-ping`` through libvirt's agent channel; see :meth:`Hypervisor.agent_ping`.

        libvirt 9.0 says, for a domain that is running: "argument unsupported: QEMU
        guest agent is not configured" without the channel (EINVAL here), "Guest
        agent is not responding: QEMU guest agent is not connected" with the
        channel but no agent on it (False), and "domain is not running" while it is
        paused (False).
        """
        domain = self._domain(name)
        try:
            libvirt_qemu.qemuAgentCommand(domain, _GUEST_PING, timeout, 0)
        except libvirt.libvirtError as e:
            code = e.get_error_code()
            if code in (
                libvirt.VIR_ERR_AGENT_UNRESPONSIVE,
                libvirt.VIR_ERR_OPERATION_INVALID,  # paused, or still being started
                libvirt.VIR_ERR_OPERATION_TIMEOUT,  # busy with a job
            ):
                return False
            error = self._failed(e, f"ping the guest agent of {name}")
            if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED:
                error = HypervisorError(errno.EINVAL, error.reason)
            raise error from None
        return True

    def _act(self, name: str, what: str, action: Callable[[libvirt.virDomain], Any]) -> None:
        domain = self._domain(name)
        try:
            action(domain)
        except libvirt.libvirtError as e:
            raise self._failed(e, f"{what} {name}") from None
