"""The mounts this process sees, from /proc/self/mountinfo."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, reduced to what vmtreefs needs."""

    mount_point: str
    fstype: str
    source: str
    device: str  # MAJOR:MINOR, st_dev of the files below mount_point


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[MountEntry]:
    """Every mount this process sees, in mount order (a later entry covers an earlier one)."""
    entries: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-", 6)
            except ValueError:
                continue
            if len(fields) < sep + 3:
                continue
            entries.append(
                MountEntry(
                    mount_point=unescape(fields[4]),
                    fstype=fields[sep + 1],
                    source=unescape(fields[sep + 2]),
                    device=fields[2],
                )
            )
    return entries


def mounted_at(mount_point: str, fstype: str) -> MountEntry | None:
    """The newest mount of ``fstype`` exactly at ``mount_point``."""
    found = None
    for entry in mounts():
        if entry.mount_point == mount_point and entry.fstype == fstype:
            found = entry
    return found
