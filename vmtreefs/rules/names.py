"""Names, sizes and labels: what a user may call a VM, a volume or a savestate; no I/O.

Each check turns what a user wrote (``str`` or the kernel's ``bytes``) into a
name, or raises :class:`ModelError` with the errno a system call gives back.
"""

from __future__ import annotations

import errno
import re

from vmtreefs.errors import VmtreeError

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


class ModelError(VmtreeError):
    """A rule of the tree refused an operation."""


def decode_name(raw: str | bytes, what: str) -> str:
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
    name = decode_name(raw, "VM name")
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
    filename = decode_name(raw, "volume file name")
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
    label = decode_name(raw, "savestate label")
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


MAX_ALIAS_CHAIN = 40  # like the kernel's limit on symlinks followed in one lookup


def is_instance_name(name: str) -> bool:
    """Made by the system to run another VM: NAME-instN, NAME-dispN, a hot runner."""
    return bool(_INSTANCE_RE.search(name)) or name.startswith(HOT_RUNNER_PREFIX)
