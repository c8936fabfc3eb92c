"""Where a task's time goes, without a worker: each scenario's task traced in this process.

``BENCH_DATABASE_URL=postgresql://... python -m tests.benchmarks.inprocess [--rounds 11] [--n 500]``

Celery's tracer (what a pool child runs for a message) is called directly on the benchmark tasks
in interleaved rounds; per task it reports the wall time, this process's CPU time and, on
PostgreSQL, the CPU time of the server process serving the connection (from ``/proc``, so
PostgreSQL must run on this machine).  No broker, no pool: a profiling aid for the success and
failure paths, not the benchmark (``make bench``) whose figures the README quotes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Callable

from tests.benchmarks.app import app

app.loader.import_default_modules()
app.finalize()

from celery.app.trace import build_tracer  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from tests.benchmarks.run import SCENARIOS  # noqa: E402
from tests.benchmarks.worker_run import reset_rows  # noqa: E402


def server_cpu() -> Callable[[], float]:
    """Seconds of CPU the PostgreSQL backend of this connection has used (0 elsewhere)."""
    if connection.vendor != "postgresql":
        return lambda: 0.0
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    ticks = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    return read


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--n", type=int, default=500, help="tasks per scenario and round")
    args = parser.parse_args()
    call_command("migrate", run_syncdb=True, verbosity=0)
    pks = reset_rows(args.n)
    tracers = {
        name: build_tracer(name, app.tasks[name], app=app, propagate=False)
        for _, _, name in SCENARIOS
    }
    server = server_cpu()
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tracers}
    for _ in range(args.rounds):
        for name, trace in tracers.items():
            reset_rows(args.n)
            wall, cpu, srv = time.perf_counter(), time.process_time(), server()
            for pk in pks:
                trace(str(uuid.uuid4()), (pk,), {}, {"delivery_info": {}})
            n = len(pks)
            samples[name].append(
                (
                    (time.perf_counter() - wall) / n * 1e6,
                    (time.process_time() - cpu) / n * 1e6,
                    (server() - srv) / n * 1e6,
                )
            )
    print(f"{connection.vendor}: {args.rounds} interleaved rounds of {args.n} tasks; medians")
    print(f"{'task':40} {'wall µs':>8} {'× recipe':>9} {'CPU µs':>7} {'server CPU µs':>14}")
    for label, path, name in SCENARIOS:
        recipe = samples[f"bench.recipe_{path}"]
        rows = samples[name]
        ratio = statistics.median(r[0] / s[0] for r, s in zip(recipe, rows, strict=True))
        print(
            f"{path + ' ' + label:40} {statistics.median(r[0] for r in rows):8.0f} "
            f"{ratio:9.3f} {statistics.median(r[1] for r in rows):7.0f} "
            f"{statistics.mean(r[2] for r in rows):14.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
