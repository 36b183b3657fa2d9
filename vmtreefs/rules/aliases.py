"""Rules for aliases (symlinks at the top level): targets, removal, renames over others; no I/O."""

from __future__ import annotations

import errno

from vmtreefs.rules.names import MAX_ALIAS_CHAIN, ModelError, check_vm_name, decode_name
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.plans import CreateAlias, RemoveAlias, RenameAlias, ReplaceAlias


def check_alias_target(ns: Namespace, raw_target: str | bytes) -> tuple[int | None, int | None]:
    target = decode_name(raw_target, "alias target")
    if target.startswith("/"):
        raise ModelError(errno.EINVAL, f"alias target {target!r} is absolute: name a VM or alias")
    if "/" in target or target in (".", ".."):
        raise ModelError(
            errno.EINVAL,
            f"alias target {target!r} is a path: name a VM or alias, with no '/' or '..'",
        )
    if target in ns.by_name:
        return ns.by_name[target].id, None
    if target in ns.aliases:
        return None, ns.aliases[target].id
    raise ModelError(errno.EINVAL, f"alias target {target!r} names no VM or alias")


def plan_create_alias(ns: Namespace, raw_name: str | bytes, raw_target: str | bytes) -> CreateAlias:
    name = check_vm_name(raw_name)
    ns.check_free(name)
    target_vm, target_alias = check_alias_target(ns, raw_target)
    ns.reserve(name)
    return CreateAlias(name, target_vm, target_alias)


def plan_remove_alias(ns: Namespace, name: str) -> RemoveAlias:
    alias = ns.get_alias(name)
    if alias.system:
        raise ModelError(
            errno.EPERM, f"alias {name!r} is kept by the system (it names the latest version)"
        )
    if ns.aliases_standing_for(alias_id=alias.id):
        raise ModelError(
            errno.EBUSY, f"alias {name!r} is named by other aliases; remove those first"
        )
    users = ns.template_users(alias_id=alias.id)
    if users:
        raise ModelError(
            errno.EBUSY,
            f"alias {name!r} is the template of {', '.join(u.name for u in users)}",
        )
    return RemoveAlias(alias.id, name)


def plan_rename_alias(ns: Namespace, old: str, raw_new: str | bytes) -> RenameAlias | ReplaceAlias:
    """A rename to a new name, or over an existing user alias (the atomic repoint)."""
    alias = ns.get_alias(old)
    new = check_vm_name(raw_new)
    if new == old:
        return RenameAlias(alias.id, old, new)
    if alias.system:
        raise ModelError(errno.EPERM, f"alias {old!r} is kept by the system")
    replaced = ns.aliases.get(new)
    if replaced is None:
        ns.check_free(new)
        ns.reserve(new)
        return RenameAlias(alias.id, old, new)
    if replaced.system:
        raise ModelError(errno.EPERM, f"alias {new!r} is kept by the system")
    retarget = tuple(
        sorted(a.id for a in ns.aliases_by_id.values() if a.target_alias == replaced.id)
    )
    # Follow the kept alias's chain as it will be: it must end at a VM.
    targets = {a.id: a.target_alias for a in ns.aliases_by_id.values()}
    for a in retarget:
        targets[a] = alias.id
    step: int | None = targets[alias.id]
    for _ in range(MAX_ALIAS_CHAIN + 1):
        if step == replaced.id:
            step = alias.id
        if step is None:
            return ReplaceAlias(alias.id, replaced.id, new, retarget)
        if step == alias.id:
            break
        step = targets.get(step)
    raise ModelError(errno.EINVAL, f"alias {new!r} would end up naming itself")
