"""The dm-thin engine: volumes are thin devices of a raw dm-thin pool that vmtreefs manages.

The pool is built from two sparse loop files in ``SOURCE/thin/`` (or from given
block devices). Thin device ids are the store's volume ids.

What the pool's metadata cannot say lives in the store, beside the intent
journal (the :class:`EngineLedger`): the volume sizes (a thin device has none of
its own) and the pool's transaction id. Docker's devicemapper driver is the
precedent. Every change of the pool (one message, or all the creations and
snapshots of a VM together) is bracketed:

1. the ledger records the change as pending, with the transaction id it will bring;
2. the messages, then ``set_transaction_id`` old -> new;
3. the ledger records the new id and sizes, and clears the pending change.

At start, a pending change the pool already carries (its id is the new one) is
recorded; one it does not (the old id) is settled the other way: the devices
its messages created are deleted again, a deletion is finished. A pool with any other id is not
ours and is refused: vmtreefs never touches another program's pool.

Devices are activated on demand as ``/dev/mapper/vmtree-<pool>-<id>`` and
removed when the last open file lets go. A watcher thread sleeps in ``dmsetup
wait`` on the pool and logs when it passes its low-water mark or fills.

One module a job: ``pool`` (the kernel's pool and what it stands on), ``provision``
(a new pool), ``ledger`` (the store's record and the bracket), ``devices`` (thin
devices in ``/dev/mapper``), ``volumes`` (the engine contract), ``metadata`` (the
thin tools), ``watcher``; ``engine`` puts them together as :class:`DmThinEngine`.
"""

from vmtreefs.engine.dmthin.engine import DmThinEngine
from vmtreefs.engine.dmthin.ledger import DATA_SIZE, PENDING, TRANSACTION, Step
from vmtreefs.engine.dmthin.metadata import parse_thin_delta
from vmtreefs.engine.dmthin.pool import (
    BLOCK_SECTORS,
    LAYOUTS,
    SECTOR,
    PoolStatus,
    backing_deleted,
    check_block_device,
)
from vmtreefs.engine.dmthin.provision import check_no_thin_metadata
from vmtreefs.engine.dmthin.volumes import DmOpenVolume
from vmtreefs.engine.dmthin.watcher import PoolWatcher

__all__ = [
    "BLOCK_SECTORS",
    "DATA_SIZE",
    "LAYOUTS",
    "PENDING",
    "SECTOR",
    "TRANSACTION",
    "DmOpenVolume",
    "DmThinEngine",
    "PoolStatus",
    "PoolWatcher",
    "Step",
    "backing_deleted",
    "check_block_device",
    "check_no_thin_metadata",
    "parse_thin_delta",
]
