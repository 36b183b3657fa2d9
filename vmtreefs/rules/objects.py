"""The things in a tree, as the rules see them: VMs, volumes, savestates, aliases.

They hold no behaviour beyond what their fields say; only
:class:`~vmtreefs.rules.namespace.Namespace` changes them once they are in a tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmtreefs.rules.names import VOLUME_SUFFIX, GiB
from vmtreefs.rules.states import HALTED


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int
    policy: str


DEFAULT_VOLUMES: tuple[VolumeSpec, ...] = (
    VolumeSpec("root", 10 * GiB, "template"),
    VolumeSpec("private", 2 * GiB, "persistent"),
    VolumeSpec("volatile", 1 * GiB, "volatile"),
)


@dataclass
class Volume:
    id: int
    name: str
    size: int
    policy: str
    created: float

    @property
    def filename(self) -> str:
        return self.name + VOLUME_SUFFIX


SAVED_POLICY = "persistent"
"""A savestate's volumes keep their data as it was saved, whatever their VM's policy."""


@dataclass
class Savestate:
    """A VM's memory image and the snapshots of its volumes taken with it."""

    id: int
    label: str
    created: float
    image: str
    info: dict[str, object]
    volumes: dict[str, Volume]


@dataclass
class Vm:
    id: int
    name: str
    created: float
    origin_id: int | None = None
    props: dict[str, str] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    state: str = HALTED
    domain_xml: str | None = None  # the base description; None: the default one
    savestates: dict[str, Savestate] = field(default_factory=dict)
    hidden: bool = False  # removed by rmdir while still running: no name, goes when it stops
    version_of: int | None = None  # a version NAME-vN: the id of its head NAME-next
    version: int = 0  # a version's N
    template: TemplateLink | None = None
    template_used: int | None = None  # the VM its template volumes were last taken from

    @property
    def volatile(self) -> bool:
        """Destroyed as soon as it is halted (a disposable, or a VM removed while running)."""
        return self.props.get("volatile") == "1"

    @property
    def immutable(self) -> bool:
        return self.props.get("immutable") == "1"

    @property
    def versioned(self) -> bool:
        """The writable head (NAME-next) of a versioned VM."""
        return self.props.get("versioned") == "1"


@dataclass(frozen=True)
class TemplateLink:
    """A VM's ``template`` symlink: it names a VM or an alias (by id, like an alias)."""

    target_vm: int | None
    target_alias: int | None


@dataclass
class Alias:
    """A name at the top level that stands for a VM or another alias (a symlink)."""

    id: int
    name: str
    target_vm: int | None
    target_alias: int | None
    system: bool = False
    created: float = 0.0
