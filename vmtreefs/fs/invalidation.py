"""Telling the kernel what it caches is stale: after the reply, from a task of its own,
never inside a handler that the kernel holds a lock for.

An entry invalidation takes the parent directory's lock in the kernel, and a request in
that directory (a ``mkdir`` in ``clones/``, a lookup) holds it until it is answered. So a
name is invalidated only while no request that holds its parent is in this daemon's
hands: a daemon that dies with an invalidation waiting for such a lock cannot finish
dying (the watchdog must then end its connection). A name whose parent stays busy longer
than the entry timeout is not sent at all: by then the kernel asks again anyway.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections import Counter
from collections.abc import Container, Iterable, Sequence

import pyfuse3
import trio

from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import ROOT, VmEntry
from vmtreefs.fs.view.base import ENTRY_TIMEOUT

log = logging.getLogger("vmtreefs.fs")

QUEUE_LENGTH = 1000


class Invalidator:
    def __init__(self, held: Container[int]) -> None:
        # Inodes the kernel holds a reference to; nothing else can be cached.
        self._held = held
        self._send, self._receive = trio.open_memory_channel[tuple[int, bool]](QUEUE_LENGTH)
        self._stale_names: set[tuple[int, str]] = set()
        # Directories the kernel holds locked for a request this daemon is answering.
        self._busy: Counter[int] = Counter()
        # Names waiting for their parent to be free, with when they were asked for.
        self._pending: dict[tuple[int, str], float] = {}
        self._wake = trio.Event()

    def enter(self, directories: Iterable[int]) -> None:
        """A request that the kernel holds these directories locked for has come in."""
        self._busy.update(directories)

    def leave(self, directories: Sequence[int]) -> None:
        self._busy.subtract(directories)
        if any(self._busy[d] <= 0 for d in directories):
            self._busy = +self._busy  # drop the counts that reached zero
            if self._pending:
                self._wake.set()

    def inode_later(self, inode: int, data: bool = False) -> None:
        """Ask the kernel to drop what it caches of ``inode`` (attributes, or also its pages)."""
        try:
            self._send.send_nowait((inode, data))
        except trio.WouldBlock:
            log.debug("invalidation queue full; inode %d relies on the attribute timeout", inode)

    def volume_pages(self, volume_ids: list[int]) -> None:
        """A running guest writes its volumes behind the kernel's back: what the kernel
        cached of them is stale once it starts and once it stops."""
        for volume_id in volume_ids:
            self.inode_later(inodes.volume_inode(volume_id), data=True)

    def volume_names(self, vm_id: int, names: list[str]) -> None:
        self.names(inodes.vm_inode(vm_id, VmEntry.VOLUMES), names)

    def top_names(self, names: list[str]) -> None:
        self.names(ROOT, names)

    def names(self, parent: int, names: list[str]) -> None:
        """Soon in any case (a commit at a VM's shutdown comes from no request); before
        the reply when a handler calls :meth:`stale_names_now`."""
        now = trio.current_time()
        for name in set(names):
            self._stale_names.add((parent, name))
            self._pending.setdefault((parent, name), now)
        self._wake.set()

    async def stale_names_now(self) -> None:
        """Names that now lead elsewhere are dropped from the kernel's cache before the
        request that changed them is answered, so the caller's next lookup sees the change.
        Called only where the kernel holds no lock on those parents (setxattr, removexattr,
        a ctl write); elsewhere the attribute timeout ends them."""
        stale, self._stale_names = self._stale_names, set()
        for key in stale:
            self._pending.pop(key, None)
        for parent, name in sorted(stale):
            try:
                # Without a deleted inode, the kernel locks only the parent.
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, os.fsencode(name))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidating %s in inode %d: %s", name, parent, e)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_names)
            await self._send_inodes()

    async def _send_names(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            for key, asked in list(self._pending.items()):
                parent, name = key
                if now - asked > ENTRY_TIMEOUT:
                    del self._pending[key]  # the kernel's entry has expired by now
                elif self._busy[parent] <= 0:
                    del self._pending[key]
                    pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)
            if self._pending:
                with trio.move_on_after(ENTRY_TIMEOUT):
                    await self._wake.wait()
                self._wake.set()

    async def _send_inodes(self) -> None:
        async for inode, data in self._receive:
            if inode not in self._held:
                continue
            try:
                await trio.to_thread.run_sync(
                    functools.partial(pyfuse3.invalidate_inode, inode, attr_only=not data)
                )
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidating inode %d: %s", inode, e)
