"""What a backup tool does with a change map, in memory, for the tests to compare."""

from __future__ import annotations

from collections.abc import Iterable

from vmtreefs.rules.blockmap import Range


def rebuild(older: bytes, newer: bytes, ranges: Iterable[Range]) -> bytes:
    """``older`` resized to ``newer``'s length, with ``newer``'s bytes in ``ranges``."""
    data = bytearray(older[: len(newer)])
    data.extend(bytes(len(newer) - len(data)))
    for offset, length in ranges:
        assert offset >= 0 and offset + length <= len(data), (offset, length)
        data[offset : offset + length] = newer[offset : offset + length]
    return bytes(data)
