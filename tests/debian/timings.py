"""How long the Debian suite's steps took: figures for docs/benchmarks.md, not assertions.

A module of its own, so that the tests and the conftest (which pytest imports
under another name) note into one :data:`TIMINGS`.
"""

from __future__ import annotations


class Timings:
    """Seconds that steps took, by name; printed at the end of the session."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}

    def add(self, what: str, seconds: float) -> None:
        self.seen.setdefault(what, []).append(seconds)

    def lines(self) -> list[str]:
        return [
            f"{what}: " + ", ".join(f"{s:.1f}" for s in values) + " s"
            for what, values in self.seen.items()
        ]


TIMINGS = Timings()
