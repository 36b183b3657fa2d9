"""The fuzz targets: one function a parser, each fed the bytes libFuzzer makes.

Each asserts its parser's contract: a value, or the project's refusal
(:class:`VmtreeError` with a known errno and a reason; ``ValueError`` where the
parser documents it), never any other exception; where there is a writer for
what is read, what it writes reads back the same. ``tests/fuzz/run.py`` runs one
under atheris; ``corpus/NAME/`` holds a few valid inputs for each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vmtreefs import saveimage
from vmtreefs.app.daemon import parse_mount_options
from vmtreefs.engine.dmthin import PoolStatus, parse_thin_delta
from vmtreefs.engine.dmthin.devices import parse_thin_status
from vmtreefs.engine.dmthin.metadata import parse_thin_ls
from vmtreefs.engine.select import EngineConfig, parse_size
from vmtreefs.errors import VmtreeError
from vmtreefs.rules import blockmap, console, domain, status
from vmtreefs.rules.aliases import check_alias_target
from vmtreefs.rules.commands import (
    GLOBAL_COMMANDS,
    MAX_SHUTDOWN_TIMEOUT,
    VM_COMMANDS,
    check_no_args,
    check_usage,
    parse_clone_args,
    parse_command,
    parse_grow_pool_args,
    parse_restore_args,
    parse_revert_args,
    parse_save_args,
    parse_shutdown_args,
    parse_version,
)
from vmtreefs.rules.names import (
    check_savestate_label,
    check_vm_name,
    check_volume_filename,
    is_instance_name,
)
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Alias, Vm
from vmtreefs.rules.properties import (
    MAX_VALUE_BYTES,
    VM_PROPERTIES,
    VOLUME_PROPERTIES,
    check_value,
    lookup,
    unknown,
)

Target = Callable[[bytes], None]


@contextlib.contextmanager
def refusals(*documented: type[Exception]) -> Iterator[None]:
    """A refusal ends the input's run; it must carry a known errno and a reason."""
    try:
        yield
    except VmtreeError as e:
        assert e.errno in errno.errorcode and e.reason, repr(e)
    except documented as e:
        assert str(e), repr(e)


def text_of(data: bytes) -> str:
    """What a file or an argv holds, as Python reads it (undecodable bytes kept)."""
    return data.decode("utf-8", "surrogateescape")


# The ctl grammar and what its arguments name


KNOWN = VM_COMMANDS | GLOBAL_COMMANDS


def ctl(data: bytes) -> None:
    with refusals():
        command = parse_command(data, KNOWN)
        assert parse_command(str(command).encode() + b"\n", KNOWN) == command
        ctl_args(command.verb, command.args)


def ctl_args(verb: str, args: tuple[str, ...]) -> None:
    if verb == "clone":
        name, _ = parse_clone_args(args)
        assert check_vm_name(name) == name
    elif verb in ("gc", "commit"):
        check_usage(verb, args)
    elif verb == "grow-pool":
        size = parse_grow_pool_args(args)
        if size is not None:
            n = parse_size(size)
            assert n > 0 and parse_size(str(n)) == n
    elif verb == "revert":
        n = parse_version(parse_revert_args(args))
        assert n >= 0 and parse_version(f"v{n}") == n
    elif verb == "shutdown":
        assert 0 <= parse_shutdown_args(args) <= MAX_SHUTDOWN_TIMEOUT
    elif verb == "save":
        label, _ = parse_save_args(args)
        assert label is None or check_savestate_label(label) == label
    elif verb == "restore":
        label = parse_restore_args(args)
        assert label is None or check_savestate_label(label) == label
    else:
        check_no_args(verb, args)


def mount_options(data: bytes) -> None:
    """``-o`` groups as argv brings them: NUL between arguments."""
    with refusals():
        parse_mount_options([text_of(group) for group in data.split(b"\0")])


# Properties (xattrs), names and alias targets


def properties(data: bytes) -> None:
    """``NAME=VALUE``: an xattr name and the value written to it, for VMs and volumes."""
    name, _, value = data.partition(b"=")
    for table in (VM_PROPERTIES, VOLUME_PROPERTIES):
        prop = lookup(table, name)
        if prop is None:
            assert unknown(name).errno == errno.ENOTSUP
            continue
        with refusals():
            normal = check_value(prop, value)
            assert len(normal) <= MAX_VALUE_BYTES
            assert check_value(prop, normal.encode()) == normal
            if prop.name == "ready" and normal.startswith("console:"):
                console.compile_pattern(normal.removeprefix("console:"))  # as hot.py does


def _namespace() -> Namespace:
    ns = Namespace()
    ns.add_vm(Vm(1, "work", 1.0))
    ns.add_alias(Alias(1, "latest", 1, None))
    ns.add_alias(Alias(2, "chain", None, 1))
    return ns


NAMESPACE = _namespace()


def names(data: bytes) -> None:
    """A name from the kernel (bytes) and from a ctl word (str): VM, volume, label, alias."""
    for raw in (data, text_of(data)):
        with refusals():
            name = check_vm_name(raw)
            assert check_vm_name(name) == name and not is_instance_name(name)
        with refusals():
            volume = check_volume_filename(raw)
            assert check_volume_filename(volume + ".img") == volume
        with refusals():
            label = check_savestate_label(raw)
            assert check_savestate_label(label) == label
        with refusals():
            vm_id, alias_id = check_alias_target(NAMESPACE, raw)
            assert (vm_id is None) != (alias_id is None)


# domain.xml: checked, rendered for libvirt, retargeted from a save image

IDENTITY = domain.Identity("vmtree-t-1", domain.domain_uuid("t", 1), "/run/console-1.log")
DISKS = [
    domain.Disk("root", "/dev/mapper/root", block=True, readonly=True),
    domain.Disk("private", "/s/private.img", block=False),
]
OTHER = domain.Identity("vmtree-t-2", domain.domain_uuid("t", 2), "/run/console-2.log")
OTHER_DISKS = [domain.Disk(d.volume, d.path + "-2", d.block, d.readonly) for d in DISKS]


def domain_xml(data: bytes) -> None:
    """A user's ``domain.xml``; and the same text as a save image's description."""
    with refusals(UnicodeDecodeError):
        saved = data.decode("utf-8")  # libvirt hands the saved description on as UTF-8
        domain.saved_name(saved)
        domain.retarget(saved, OTHER, OTHER_DISKS)
    try:
        base = domain.check_base(data)
    except VmtreeError as e:
        assert e.errno in (errno.EINVAL, errno.EFBIG), repr(e)
        return
    # An accepted base renders, the result is a base too, and it retargets.
    rendered = domain.render(base, IDENTITY, 256, 2, DISKS)
    assert domain.check_base(rendered.encode()) == rendered
    assert domain.saved_name(rendered) == IDENTITY.name
    moved = domain.retarget(rendered, OTHER, OTHER_DISKS)
    assert domain.saved_name(moved) == OTHER.name
    assert domain.render(rendered, IDENTITY, 256, 2, DISKS) == rendered


# The libvirt save image header

SCRATCH = Path(os.environ.get("VMTREE_FUZZ_SCRATCH") or tempfile.gettempdir())
"""Where the save image target writes its two files (the callers remove the directory)."""


def save_image(data: bytes) -> None:
    """A file that may be crafted: read, rewritten into a copy, read back; was_running set."""
    image, copy = SCRATCH / f"image-{os.getpid()}.save", SCRATCH / f"copy-{os.getpid()}.save"
    image.write_bytes(data)
    copy.unlink(missing_ok=True)
    assert saveimage.is_complete(image) == data.startswith(saveimage.MAGIC)
    try:
        header = saveimage.read_header(image)
    except VmtreeError as e:
        assert e.errno == errno.EINVAL and e.reason, repr(e)
        return
    made = saveimage.rewrite_xml(image, copy, header.xml)
    assert saveimage.read_header(copy) == made
    assert dataclasses.replace(made, cookie_offset=header.cookie_offset) == header
    assert copy.read_bytes()[made.stream_offset :] == data[header.stream_offset :]
    saveimage.set_running(image, not header.was_running)
    assert saveimage.read_header(image).was_running != header.was_running


# Change maps and .vmtree/status


def change_map(data: bytes) -> None:
    """``VOL.changes/OTHER`` read back; and the map of two volumes laid out by the input."""
    with refusals(ValueError):
        ranges = blockmap.parse(text_of(data))
        assert all(offset >= 0 and length >= 0 for offset, length in ranges)
        assert blockmap.parse(blockmap.text(ranges)) == ranges
    sizes, a, b = _layouts(data)
    changed = blockmap.differences(a, sizes[0], b, sizes[1])
    assert changed == blockmap.merge(changed)
    assert all(o >= 0 and o + n <= sizes[0] for o, n in changed)
    covered = {x for o, n in changed for x in range(o, o + n)}
    for x in range(sizes[0]):
        if _where(a, x) != (_where(b, x) if x < sizes[1] else None):
            assert x in covered, (x, changed)
    assert blockmap.differences(a, sizes[0], a, sizes[0]) == []


def _layouts(data: bytes) -> tuple[tuple[int, int], list[blockmap.Mapping], list[blockmap.Mapping]]:
    """Two sizes below 256 and two lists of non-overlapping mappings, from the bytes."""
    head = data[:2].ljust(2, b"\0")
    layouts: list[list[blockmap.Mapping]] = [[], []]
    pos = [0, 0]
    for i in range(2, len(data) - 2, 3):
        side = data[i] & 1
        gap, length, physical = data[i] >> 5, data[i + 1] % 32, data[i + 2]
        start = pos[side] + gap
        layouts[side].append(
            blockmap.Mapping(start, length, None if physical < 32 else physical * 64)
        )
        pos[side] = start + length
    return (head[0], head[1]), layouts[0], layouts[1]


def _where(mappings: list[blockmap.Mapping], x: int) -> int | None:
    for m in mappings:
        if m.logical <= x < m.end:
            return None if m.physical is None else m.physical + x - m.logical
    return None


def status_file(data: bytes) -> None:
    """``.vmtree/status`` read back; any fields written come back as they were."""
    with refusals(ValueError):
        fields = status.parse(text_of(data))
        assert status.parse(status.render(fields)) == fields
    written = [(f"key_{i}", v) for i, v in enumerate(text_of(data).split("\0"))]
    rendered = status.render(written)
    rendered.encode("utf-8")  # the file's bytes
    assert status.parse(rendered) == written


# What the dm-thin tools and the kernel print


def dmthin(data: bytes) -> None:
    """A pool status line, a thin device's, thin_ls's table and thin_delta's XML."""
    try:
        text = data.decode("utf-8")  # as engine.tools.run hands the tools' output on
    except UnicodeDecodeError:
        return
    with refusals():
        PoolStatus.parse(text)
    with refusals():
        mapped, highest = parse_thin_status(text.split("\n"), "vmtree-t-1")
        assert mapped >= 0 and highest >= 0
    with refusals():
        for dev, (used, exclusive) in parse_thin_ls(text).items():
            assert dev >= 0 and used >= 0 and exclusive >= 0
    with refusals():
        ranges = parse_thin_delta(text)
        assert ranges == blockmap.merge(ranges)
        assert all(o >= 0 and n > 0 for o, n in ranges)


def engine_config(data: bytes) -> None:
    """The engine config the store in SOURCE records: a damaged SOURCE may hold anything."""
    with refusals():
        config = EngineConfig.from_json(text_of(data))
        assert EngineConfig.from_json(config.to_json()) == config


TARGETS: dict[str, Target] = {
    "ctl": ctl,
    "mount_options": mount_options,
    "properties": properties,
    "names": names,
    "domain": domain_xml,
    "saveimage": save_image,
    "change_map": change_map,
    "status": status_file,
    "dmthin": dmthin,
    "engine_config": engine_config,
}
