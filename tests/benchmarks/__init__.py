"""Benchmarks: ``python -m tests.benchmarks.run`` (``make bench``); see the README's Benchmarks."""
