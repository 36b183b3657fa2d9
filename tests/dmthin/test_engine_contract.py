"""The dm-thin engine against a real kernel's dm-thin: the engine contract tests and the
end-to-end story through a FUSE mount, run inside a guest (or natively where the host
kernel has dm-thin). Nothing may be skipped there: a skip would hide a missing kernel.

The run itself (``dmthin_contract``, tests/dmthin/conftest.py) starts early, alongside
the host's tests, and this test collects its result at the end of the session."""

from __future__ import annotations

from tests.helpers.guest import PytestReport


def test_dmthin_engine_in_a_real_kernel(dmthin_contract: PytestReport) -> None:
    report = dmthin_contract
    out = report.result.script_output
    assert report.tests >= 40, out
    assert (report.failures, report.errors, report.skipped) == (0, 0, 0), out
    assert report.result.returncode == 0, out
