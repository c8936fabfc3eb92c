"""Where a task's time goes, without a worker: the benchmark's tasks traced in this process.

Timing (interleaved rounds; wall time, this process's CPU and, on a local PostgreSQL, the CPU of
the server process serving the connection, read from ``/proc``)::

    python -m tests.benchmarks.inprocess [--rounds 11] [--n 500] [--path ok --path fail]

Profile (cProfile): where the drop-in's added time per task goes, against the peer (the recipe
with the same active check written by hand), on the same rows, in interleaved rounds; each
function of the library and of Django with its cumulative time per task in both, sorted by the
drop-in's cumulative time (``--sort delta``: by the time added)::

    python -m tests.benchmarks.inprocess --profile [--path ok|fail|io] [--kind deactivating]
        [--against peer] [--n 2000] [--limit 40] [--frames REGEX] [--dump DIR]

``--dump DIR`` keeps each task's profile (``DIR/<task>.prof``, for ``python -m pstats`` or a
viewer).  The backend is PostgreSQL when ``DATABASE_URL`` and ``CELERY_BROKER_URL`` are set (the
benchmark's database, see :mod:`tests.benchmarks.env`), else an SQLite file; ``--backend``
chooses.  Celery's tracer is what a pool child runs for a message: no broker and no pool here
(the worker's ``Request`` in the main process is not measured), so this is a profiling aid, not
the benchmark (``make bench``).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.benchmarks.env import backend_env, backends
from tests.benchmarks.mail import MAIL, mail_env, smtp_sink
from tests.benchmarks.scenarios import KINDS, PATHS, Scenario

#: Frames the profile shows unless ``--frames`` says otherwise.
FRAMES = r"/celery_deactivate/|/django/"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=[b["key"] for b in backends()])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--n", type=int, default=500, help="tasks per scenario and round")
    parser.add_argument("--path", action="append", choices=list(PATHS))
    parser.add_argument("--profile", action="store_true", help="profile --kind against --against")
    parser.add_argument("--kind", choices=list(KINDS), default="deactivating")
    parser.add_argument("--against", choices=list(KINDS), default="peer")
    parser.add_argument("--limit", type=int, default=40, help="functions shown")
    parser.add_argument("--frames", default=FRAMES, help="regex on the frames' file names")
    parser.add_argument("--sort", choices=["cumulative", "delta"], default="cumulative")
    parser.add_argument("--dump", type=Path, help="write each task's profile into this folder")
    parser.add_argument("--mail", choices=MAIL, default=MAIL[0], help="SMTP to a sink, or render")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    found = {b["key"]: b for b in backends()}
    backend = found[args.backend or ("pgredis" if "pgredis" in found else "embedded")]
    with tempfile.TemporaryDirectory(prefix="cd-inprocess-") as workdir, smtp_sink() as port:
        # The benchmark's settings, before Django is set up by importing the app.
        os.environ.update(backend_env(backend, workdir) | mail_env(args.mail, port))
        for name in ("DATABASE_URL", "CELERY_BROKER_URL"):
            os.environ.pop(name, None)
        os.environ["DJANGO_SETTINGS_MODULE"] = "tests.benchmarks.settings"
        return Tracing(args).profile() if args.profile else Tracing(args).timing()


class Tracing:
    """Celery's tracer on the benchmark's tasks, with the rows reset and checked around it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from celery import signals
        from celery.app.trace import build_tracer
        from django.core.management import call_command

        from tests.benchmarks import worker_run

        self.args = args
        self.app = worker_run.app
        self.worker_run = worker_run
        call_command("migrate", run_syncdb=True, verbosity=0)
        self.pks = worker_run.reset_rows(args.n)
        self.failures = 0
        signals.task_failure.connect(self._failed, weak=False)
        self.build_tracer = build_tracer
        self.server = server_cpu()

    def _failed(self, **kwargs: Any) -> None:
        self.failures += 1

    def tracer(self, scenario: Scenario) -> Callable[[], None]:
        """Run ``scenario`` once per row, as a pool child would: one call of the tracer each."""
        trace = self.build_tracer(
            scenario.task, self.app.tasks[scenario.task], app=self.app, propagate=False
        )
        ids = [str(uuid.uuid4()) for _ in self.pks]
        request = {"delivery_info": {}}

        def run() -> None:
            for task_id, pk in zip(ids, self.pks, strict=True):
                trace(task_id, (pk,), {}, request)

        return run

    def once(
        self, scenario: Scenario, run: Callable[[], None], profile: cProfile.Profile | None = None
    ) -> tuple[float, float, float]:
        """Seconds of wall, CPU and server CPU of one pass over every row, reset before and
        checked after."""
        self.worker_run.reset_rows(self.args.n, scenario)
        self.failures = 0
        if profile is not None:
            profile.enable()
        wall, cpu, server = time.perf_counter(), time.process_time(), self.server()
        run()
        wall, cpu, server = (
            time.perf_counter() - wall,
            time.process_time() - cpu,
            self.server() - server,
        )
        if profile is not None:
            profile.disable()
        self.worker_run.check(scenario, self.pks, self.failures)
        return wall, cpu, server

    # -- timing -----------------------------------------------------------------------------

    def timing(self) -> int:
        from django.db import connection

        args = self.args
        paths = args.path or ["ok", "fail"]
        scenarios = [Scenario(kind, path) for path in paths for kind in KINDS]
        runs = {s: self.tracer(s) for s in scenarios}
        samples: dict[Scenario, list[tuple[float, ...]]] = {s: [] for s in scenarios}
        n = len(self.pks)
        for round_ in range(args.rounds):
            for scenario in scenarios if round_ % 2 == 0 else scenarios[::-1]:
                wall, cpu, server = self.once(scenario, runs[scenario])
                samples[scenario].append((wall / n * 1e6, cpu / n * 1e6, server / n * 1e6))
        print(f"{connection.vendor}: {args.rounds} interleaved rounds of {n} tasks; medians")
        print(
            f"{'path':19} {'task':30} {'wall µs':>8} {'× recipe':>9} {'× peer':>7} "
            f"{'CPU µs':>7} {'server CPU µs':>14}"
        )
        for scenario in scenarios:
            rows = samples[scenario]
            print(
                f"{PATHS[scenario.path]:19} {scenario.label:30} "
                f"{statistics.median(r[0] for r in rows):8.0f} "
                f"{speed(samples, scenario, 'recipe'):9.3f} "
                f"{speed(samples, scenario, 'peer'):7.3f} "
                f"{statistics.median(r[1] for r in rows):7.0f} "
                + (
                    f"{statistics.median(r[2] for r in rows):14.0f}"
                    if connection.vendor == "postgresql"
                    else f"{'n/a':>14}"
                )
            )
        return 0

    # -- profile ----------------------------------------------------------------------------

    def profile(self) -> int:
        args = self.args
        path = (args.path or ["ok"])[0]
        pair = [Scenario(args.kind, path), Scenario(args.against, path)]
        runs = {s: self.tracer(s) for s in pair}
        profiles = {s: cProfile.Profile() for s in pair}
        plain: dict[Scenario, list[float]] = {s: [] for s in pair}
        profiled: dict[Scenario, list[float]] = {s: [] for s in pair}
        n = len(self.pks)
        for round_ in range(args.rounds):
            for scenario in pair if round_ % 2 == 0 else pair[::-1]:
                plain[scenario].append(self.once(scenario, runs[scenario])[0] / n * 1e6)
                profiled[scenario].append(
                    self.once(scenario, runs[scenario], profiles[scenario])[0] / n * 1e6
                )
        kind, base = pair
        tasks = n * args.rounds
        print(
            f"{PATHS[path]}: {kind.label} against {base.label}, {args.rounds} interleaved "
            f"rounds of {n} tasks (Celery's tracer in this process)"
        )
        for label, samples in (("without the profiler", plain), ("with it", profiled)):
            a, b = statistics.median(samples[kind]), statistics.median(samples[base])
            print(
                f"  wall per task {label}: {a:.0f} µs against {b:.0f} µs "
                f"({a - b:+.0f} µs, median of the rounds)"
            )
        stats = {s: pstats.Stats(profiles[s]) for s in pair}
        if args.dump:
            args.dump.mkdir(parents=True, exist_ok=True)
            for scenario, st in stats.items():
                st.dump_stats(args.dump / f"{scenario.task}.prof")
            print(f"  profiles: {args.dump}/<task>.prof")
        print()
        print(by_package(stats[kind], stats[base], tasks, kind.kind, base.kind))
        print()
        print(diff(stats[kind], stats[base], tasks, args, kind.kind, base.kind))
        return 0


def speed(samples: dict[Scenario, list[tuple[float, ...]]], scenario: Scenario, base: str) -> float:
    """Throughput of ``scenario`` against the ``base`` kind: the median of the per-round ratios."""
    pairs = zip(samples[Scenario(base, scenario.path)], samples[scenario], strict=True)
    return statistics.median(b[0] / r[0] for b, r in pairs)


def table_of(stats: pstats.Stats) -> dict[tuple[str, int, str], tuple[Any, ...]]:
    """pstats' table: {(file, line, function): (primitive calls, calls, own time, cumulative
    time, callers)}, kept in ``Stats.stats`` (what ``print_stats`` reads; not in typeshed)."""
    return stats.stats  # type: ignore[attr-defined, no-any-return]


def by_package(stats: pstats.Stats, base: pstats.Stats, tasks: int, a: str, b: str) -> str:
    """Own time per task (cProfile's tottime) summed by the package of each function."""
    sums: dict[str, list[float]] = {}
    for i, st in enumerate((stats, base)):
        for key, row in table_of(st).items():
            sums.setdefault(package(key[0]), [0.0, 0.0])[i] += row[2] / tasks * 1e6
    total = [sum(v[0] for v in sums.values()), sum(v[1] for v in sums.values())]
    width = max(len(name) for name in [*sums, "total"])
    head = f"{'own time per task, by package':{width}} {'µs ' + a:>16} {'µs ' + b:>12} {'added':>8}"
    lines = [head, "-" * len(head)]
    for name, (mine, theirs) in sorted(sums.items(), key=lambda kv: kv[1][1] - kv[1][0]):
        lines.append(f"{name:{width}} {mine:16.1f} {theirs:12.1f} {mine - theirs:+8.1f}")
    lines.append(f"{'total':{width}} {total[0]:16.1f} {total[1]:12.1f} {total[0] - total[1]:+8.1f}")
    return "\n".join(lines)


def package(file: str) -> str:
    """The top-level package a profiled function's file belongs to."""
    if file == "~":
        return "C functions (builtins, extensions)"
    for marker in ("site-packages/", str(Path(__file__).resolve().parents[2]) + "/"):
        if marker in file:
            return file.split(marker, 1)[1].split("/", 1)[0].removesuffix(".py")
    return "Python's standard library"


def diff(
    stats: pstats.Stats, base: pstats.Stats, tasks: int, args: argparse.Namespace, a: str, b: str
) -> str:
    """The functions whose file matches ``--frames``: calls and cumulative µs per task in both."""
    frames = re.compile(args.frames)
    mine, theirs = table_of(stats), table_of(base)
    rows = []
    for key in {*mine, *theirs}:
        if not frames.search(key[0]):
            continue
        _, calls, _, cumulative, _ = mine.get(key, (0, 0, 0.0, 0.0, {}))
        _, base_calls, _, base_cumulative, _ = theirs.get(key, (0, 0, 0.0, 0.0, {}))
        rows.append(
            (
                cumulative / tasks * 1e6,
                base_cumulative / tasks * 1e6,
                calls / tasks,
                base_calls / tasks,
                where(key),
            )
        )
    if args.sort == "delta":
        rows.sort(key=lambda r: r[0] - r[1], reverse=True)
    else:
        rows.sort(key=lambda r: r[0], reverse=True)
    width = max([len(r[4]) for r in rows[: args.limit]] + [8])
    head = (
        f"{'function':{width}} {'cum µs ' + a:>18} {'cum µs ' + b:>14} {'added':>8} "
        f"{'calls ' + a:>18} {'calls ' + b:>12}"
    )
    lines = [
        f"per task, frames matching {args.frames!r}, sorted by "
        + ("the time added" if args.sort == "delta" else f"cumulative time in {a}")
        + " (times include the profiler's own overhead)",
        head,
        "-" * len(head),
    ]
    for cum, base_cum, calls, base_calls, name in rows[: args.limit]:
        lines.append(
            f"{name:{width}} {cum:18.1f} {base_cum:14.1f} {cum - base_cum:+8.1f} "
            f"{calls:18.2f} {base_calls:12.2f}"
        )
    return "\n".join(lines)


def where(key: tuple[str, int, str]) -> str:
    """``package/module.py:line(function)``: the file from its package down."""
    file, line, function = key
    for marker in ("site-packages/", str(Path(__file__).resolve().parents[2]) + "/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({function})"


def server_cpu() -> Callable[[], float]:
    """Seconds of CPU the PostgreSQL backend of this connection has used (0 elsewhere)."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return lambda: 0.0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():  # the server runs on another machine
        return lambda: 0.0

    def read() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    return read


if __name__ == "__main__":
    sys.exit(main())
