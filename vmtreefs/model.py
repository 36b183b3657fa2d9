"""The rules of the tree, with no I/O.

Every check that decides whether an operation may happen, and what it turns
into, lives here, so the rules can be tested exhaustively without a kernel, a
database or an engine. The orchestrator (``tree``) asks for a *plan*, carries
it out with the store and the engine, then *applies* it here.

The namespace is held in memory as :class:`Namespace`. Plans reserve the names
they will create, so two racing ``mkdir`` of one name cannot both succeed even
while the first one is still waiting on the engine.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field

from vmtreefs.errors import VmtreeError
from vmtreefs.properties import VOLUME_POLICIES, inherited

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 255
SECTOR = 512
MAX_VOLUME_SIZE = 16 * TiB
VOLUME_SUFFIX = ".img"

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
_RESERVED_SUFFIX_RE = re.compile(r"-(next|v[0-9]+|inst[0-9]+|disp[0-9]+)\Z")
_INSTANCE_RE = re.compile(r"-(inst|disp)[0-9]+\Z")
HIDDEN_PREFIX = ".volatile-"

POLICIES = VOLUME_POLICIES
VM_STATES = ("halted", "starting", "running", "paused", "saved", "stopping")


class ModelError(VmtreeError):
    """A rule of the tree refused an operation."""


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


def _decode(raw: str | bytes, what: str) -> str:
    raw_bytes = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
    if len(raw_bytes) > MAX_NAME_BYTES:
        raise ModelError(
            errno.ENAMETOOLONG, f"{what} is {len(raw_bytes)} bytes, over {MAX_NAME_BYTES}"
        )
    try:
        return raw_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise ModelError(
            errno.EINVAL, f"{what} {raw_bytes!r} is not ASCII: names are [A-Za-z][A-Za-z0-9_-]*"
        ) from None


def _check_plain_name(name: str, what: str) -> None:
    if not _NAME_RE.match(name):
        raise ModelError(
            errno.EINVAL,
            f"{what} {name!r} is not allowed: names are [A-Za-z][A-Za-z0-9_-]*",
        )
    if len(name) > MAX_NAME_CHARS:
        raise ModelError(
            errno.EINVAL, f"{what} {name[:16]}... has {len(name)} characters, over {MAX_NAME_CHARS}"
        )


def check_vm_name(raw: str | bytes) -> str:
    """Validate a VM name a user gave; system-made suffixes are refused."""
    name = _decode(raw, "VM name")
    _check_plain_name(name, "VM name")
    match = _RESERVED_SUFFIX_RE.search(name)
    if match:
        raise ModelError(
            errno.EINVAL,
            f"VM name {name!r} ends in {match.group(0)!r}, a suffix reserved for names "
            "the system makes (-next, -vN, -instN, -dispN)",
        )
    return name


def check_volume_filename(raw: str | bytes) -> str:
    """Turn ``NAME.img`` into the volume name NAME, or refuse it."""
    filename = _decode(raw, "volume file name")
    if not filename.endswith(VOLUME_SUFFIX):
        raise ModelError(
            errno.EINVAL, f"volume file {filename!r} must be named NAME{VOLUME_SUFFIX}"
        )
    name = filename[: -len(VOLUME_SUFFIX)]
    _check_plain_name(name, "volume name")
    return name


_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
MAX_LABEL_CHARS = 64
HOT_LABEL = "hot"
HOT_RUNNER_PREFIX = ".hot-"
"""The hidden VMs booted only to make a hot savestate are named .hot-SOURCEID-N."""


def check_savestate_label(raw: str | bytes) -> str:
    """A savestate label a user gave; ``hot`` is the hot savestate's, made by vmtreefs."""
    label = _decode(raw, "savestate label")
    if not _LABEL_RE.match(label) or len(label) > MAX_LABEL_CHARS:
        raise ModelError(
            errno.EINVAL,
            f"savestate label {label[:70]!r} is not allowed: labels are "
            f"[A-Za-z0-9][A-Za-z0-9._-]*, at most {MAX_LABEL_CHARS} characters",
        )
    if label == HOT_LABEL:
        raise ModelError(errno.EINVAL, "the savestate label 'hot' is kept for hot savestates")
    return label


def check_volume_size(size: int) -> None:
    if size < 0 or size % SECTOR:
        raise ModelError(errno.EINVAL, f"volume size {size} is not a multiple of {SECTOR} bytes")
    if size > MAX_VOLUME_SIZE:
        raise ModelError(
            errno.EFBIG, f"volume size {size} is over the limit of {MAX_VOLUME_SIZE} bytes"
        )


def round_up_to_sector(size: int) -> int:
    return -(-size // SECTOR) * SECTOR


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
    state: str = "halted"
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


# Plans: what an operation turns into, decided before any I/O.


@dataclass(frozen=True)
class CreateVm:
    name: str
    volumes: tuple[VolumeSpec, ...]


@dataclass(frozen=True)
class DeleteVm:
    vm_id: int
    name: str
    volume_ids: tuple[int, ...]
    new_origin: int | None = None  # its clones move to its own origin
    reparent: tuple[int, ...] = ()
    aliases: tuple[int, ...] = ()  # aliases that stand for it, dependents first
    images: tuple[str, ...] = ()  # memory images of its savestates


@dataclass(frozen=True)
class RenameVm:
    vm_id: int
    old: str
    new: str


@dataclass(frozen=True)
class CreateVolume:
    vm_id: int
    spec: VolumeSpec


@dataclass(frozen=True)
class DeleteVolume:
    vm_id: int
    volume_id: int
    name: str


@dataclass(frozen=True)
class RenameVolume:
    vm_id: int
    volume_id: int
    old: str
    new: str


@dataclass(frozen=True)
class ResizeVolume:
    vm_id: int
    volume_id: int
    old_size: int
    new_size: int


@dataclass(frozen=True)
class HideVm:
    """rmdir of a VM that still runs: its name goes now, the VM when it stops."""

    vm_id: int
    name: str
    hidden_name: str
    new_origin: int | None
    reparent: tuple[int, ...]
    aliases: tuple[int, ...]


@dataclass(frozen=True)
class CloneVm:
    source_id: int
    name: str
    volumes: tuple[tuple[int, VolumeSpec], ...]  # (source volume id, the new volume)
    props: dict[str, str]
    reparent: tuple[int, ...]  # --replace: VMs whose origin moves from the source to the clone


@dataclass(frozen=True)
class MakeVersion:
    """The next NAME-vN of a versioned VM: a replacement linked clone of its head.

    The version's origin is the head's (the previous version); the head and
    the VMs cloned from the head then descend from the new version, and the
    system alias NAME moves to it.
    """

    head_id: int
    base: str  # NAME
    name: str  # NAME-vN
    number: int
    volumes: tuple[tuple[int, VolumeSpec], ...]
    props: dict[str, str]
    origin: int | None
    reparent: tuple[int, ...]
    head_name: str  # NAME-next (the head is renamed to it by the first version)
    alias_id: int | None  # the system alias to move; None: the first version makes it


@dataclass(frozen=True)
class Unversion:
    """Clearing ``versioned``: the head is NAME again; versions stay (history) or go."""

    head_id: int
    base: str
    alias_id: int | None
    retarget: tuple[int, ...]  # user aliases that named the system alias name the head now
    versions: tuple[int, ...]
    keep_history: bool


@dataclass(frozen=True)
class SetProperty:
    vm_id: int
    name: str
    value: str | None  # None: back to the default


@dataclass
class Alias:
    """A name at the top level that stands for a VM or another alias (a symlink)."""

    id: int
    name: str
    target_vm: int | None
    target_alias: int | None
    system: bool = False
    created: float = 0.0


@dataclass(frozen=True)
class CreateAlias:
    name: str
    target_vm: int | None
    target_alias: int | None


@dataclass(frozen=True)
class RemoveAlias:
    alias_id: int
    name: str


@dataclass(frozen=True)
class RenameAlias:
    alias_id: int
    old: str
    new: str


@dataclass(frozen=True)
class ReplaceAlias:
    """``mv NEW OLD`` over an existing alias (``ln -sfn``): NEW takes OLD's name and place."""

    keep_id: int
    drop_id: int
    name: str
    retarget: tuple[int, ...]  # aliases that named the dropped one now name the kept one


MAX_ALIAS_CHAIN = 40  # like the kernel's limit on symlinks followed in one lookup


class Namespace:
    """Every VM the user can see, by name and by id, plus names reserved by operations in flight."""

    def __init__(self) -> None:
        self.by_name: dict[str, Vm] = {}
        self.by_id: dict[int, Vm] = {}
        self.reserved: set[str] = set()
        self._volume_owner: dict[int, int] = {}
        self._savestate_volume_owner: dict[int, tuple[int, str]] = {}
        self._savestate_owner: dict[int, tuple[int, str]] = {}
        self.aliases: dict[str, Alias] = {}
        self.aliases_by_id: dict[int, Alias] = {}

    # Queries

    def __len__(self) -> int:
        return len(self.by_id)

    def get(self, name: str) -> Vm:
        try:
            return self.by_name[name]
        except KeyError:
            raise ModelError(errno.ENOENT, f"there is no VM named {name!r}") from None

    def get_by_id(self, vm_id: int) -> Vm:
        try:
            return self.by_id[vm_id]
        except KeyError:
            raise ModelError(errno.ENOENT, f"there is no VM with id {vm_id}") from None

    def volume(self, vm: Vm, name: str) -> Volume:
        try:
            return vm.volumes[name]
        except KeyError:
            raise ModelError(errno.ENOENT, f"VM {vm.name!r} has no volume {name!r}") from None

    def volume_count(self) -> int:
        return len(self._volume_owner)

    def savestate_volume_by_id(self, volume_id: int) -> tuple[Vm, Savestate, Volume]:
        """A volume of a savestate (read-only); ENOENT once it is gone."""
        found = self._savestate_volume_owner.get(volume_id)
        if found is not None:
            vm = self.by_id.get(found[0])
            ss = vm.savestates.get(found[1]) if vm is not None else None
            for vol in ss.volumes.values() if ss is not None else ():
                if vol.id == volume_id and vm is not None and ss is not None:
                    return vm, ss, vol
        raise ModelError(errno.ENOENT, f"savestate volume id {volume_id} is gone")

    def any_volume_by_id(self, volume_id: int) -> tuple[Vm, Savestate | None, Volume]:
        """A VM's own volume (savestate None) or a savestate's; ENOENT once it is gone."""
        if volume_id in self._volume_owner:
            vm, volume = self.volume_by_id(volume_id)
            return vm, None, volume
        return self.savestate_volume_by_id(volume_id)

    def add_savestate(self, vm_id: int, savestate: Savestate) -> None:
        vm = self.get_by_id(vm_id)
        vm.savestates[savestate.label] = savestate
        self._savestate_owner[savestate.id] = (vm_id, savestate.label)
        for vol in savestate.volumes.values():
            self._savestate_volume_owner[vol.id] = (vm_id, savestate.label)

    def remove_savestate(self, vm_id: int, label: str) -> Savestate:
        vm = self.get_by_id(vm_id)
        savestate = vm.savestates.pop(label)
        self._savestate_owner.pop(savestate.id, None)
        for vol in savestate.volumes.values():
            self._savestate_volume_owner.pop(vol.id, None)
        return savestate

    def savestate_by_id(self, savestate_id: int) -> tuple[Vm, Savestate]:
        found = self._savestate_owner.get(savestate_id)
        vm = self.by_id.get(found[0]) if found is not None else None
        if vm is None or found is None or found[1] not in vm.savestates:
            raise ModelError(errno.ENOENT, f"savestate id {savestate_id} is gone")
        return vm, vm.savestates[found[1]]

    def get_savestate(self, vm: Vm, label: str) -> Savestate:
        try:
            return vm.savestates[label]
        except KeyError:
            raise ModelError(errno.ENOENT, f"VM {vm.name!r} has no savestate {label!r}") from None

    def volume_by_id(self, volume_id: int) -> tuple[Vm, Volume]:
        """The owner and the volume; ENOENT once either is gone."""
        vm_id = self._volume_owner.get(volume_id)
        vm = self.by_id.get(vm_id) if vm_id is not None else None
        if vm is not None:
            for vol in vm.volumes.values():
                if vol.id == volume_id:
                    return vm, vol
        raise ModelError(errno.ENOENT, f"volume id {volume_id} is gone")

    def _check_free(self, name: str) -> None:
        if name in self.by_name:
            raise ModelError(errno.EEXIST, f"a VM named {name!r} already exists")
        if name in self.aliases:
            raise ModelError(errno.EEXIST, f"an alias named {name!r} already exists")
        if name in self.reserved:
            raise ModelError(errno.EEXIST, f"a VM named {name!r} is being created")

    def _check_writable(self, vm: Vm, action: str) -> None:
        if vm.immutable:
            raise ModelError(errno.EROFS, f"cannot {action}: VM {vm.name!r} is immutable")
        if vm.state != "halted":
            raise ModelError(errno.EBUSY, f"cannot {action}: VM {vm.name!r} is {vm.state}")

    # Plans

    def plan_create_vm(self, raw_name: str | bytes) -> CreateVm:
        """Check the name and reserve it until :meth:`add_vm` or :meth:`release`."""
        name = check_vm_name(raw_name)
        self._check_free(name)
        self.reserved.add(name)
        return CreateVm(name, DEFAULT_VOLUMES)

    def plan_delete_vm(self, name: str) -> DeleteVm:
        vm = self.get(name)
        if vm.state != "halted":
            raise ModelError(errno.EBUSY, f"cannot delete VM {name!r}: it is {vm.state}")
        self._check_deletable(vm)
        return DeleteVm(
            vm.id,
            vm.name,
            tuple(v.id for v in vm.volumes.values())
            + tuple(v.id for ss in vm.savestates.values() for v in ss.volumes.values()),
            new_origin=vm.origin_id,
            reparent=tuple(c.id for c in self.clones_of(vm)),
            aliases=self._aliases_standing_for(vm_id=vm.id),
            images=tuple(ss.image for ss in vm.savestates.values()),
        )

    def plan_hide(self, name: str) -> HideVm:
        vm = self.get(name)
        self._check_deletable(vm)
        return HideVm(
            vm.id,
            vm.name,
            hidden_name=f"{HIDDEN_PREFIX}{vm.id}-{vm.name}",
            new_origin=vm.origin_id,
            # Its running instances stay its clones: they are what keeps it.
            reparent=tuple(c.id for c in self.clones_of(vm) if not self.is_instance(c)),
            aliases=self._aliases_standing_for(vm_id=vm.id),
        )

    def apply_hide(self, plan: HideVm) -> None:
        vm = self.get_by_id(plan.vm_id)
        for alias_id in plan.aliases:
            self.remove_alias(alias_id)
        for child in plan.reparent:
            self.by_id[child].origin_id = plan.new_origin
        del self.by_name[vm.name]
        vm.name = plan.hidden_name
        self.by_name[vm.name] = vm  # users cannot make names starting with "."
        vm.hidden = True
        vm.props["volatile"] = "1"

    def plan_instance(self, source_name: str, kind: str, number: int) -> CloneVm:
        """``NAME-instN`` or ``NAME-dispN`` (volatile): a linked clone made by the system."""
        source = self.get(source_name)
        if kind not in ("inst", "disp", "hot"):
            raise ModelError(errno.EINVAL, f"no instance kind {kind!r}")
        # The runner of a hot savestate is hidden: a name no user can make or see.
        stem, _ = self.instance_stem(source)
        name = (
            f"{HOT_RUNNER_PREFIX}{source.id}-{number}"
            if kind == "hot"
            else f"{stem}-{kind}{number}"
        )
        self._check_free(name)
        self.reserved.add(name)
        props = inherited(source.props)
        props.pop("hot_savestate", None)
        if kind in ("disp", "hot"):
            props["volatile"] = "1"
        hot = source.savestates.get(HOT_LABEL) if kind != "hot" else None
        # From a hot savestate, the instance's disks are the savestate's: they match its memory.
        origin_volumes = hot.volumes.values() if hot is not None else source.volumes.values()
        policies = {vol.name: vol.policy for vol in source.volumes.values()}
        volumes = tuple(
            (vol.id, VolumeSpec(vol.name, vol.size, policies.get(vol.name, vol.policy)))
            for vol in sorted(origin_volumes, key=lambda v: v.name)
        )
        return CloneVm(source.id, name, volumes, props, ())

    def plan_clone(self, source_name: str, raw_new: str | bytes, replace: bool = False) -> CloneVm:
        """A linked clone of every volume; reserves the new name."""
        source = self.get(source_name)
        name = check_vm_name(raw_new)
        self._check_free(name)
        self.reserved.add(name)
        volumes = tuple(
            (vol.id, VolumeSpec(vol.name, vol.size, vol.policy))
            for vol in sorted(source.volumes.values(), key=lambda v: v.id)
        )
        props = inherited(source.props)
        reparent = tuple(c.id for c in self.clones_of(source)) if replace else ()
        return CloneVm(source.id, name, volumes, props, reparent)

    def clones_of(self, vm: Vm) -> list[Vm]:
        return sorted(
            (c for c in self.by_id.values() if c.origin_id == vm.id and not c.hidden),
            key=lambda c: c.id,
        )

    # Versions and templates

    def versions_of(self, head: Vm, hidden: bool = False) -> list[Vm]:
        """A versioned VM's versions, oldest first (with ``hidden``, also those waiting to go)."""
        return sorted(
            (
                v
                for v in self.by_id.values()
                if v.version_of == head.id and (hidden or not v.hidden)
            ),
            key=lambda v: v.version,
        )

    def system_alias_of(self, head: Vm) -> Alias | None:
        """The alias NAME that names the newest version of the head NAME-next."""
        versions = {v.id for v in self.versions_of(head, hidden=True)}
        for alias in self.aliases_by_id.values():
            if alias.system and alias.target_vm in versions:
                return alias
        return None

    def newest_version(self, head: Vm) -> Vm | None:
        alias = self.system_alias_of(head)
        return None if alias is None or alias.target_vm is None else self.by_id[alias.target_vm]

    def head_of(self, vm: Vm) -> Vm | None:
        return None if vm.version_of is None else self.by_id.get(vm.version_of)

    @staticmethod
    def base_name(head: Vm) -> str:
        return head.name.removesuffix("-next") if head.versioned else head.name

    def instance_stem(self, source: Vm) -> tuple[str, int]:
        """The name an instance of ``source`` is numbered after, and whose counter it uses:
        a version's instances are NAME-instN and NAME-dispN, counted per versioned VM."""
        head = self.head_of(source)
        return (self.base_name(head), head.id) if head is not None else (source.name, source.id)

    def plan_version(self, head_id: int, number: int) -> MakeVersion:
        """The next version of ``head_id``; the first one also makes it versioned."""
        head = self.get_by_id(head_id)
        if head.hidden:
            raise ModelError(errno.ENOENT, f"VM {head.name!r} is being deleted")
        if head.volatile:
            raise ModelError(
                errno.EINVAL, f"VM {head.name!r} is volatile (it goes when it stops): no versions"
            )
        if head.immutable or head.version_of is not None:
            raise ModelError(
                errno.EROFS, f"cannot make versions of VM {head.name!r}: it is immutable"
            )
        if head.state in ("starting", "stopping"):
            raise ModelError(errno.EBUSY, f"cannot commit VM {head.name!r}: it is {head.state}")
        alias = self.system_alias_of(head) if head.versioned else None
        if head.versioned:
            base, head_name = self.base_name(head), head.name
        else:
            base, head_name = head.name, f"{head.name}-next"
            self._check_free(head_name)
        name = f"{base}-v{number}"
        self._check_free(name)
        if alias is None and head.versioned:
            self._check_free(base)  # the alias was lost: the commit makes it again
        self.reserved.add(name)
        if not head.versioned:
            self.reserved.add(head_name)
        volumes = tuple(
            (vol.id, VolumeSpec(vol.name, vol.size, vol.policy))
            for vol in sorted(head.volumes.values(), key=lambda v: v.id)
        )
        props = {**inherited(head.props), "immutable": "1"}
        reparent = tuple(sorted(c.id for c in self.by_id.values() if c.origin_id == head.id))
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

    def apply_version(self, plan: MakeVersion, version: Vm, alias: Alias | None) -> None:
        """Record what a commit made: ``version`` is in the namespace; ``alias`` is new."""
        head = self.get_by_id(plan.head_id)
        self.reserved.discard(plan.head_name)
        if head.name != plan.head_name:
            del self.by_name[head.name]
            head.name = plan.head_name
            self.by_name[head.name] = head
        head.props["versioned"] = "1"
        version.version_of = head.id
        version.version = plan.number
        head.origin_id = version.id
        if alias is not None:
            self.add_alias(alias)
        elif plan.alias_id is not None:
            moved = self.aliases_by_id[plan.alias_id]
            moved.target_vm, moved.target_alias = version.id, None

    def plan_unversion(self, head_id: int) -> Unversion:
        head = self.get_by_id(head_id)
        if not head.versioned:
            raise ModelError(errno.EINVAL, f"VM {head.name!r} is not versioned")
        versions = self.versions_of(head, hidden=True)
        alias = self.system_alias_of(head)
        busy = [f"{v.name}: {'; '.join(self.needs_of(v))}" for v in versions if self.needs_of(v)]
        users = [u.name for v in versions for u in self.template_users(vm_id=v.id)]
        if alias is not None:
            users += [u.name for u in self.template_users(alias_id=alias.id)]
        if busy or users:
            raise ModelError(
                errno.EBUSY,
                f"cannot clear versioned on {head.name!r}: its versions are in use ("
                + "; ".join(busy + [f"{u} has it as its template" for u in sorted(set(users))])
                + ")",
            )
        base = self.base_name(head)
        if alias is None:
            self._check_free(base)
        retarget = tuple(
            sorted(
                a.id
                for a in self.aliases_by_id.values()
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

    def apply_unversion(self, plan: Unversion) -> None:
        head = self.get_by_id(plan.head_id)
        for alias_id in plan.retarget:
            retargeted = self.aliases_by_id[alias_id]
            retargeted.target_vm, retargeted.target_alias = head.id, None
        if plan.alias_id is not None:
            self.remove_alias(plan.alias_id)
        del self.by_name[head.name]
        head.name = plan.base
        self.by_name[head.name] = head
        head.props.pop("versioned", None)
        for vm_id in plan.versions:
            self.by_id[vm_id].version_of = None

    def prunable(self, head: Vm) -> list[Vm]:
        """Versions older than the newest that go when history is not kept (a version
        named directly as some VM's template stays until that changes)."""
        newest = self.newest_version(head)
        return [
            v
            for v in self.versions_of(head)
            if newest is not None and v.version < newest.version and not self.template_users(v.id)
        ]

    @staticmethod
    def is_instance(vm: Vm) -> bool:
        """Made by the system to run another VM: NAME-instN, NAME-dispN, a hot runner."""
        return bool(_INSTANCE_RE.search(vm.name)) or vm.name.startswith(".hot-")

    def needs_of(self, vm: Vm) -> list[str]:
        """What keeps a VM from being destroyed now (it becomes volatile instead)."""
        reasons = [f"it is {vm.state}"] if vm.state != "halted" else []
        for other in self.by_id.values():
            if other.state != "halted" and other.origin_id == vm.id and self.is_instance(other):
                reasons.append(f"its instance {other.name} is {other.state}")
            if other.state != "halted" and other.template_used == vm.id and other.id != vm.id:
                reasons.append(f"{other.name} runs from it as its template")
            for ss in other.savestates.values():
                if ss.info.get("template_version") == vm.id:
                    reasons.append(f"savestate {other.name}/{ss.label} records it")
        return reasons

    def collectable(self) -> list[Vm]:
        """VMs removed while still needed that nothing needs any more."""
        return [
            vm
            for vm in self.by_id.values()
            if vm.name.startswith(HIDDEN_PREFIX) and vm.volatile and not self.needs_of(vm)
        ]

    def template_users(self, vm_id: int | None = None, alias_id: int | None = None) -> list[Vm]:
        """VMs whose template link names this VM or alias itself."""
        return sorted(
            (
                vm
                for vm in self.by_id.values()
                if vm.template is not None
                and (
                    (vm_id is not None and vm.template.target_vm == vm_id)
                    or (alias_id is not None and vm.template.target_alias == alias_id)
                )
            ),
            key=lambda v: v.id,
        )

    def template_name(self, link: TemplateLink) -> str:
        if link.target_vm is not None:
            return self.get_by_id(link.target_vm).name
        assert link.target_alias is not None
        return self.aliases_by_id[link.target_alias].name

    def resolve_template(self, vm: Vm) -> Vm | None:
        """The VM a template link stands for now (an alias: the version it names now)."""
        if vm.template is None:
            return None
        return self.resolve(self.template_name(vm.template))

    def plan_set_template(self, vm_id: int, raw_target: str | bytes) -> TemplateLink:
        """``ln -s ../fedora work/template``: the target names a VM or an alias."""
        vm = self.get_by_id(vm_id)
        self._check_writable(vm, "change its template")
        target = _decode(raw_target, "template target").removeprefix("../")
        if target.startswith("/") or "/" in target or target in (".", "..", ""):
            raise ModelError(
                errno.EINVAL,
                f"template target {target!r} must name a VM or alias, as ../NAME",
            )
        if target in self.aliases:
            link = TemplateLink(None, self.aliases[target].id)
        elif target in self.by_name and not self.by_name[target].hidden:
            link = TemplateLink(self.by_name[target].id, None)
        else:
            raise ModelError(errno.EINVAL, f"template target {target!r} names no VM or alias")
        if self.resolve(target).id == vm.id:
            raise ModelError(errno.EINVAL, f"VM {vm.name!r} cannot be its own template")
        return link

    def check_template_removable(self, vm_id: int) -> None:
        self._check_writable(self.get_by_id(vm_id), "remove its template")

    def _check_deletable(self, vm: Vm) -> None:
        """What rmdir refuses: a versioned head, the newest version, a template in use."""
        if vm.versioned:
            raise ModelError(
                errno.EBUSY,
                f"{vm.name!r} is the head of versioned VM {self.base_name(vm)!r}: "
                "clear user.vmtree.versioned first",
            )
        head = self.head_of(vm)
        if head is not None and self.newest_version(head) is vm:
            raise ModelError(
                errno.EBUSY,
                f"{vm.name!r} is the newest version of {self.base_name(head)!r} "
                "(the alias names it): commit a newer one first",
            )
        users = self.template_users(vm_id=vm.id)
        for alias_id in self._aliases_standing_for(vm_id=vm.id):
            users += self.template_users(alias_id=alias_id)
        if users:
            raise ModelError(
                errno.EBUSY,
                f"VM {vm.name!r} is the template of {', '.join(sorted({u.name for u in users}))}",
            )

    def visible(self) -> list[Vm]:
        """The VMs with a name at the top level (not the hidden volatile ones)."""
        return [vm for vm in self.by_id.values() if not vm.hidden]

    # Aliases

    def get_alias(self, name: str) -> Alias:
        try:
            return self.aliases[name]
        except KeyError:
            raise ModelError(errno.ENOENT, f"there is no alias named {name!r}") from None

    def alias_target_name(self, alias: Alias) -> str:
        """What the symlink reads: the current name of the VM or alias it stands for."""
        if alias.target_vm is not None:
            return self.get_by_id(alias.target_vm).name
        assert alias.target_alias is not None
        return self.aliases_by_id[alias.target_alias].name

    def resolve(self, name: str) -> Vm:
        """The VM a name stands for, following aliases."""
        seen = 0
        while name in self.aliases:
            seen += 1
            if seen > MAX_ALIAS_CHAIN:
                raise ModelError(errno.ELOOP, f"alias chain from {name!r} is too long")
            name = self.alias_target_name(self.aliases[name])
        return self.get(name)

    def _aliases_standing_for(
        self, vm_id: int | None = None, alias_id: int | None = None
    ) -> tuple[int, ...]:
        """Every alias that ends at this VM or alias, the ones named by others last."""
        doomed: list[int] = []
        frontier_vm = {vm_id} if vm_id is not None else set()
        frontier_alias = {alias_id} if alias_id is not None else set()
        while True:
            found = sorted(
                a.id
                for a in self.aliases_by_id.values()
                if a.id not in doomed
                and (a.target_vm in frontier_vm or a.target_alias in frontier_alias)
            )
            if not found:
                break
            doomed.extend(found)
            frontier_vm = set()
            frontier_alias = set(found)
        return tuple(reversed(doomed))

    def _check_alias_target(self, raw_target: str | bytes) -> tuple[int | None, int | None]:
        target = _decode(raw_target, "alias target")
        if target.startswith("/"):
            raise ModelError(
                errno.EINVAL, f"alias target {target!r} is absolute: name a VM or alias"
            )
        if "/" in target or target in (".", ".."):
            raise ModelError(
                errno.EINVAL,
                f"alias target {target!r} is a path: name a VM or alias, with no '/' or '..'",
            )
        if target in self.by_name:
            return self.by_name[target].id, None
        if target in self.aliases:
            return None, self.aliases[target].id
        raise ModelError(errno.EINVAL, f"alias target {target!r} names no VM or alias")

    def plan_create_alias(self, raw_name: str | bytes, raw_target: str | bytes) -> CreateAlias:
        name = check_vm_name(raw_name)
        self._check_free(name)
        target_vm, target_alias = self._check_alias_target(raw_target)
        self.reserved.add(name)
        return CreateAlias(name, target_vm, target_alias)

    def plan_remove_alias(self, name: str) -> RemoveAlias:
        alias = self.get_alias(name)
        if alias.system:
            raise ModelError(
                errno.EPERM, f"alias {name!r} is kept by the system (it names the latest version)"
            )
        if self._aliases_standing_for(alias_id=alias.id):
            raise ModelError(
                errno.EBUSY, f"alias {name!r} is named by other aliases; remove those first"
            )
        users = self.template_users(alias_id=alias.id)
        if users:
            raise ModelError(
                errno.EBUSY,
                f"alias {name!r} is the template of {', '.join(u.name for u in users)}",
            )
        return RemoveAlias(alias.id, name)

    def plan_rename_alias(self, old: str, raw_new: str | bytes) -> RenameAlias | ReplaceAlias:
        """A rename to a new name, or over an existing user alias (the atomic repoint)."""
        alias = self.get_alias(old)
        new = check_vm_name(raw_new)
        if new == old:
            return RenameAlias(alias.id, old, new)
        if alias.system:
            raise ModelError(errno.EPERM, f"alias {old!r} is kept by the system")
        replaced = self.aliases.get(new)
        if replaced is None:
            self._check_free(new)
            self.reserved.add(new)
            return RenameAlias(alias.id, old, new)
        if replaced.system:
            raise ModelError(errno.EPERM, f"alias {new!r} is kept by the system")
        retarget = tuple(
            sorted(a.id for a in self.aliases_by_id.values() if a.target_alias == replaced.id)
        )
        # Follow the kept alias's chain as it will be: it must end at a VM.
        targets = {a.id: a.target_alias for a in self.aliases_by_id.values()}
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

    def add_alias(self, alias: Alias) -> None:
        self.reserved.discard(alias.name)
        if alias.name in self.aliases or alias.name in self.by_name:
            raise ModelError(errno.EEXIST, f"name {alias.name!r} is already taken")
        self.aliases[alias.name] = alias
        self.aliases_by_id[alias.id] = alias

    def remove_alias(self, alias_id: int) -> None:
        alias = self.aliases_by_id.pop(alias_id)
        del self.aliases[alias.name]

    def apply_rename_alias(self, plan: RenameAlias) -> None:
        alias = self.aliases_by_id[plan.alias_id]
        self.reserved.discard(plan.new)
        del self.aliases[plan.old]
        alias.name = plan.new
        self.aliases[plan.new] = alias

    def apply_replace_alias(self, plan: ReplaceAlias) -> None:
        kept = self.aliases_by_id[plan.keep_id]
        self.remove_alias(plan.drop_id)
        for alias_id in plan.retarget:
            self.aliases_by_id[alias_id].target_alias = plan.keep_id
        del self.aliases[kept.name]
        kept.name = plan.name
        self.aliases[plan.name] = kept

    # Properties

    def plan_set_property(self, vm_name: str, name: str, value: str | None) -> SetProperty:
        vm = self.get(vm_name)
        if vm.version_of is not None and name in ("immutable", "versioned"):
            raise ModelError(errno.EROFS, f"{vm_name!r} is a version: versions stay immutable")
        # How the VM is run may change; what it is may not.
        if vm.immutable and name not in ("immutable", "hot_savestate", "ready"):
            raise ModelError(
                errno.EROFS, f"cannot change {name} of VM {vm_name!r}: it is immutable"
            )
        if name == "immutable" and value == "1" and vm.versioned:
            raise ModelError(
                errno.EINVAL,
                f"{vm_name!r} is the head of a versioned VM: it stays writable "
                "(its versions are immutable)",
            )
        if name == "immutable" and value == "1" and vm.state != "halted":
            raise ModelError(errno.EBUSY, f"cannot make VM {vm_name!r} immutable: it is {vm.state}")
        if name == "immutable" and value != "1" and vm.immutable:
            running = [
                c.name for c in self.by_id.values() if c.origin_id == vm.id and c.state != "halted"
            ]
            if running or vm.savestates:
                raise ModelError(
                    errno.EBUSY,
                    f"cannot make VM {vm_name!r} writable: "
                    + (f"instances {', '.join(sorted(running))} run from it" if running else "")
                    + (" and " if running and vm.savestates else "")
                    + (f"{len(vm.savestates)} savestates record it" if vm.savestates else ""),
                )
        return SetProperty(vm.id, name, value)

    def apply_set_property(self, plan: SetProperty) -> None:
        vm = self.get_by_id(plan.vm_id)
        if plan.value is None:
            vm.props.pop(plan.name, None)
        else:
            vm.props[plan.name] = plan.value

    def plan_rename_vm(self, old: str, raw_new: str | bytes) -> RenameVm:
        vm = self.get(old)
        new = check_vm_name(raw_new)
        if new == old:
            return RenameVm(vm.id, old, new)
        if vm.versioned or vm.version_of is not None:
            raise ModelError(
                errno.EPERM,
                f"{old!r} belongs to a versioned VM, whose names the system keeps "
                "(clear user.vmtree.versioned to rename it)",
            )
        self._check_free(new)
        self.reserved.add(new)
        return RenameVm(vm.id, old, new)

    def plan_create_volume(self, vm_name: str, raw_filename: str | bytes) -> CreateVolume:
        vm = self.get(vm_name)
        name = check_volume_filename(raw_filename)
        if name in vm.volumes:
            raise ModelError(errno.EEXIST, f"VM {vm_name!r} already has a volume {name!r}")
        self._check_writable(vm, f"create volume {name!r}")
        return CreateVolume(vm.id, VolumeSpec(name, 0, "persistent"))

    def plan_delete_volume(self, vm_name: str, vol_name: str) -> DeleteVolume:
        vm = self.get(vm_name)
        vol = self.volume(vm, vol_name)
        self._check_writable(vm, f"delete volume {vol_name!r}")
        return DeleteVolume(vm.id, vol.id, vol.name)

    def plan_rename_volume(
        self, vm_name: str, vol_name: str, raw_new_filename: str | bytes
    ) -> RenameVolume:
        vm = self.get(vm_name)
        vol = self.volume(vm, vol_name)
        new = check_volume_filename(raw_new_filename)
        if new != vol_name and new in vm.volumes:
            raise ModelError(errno.EEXIST, f"VM {vm_name!r} already has a volume {new!r}")
        self._check_writable(vm, f"rename volume {vol_name!r}")
        return RenameVolume(vm.id, vol.id, vol_name, new)

    def plan_resize_volume(self, vm_name: str, vol_name: str, new_size: int) -> ResizeVolume:
        vm = self.get(vm_name)
        vol = self.volume(vm, vol_name)
        self._check_writable(vm, f"resize volume {vol_name!r}")
        if new_size < vol.size:
            raise ModelError(
                errno.EINVAL,
                f"cannot shrink volume {vm_name}/{vol_name} from {vol.size} to {new_size} bytes: "
                "volumes only grow",
            )
        check_volume_size(new_size)
        return ResizeVolume(vm.id, vol.id, vol.size, new_size)

    def check_volume_write(self, vm_name: str, vol_name: str) -> Volume:
        """May this volume's data be changed now? Returns the volume."""
        vm = self.get(vm_name)
        vol = self.volume(vm, vol_name)
        self._check_writable(vm, f"write to volume {vol_name!r}")
        return vol

    # Applying what was carried out

    def add_vm(self, vm: Vm) -> None:
        self.reserved.discard(vm.name)
        vm.hidden = vm.hidden or vm.name.startswith(".")
        if vm.name in self.by_name or vm.name in self.aliases or vm.id in self.by_id:
            raise ModelError(errno.EEXIST, f"VM {vm.name!r} (id {vm.id}) is already present")
        self.by_name[vm.name] = vm
        self.by_id[vm.id] = vm
        for vol in vm.volumes.values():
            self._volume_owner[vol.id] = vm.id

    def release(self, name: str) -> None:
        """Give back a name reserved by a plan that was not carried out."""
        self.reserved.discard(name)

    def remove_vm(self, vm_id: int) -> Vm:
        """Forget a VM; its clones move to its origin and the aliases standing for it go."""
        vm = self.get_by_id(vm_id)
        for alias_id in self._aliases_standing_for(vm_id=vm_id):
            self.remove_alias(alias_id)
        del self.by_id[vm_id]
        del self.by_name[vm.name]
        for vol in vm.volumes.values():
            self._volume_owner.pop(vol.id, None)
        for savestate in vm.savestates.values():
            self._savestate_owner.pop(savestate.id, None)
            for vol in savestate.volumes.values():
                self._savestate_volume_owner.pop(vol.id, None)
        for other in self.by_id.values():
            if other.origin_id == vm_id:
                other.origin_id = vm.origin_id
        return vm

    def set_origin(self, vm_id: int, origin_id: int | None) -> None:
        self.get_by_id(vm_id).origin_id = origin_id

    def apply_rename_vm(self, plan: RenameVm) -> None:
        vm = self.get_by_id(plan.vm_id)
        self.reserved.discard(plan.new)
        del self.by_name[plan.old]
        vm.name = plan.new
        self.by_name[plan.new] = vm

    def add_volume(self, vm_id: int, volume: Volume) -> None:
        vm = self.get_by_id(vm_id)
        if volume.name in vm.volumes:
            raise ModelError(errno.EEXIST, f"VM {vm.name!r} already has a volume {volume.name!r}")
        vm.volumes[volume.name] = volume
        self._volume_owner[volume.id] = vm_id

    def remove_volume(self, vm_id: int, name: str) -> None:
        vm = self.get_by_id(vm_id)
        vol = self.volume(vm, name)
        del vm.volumes[name]
        self._volume_owner.pop(vol.id, None)

    def apply_rename_volume(self, plan: RenameVolume) -> None:
        vm = self.get_by_id(plan.vm_id)
        vol = vm.volumes.pop(plan.old)
        vol.name = plan.new
        vm.volumes[plan.new] = vol

    def apply_resize_volume(self, plan: ResizeVolume) -> None:
        _, vol = self.volume_by_id(plan.volume_id)
        vol.size = plan.new_size
