"""One backend's benchmark, run by :mod:`tests.benchmarks.run` in the backend's environment.

Starts one real prefork worker, runs every scenario in interleaved rounds, checks what each
scenario did to the rows, measures the fan-out, and prints one JSON line: per scenario and
round, tasks/s, queries/task, peak RSS; the fan-out rates; the servers' versions; the machine's
load average before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tests.benchmarks.app import app

app.loader.import_default_modules()
app.finalize()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from celery_deactivate.dispatch import DEFAULT_BATCH_SIZE  # noqa: E402
from tests.benchmarks import stats, tasks  # noqa: E402
from tests.benchmarks.scenarios import CONCURRENCY, PATHS, Scenario, run_order  # noqa: E402
from tests.testapp.models import Feed  # noqa: E402


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def reset_rows(n: int, scenario: Scenario | None = None) -> list[int]:
    """``n`` active feeds that never ran; their primary keys in order.  On the ``mix`` path the
    ones its scenario fails on are marked broken."""
    if Feed.objects.count() != n:
        Feed.objects.all().delete()
        Feed.objects.bulk_create([Feed(title=f"feed {i}") for i in range(n)], batch_size=2000)
    Feed.objects.update(
        active=True,
        error=False,
        error_message="",
        failure_count=0,
        deactivated_at=None,
        polls=0,
        behaviour="ok",
    )
    pks = list(Feed.objects.order_by("pk").values_list("pk", flat=True))
    if scenario is not None and scenario.path == "mix":
        Feed.objects.filter(pk__in=scenario.failing(pks)).update(behaviour="fail")
    if connection.vendor == "postgresql":
        # Every scenario starts from the same table: no dead row versions left by the previous
        # one (a read by primary key would walk their chains).
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM {Feed._meta.db_table}")
    return pks


def check(scenario: Scenario, pks: list[int], failures: int) -> None:
    """Fail the benchmark unless ``scenario`` did what it claims to every row of ``pks``.

    Every task on a failing object failed: the plain task's save stays, every other kind rolled
    the body back and deactivated the feed; every other task succeeded and polled its feed once.
    """
    rows = Feed.objects.filter(pk__gte=pks[0], pk__lte=pks[-1])
    failing = len(scenario.failing(pks))
    guarded = scenario.kind != "plain"
    expected = {
        "failed": failing,
        "polled once": len(pks) - failing if guarded else len(pks),
        "deactivated": failing if guarded else 0,
    }
    found = {
        "failed": failures,
        "polled once": rows.filter(polls=1).count(),
        "deactivated": rows.filter(active=False).count(),
    }
    if found != expected:
        raise RuntimeError(f"{scenario.task} on {len(pks)} feeds: {found}, expected {expected}")


def queue(task: Any, pks: list[int]) -> None:
    """One message of ``task`` per primary key, through ``apply_async`` on one producer."""
    with app.producer_or_acquire() as producer:
        batch = getattr(producer, "batch", None)  # kombu >= 5.7: pipelined where it can
        with batch() if batch else contextlib.nullcontext():
            for pk in pks:
                task.apply_async((pk,), producer=producer, add_to_parent=False)


def purge(queue: str) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


class Worker:
    def __init__(self, workdir: Path, concurrency: int) -> None:
        self.concurrency = concurrency
        self.stats_path = str(workdir / "stats")
        stats.create(self.stats_path)
        self.map = stats.open_map(self.stats_path)
        self.gate = str(workdir / "gate")
        self.log = open(workdir / "worker.log", "w")  # noqa: SIM115  (closed with the workdir)
        env = dict(os.environ, BENCH_STATS=self.stats_path)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.benchmarks.app",
                "worker",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                "--loglevel=ERROR",
                "-Q",
                "bench",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def run(
        self,
        scenario: Scenario,
        pks: list[int],
        timeout: float = 600.0,
        count_queries: bool = False,
    ) -> dict[str, float]:
        """Run ``scenario`` once per primary key; its rate from first start to last end."""
        # Hold every pool child, queue the scenario, then let them go.
        for path in Path(self.gate).parent.glob("gate*"):
            path.unlink()
        for _ in range(self.concurrency):
            tasks.gate.delay(self.gate)
        self._wait(
            lambda: len(list(Path(self.gate).parent.glob("gate.started.*"))) >= self.concurrency,
            120,
        )
        stats.reset(self.map)
        stats.set_counting(self.map, count_queries)
        queue(app.tasks[scenario.task], pks)
        Path(self.gate).touch()
        self._wait(lambda: stats.totals(self.map).tasks >= len(pks), timeout)
        total = stats.totals(self.map)
        check(scenario, pks, total.failures)
        return {
            "rate": total.tasks / (total.last - total.first),
            "queries": total.queries / total.tasks,
            "rss_mib": total.rss_kib / 1024,
        }

    def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                Path(tempfile.gettempdir(), "cd-bench-worker.log").write_text(
                    Path(self.log.name).read_text()
                )
                raise RuntimeError(
                    f"the worker exited ({self.proc.returncode}); see {self.log.name}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out; worker log: {self.log.name}")
            time.sleep(0.005)

    def stop(self) -> None:
        Path(self.gate).touch()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def fanout(n: int, floor_first: bool = False) -> tuple[float, float, float]:
    """Messages/s of a ``.delay()`` loop, of ``dispatch_active`` and of Celery's floor
    (:func:`celery_floor`), into an unconsumed queue; the floor before ``dispatch_active`` when
    ``floor_first`` (the rounds alternate: the two compared run side by side, each first as
    often)."""
    target = tasks.fanout_target
    purge("bench_fanout")
    start = time.perf_counter()
    for pk in Feed.objects.filter(active=True).values_list("pk", flat=True).iterator():
        target.delay(pk)
    delay = n / (time.perf_counter() - start)
    purge("bench_fanout")

    def dispatch() -> float:
        start = time.perf_counter()
        sent = target.dispatch_active()
        took = time.perf_counter() - start
        purge("bench_fanout")
        if sent != n:
            raise RuntimeError(f"dispatch_active sent {sent} messages for {n} active feeds")
        return sent / took

    def floor() -> float:
        pks = list(Feed.objects.filter(active=True).values_list("pk", flat=True))
        start = time.perf_counter()
        celery_floor(target, pks)
        took = time.perf_counter() - start
        purge("bench_fanout")
        return n / took

    if floor_first:
        at_floor = floor()
        return delay, dispatch(), at_floor
    return delay, dispatch(), floor()


def fanout_rounds(n: int, rounds: int) -> dict[str, Any]:
    """:func:`fanout` over ``n`` active objects, ``rounds`` times."""
    fan: dict[str, Any] = {"n": n, "delay": [], "dispatch": [], "floor": []}
    for round_ in range(1, rounds + 1):
        reset_rows(n)
        delay, fast, floor = fanout(n, floor_first=round_ % 2 == 0)
        fan["delay"].append(delay)
        fan["dispatch"].append(fast)
        fan["floor"].append(floor)
        log(
            f"round {round_} fan-out: delay {delay:.0f}/s dispatch_active {fast:.0f}/s "
            f"Celery's floor {floor:.0f}/s"
        )
    with app.producer_or_acquire() as producer:
        fan["batch_publish"] = bool(getattr(producer, "supports_batch_publish", False))
    return fan


def fanout_with_results(broker: str, n: int, rounds: int) -> dict[str, Any]:
    """:func:`fanout_rounds` in a process whose app stores results in Redis (the broker's server,
    the next database): outside a worker, Celery subscribes to each sent task's result channel."""
    parts = urlsplit(broker)
    backend = urlunsplit(parts._replace(path=f"/{int(parts.path.strip('/') or 0) + 1}"))
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "tests.benchmarks.worker_run", "--fanout-only"),
            *("--fanout-n", str(n), "--rounds", str(rounds)),
        ],
        env=dict(os.environ, BENCH_RESULT_BACKEND=backend),
        capture_output=True,
        text=True,
        check=True,
    )
    sys.stderr.write(proc.stderr)
    found: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def celery_floor(target: Any, pks: list[int]) -> None:
    """The fastest a fan-out through ``apply_async`` can be: Celery's own ``apply_async`` alone,
    keys already in memory, over one producer, a page per ``Producer.batch()``, each page's later
    messages with ``declare=[]`` (what ``dispatch_active`` sends, without reading a key or any
    code of the library around it)."""
    size = DEFAULT_BATCH_SIZE
    with app.producer_or_acquire() as producer:
        batching = bool(getattr(producer, "supports_batch_publish", False))
        for page in (pks[i : i + size] for i in range(0, len(pks), size)):
            with producer.batch(max_size=size) if batching else contextlib.nullcontext():
                for i, pk in enumerate(page):
                    more: dict[str, Any] = {"declare": []} if i and batching else {}
                    target.apply_async((pk,), producer=producer, add_to_parent=False, **more)


def memory(sizes: list[int]) -> list[tuple[int, float]]:
    """Peak RSS of a fresh process running ``dispatch_active`` over ``size`` objects."""
    out = []
    for size in sizes:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"TRUNCATE {Feed._meta.db_table} RESTART IDENTITY CASCADE")
                cursor.execute(
                    f"INSERT INTO {Feed._meta.db_table} (title, behaviour, polls, note,"
                    " active, error, error_message, failure_count)"
                    " SELECT 'feed ' || i, 'ok', 0, '', true, false, '', 0"
                    f" FROM generate_series(1, {size}) AS i"
                )
        else:
            Feed.objects.all().delete()
            for start in range(0, size, 50000):
                Feed.objects.bulk_create(
                    [Feed(title=f"feed {i}") for i in range(start, min(size, start + 50000))],
                    batch_size=5000,
                )
        proc = subprocess.run(
            [sys.executable, "-m", "tests.benchmarks.worker_run", "--dispatch-rss"],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append((size, float(proc.stdout.strip().splitlines()[-1])))
        log(f"memory: {size} objects -> {out[-1][1]:.0f} MiB")
    return out


def dispatch_rss() -> None:
    """Run by :func:`memory` in a fresh process; a thread empties the queue meanwhile."""
    import threading

    done = threading.Event()

    def drain() -> None:
        while not done.wait(0.2):
            purge("bench_fanout")

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    tasks.fanout_target.dispatch_active()
    done.set()
    thread.join()
    purge("bench_fanout")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def servers() -> str:
    """The database's and the broker's versions, as the benchmark's connections report them."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            found = [f"PostgreSQL {cursor.fetchone()[0]}"]
    else:
        import sqlite3

        found = [f"SQLite {sqlite3.sqlite_version}"]
    url = app.conf.broker_url
    if url.startswith("redis://"):
        import redis

        found.append(f"Redis {redis.Redis.from_url(url).info('server')['redis_version']}")
    elif url.startswith("sqla+"):
        import sqlalchemy

        found.append(f"SQLAlchemy {sqlalchemy.__version__} (kombu's sqla transport)")
    return ", ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--io-n", type=int, default=1000)
    parser.add_argument("--fanout-n", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--path", action="append", choices=list(PATHS))
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--dispatch-rss", action="store_true")
    parser.add_argument("--fanout-only", action="store_true")
    args = parser.parse_args()
    if args.dispatch_rss:
        dispatch_rss()
        return 0
    if args.fanout_only:
        print(json.dumps(fanout_rounds(args.fanout_n, args.rounds)))
        return 0
    load = [os.getloadavg()[0]]
    call_command("migrate", run_syncdb=True, verbosity=0)
    purge("bench")
    order = run_order(args.path)
    sizes = {path: args.io_n if path == "io" else args.n for path in PATHS}
    rows = max(sizes[s.path] for s in order)
    results: dict[str, list[dict[str, float]]] = {s.task: [] for s in order}
    worker = Worker(Path(args.workdir), args.concurrency)
    try:
        # One warm-up pass so that every child has imported, connected and compiled everything;
        # it counts the queries (the timed rounds run without the counting wrapper).
        queries: dict[str, float] = {}
        for scenario in order:
            pks = reset_rows(rows, scenario)[: min(sizes[scenario.path], max(50, args.n // 10))]
            queries[scenario.task] = worker.run(scenario, pks, count_queries=True)["queries"]
        for round_ in range(1, args.rounds + 1):
            # Forwards, then backwards: each scenario runs next to the ones it is compared with,
            # after them as often as before them.
            for scenario in order if round_ % 2 else order[::-1]:
                pks = reset_rows(rows, scenario)[: sizes[scenario.path]]
                result = worker.run(scenario, pks)
                results[scenario.task].append(dict(result, queries=queries[scenario.task]))
                log(f"round {round_} {scenario.task}: {result['rate']:.0f}/s")
    finally:
        worker.stop()
    data: dict[str, Any] = {
        "rounds": args.rounds,
        "sizes": sizes,
        "concurrency": args.concurrency,
        "scenarios": results,
        "servers": servers(),
    }
    if args.fanout_n:  # --fanout-n 0: the per-task scenarios alone
        data["fanout"] = fanout_rounds(args.fanout_n, args.rounds)
    broker = os.environ.get("BENCH_BROKER_URL", "")
    if args.fanout_n and broker.startswith("redis://"):
        data["fanout_results"] = fanout_with_results(broker, args.fanout_n, args.rounds)
    if args.memory:
        data["memory"] = memory([100_000, 1_000_000])
    data["load"] = [*load, os.getloadavg()[0]]
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
