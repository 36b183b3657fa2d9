"""``vmtreefs tree``: the whole forest of VMs drawn from a mounted tree.

Reading goes through the mount, as any user's tools would (symlinks, ``state``,
extended attributes); drawing is pure. A VM hangs below its origin (the VM it was
cloned or versioned from); a VM without one starts a tree. Aliases are shown on
the VM they name, versions with their head, and each VM with the bytes only it
holds (what removing it would free).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from vmtreefs.engine.select import format_size
from vmtreefs.rules.states import RUNNING

XATTR = "user.vmtree."


@dataclass
class Node:
    name: str
    state: str
    own_bytes: int | None  # None: the engine could not say
    origin: str | None = None
    template: str | None = None  # as the link names it (often an alias)
    template_vm: str | None = None  # the VM that is now
    flags: list[str] = field(default_factory=list)  # versioned, immutable, volatile
    aliases: list[str] = field(default_factory=list)
    savestates: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # a head's: v1, v2...


def _xattr(path: Path, name: str) -> str | None:
    try:
        return os.getxattr(path, XATTR + name).decode()
    except OSError:
        return None


def _link(path: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def read(vms: Path) -> list[Node]:
    """Every VM of the tree mounted at ``vms``, with its aliases; a VM removed while
    being read is left out."""
    nodes: dict[str, Node] = {}
    aliases: dict[str, str] = {}
    for name in sorted(os.listdir(vms)):
        path = vms / name
        if name.startswith("."):
            continue
        if path.is_symlink():
            aliases[name] = os.readlink(path)
            continue
        try:
            state = (path / "state").read_text().strip()
            usage = _xattr(path, "usage")
            node = Node(
                name,
                state,
                int(usage) if usage and usage.isdigit() else None,
                origin=_link(path / "origin"),
                template=_link(path / "template"),
                flags=[f for f in ("versioned", "immutable", "volatile") if _xattr(path, f) == "1"],
                savestates=sorted(os.listdir(path / "savestates")),
                versions=sorted(os.listdir(path / "versions"), key=_version_number),
            )
        except FileNotFoundError:
            continue
        nodes[name] = node
    for node in nodes.values():
        if node.template is not None:
            node.template_vm = _final(vms / node.name / "template")
    for alias, target in aliases.items():
        final = _final(vms / alias)  # the kernel follows alias chains like any symlink
        if final in nodes:
            nodes[final].aliases.append(alias if final == target else f"{alias} -> {target}")
    return list(nodes.values())


def _final(link: Path) -> str:
    """The VM a chain of symlinks ends at, by name."""
    return os.path.basename(os.path.realpath(link))


def _version_number(name: str) -> int:
    return int(name[1:]) if name[1:].isdigit() else 0


def _children(nodes: Iterable[Node]) -> tuple[list[Node], dict[str, list[Node]]]:
    by_name = {n.name: n for n in nodes}
    roots: list[Node] = []
    below: dict[str, list[Node]] = {}
    for node in by_name.values():
        if node.origin in by_name:
            below.setdefault(node.origin, []).append(node)
        else:
            roots.append(node)
    return roots, below


def _facts(node: Node) -> list[str]:
    """What is shown of a VM after its name and state, in both formats."""
    facts = [] if node.own_bytes is None else [f"own {format_size(node.own_bytes)}"]
    if node.flags:
        facts.append(" ".join(node.flags))
    if node.versions:
        facts.append("versions " + " ".join(node.versions))
    if node.template:
        facts.append(f"template {node.template}")
    if node.aliases:
        facts.append("<- " + ", ".join(node.aliases))
    if node.savestates:
        facts.append("savestates " + " ".join(node.savestates))
    return facts


def _label(node: Node) -> str:
    return "  ".join([node.name, f"[{node.state}]", *_facts(node)])


def text(nodes: Iterable[Node]) -> str:
    """The forest as an indented tree, roots and siblings by name."""
    roots, below = _children(nodes)
    lines: list[str] = []

    def draw(node: Node, prefix: str, last: bool, top: bool) -> None:
        branch = "" if top else ("└── " if last else "├── ")
        lines.append(prefix + branch + _label(node))
        kids = sorted(below.get(node.name, []), key=lambda n: n.name)
        inner = prefix + ("" if top else ("    " if last else "│   "))
        for i, kid in enumerate(kids):
            draw(kid, inner, i == len(kids) - 1, False)

    for root in sorted(roots, key=lambda n: n.name):
        draw(root, "", True, True)
    return "".join(line + "\n" for line in lines)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dot(nodes: Iterable[Node]) -> str:
    """The forest for Graphviz: an edge from each origin to its clones and versions,
    dashed ones from a template to the VMs built on it."""
    listed = list(nodes)
    names = {n.name for n in listed}
    out = ["digraph vmtree {", "  rankdir=LR;", '  node [shape=box, fontname="monospace"];']
    for node in sorted(listed, key=lambda n: n.name):
        lines = [f"{node.name} [{node.state}]", *_facts(node)]
        style = ', style="rounded,filled", fillcolor="#d8f0d8"' if node.state == RUNNING else ""
        label = "\\n".join(line.replace("\\", "\\\\").replace('"', '\\"') for line in lines)
        out.append(f'  {_quoted(node.name)} [label="{label}"{style}];')
    for node in sorted(listed, key=lambda n: n.name):
        if node.origin in names:
            out.append(f"  {_quoted(node.origin)} -> {_quoted(node.name)};")
        template = node.template_vm
        if template in names and template != node.origin:
            out.append(f"  {_quoted(template)} -> {_quoted(node.name)} [style=dashed];")
    out.append("}")
    return "\n".join(out) + "\n"
