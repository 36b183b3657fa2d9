"""Changed-block maps: byte ranges where two volumes may differ. Pure, no I/O.

A map lists every range where the two volumes differ and may list ranges where
they do not (an engine compares where the data lives, not the data): copying the
listed ranges of volume A over a copy of volume B, resized to A's size, gives A.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Range = tuple[int, int]
"""(offset, length) in bytes."""


@dataclass(frozen=True)
class Mapping:
    """``length`` bytes from file offset ``logical`` live at ``physical`` (None: reads zeros)."""

    logical: int
    length: int
    physical: int | None

    @property
    def end(self) -> int:
        return self.logical + self.length


def merge(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, with touching and overlapping ranges joined and empty ones dropped."""
    merged: list[Range] = []
    for offset, length in sorted(r for r in ranges if r[1] > 0):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (
                last_offset,
                max(last_offset + last_length, offset + length) - last_offset,
            )
        else:
            merged.append((offset, length))
    return merged


def clip(ranges: Iterable[Range], size: int) -> list[Range]:
    """The parts of ``ranges`` below ``size``."""
    return [(o, min(o + n, size) - o) for o, n in ranges if o < size and n > 0]


def _segments(mappings: Sequence[Mapping], size: int) -> list[Mapping]:
    """[0, size) covered without gaps: holes filled in as zero mappings, the rest clipped."""
    out: list[Mapping] = []
    pos = 0
    for m in sorted(mappings, key=lambda m: m.logical):
        start, end = max(m.logical, pos), min(m.end, size)
        if end <= start:
            continue
        if start > pos:
            out.append(Mapping(pos, start - pos, None))
        physical = None if m.physical is None else m.physical + (start - m.logical)
        out.append(Mapping(start, end - start, physical))
        pos = end
    if pos < size:
        out.append(Mapping(pos, size - pos, None))
    return out


def differences(
    a: Sequence[Mapping], a_size: int, b: Sequence[Mapping], b_size: int
) -> list[Range]:
    """Where A (of ``a_size`` bytes) may differ from B, by comparing where their bytes live.

    Two ranges are the same when both read zeros, or both sit at the same physical
    address (a shared extent: copy-on-write never changes a shared block in place).
    B beyond its size reads as zeros, as a copy of B extended to A's size does.
    """
    left = _segments(a, a_size)
    right = _segments(b, min(b_size, a_size))
    if b_size < a_size:
        right.append(Mapping(b_size, a_size - b_size, None))
    changed: list[Range] = []
    i = j = 0
    pos = 0
    while pos < a_size:
        x, y = left[i], right[j]
        end = min(x.end, y.end)
        x_at = None if x.physical is None else x.physical + (pos - x.logical)
        y_at = None if y.physical is None else y.physical + (pos - y.logical)
        if x_at != y_at:
            changed.append((pos, end - pos))
        pos = end
        if x.end == end:
            i += 1
        if y.end == end:
            j += 1
    return merge(changed)


def text(ranges: Iterable[Range]) -> str:
    """The file ``VOL.changes/OTHER``: ``OFFSET LENGTH`` per line, in bytes."""
    return "".join(f"{offset} {length}\n" for offset, length in ranges)


_LINE_RE = re.compile(r"([0-9]{1,20}) ([0-9]{1,20})\Z")


def parse(data: str) -> list[Range]:
    """Read back what :func:`text` wrote (for tools and tests); ValueError for anything else,
    a negative or non-ASCII number included."""
    lines = data.split("\n")
    if lines[-1] == "":
        lines.pop()
    ranges: list[Range] = []
    for line in lines:
        match = _LINE_RE.match(line)
        if match is None:
            raise ValueError(f"change map line {line[:60]!r} is not OFFSET LENGTH")
        ranges.append((int(match.group(1)), int(match.group(2))))
    return ranges
