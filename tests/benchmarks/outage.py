"""``python -m tests.benchmarks.outage [--rounds 3] [--n 10000] [--ok-n 2000]``: what the outage
guard costs and what it saves (issue #12), on PostgreSQL + Redis.

* **Success path, guard on vs off**: one ``celery worker --pool=prefork --concurrency=2``,
  ``--ok-n`` tasks that succeed, interleaved rounds (as ``make bench``).  The guard counts runs in
  memory and writes them every 2 s per process.
* **An outage across ``--n`` objects on 2 workers × 2 children**: every task fails (the upstream
  is down).  Guard on (the defaults): the outage starts after 10 failing objects, its victims are
  re-activated, no failure deactivates nor mails.  Guard off: every failure deactivates its
  object and sends its mail, as before the guard.  Failures/s (first task's start to last task's
  end, recording included), mails sent, objects left active.

Between rounds the table is reset and the guard's state of the task deleted.  Needs
``DATABASE_URL`` (PostgreSQL) and a ``redis://`` ``CELERY_BROKER_URL``; uses the database
``$BENCH_DATABASE`` (default ``cd_bench_outage``, created if missing) and Redis database
``$BENCH_REDIS_DB`` (default: the broker URL's).  Prints a Markdown table and writes it to
``tests/benchmarks/outage_results.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).with_name("outage_results.md")

SUCCESS = ("bench.outage_guard_ok", "bench.outage_noguard_ok")
OUTAGE = ("bench.outage_guard_fail", "bench.outage_noguard_fail")


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def configure() -> None:
    """The benchmark's own database and Redis database, then Django."""
    database, broker = os.environ.get("DATABASE_URL"), os.environ.get("CELERY_BROKER_URL", "")
    if not database or not broker.startswith("redis://"):
        raise SystemExit("needs DATABASE_URL (postgresql://) and CELERY_BROKER_URL (redis://)")
    name = os.environ.get("BENCH_DATABASE", "cd_bench_outage")
    parts = urlsplit(database)
    import psycopg

    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if not exists.fetchone():
            connection.execute(f'CREATE DATABASE "{name}"')
    redis = urlsplit(broker)
    if os.environ.get("BENCH_REDIS_DB"):
        redis = redis._replace(path="/" + os.environ["BENCH_REDIS_DB"])
    os.environ.update(
        BENCH_DATABASE_URL=urlunsplit(parts._replace(path="/" + name)),
        BENCH_BROKER_URL=urlunsplit(redis),
        DJANGO_SETTINGS_MODULE="tests.benchmarks.outage_settings",
        CELERY_DB_REUSE_MAX=os.environ.get("CELERY_DB_REUSE_MAX", "1000"),
    )
    for key in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
        os.environ.pop(key, None)


class Workers:
    """``count`` prefork workers of two children each on the benchmark's queue."""

    def __init__(self, workdir: Path, count: int) -> None:
        from tests.benchmarks import stats

        self.stats = stats
        self.workdir = workdir
        self.stats_path = str(workdir / "stats")
        stats.create(self.stats_path)
        self.map = stats.open_map(self.stats_path)
        self.gate = workdir / "gate"
        self.children = 2 * count
        self.mail_log = workdir / "mails"
        self.procs = []
        for number in range(count):
            log_file = open(workdir / f"worker{number}.log", "w")  # noqa: SIM115
            env = dict(os.environ, BENCH_STATS=self.stats_path, BENCH_MAIL_LOG=str(self.mail_log))
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "tests.benchmarks.outage_tasks",
                        "worker",
                        "--pool=prefork",
                        "--concurrency=2",
                        "--prefetch-multiplier=1",  # each worker takes two of the gates
                        "--loglevel=ERROR",
                        "-Q",
                        "bench",
                        "-n",
                        f"outage{number}@%h",
                        "--without-gossip",
                        "--without-mingle",
                        "--without-heartbeat",
                    ],
                    env=env,
                    cwd=ROOT,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            )

    def run(self, task: Any, pks: list[int], *, count_queries: bool = False) -> dict[str, float]:
        """Hold every child, queue the tasks, let them go; rate, queries, mails of the round."""
        from celery_deactivate.dispatch import publish_pks
        from tests.benchmarks.outage_tasks import gate

        for path in self.workdir.glob("gate*"):
            path.unlink()
        self.mail_log.write_text("")
        for _ in range(self.children):
            gate.delay(str(self.gate))
        self._wait(lambda: len(list(self.workdir.glob("gate.started.*"))) >= self.children, 120)
        self.stats.reset(self.map)
        self.stats.set_counting(self.map, count_queries)
        publish_pks(task, iter([pks]))
        self.gate.touch()
        self._wait(lambda: self.stats.totals(self.map).tasks >= len(pks), 900)
        total = self.stats.totals(self.map)
        return {
            "rate": total.tasks / (total.last - total.first),
            "queries": total.queries / total.tasks,
            "mails": len(self.mail_log.read_text().splitlines()),
        }

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited ({proc.returncode}); see {self.workdir}")
            if time.monotonic() > deadline:
                for path in sorted(self.workdir.glob("worker*.log")):
                    log("\n".join([f"--- {path.name}", *path.read_text().splitlines()[-20:]]))
                started = len(list(self.workdir.glob("gate.started.*")))
                raise RuntimeError(f"timed out ({started} of {self.children} children held)")
            time.sleep(0.005)

    def stop(self) -> None:
        self.gate.touch()
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def reset(n: int, task_name: str) -> list[int]:
    """Every object active, nothing counted; none of the guard's state for ``task_name``."""
    from django.db import connection

    from celery_deactivate.models import TaskFailure, TaskRuns, TaskState
    from tests.testapp.models import Feed

    if Feed.objects.count() != n:
        Feed.objects.all().delete()
        Feed.objects.bulk_create([Feed(title=f"feed {i}") for i in range(n)], batch_size=2000)
    Feed.objects.update(
        active=True, error=False, error_message="", failure_count=0, deactivated_at=None
    )
    for table in (TaskState, TaskRuns, TaskFailure):
        table.objects.filter(task=task_name).delete()
    with connection.cursor() as cursor:
        for model in (Feed, TaskState, TaskRuns, TaskFailure):
            cursor.execute(f"VACUUM {model._meta.db_table}")
    return list(Feed.objects.order_by("pk").values_list("pk", flat=True))


def interleaved(
    workers: Workers, names: tuple[str, ...], n: int, rounds: int
) -> dict[str, list[dict[str, float]]]:
    """A counting warm-up pass, then ``rounds`` rounds, forwards then backwards."""
    from tests.testapp.models import Feed

    app = workers_app()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    queries = {}
    for name in names:
        pks = reset(n, name)
        queries[name] = workers.run(app.tasks[name], pks[: max(50, n // 20)], count_queries=True)[
            "queries"
        ]
    for round_ in range(1, rounds + 1):
        for name in names if round_ % 2 else names[::-1]:
            pks = reset(n, name)
            result = workers.run(app.tasks[name], pks)
            result["active"] = Feed.objects.filter(active=True).count()
            result["queries"] = queries[name]
            results[name].append(result)
            log(
                f"round {round_} {name}: {result['rate']:,.0f}/s, {result['mails']} mails, "
                f"{result['active']:,} active"
            )
    return results


def workers_app() -> Any:
    from tests.benchmarks.outage_tasks import app

    return app


def ratios(rows: list[dict[str, float]], base: list[dict[str, float]]) -> list[float]:
    return [r["rate"] / b["rate"] for r, b in zip(rows, base, strict=True)]


def ratio(rows: list[dict[str, float]], base: list[dict[str, float]]) -> str:
    """The median of the per-round ratios, and their range."""
    each = ratios(rows, base)
    return f"{statistics.median(each):.3f} ({min(each):.2f}–{max(each):.2f})"


def report(
    args: argparse.Namespace,
    success: dict[str, list[dict[str, float]]],
    outage: dict[str, list[dict[str, float]]],
) -> str:
    def med(rows: list[dict[str, float]], field: str) -> float:
        return statistics.median(row[field] for row in rows)

    on_ok, off_ok = success[SUCCESS[0]], success[SUCCESS[1]]
    on, off = outage[OUTAGE[0]], outage[OUTAGE[1]]
    lines = [
        "# Outage guard benchmark",
        "",
        f"{datetime.date.today().isoformat()} · `python -m tests.benchmarks.outage "
        f"--rounds {args.rounds} --n {args.n} --ok-n {args.ok_n}` · {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, PostgreSQL + Redis. Medians of {args.rounds} interleaved rounds; "
        "ratios are medians of the per-round ratios; queries per task from a counting warm-up "
        "pass (the timed rounds run without the counting wrapper).",
        "",
        f"Success path, 1 worker × 2 children, {args.ok_n:,} tasks:",
        "",
        "| guard | tasks/s | × off (per round) | queries/task |",
        "|---|---:|---:|---:|",
        f"| on (defaults) | {med(on_ok, 'rate'):,.0f} | {ratio(on_ok, off_ok)} | "
        f"{med(on_ok, 'queries'):.2f} |",
        f"| off | {med(off_ok, 'rate'):,.0f} | 1 | {med(off_ok, 'queries'):.2f} |",
        "",
        f"Outage: {args.n:,} objects, every task fails, 2 workers × 2 children:",
        "",
        "| guard | failures/s | × off (per round) | mails sent | objects left active "
        "| queries/task |",
        "|---|---:|---:|---:|---:|---:|",
        f"| on (defaults) | {med(on, 'rate'):,.0f} | {ratio(on, off)} | "
        f"{med(on, 'mails'):,.0f} | {med(on, 'active'):,.0f} | {med(on, 'queries'):.2f} |",
        f"| off | {med(off, 'rate'):,.0f} | 1 | {med(off, 'mails'):,.0f} | "
        f"{med(off, 'active'):,.0f} | {med(off, 'queries'):.2f} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10000, help="objects of the outage")
    parser.add_argument("--ok-n", type=int, default=2000, help="tasks of a success round")
    parser.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    args = parser.parse_args(argv)
    configure()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)
    app = workers_app()
    app.loader.import_default_modules()
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("bench")
    with tempfile.TemporaryDirectory(prefix="cd-bench-outage-") as folder:
        workers = Workers(Path(folder), 1)
        try:
            success = interleaved(workers, SUCCESS, args.ok_n, args.rounds)
        finally:
            workers.stop()
        workers = Workers(Path(folder), 2)
        try:
            outage = interleaved(workers, OUTAGE, args.n, args.rounds)
        finally:
            workers.stop()
    text = report(args, success, outage)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
