"""What the benchmark measures: the scenarios, the order they run in, and what is compared.

A scenario is one task (``bench.<kind>_<path>`` in :mod:`tests.benchmarks.tasks`) on one path.
Plain data, no Django: the runner, the worker-side driver and the in-process profiler share it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The kinds of task, in the order the table shows them.
KINDS = {
    "plain": "plain task",
    "recipe": "recipe",
    "peer": "recipe + active check (peer)",
    "deactivating": "DeactivatingTask (drop-in)",
    "object": "DeactivatingTask, pass-object",
}

#: The paths, in the order the table shows them: ``ok`` and ``io`` succeed, ``fail`` raises,
#: ``mix`` raises on one object in :data:`MIX_EVERY` (for good: the same ones every round) and
#: succeeds on the others.
PATHS = {
    "ok": "success",
    "fail": "failure",
    "io": "success, 5 ms body",
    "mix": "5 % failing for good",
}

#: On the ``mix`` path, the objects whose position in the table is a multiple of this fail.
MIX_EVERY = 20

#: The order a round runs each path's scenarios in (reversed every other round): every pair of
#: :data:`COMPARISONS` runs back to back but the recipe and the plain task (one scenario between).
RUN_ORDER = ("peer", "deactivating", "recipe", "object", "plain")

#: Worker processes of the benchmark worker (``--concurrency``), unless told otherwise.
CONCURRENCY = 2


@dataclass(frozen=True)
class Scenario:
    kind: str
    path: str

    @property
    def task(self) -> str:
        return f"bench.{self.kind}_{self.path}"

    @property
    def label(self) -> str:
        return KINDS[self.kind]

    @property
    def fails(self) -> bool:
        return self.path == "fail"

    def failing(self, pks: list[int]) -> set[int]:
        """The objects of ``pks`` whose task fails on this path."""
        if self.path == "fail":
            return set(pks)
        if self.path == "mix":
            return set(pks[::MIX_EVERY])
        return set()


#: Every scenario, in the table's order.
SCENARIOS = [Scenario(kind, path) for path in PATHS for kind in KINDS]


def run_order(paths: list[str] | None = None) -> list[Scenario]:
    """One round's scenarios (forwards), path by path."""
    return [Scenario(kind, path) for path in paths or PATHS for kind in RUN_ORDER]


@dataclass(frozen=True)
class Comparison:
    """``kind`` against ``base`` on one path: a throughput ratio and the time added per task."""

    path: str
    kind: str
    base: str
    #: What the comparison tells a user, for the report.
    means: str


COMPARISONS = [
    Comparison("ok", "deactivating", "peer", "the drop-in vs the same guarantee written by hand"),
    Comparison("ok", "deactivating", "recipe", "the drop-in vs the recipe (no active check)"),
    Comparison("ok", "object", "recipe", "pass-object vs the recipe"),
    Comparison("fail", "deactivating", "recipe", "failure: the drop-in vs the recipe"),
    Comparison("fail", "object", "recipe", "failure: pass-object vs the recipe"),
    Comparison("io", "recipe", "plain", "5 ms body: the recipe vs a plain task"),
    Comparison("io", "deactivating", "recipe", "5 ms body: the drop-in vs the recipe"),
    Comparison("io", "deactivating", "peer", "5 ms body: the drop-in vs the peer"),
    Comparison("io", "object", "recipe", "5 ms body: pass-object vs the recipe"),
    Comparison(
        "mix", "deactivating", "recipe", "the defaults, 5 % failing: the drop-in vs the recipe"
    ),
    Comparison("mix", "object", "recipe", "the defaults, 5 % failing: pass-object vs the recipe"),
]
