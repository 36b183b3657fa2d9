"""The ``console:REGEX`` readiness pattern, matched by RE2 in time linear in the console.

The console holds what the guest wrote and the pattern what a user set, and Python's
``re`` backtracks: ``(a|aa)+b``, or a plain ``.*login`` over one long line a guest
printed, can keep it searching for hours, and the search holds the GIL, so no
thread or timeout would free the daemon. RE2 never backtracks; it has no
backreferences or lookarounds, and it refuses a pattern whose program would need more
than :data:`MAX_MEMORY` (``(a{999}){999}``) at compile time.
"""

from __future__ import annotations

from typing import Protocol

import re2  # google-re2

MAX_MEMORY = 8 << 20
"""Bytes RE2 may use for one pattern's program; what needs more does not compile."""


class ConsolePattern(Protocol):
    def search(self, text: bytes) -> object | None: ...


class BadPattern(ValueError):
    """RE2 refused the pattern; the message is its reason."""


def compile_pattern(pattern: str) -> ConsolePattern:
    """The pattern as the console is searched with it: bytes, read as Latin-1, so that
    any byte a guest prints is one character and no console is invalid input."""
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    options.max_mem = MAX_MEMORY
    options.log_errors = False  # the reason goes into the EINVAL, not onto stderr
    try:
        compiled: ConsolePattern = re2.compile(pattern.encode("latin-1"), options)
    except re2.error as e:
        reason = e.args[0] if e.args else "refused"
        if isinstance(reason, bytes):
            reason = reason.decode("latin-1")
        raise BadPattern(str(reason)) from None
    except UnicodeEncodeError:
        raise BadPattern("it holds characters outside Latin-1") from None
    return compiled


def found(pattern: ConsolePattern, console: bytes) -> bool:
    return pattern.search(console) is not None
