"""What the orchestrator needs of whoever runs VMs: a protocol, so core/ never imports runtime/.

``runtime.lifecycle.Lifecycle`` is the one implementation; a tree without one
(fsck, the fast tests) makes no hot savestates and holds no VM still. The
lifecycle commands themselves reach the lifecycle through ``control``, above
both.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from vmtreefs.rules.objects import Vm


class Runner(Protocol):
    """The lifecycle, as the orchestrator sees it (``control`` hands it the commands)."""

    def hot_savestate_changed(self, vm: Vm) -> None:
        """The VM's hot savestate is out of date (or wanted, or no longer wanted)."""
        ...

    def held_still(self, vm: Vm) -> AbstractAsyncContextManager[None]:
        """While inside: a running VM is paused, so its volumes can be snapshotted whole."""
        ...

    def libvirt_status(self) -> str:
        """For ``.vmtree/status``: ``connected`` once libvirt answers and what happened
        while it was away is settled; otherwise what is going on."""
        ...
