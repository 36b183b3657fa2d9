"""Run one fuzz target under atheris: ``python -m tests.fuzz.run NAME [libFuzzer flags] [DIRS]``.

The parsers are imported inside ``instrument_imports`` so libFuzzer sees their
branches (the coverage it reports is of vmtreefs' parsers, not of the harness). atheris ends the
process (libFuzzer's exit), so callers run this in a subprocess of its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

# The parsers' modules are instrumented, the rest of vmtreefs (which app.daemon imports)
# is not: that saves seconds at each start. atheris includes whole top-level packages,
# so the others are named one by one to be left out.
PARSERS = {
    *(f"vmtreefs.rules.{m}" for m in ("commands", "properties", "names", "aliases")),
    *(f"vmtreefs.rules.{m}" for m in ("domain", "blockmap", "status")),
    *(f"vmtreefs.engine.dmthin.{m}" for m in ("pool", "metadata", "devices")),
    "vmtreefs.saveimage",
    "vmtreefs.engine.select",
    "vmtreefs.app.daemon",
}
PACKAGE = Path(__file__).resolve().parents[2] / "vmtreefs"
OTHERS = [
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in PACKAGE.rglob("*.py")
]

with atheris.instrument_imports(
    include=["vmtreefs"], exclude=[m for m in OTHERS if m not in PARSERS]
):
    from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
