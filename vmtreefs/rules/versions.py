"""Rules for versioned VMs and template links: commits, clearing versioned, pruning; no I/O."""

from __future__ import annotations

import errno

from vmtreefs.rules.names import ModelError, decode_name
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import TemplateLink, Vm, VolumeSpec
from vmtreefs.rules.plans import MakeVersion, Unversion
from vmtreefs.rules.properties import inherited
from vmtreefs.rules.states import STARTING, STOPPING
from vmtreefs.rules.vms import check_writable, needs_of


def plan_version(ns: Namespace, head_id: int, number: int) -> MakeVersion:
    """The next version of ``head_id``; the first one also makes it versioned."""
    head = ns.get_by_id(head_id)
    if head.hidden:
        raise ModelError(errno.ENOENT, f"VM {head.name!r} is being deleted")
    if head.volatile:
        raise ModelError(
            errno.EINVAL, f"VM {head.name!r} is volatile (it goes when it stops): no versions"
        )
    if head.immutable or head.version_of is not None:
        raise ModelError(errno.EROFS, f"cannot make versions of VM {head.name!r}: it is immutable")
    if head.state in (STARTING, STOPPING):
        raise ModelError(errno.EBUSY, f"cannot commit VM {head.name!r}: it is {head.state}")
    alias = ns.system_alias_of(head) if head.versioned else None
    if head.versioned:
        base, head_name = ns.base_name(head), head.name
    else:
        base, head_name = head.name, f"{head.name}-next"
        ns.check_free(head_name)
    name = f"{base}-v{number}"
    ns.check_free(name)
    if alias is None and head.versioned:
        ns.check_free(base)  # the alias was lost: the commit makes it again
    ns.reserve(name)
    if not head.versioned:
        ns.reserve(head_name)
    volumes = tuple(
        (vol.id, VolumeSpec(vol.name, vol.size, vol.policy))
        for vol in sorted(head.volumes.values(), key=lambda v: v.id)
    )
    props = {**inherited(head.props), "immutable": "1"}
    reparent = tuple(sorted(c.id for c in ns.by_id.values() if c.origin_id == head.id))
    return MakeVersion(
        head.id,
        base,
        name,
        number,
        volumes,
        props,
        head.origin_id,
        reparent,
        head_name,
        None if alias is None else alias.id,
    )


def plan_unversion(ns: Namespace, head_id: int) -> Unversion:
    head = ns.get_by_id(head_id)
    if not head.versioned:
        raise ModelError(errno.EINVAL, f"VM {head.name!r} is not versioned")
    versions = ns.versions_of(head, hidden=True)
    alias = ns.system_alias_of(head)
    busy = [f"{v.name}: {'; '.join(needs_of(ns, v))}" for v in versions if needs_of(ns, v)]
    users = [u.name for v in versions for u in ns.template_users(vm_id=v.id)]
    if alias is not None:
        users += [u.name for u in ns.template_users(alias_id=alias.id)]
    if busy or users:
        raise ModelError(
            errno.EBUSY,
            f"cannot clear versioned on {head.name!r}: its versions are in use ("
            + "; ".join(busy + [f"{u} has it as its template" for u in sorted(set(users))])
            + ")",
        )
    base = ns.base_name(head)
    if alias is None:
        ns.check_free(base)
    retarget = tuple(
        sorted(
            a.id
            for a in ns.aliases_by_id.values()
            if alias is not None and a.target_alias == alias.id
        )
    )
    return Unversion(
        head.id,
        base,
        None if alias is None else alias.id,
        retarget,
        tuple(v.id for v in versions),
        head.props.get("preserve_history") == "1",
    )


def prunable(ns: Namespace, head: Vm) -> list[Vm]:
    """Versions older than the newest that go when history is not kept (a version
    named directly as some VM's template stays until that changes)."""
    newest = ns.newest_version(head)
    return [
        v
        for v in ns.versions_of(head)
        if newest is not None and v.version < newest.version and not ns.template_users(v.id)
    ]


def plan_set_template(ns: Namespace, vm_id: int, raw_target: str | bytes) -> TemplateLink:
    """``ln -s ../fedora work/template``: the target names a VM or an alias."""
    vm = ns.get_by_id(vm_id)
    check_writable(vm, "change its template")
    target = decode_name(raw_target, "template target").removeprefix("../")
    if target.startswith("/") or "/" in target or target in (".", "..", ""):
        raise ModelError(
            errno.EINVAL,
            f"template target {target!r} must name a VM or alias, as ../NAME",
        )
    if target in ns.aliases:
        link = TemplateLink(None, ns.aliases[target].id)
    elif target in ns.by_name and not ns.by_name[target].hidden:
        link = TemplateLink(ns.by_name[target].id, None)
    else:
        raise ModelError(errno.EINVAL, f"template target {target!r} names no VM or alias")
    if ns.resolve(target).id == vm.id:
        raise ModelError(errno.EINVAL, f"VM {vm.name!r} cannot be its own template")
    return link


def check_template_removable(ns: Namespace, vm_id: int) -> None:
    check_writable(ns.get_by_id(vm_id), "remove its template")
