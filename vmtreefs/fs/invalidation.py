"""Telling the kernel what it caches is stale: after the reply, from a task of its own,
never inside a handler that the kernel holds a lock for."""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Container

import pyfuse3
import trio

from vmtreefs.fs import inodes
from vmtreefs.fs.inodes import ROOT, VmEntry

log = logging.getLogger("vmtreefs.fs")

QUEUE_LENGTH = 1000


class Invalidator:
    def __init__(self, held: Container[int]) -> None:
        # Inodes the kernel holds a reference to; nothing else can be cached.
        self._held = held
        self._send, self._receive = trio.open_memory_channel[tuple[int, bool]](QUEUE_LENGTH)
        self._stale_names: set[tuple[int, str]] = set()

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
        for name in set(names):
            self._stale_names.add((parent, name))
            pyfuse3.invalidate_entry_async(parent, os.fsencode(name), ignore_enoent=True)

    async def stale_names_now(self) -> None:
        """Names that now lead elsewhere are dropped from the kernel's cache before the
        request that changed them is answered, so the caller's next lookup sees the change.
        Called only where the kernel holds no lock on those parents (setxattr, removexattr,
        a ctl write); elsewhere the attribute timeout ends them."""
        stale, self._stale_names = self._stale_names, set()
        for parent, name in sorted(stale):
            try:
                # Without a deleted inode, the kernel locks only the parent.
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent, os.fsencode(name))
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.debug("invalidating %s in inode %d: %s", name, parent, e)

    async def run(self) -> None:
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
