"""Keeping the connection to the hypervisor, and handing its events into trio.

libvirt calls back on its own event thread; an event is passed to the trio
loop through an unbounded channel, so that thread never waits. A connection
that drops is made again every few seconds, and each (re)connection is
followed by a reconciliation before commands may use it: a VM that stopped
meanwhile is seen as halted first.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from collections.abc import Awaitable, Callable

import trio

from vmtreefs.errors import VmtreeError
from vmtreefs.runtime.hypervisor import DomainEvent, Hypervisor

log = logging.getLogger("vmtreefs.lifecycle")

RECONNECT_SECONDS = 5.0
CONNECT_WAIT_SECONDS = 10.0  # a command waits this long for libvirt to come (back)


class Connection:
    """One hypervisor's connection, as the lifecycle keeps it."""

    def __init__(self, hypervisor: Hypervisor | None) -> None:
        self.hypervisor = hypervisor
        self._events_in, self.events = trio.open_memory_channel[DomainEvent](math.inf)
        self._token: trio.lowlevel.TrioToken | None = None
        self.connected = trio.Event()
        # Set once the first connection attempt is over: the mount answers only then,
        # so the first `state` anyone reads is libvirt's.
        self.settled = trio.Event()

    def listen(self) -> None:
        """From now on events reach the trio loop this is called on."""
        self._token = trio.lowlevel.current_trio_token()

    def deliver(self, event: DomainEvent) -> None:
        """Called on libvirt's event thread."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(self._events_in.send_nowait, event)

    def lost(self) -> None:
        """The connection dropped: commands wait until :meth:`keep` has it again."""
        self.connected = trio.Event()

    async def keep(self, reconcile: Callable[[], Awaitable[None]]) -> None:
        """Connect, retrying until libvirt answers; then ``reconcile`` before commands go."""
        assert self.hypervisor is not None
        warned = False
        while True:
            try:
                await trio.to_thread.run_sync(self.hypervisor.connect, self.deliver)
                await reconcile()
                self.connected.set()
                self.settled.set()
                return
            except VmtreeError as e:
                if not warned:
                    log.warning("%s; VMs cannot start until it answers (retrying)", e.reason)
                    warned = True
            self.settled.set()
            await trio.sleep(RECONNECT_SECONDS)

    async def require(self) -> Hypervisor:
        """The hypervisor, once connected; ENOTCONN without one or after a while."""
        if self.hypervisor is None:
            raise VmtreeError(errno.ENOTCONN, "this mount runs no VMs (mounted with libvirt=none)")
        with trio.move_on_after(CONNECT_WAIT_SECONDS):
            await self.connected.wait()
        if not self.connected.is_set():
            raise VmtreeError(
                errno.ENOTCONN,
                f"libvirt at {self.hypervisor.uri} does not answer; is libvirtd running?",
            )
        return self.hypervisor
