"""The metadata store: one SQLite file, ``SOURCE/vmtree.db``.

``Store`` opens it (running the migrations of ``schema``), ``Txn`` writes one
transaction, ``rows`` are what it reads back. The names below are the store's
whole public interface.
"""

from vmtreefs.store.damage import damaged
from vmtreefs.store.rows import (
    AliasRow,
    Intent,
    SavestateRow,
    Snapshot,
    TemplateRow,
    VersionRow,
    VmRow,
    VolumeRow,
)
from vmtreefs.store.schema import APPLICATION_ID, DB_FILENAME, EVENTS_KEPT, INTENTS_KEPT
from vmtreefs.store.store import Store
from vmtreefs.store.txn import Txn

__all__ = [
    "APPLICATION_ID",
    "DB_FILENAME",
    "EVENTS_KEPT",
    "INTENTS_KEPT",
    "AliasRow",
    "Intent",
    "SavestateRow",
    "Snapshot",
    "Store",
    "TemplateRow",
    "Txn",
    "VersionRow",
    "VmRow",
    "VolumeRow",
    "damaged",
]
