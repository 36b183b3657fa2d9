"""The ``.vmtree/status`` format: ``KEY: VALUE``, one field a line; no I/O.

A value may hold what a path or a reason holds (a SOURCE named with a newline,
a backslash, or bytes that are not UTF-8), so each is written escaped the way
/proc/self/mountinfo escapes: a backslash, a control character or a byte that is
not UTF-8 (a surrogate escape, as ``os.fsdecode`` makes) as ``\\ooo``, its octal.
Every field stays one line of UTF-8, and a reader gets back what was written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_KEY_RE = re.compile(r"[a-z][a-z0-9_]*\Z")
_ESCAPED_RE = re.compile(r"[\\\x00-\x1f\x7f\udc80-\udcff]")
_SURROGATE_RE = re.compile(r"[\ud800-\udfff]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
_ESCAPE_RE = re.compile(r"\\([0-3][0-7]{2})")
_SURROGATE_BASE = 0xDC00  # os.fsdecode's escape of byte B is chr(0xDC00 + B), B >= 0x80


def _escape(value: str) -> str:
    def octal(m: re.Match[str]) -> str:
        code = ord(m.group(0))
        return f"\\{code - _SURROGATE_BASE if code > 0xFF else code:03o}"

    return _SURROGATE_RE.sub("\ufffd", _ESCAPED_RE.sub(octal, value))


def _unescape(m: re.Match[str]) -> str:
    code = int(m.group(1), 8)
    return chr(code + _SURROGATE_BASE if code >= 0x80 else code)


def render(fields: Iterable[tuple[str, object]]) -> str:
    """The status text of ``(key, value)`` fields, in order (a key may repeat)."""
    lines = []
    for key, value in fields:
        if not _KEY_RE.match(key):
            raise ValueError(f"status key {key!r} is not [a-z][a-z0-9_]*")
        lines.append(f"{key}: {_escape(str(value))}\n")
    return "".join(lines)


def parse(text: str) -> list[tuple[str, str]]:
    """The fields of a status text; ValueError for a line that is not ``KEY: VALUE``.

    A value's ``\\ooo`` below 200 is that character, and from 200 the surrogate
    escape of that byte (what ``os.fsdecode`` gives for it).
    """
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    fields = []
    for line in lines:
        key, sep, value = line.partition(": ")
        if not sep or not _KEY_RE.match(key):
            raise ValueError(f"status line {line[:80]!r} is not KEY: VALUE")
        if _CONTROL_RE.search(value):
            raise ValueError(f"status line {line[:80]!r} holds a control character")
        fields.append((key, _ESCAPE_RE.sub(_unescape, value)))
    return fields
