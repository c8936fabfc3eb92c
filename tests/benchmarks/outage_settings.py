"""Settings of the outage benchmark (:mod:`tests.benchmarks.outage`): the benchmark's, with every
mail counted (one line per message in ``$BENCH_MAIL_LOG``, written by all the worker processes)."""

from __future__ import annotations

from tests.benchmarks.settings import *  # noqa: F403

EMAIL_BACKEND = "tests.benchmarks.outage_tasks.CountingBackend"
