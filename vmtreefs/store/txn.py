"""The writes of one store transaction (``with store.transaction() as tx``)."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Mapping
from typing import Any

from vmtreefs.errors import VmtreeError
from vmtreefs.store.alias_writes import AliasWrites
from vmtreefs.store.schema import (
    EVENTS_KEPT,
    INTENTS_KEPT,
)
from vmtreefs.store.statements import one_target


def _props_json(props: dict[str, str]) -> str:
    # Checked here because the JSON column would otherwise accept anything and
    # VmRow promises str -> str.
    for k, v in props.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise VmtreeError(errno.EINVAL, f"VM property {k!r}={v!r} is not a string pair")
    return json.dumps(props, sort_keys=True)


class Txn(AliasWrites):
    """The writes of one transaction; valid only inside ``with store.transaction()``."""

    # VMs

    def insert_vm(
        self,
        name: str,
        created: float,
        origin_id: int | None = None,
        props: dict[str, str] | None = None,
    ) -> int:
        cur = self._run(
            "INSERT INTO vms (name, created, origin_id, props) VALUES (?, ?, ?, ?)",
            (name, created, origin_id, _props_json(props or {})),
            f"insert VM {name!r}",
            exists=f"a VM named {name!r} already exists",
            missing=f"origin VM {origin_id} of {name!r} does not exist",
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def rename_vm(self, vm_id: int, new_name: str) -> None:
        cur = self._run(
            "UPDATE vms SET name = ? WHERE id = ?",
            (new_name, vm_id),
            f"rename VM {vm_id} to {new_name!r}",
            exists=f"a VM named {new_name!r} already exists",
        )
        self._one_row(cur, f"no VM with id {vm_id} to rename")

    def set_vm_origin(self, vm_id: int, origin_id: int | None) -> None:
        """Set or clear the VM a VM was cloned from.

        A loop of origins is refused (EINVAL); to reverse a clone relationship,
        clear the old origin before setting the new one.
        """
        if origin_id is not None:
            loop = self._run(
                "WITH RECURSIVE chain(id) AS ("
                "SELECT id FROM vms WHERE id = ? "
                "UNION SELECT vms.origin_id FROM vms JOIN chain ON vms.id = chain.id "
                "WHERE vms.origin_id IS NOT NULL) "
                "SELECT 1 FROM chain WHERE id = ?",
                (origin_id, vm_id),
                f"follow the origins of VM {origin_id}",
            ).fetchone()
            if loop is not None:
                raise VmtreeError(
                    errno.EINVAL,
                    f"VM {origin_id} cannot be the origin of VM {vm_id}: "
                    f"it is VM {vm_id} or descends from it",
                )
        cur = self._run(
            "UPDATE vms SET origin_id = ? WHERE id = ?",
            (origin_id, vm_id),
            f"set origin of VM {vm_id} to {origin_id}",
            missing=f"origin VM {origin_id} of VM {vm_id} does not exist",
        )
        self._one_row(cur, f"no VM with id {vm_id} to set the origin of")

    def set_vm_props(self, vm_id: int, props: dict[str, str]) -> None:
        cur = self._run(
            "UPDATE vms SET props = ? WHERE id = ?",
            (_props_json(props), vm_id),
            f"set properties of VM {vm_id}",
        )
        self._one_row(cur, f"no VM with id {vm_id} to set properties on")

    def delete_vm(self, vm_id: int) -> None:
        """Delete a VM and (by cascade) its volume rows; its clones lose their origin.

        EBUSY, and nothing deleted, while an alias names the VM: delete or
        re-target the aliases first, in the same transaction.
        """
        cur = self._run(
            "DELETE FROM vms WHERE id = ?",
            (vm_id,),
            f"delete VM {vm_id}",
            in_use=lambda: (
                f"VM {vm_id} is still named by alias {self._alias_names('target_vm', vm_id)}, "
                "a template link or its versions; delete or re-target them first"
            ),
        )
        self._one_row(cur, f"no VM with id {vm_id} to delete")

    def set_domain_xml(self, vm_id: int, xml: str | None) -> None:
        """A VM's base description; None goes back to the default."""
        if xml is None:
            self._run("DELETE FROM domains WHERE vm_id = ?", (vm_id,), "reset domain.xml")
            return
        self._run(
            "INSERT INTO domains (vm_id, xml) VALUES (?, ?) "
            "ON CONFLICT (vm_id) DO UPDATE SET xml = excluded.xml",
            (vm_id, xml),
            f"store domain.xml of VM {vm_id}",
            missing=f"no VM with id {vm_id} to store domain.xml for",
        )

    # Savestates

    def insert_savestate(
        self,
        vm_id: int,
        label: str,
        created: float,
        image: str,
        info: dict[str, Any],
        volumes: dict[str, tuple[int, int]],
    ) -> int:
        cur = self._run(
            "INSERT INTO savestates (vm_id, label, created, image, info) VALUES (?, ?, ?, ?, ?)",
            (vm_id, label, created, image, json.dumps(info, sort_keys=True)),
            f"record savestate {label!r} of VM {vm_id}",
            exists=f"VM {vm_id} already has a savestate {label!r}",
            missing=f"no VM with id {vm_id} to record a savestate of",
        )
        assert cur.lastrowid is not None
        for name, (vol_id, size) in volumes.items():
            self._run(
                "INSERT INTO savestate_volumes (savestate_id, name, vol_id, size) "
                "VALUES (?, ?, ?, ?)",
                (cur.lastrowid, name, vol_id, size),
                f"record volume {name!r} of savestate {label!r}",
            )
        return cur.lastrowid

    def delete_savestate(self, savestate_id: int) -> None:
        cur = self._run(
            "DELETE FROM savestates WHERE id = ?", (savestate_id,), "delete a savestate"
        )
        self._one_row(cur, f"no savestate with id {savestate_id} to delete")

    # Versions and templates

    def insert_version(self, vm_id: int, head_id: int, number: int) -> None:
        self._run(
            "INSERT INTO versions (vm_id, head_id, number) VALUES (?, ?, ?)",
            (vm_id, head_id, number),
            f"record VM {vm_id} as version {number} of VM {head_id}",
            exists=f"VM {head_id} already has a version {number}",
            missing=f"no VM {vm_id} or head {head_id} to record a version of",
        )

    def forget_version(self, vm_id: int) -> None:
        """The VM stays, as a VM of its own: it is no longer a version."""
        self._run("DELETE FROM versions WHERE vm_id = ?", (vm_id,), f"forget version {vm_id}")

    def set_template(
        self, vm_id: int, target_vm: int | None, target_alias: int | None, used: int | None = None
    ) -> None:
        """Set (or with no target, clear) a VM's template link."""
        if target_vm is None and target_alias is None:
            self._run("DELETE FROM templates WHERE vm_id = ?", (vm_id,), "clear a template")
            return
        what = f"set the template of VM {vm_id}"
        one_target(target_vm, target_alias, what)
        self._require_target(target_vm, target_alias, f"the template of VM {vm_id}")
        self._run(
            "INSERT INTO templates (vm_id, target_vm, target_alias, used) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (vm_id) DO UPDATE SET target_vm = excluded.target_vm, "
            "target_alias = excluded.target_alias, used = excluded.used",
            (vm_id, target_vm, target_alias, used),
            what,
            missing=f"no VM with id {vm_id} to set the template of",
        )

    def set_template_used(self, vm_id: int, used: int | None) -> None:
        self._run(
            "UPDATE templates SET used = ? WHERE vm_id = ?",
            (used, vm_id),
            f"record the template version VM {vm_id} started from",
        )

    # Volumes

    def allocate_volume_ids(self, count: int) -> list[int]:
        """Reserve ids durably, with the rest of the transaction: no crash hands one out twice."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} volume ids")
        if count == 0:
            return []
        cur = self._run(
            "UPDATE counters SET value = value + ? WHERE name = 'volume_id' RETURNING value",
            (count,),
            "allocate volume ids",
        )
        row = cur.fetchone()
        cur.fetchall()  # finish the statement
        if row is None:
            raise VmtreeError(errno.EIO, "the store has no volume id counter; run fsck")
        last = int(row[0])
        return list(range(last - count + 1, last + 1))

    def next_number(self, counter: str) -> int:
        """The next of a named sequence (1, 2, ...): numbers are never handed out twice,
        also after the names that carried them are gone."""
        self._run(
            "INSERT OR IGNORE INTO counters (name, value) VALUES (?, 0)",
            (counter,),
            f"start counter {counter!r}",
        )
        cur = self._run(
            "UPDATE counters SET value = value + 1 WHERE name = ? RETURNING value",
            (counter,),
            f"advance counter {counter!r}",
        )
        row = cur.fetchone()
        cur.fetchall()
        assert row is not None
        return int(row[0])

    def insert_volume(
        self, vol_id: int, vm_id: int, name: str, size: int, policy: str, created: float
    ) -> None:
        self._run(
            "INSERT INTO volumes (id, vm_id, name, size, policy, created) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (vol_id, vm_id, name, size, policy, created),
            f"insert volume {vol_id} {name!r} of VM {vm_id}",
            exists=f"VM {vm_id} already has a volume named {name!r} or volume id {vol_id} "
            "is in use",
            missing=f"no VM with id {vm_id} to add volume {name!r} to",
        )
        # An id that did not come from allocate_volume_ids (an import by fsck)
        # must still never be handed out later.
        self._run(
            "UPDATE counters SET value = max(value, ?) WHERE name = 'volume_id'",
            (vol_id,),
            "advance the volume id counter",
        )

    def set_volume_size(self, vol_id: int, size: int) -> None:
        cur = self._run(
            "UPDATE volumes SET size = ? WHERE id = ?",
            (size, vol_id),
            f"set size of volume {vol_id} to {size}",
        )
        self._one_row(cur, f"no volume with id {vol_id} to resize")

    def set_volume_policy(self, vol_id: int, policy: str) -> None:
        cur = self._run(
            "UPDATE volumes SET policy = ? WHERE id = ?",
            (policy, vol_id),
            f"set policy of volume {vol_id} to {policy!r}",
        )
        self._one_row(cur, f"no volume with id {vol_id} to set the policy of")

    def rename_volume(self, vol_id: int, new_name: str) -> None:
        cur = self._run(
            "UPDATE volumes SET name = ? WHERE id = ?",
            (new_name, vol_id),
            f"rename volume {vol_id} to {new_name!r}",
            exists=f"the VM of volume {vol_id} already has a volume named {new_name!r}",
        )
        self._one_row(cur, f"no volume with id {vol_id} to rename")

    def delete_volume(self, vol_id: int) -> None:
        cur = self._run("DELETE FROM volumes WHERE id = ?", (vol_id,), f"delete volume {vol_id}")
        self._one_row(cur, f"no volume with id {vol_id} to delete")

    # Intent journal

    def begin_intent(self, kind: str, payload: dict[str, Any]) -> int:
        cur = self._run(
            "INSERT INTO intents (kind, payload, created) VALUES (?, ?, ?)",
            (kind, json.dumps(payload, sort_keys=True), time.time()),
            f"record {kind} intent",
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def complete_intent(self, intent_id: int) -> None:
        """Close an intent; completing one twice is harmless, so recovery may retry.

        Completed intents are kept for fsck and post-mortems, but only the
        newest INTENTS_KEPT of them.
        """
        cur = self._run(
            "UPDATE intents SET completed = ? WHERE id = ? AND completed IS NULL",
            (time.time(), intent_id),
            f"complete intent {intent_id}",
        )
        if cur.rowcount == 0:
            known = self._run(
                "SELECT 1 FROM intents WHERE id = ?", (intent_id,), f"look up intent {intent_id}"
            ).fetchone()
            if known is None:
                raise VmtreeError(errno.ENOENT, f"no intent with id {intent_id} to complete")
            return
        self._run(
            "DELETE FROM intents WHERE completed IS NOT NULL AND id < ("
            "SELECT id FROM intents WHERE completed IS NOT NULL ORDER BY id DESC "
            "LIMIT 1 OFFSET ?)",
            (INTENTS_KEPT - 1,),
            "prune completed intents",
        )

    def set_engine_state(
        self, meta: Mapping[str, str | None], sizes: Mapping[int, int | None]
    ) -> None:
        for key, value in meta.items():
            if value is None:
                self._run("DELETE FROM engine_meta WHERE key = ?", (key,), "engine state")
            else:
                self._run(
                    "INSERT INTO engine_meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, value),
                    "engine state",
                )
        for vol_id, size in sizes.items():
            if size is None:
                self._run("DELETE FROM engine_volumes WHERE id = ?", (vol_id,), "engine state")
            else:
                self._run(
                    "INSERT INTO engine_volumes (id, size) VALUES (?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET size = excluded.size",
                    (vol_id, size),
                    "engine state",
                )

    # Miscellany

    def set_meta(self, key: str, value: str) -> None:
        self._run(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
            f"set meta {key!r}",
        )

    def add_event(self, time: float, line: str) -> None:
        """Record an operation for ``.vmtree/events``; only the newest EVENTS_KEPT stay."""
        self._run("INSERT INTO events (time, line) VALUES (?, ?)", (time, line), "record event")
        self._run(
            "DELETE FROM events WHERE id <= ("
            "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (EVENTS_KEPT,),
            "trim events",
        )
