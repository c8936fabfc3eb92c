"""Benchmarks: ``python -m tests.benchmarks.run`` (``make bench``); see README_SECTION.md."""
