"""Benchmarks of the harness's training and evaluation paths (`python -m bench.run`); not part of the tests."""
