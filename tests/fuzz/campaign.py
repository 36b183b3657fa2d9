"""``make fuzz``: each target in turn for FUZZ_SECONDS (default 180), with a table at the end.

New inputs go to ``build/fuzz/corpus/NAME`` (kept between runs, so a campaign goes on
from the last), never to the committed seeds; a crash's input is written to
``build/fuzz/crash-NAME-*`` and the campaign fails. ``FUZZ_TARGETS=a,b`` runs some.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT / "tests" / "fuzz" / "corpus"
WORK = ROOT / "build" / "fuzz"
_DONE_RE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_STATS_RE = re.compile(r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")


def fuzz(name: str, seconds: int) -> tuple[int, str, float]:
    """Run one target; its return code, its output and how long it ran."""
    corpus = WORK / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        name,
        f"-max_total_time={seconds}",
        f"-artifact_prefix={WORK}/crash-{name}-",
        "-print_final_stats=1",
        str(corpus),
        str(SEEDS / name),
    ]
    started = time.monotonic()
    with scratch() as env:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


@contextlib.contextmanager
def scratch() -> Iterator[dict[str, str]]:
    """The environment of a target's process, with a scratch directory it removes after."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="vmtree-fuzz-", dir=shm) as directory:
        yield {**os.environ, "VMTREE_FUZZ_SCRATCH": directory}


def figures(output: str) -> tuple[str, str, str, str]:
    """Executions, edge coverage, features and corpus size from libFuzzer's last status line."""
    found = _DONE_RE.findall(output) or _STATS_RE.findall(output)
    return found[-1] if found else ("?", "?", "?", "?")


def main() -> int:
    seconds = int(os.environ.get("FUZZ_SECONDS", "180"))
    chosen = [n for n in os.environ.get("FUZZ_TARGETS", ",".join(TARGETS)).split(",") if n]
    rows, failed = [], []
    for name in chosen:
        print(f"fuzz {name} for {seconds} s ...", flush=True)
        rc, output, took = fuzz(name, seconds)
        execs, cov, ft, corp = figures(output)
        crashes = 0 if rc == 0 else 1
        if rc != 0:
            failed.append(name)
            print(output[-4000:], file=sys.stderr)
        rows.append((name, f"{took:.0f}", execs, cov, ft, corp, str(crashes)))
        print(f"  {name}: {execs} executions, cov {cov}, ft {ft}, corpus {corp}, rc {rc}")
    head = ("target", "seconds", "executions", "cov", "ft", "corpus", "crashes")
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if failed:
        print(f"crashes in {', '.join(failed)}: inputs in {WORK}/crash-*", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
