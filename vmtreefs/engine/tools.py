"""Running the system tools the engines drive (mount, losetup, mkfs.xfs, dmsetup, thin_*).

One wrapper for every engine, so a failure always reads the same way: an
:class:`EngineError` whose reason carries the tool's own words, and whose errno
says what kind of failure it was when the words make that clear.
"""

from __future__ import annotations

import errno
import subprocess
from collections.abc import Sequence

from vmtreefs.engine.base import EngineError

COMMAND_TIMEOUT = 300.0


def errno_of(message: str) -> int:
    """The errno a tool's error message stands for; EIO when it says nothing clearer."""
    lowered = message.lower()
    if "no space" in lowered or "out of data space" in lowered:
        return errno.ENOSPC
    if "no data available" in lowered or "does not exist" in lowered or "not found" in lowered:
        return errno.ENOENT
    if "file exists" in lowered or "already exists" in lowered:
        return errno.EEXIST
    if "busy" in lowered:
        return errno.EBUSY
    return errno.EIO


def run(argv: Sequence[str], what: str | None = None) -> str:
    """Run a tool and return its output; a failure is an EngineError with its own words."""
    what = what or f"'{' '.join(argv)}'"
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise EngineError(errno.ENOENT, f"{what}: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise EngineError(
            errno.ETIMEDOUT, f"{what}: {argv[0]} did not finish in {COMMAND_TIMEOUT:.0f} s"
        ) from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().replace("\n", "; ")
        raise EngineError(errno_of(detail), f"{what}: {detail or f'exit {done.returncode}'}")
    return done.stdout
