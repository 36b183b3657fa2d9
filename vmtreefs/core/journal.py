"""The tree's record of what it does: the intent bracket around engine work, and events.

Every engine action is bracketed by an intent: the intent is written (in the
same transaction as anything the action needs, such as new volume ids) before
the engine is touched, and completed in the transaction that records the
result. A crash at any point leaves either a completed intent, whose effects
are all in the store, or an open one, which recovery rolls back (creations) or
forward (deletions and growth) at the next mount (``core.recovery``).

Each operation's event line is written in the transaction that records the
operation (:meth:`Journal.commit`), then published to the daemon's log and to
``.vmtree/events`` (:meth:`Journal.publish`); refusals are only published.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from vmtreefs.engine.base import NewVolume, SnapshotEngine
from vmtreefs.errors import VmtreeError
from vmtreefs.rules.objects import VolumeSpec
from vmtreefs.store import EVENTS_KEPT, Store, Txn

log = logging.getLogger("vmtreefs.tree")

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t))


class LeftOpen(Exception):
    """Raised by a creation's ``prepare``: leave the intent open for the recovery.

    For a step whose outcome is not known here (libvirt went away while pausing the
    VM for a save: it may be paused): the reconciliation settles the intent, as after
    a crash. ``intent`` is set once the creation has passed it on.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.intent = 0


class EventLog:
    """Recent operations and refusals, one line each, for ``.vmtree/events``.

    Operations are also persisted by the store in the transaction that makes
    them; refusals live only here and in the daemon log.
    """

    def __init__(self, initial: list[tuple[float, str]]) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=EVENTS_KEPT)
        for t, line in initial:
            self._lines.append(f"{format_time(t)} {line}")

    def add(self, line: str, t: float | None = None) -> None:
        self._lines.append(f"{format_time(time.time() if t is None else t)} {line}")

    def text(self) -> str:
        return "".join(line + "\n" for line in self._lines)


def remove_files(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class Journal:
    """Intents around engine work, and the event line of every operation."""

    def __init__(self, store: Store, engine: SnapshotEngine) -> None:
        self.store = store
        self.engine = engine
        self.events = EventLog(store.recent_events(EVENTS_KEPT))
        self.changed = trio.lowlevel.ParkingLot()

    def refused(self, operation: str, error: VmtreeError) -> None:
        """Log a refusal where an administrator looks: the daemon log and .vmtree/events."""
        log.warning("refused %s: %s", operation, error.describe())
        self.events.add(f"refused {operation}: {error.reason} ({error.errname})")

    def record_event(self, tx: Txn, line: str) -> float:
        """The operation's event line, in the transaction that records the operation itself."""
        now = time.time()
        tx.add_event(now, line)
        return now

    def publish(self, line: str, t: float) -> None:
        """After the commit: the daemon's log, ``.vmtree/events``, and who waits for a change."""
        log.info("%s", line)
        self.events.add(line, t)
        self.changed.unpark_all()

    async def commit(self, what: str, write: Callable[[Txn], object] | None = None) -> float:
        """One store transaction in a worker thread: ``write``, and ``what`` as its event
        line in the same commit; returns the event's time, for :meth:`publish`."""

        def run() -> float:
            with self.store.transaction() as tx:
                if write is not None:
                    write(tx)
                return self.record_event(tx, what)

        return await in_thread(run)

    async def create_volumes(
        self,
        what: str,
        specs: tuple[VolumeSpec, ...],
        sources: tuple[int, ...] | None = None,
        files: tuple[str, ...] = (),
        kind: str = "create",
        extra: dict[str, Any] | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[int, list[int]]:
        """Journal, then create (or snapshot from ``sources``) engine volumes.

        ``prepare`` runs between the two, under the intent (a save pauses the VM there,
        so that a recovery knows to resume it); if it raises :class:`LeftOpen`, the
        intent stays open for the recovery.

        ``files`` are made by the caller under the same intent (a savestate's
        memory image): rolling the intent back removes them too.

        On failure nothing is left behind: what was made is deleted and the
        intent completed, or, if even that fails, left open for the next mount.
        """

        def begin() -> tuple[int, list[int]]:
            with self.store.transaction() as tx:
                ids = tx.allocate_volume_ids(len(specs))
                volumes = [
                    {"id": i, "name": s.name, "size": s.size}
                    for i, s in zip(ids, specs, strict=True)
                ]
                intent = tx.begin_intent(
                    kind, {"what": what, "volumes": volumes, "files": list(files), **(extra or {})}
                )
            return intent, ids

        intent, ids = await in_thread(begin)
        if prepare is not None:
            try:
                await prepare()
            except LeftOpen as e:
                e.intent = intent
                raise
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.undo_creation(intent, ids, files)
                raise
        new = [
            NewVolume(vol_id, spec.size, None if sources is None else sources[n])
            for n, (vol_id, spec) in enumerate(zip(ids, specs, strict=True))
        ]
        await self.or_undo(intent, ids, functools.partial(self.engine.make_volumes, new))
        return intent, ids

    async def or_undo(
        self, intent: int, ids: list[int], step: Callable[[], T], files: tuple[str, ...] = ()
    ) -> T:
        """Run a blocking step of a creation; if it fails, what the creation made goes."""
        try:
            return await in_thread(step)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.undo_creation(intent, ids, files)
            raise

    async def undo_creation(self, intent: int, ids: list[int], files: tuple[str, ...] = ()) -> None:
        try:
            await in_thread(self.drop_and_complete, intent, ids, list(files))
        except Exception as e:
            log.error("could not undo intent %d (%s); the next mount rolls it back", intent, e)

    async def begin_deletion(
        self,
        line: str,
        write: Callable[[Txn], object],
        ids: list[int],
        files: list[str] | None = None,
        what: str | None = None,
    ) -> tuple[int, float]:
        """One commit that removes the rows (``write``), opens the ``delete_volumes``
        intent for the engine volumes and files they held, and records ``line``: a crash
        after it rolls the deletion forward. Returns the intent, for
        :meth:`finish_deletion`, and the event's time, for :meth:`publish`. ``what`` is
        the intent's own description when it differs from the event line."""
        payload: dict[str, Any] = {"what": what or line, "volume_ids": ids}
        if files is not None:
            payload["files"] = files

        def run() -> tuple[int, float]:
            with self.store.transaction() as tx:
                write(tx)
                intent = tx.begin_intent("delete_volumes", payload)
                return intent, self.record_event(tx, line)

        try:
            return await in_thread(run)
        except VmtreeError as e:
            # A full SOURCE: a deletion makes room, so it may use the store's reserve.
            if e.errno != errno.ENOSPC or not await in_thread(self.store.release_reserve):
                raise
        return await in_thread(run)

    async def finish_deletion(
        self, intent: int, ids: list[int], files: list[str] | None = None
    ) -> None:
        try:
            await in_thread(self.drop_and_complete, intent, ids, files or [])
        except Exception as e:
            log.error("deleting engine volumes %s failed (%s); the next mount finishes it", ids, e)

    def drop_and_complete(self, intent: int, ids: list[int], files: list[str]) -> None:
        """Blocking: the engine volumes and files an intent names go, then the intent is closed
        (an undone creation and a finished deletion end the same way)."""
        for vol_id in ids:
            self.engine.delete(vol_id, missing_ok=True)
        remove_files(files)
        try:
            with self.store.transaction() as tx:
                tx.complete_intent(intent)
        except VmtreeError as e:
            if e.errno != errno.ENOSPC:
                raise
            # Nothing is left to do but say so: the next commit with room does.
            self.store.complete_later(intent)
            log.warning("intent %d is done; it is recorded at the next commit (%s)", intent, e)

    def complete_intent(self, intent_id: int) -> None:
        with self.store.transaction() as tx:
            tx.complete_intent(intent_id)
