"""Parsing of what is written to a ``ctl`` file, with no I/O.

A write is one command line. The grammar is checked here once, at the
boundary, so the rest of the code only ever sees a well-formed :class:`Command`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vmtreefs.errors import VmtreeError

MAX_CTL_WRITE = 4096

VM_COMMANDS = frozenset(
    {
        "start",
        "disposable",
        "shutdown",
        "kill",
        "pause",
        "resume",
        "save",
        "restore",
        "commit",
        "revert",
        "clone",
    }
)
GLOBAL_COMMANDS = frozenset({"gc", "grow-pool"})


@dataclass(frozen=True)
class Command:
    verb: str
    args: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.verb, *self.args))


def parse_command(data: bytes, known: frozenset[str]) -> Command:
    """One command line from one write(2); refusals carry the errno the writer sees."""
    if len(data) > MAX_CTL_WRITE:
        raise VmtreeError(
            errno.EFBIG, f"control write of {len(data)} bytes is over {MAX_CTL_WRITE} bytes"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise VmtreeError(errno.EINVAL, "control command is not ASCII text") from None
    if text.endswith("\n"):
        text = text[:-1]
    if "\n" in text or "\r" in text or "\0" in text:
        raise VmtreeError(errno.EINVAL, "control write holds more than one line")
    if not text.isprintable():
        raise VmtreeError(errno.EINVAL, "control command holds control characters")
    words = text.split()
    if not words:
        raise VmtreeError(errno.EINVAL, "empty control command")
    verb, *args = words
    if verb not in known:
        raise VmtreeError(
            errno.EINVAL,
            f"unknown command {verb[:32]!r}; known: {', '.join(sorted(known))}",
        )
    return Command(verb, tuple(args))
