"""Benchmarks of the sender (issue 6): run ``python -m tests.bench.bench_sender [--quick]``."""
