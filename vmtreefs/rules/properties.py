"""VM and volume properties, shown as ``user.vmtree.*`` extended attributes; no I/O.

Each property is declared once here with its default, whether a user may set
it, and the check its value must pass, so the filesystem only translates
between xattr calls and these rules.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.console import BadPattern, compile_pattern

PREFIX = "user.vmtree."
MAX_VALUE_BYTES = 1024
POLICY = "policy"

# Properties a linked clone does not take from its source.
NOT_INHERITED = frozenset({"versioned", "immutable", "volatile"})


def _decode(raw: bytes, name: str) -> str:
    if len(raw) > MAX_VALUE_BYTES:
        raise VmtreeError(
            errno.EINVAL, f"value of {name} is {len(raw)} bytes, over {MAX_VALUE_BYTES}"
        )
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise VmtreeError(errno.EINVAL, f"value of {name} is not ASCII") from None
    text = text.removesuffix("\n")
    if not text.isprintable():
        raise VmtreeError(errno.EINVAL, f"value of {name} holds control characters")
    return text


def _flag(name: str, text: str) -> str:
    if text not in ("0", "1"):
        raise VmtreeError(errno.EINVAL, f"{name} must be 0 or 1, not {text!r}")
    return text


def _integer(low: int, high: int) -> Callable[[str, str], str]:
    def check(name: str, text: str) -> str:
        if not re.fullmatch(r"[0-9]{1,10}", text):
            raise VmtreeError(
                errno.EINVAL, f"{name} must be a whole number from {low} to {high}, not {text!r}"
            )
        value = int(text)
        if not low <= value <= high:
            raise VmtreeError(errno.EINVAL, f"{name} must be from {low} to {high}, not {value}")
        return str(value)

    return check


def _choice(*choices: str) -> Callable[[str, str], str]:
    def check(name: str, text: str) -> str:
        if text not in choices:
            raise VmtreeError(
                errno.EINVAL, f"{name} must be one of {', '.join(choices)}, not {text!r}"
            )
        return text

    return check


MAX_READY_DELAY = 3600
MAX_READY_REGEX = 256


READY_AGENT = "agent"
"""``ready`` value: the VM is ready when its QEMU guest agent answers ``guest-ping``."""


def _ready(name: str, text: str) -> str:
    if text == READY_AGENT:
        return text
    kind, sep, arg = text.partition(":")
    if sep and kind == "delay":
        return "delay:" + _integer(0, MAX_READY_DELAY)(name, arg)
    if sep and kind == "console" and arg:
        if len(arg) > MAX_READY_REGEX:
            raise VmtreeError(
                errno.EINVAL, f"{name} pattern is {len(arg)} characters, over {MAX_READY_REGEX}"
            )
        try:  # as the console is searched
            compile_pattern(arg)
        except BadPattern as e:
            raise VmtreeError(
                errno.EINVAL, f"{name} pattern {arg!r} is not an RE2 regex: {e}"
            ) from None
        return text
    raise VmtreeError(
        errno.EINVAL, f"{name} must be console:REGEX, delay:SECONDS or agent, not {text!r}"
    )


@dataclass(frozen=True)
class Property:
    name: str
    default: str
    check: Callable[[str, str], str] | None  # None: read-only, computed by vmtreefs
    why_read_only: str = ""

    @property
    def writable(self) -> bool:
        return self.check is not None

    @property
    def xattr(self) -> str:
        return PREFIX + self.name


VM_PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        Property("immutable", "0", _flag),
        Property("versioned", "0", _flag),
        Property("preserve_history", "0", _flag),
        Property("hot_savestate", "0", _flag),
        Property("commit", "shutdown", _choice("shutdown", "manual")),
        Property("memory", "256", _integer(16, 1024 * 1024)),
        Property("vcpus", "1", _integer(1, 512)),
        Property("ready", "console:VMTREE-READY", _ready),
        Property("volatile", "0", None, "volatile is set by vmtreefs when a VM waits to go"),
        Property("created", "", None, "created is the time the VM was made"),
        Property("id", "", None, "id is vmtreefs' own number for the VM"),
        Property("usage", "", None, "usage is measured by the engine"),
    )
}

VOLUME_POLICIES = ("persistent", "template", "volatile")
VOLUME_PROPERTIES: dict[str, Property] = {
    POLICY: Property(POLICY, "persistent", _choice(*VOLUME_POLICIES)),
}


def lookup(table: Mapping[str, Property], raw_name: bytes) -> Property | None:
    """The property an xattr name refers to, or None when it is not one of ours."""
    name = raw_name.decode("utf-8", "replace")
    if not name.startswith(PREFIX):
        return None
    return table.get(name[len(PREFIX) :])


def is_ours(raw_name: bytes) -> bool:
    return raw_name.startswith(PREFIX.encode())


def check_value(prop: Property, raw_value: bytes) -> str:
    """The normalised value to store, or a refusal (EPERM read-only, EINVAL bad value)."""
    if prop.check is None:
        raise VmtreeError(errno.EPERM, f"{prop.xattr} is read-only: {prop.why_read_only}")
    text = _decode(raw_value, prop.xattr)
    value = prop.check(prop.xattr, text)
    return value


def unknown(raw_name: bytes) -> VmtreeError:
    """Setting a name we do not know: ENOTSUP, as the contract says."""
    name = raw_name.decode("utf-8", "backslashreplace")
    if is_ours(raw_name):
        return VmtreeError(errno.ENOTSUP, f"{name[:80]!r} is not a vmtreefs property")
    return VmtreeError(errno.ENOTSUP, f"only {PREFIX}* attributes can be set, not {name[:80]!r}")


def inherited(props: dict[str, str]) -> dict[str, str]:
    """What a linked clone takes from its source."""
    return {k: v for k, v in props.items() if k not in NOT_INHERITED}
