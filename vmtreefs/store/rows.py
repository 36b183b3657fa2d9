"""What the store hands back: one frozen record per row, and a whole snapshot at mount."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SavestateRow:
    id: int
    vm_id: int
    label: str
    created: float
    image: str
    info: dict[str, Any]
    volumes: dict[str, tuple[int, int]]  # name -> (volume id, size)


@dataclass(frozen=True)
class VersionRow:
    vm_id: int
    head_id: int
    number: int


@dataclass(frozen=True)
class TemplateRow:
    vm_id: int
    target_vm: int | None
    target_alias: int | None
    used: int | None


@dataclass(frozen=True)
class VmRow:
    id: int
    name: str
    created: float
    origin_id: int | None
    props: dict[str, str]


@dataclass(frozen=True)
class VolumeRow:
    id: int
    vm_id: int
    name: str
    size: int
    policy: str
    created: float


@dataclass(frozen=True)
class AliasRow:
    """A top-level symlink; exactly one of ``target_vm`` and ``target_alias`` is set."""

    id: int
    name: str
    target_vm: int | None
    target_alias: int | None
    system: bool
    created: float


@dataclass(frozen=True)
class Intent:
    id: int
    kind: str
    payload: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Snapshot:
    vms: list[VmRow]
    volumes: list[VolumeRow]
    open_intents: list[Intent]
    meta: dict[str, str]
    aliases: list[AliasRow] = field(default_factory=list)
    domains: dict[int, str] = field(default_factory=dict)
    savestates: list[SavestateRow] = field(default_factory=list)
    versions: list[VersionRow] = field(default_factory=list)
    templates: list[TemplateRow] = field(default_factory=list)
