"""A short, seeded run of every fuzz target (``make fuzz`` is the long one).

Each target runs in a subprocess of its own (atheris ends its process) for a fixed
number of inputs from a fixed seed, starting from its committed seeds: the same
inputs every run, so a failure here is reproducible with the command it prints.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.campaign import ROOT, SEEDS, figures, scratch
from tests.fuzz.targets import TARGETS

RUNS = 1000
SEED = 19


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_holds_its_contract(name: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    argv = [
        sys.executable,
        "-m",
        "tests.fuzz.run",
        name,
        f"-runs={RUNS}",
        f"-seed={SEED}",
        f"-artifact_prefix={tmp_path}/crash-",
        str(corpus),
        str(SEEDS / name),
    ]
    with scratch() as env:
        done = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120
        )
    output = done.stdout + done.stderr
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, f"{' '.join(argv)}\n{output[-3000:]}"
    executions = figures(output)[0]
    assert executions.isdigit() and int(executions) >= RUNS, output[-2000:]
