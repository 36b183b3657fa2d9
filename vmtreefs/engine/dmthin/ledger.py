"""The store's record of the pool, and every change of the pool bracketed by it.

The pool's metadata knows neither the volumes' sizes nor whether a change was
finished, so both live in the store beside the intent journal: a crash between
the kernel and the record is then settled from the transaction id alone (the
package docstring has the bracket and how each crash window is settled).
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vmtreefs.engine.base import EngineError, EngineLedger
from vmtreefs.engine.dmthin.pool import ThinPool

log = logging.getLogger("vmtreefs.engine.dmthin")

LEGACY_STATE_NAME = "state.json"  # the ledger before it moved into the store
# Ledger keys
TRANSACTION = "dmthin.transaction"
DATA_SIZE = "dmthin.data_size"
PENDING = "dmthin.pending"


@dataclass(frozen=True)
class Step:
    """One pool message of a change, and what it leaves."""

    message: str
    volume: int
    size: int | None  # the volume's size afterwards; None: deleted
    quiet: int | None = None  # a volume whose active device is suspended around it


class PoolLedger:
    """The recorded transaction id, volume sizes and pending change of one pool, and the
    sizes writes past the end reached this session, not yet recorded (``reached``)."""

    def __init__(self, pool: ThinPool, store: EngineLedger) -> None:
        self.pool = pool
        self.store = store
        self.sizes: dict[int, int] = {}  # as recorded: durable
        self.reached: dict[int, int] = {}  # bigger than recorded, until a record catches up
        self.transaction = 0
        self.pending: dict[str, Any] | None = None  # a change a crash interrupted

    def record_new_pool(self) -> None:
        self.store.save_engine_state(
            {TRANSACTION: "0", DATA_SIZE: str(self.pool.data_size), PENDING: None}
        )

    def load(self) -> None:
        """Read the record, and the pool's data size with it."""
        meta, sizes = self.store.load_engine_state()
        if TRANSACTION not in meta:
            meta, sizes = self._import_legacy_state()
        try:
            self.transaction = int(meta[TRANSACTION])
            self.pool.data_size = int(meta.get(DATA_SIZE, self.pool.data_size))
            self.pending = json.loads(meta[PENDING]) if PENDING in meta else None
        except (KeyError, ValueError) as e:
            raise EngineError(
                errno.EINVAL, f"the store's record of the pool is damaged: {e}"
            ) from None
        self.sizes = sizes
        self.reached = {}

    def size(self, vol_id: int) -> int:
        """The volume's size as users see it: where writes reached, or as recorded."""
        return max(self.sizes[vol_id], self.reached.get(vol_id, 0))

    def _import_legacy_state(self) -> tuple[dict[str, str], dict[int, int]]:
        """Trees made before the ledger moved into the store kept it in thin/state.json."""
        legacy = self.pool.dir / LEGACY_STATE_NAME
        try:
            data = json.loads(legacy.read_text())
            meta = {TRANSACTION: str(int(data["transaction"])), DATA_SIZE: str(data["data_size"])}
            sizes = {int(k): int(v) for k, v in data.get("sizes", {}).items()}
        except FileNotFoundError:
            raise EngineError(
                errno.ENOENT, f"the store holds no record of pool {self.pool.name}"
            ) from None
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(errno.EINVAL, f"{legacy} is damaged: {e}") from None
        self.store.save_engine_state(meta, sizes)
        legacy.rename(legacy.with_name(LEGACY_STATE_NAME + ".imported"))
        log.info("moved the pool's record from %s into the store", legacy)
        return meta, sizes

    def foreign(self, found: int) -> EngineError:
        return EngineError(
            errno.EINVAL,
            f"pool {self.pool.name} carries transaction id {found}, not {self.transaction} "
            "as the store records: it is not this tree's pool, or not as the store knows it; "
            "vmtreefs leaves it alone",
        )

    def settle_pending(self, found: int) -> None:
        """Finish or undo the change a crash interrupted, if any, by the transaction id
        ``found`` on the pool."""
        pending = self.pending
        if pending is None:
            return
        new = int(pending["transaction"])
        sizes = {int(k): v for k, v in pending["sizes"].items()}
        what = "; ".join(pending["messages"])
        if found == new:
            self._record(new, sizes)
            log.warning("recorded %r: the pool had it, the store not yet", what)
        elif found == self.transaction:
            # Some of the messages may have been taken: delete what they made (undone)
            # and what they were to delete (finished).
            for vol_id in sizes:
                self._delete_thin(vol_id)
            gone = {vol_id: None for vol_id, size in sizes.items() if size is None}
            self.store.save_engine_state({PENDING: None}, gone)
            self._apply(gone)
            self.pending = None
            log.warning("settled %r that a crash interrupted: creations undone", what)
        else:
            raise self.foreign(found)

    def change(self, steps: Sequence[Step], what: str) -> None:
        """Change the pool by one or more messages under one transaction id, bracketed in
        the store: all of them, or none."""
        self.pool.require_started()
        new = self.transaction + 1
        pending = {
            "transaction": new,
            "messages": [step.message for step in steps],
            "sizes": {str(step.volume): step.size for step in steps},
        }
        self.store.save_engine_state({PENDING: json.dumps(pending)})
        sent: list[Step] = []
        try:
            for step in steps:
                self._send(step, what)
                sent.append(step)
        except EngineError:
            if self.pool.broken is None:  # the kernel refused one: take back those before it
                self._take_back(sent, what)
            if self.pool.broken is None:
                self.store.save_engine_state({PENDING: None})
            raise
        try:
            self._set_transaction(new)
        except EngineError as e:
            self.pool.broken = f"{what}: {e.reason}"
            raise EngineError(errno.EIO, f"{self.pool.broken}; remount to reconcile") from None
        self._record(new, {step.volume: step.size for step in steps})

    def record_sizes(self, sizes: Mapping[int, int | None]) -> None:
        """Sizes (None: gone) that no pool message changes: a thin device has none."""
        self.store.save_engine_state(sizes=sizes)
        self._apply(sizes)

    def record_data_size(self, data_size: int) -> None:
        self.store.save_engine_state({DATA_SIZE: str(data_size)})

    def _send(self, step: Step, what: str) -> None:
        if step.quiet is not None:
            self.pool.dm.suspend(self.pool.device_name(step.quiet), f"{what}: suspend")
        try:
            self.pool.dm.message(self.pool.name, step.message, what)
        except EngineError as e:
            if e.errno != errno.EINVAL:
                raise
            # The ids were checked against the record: the kernel says EINVAL when it
            # cannot read or write the metadata the message changes.
            raise EngineError(
                errno.EIO,
                f"{e.reason}: the pool could not carry out {step.message!r}, which the "
                "store's record allows; an I/O error on its metadata device is the likely "
                "cause (see the kernel log)",
            ) from None
        finally:
            if step.quiet is not None:
                self._resume(step.quiet, what)

    def _take_back(self, sent: list[Step], what: str) -> None:
        """Delete what the messages sent so far made (only creations come in batches)."""
        for step in reversed(sent):
            try:
                if step.size is None:
                    raise EngineError(errno.EIO, f"{step.message!r} cannot be undone")
                self._delete_thin(step.volume)
            except EngineError as e:
                self.pool.broken = f"{what}: could not take back {step.message!r}: {e.reason}"
                return

    def _resume(self, vol_id: int, what: str) -> None:
        try:
            self.pool.dm.resume(self.pool.device_name(vol_id), f"{what}: resume")
        except EngineError as e:
            self.pool.broken = f"{what}: {e.reason}"
            raise

    def _delete_thin(self, vol_id: int) -> None:
        """Delete a thin device from the pool if it is there."""
        try:
            self.pool.dm.message(self.pool.name, f"delete {vol_id}", f"delete volume {vol_id}")
        except EngineError as e:
            if e.errno != errno.ENOENT:
                raise

    def _set_transaction(self, new: int) -> None:
        self.pool.dm.message(
            self.pool.name,
            f"set_transaction_id {self.transaction} {new}",
            f"set pool transaction id {new}",
        )

    def _record(self, transaction: int, sizes: Mapping[int, int | None]) -> None:
        """The pool carries ``transaction``: write it, and the volumes' new sizes (None:
        gone), to the store."""
        self.store.save_engine_state({TRANSACTION: str(transaction), PENDING: None}, sizes)
        self.transaction = transaction
        self.pending = None
        self._apply(sizes)

    def _apply(self, sizes: Mapping[int, int | None]) -> None:
        for vol_id, size in sizes.items():
            if size is None:
                self.sizes.pop(vol_id, None)
                self.reached.pop(vol_id, None)
            else:
                self.sizes[vol_id] = size
                if self.reached.get(vol_id, 0) <= size:
                    self.reached.pop(vol_id, None)
