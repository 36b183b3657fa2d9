"""Benchmarks: programs run by hand (``python -m tests.bench.NAME``), not collected by pytest."""
