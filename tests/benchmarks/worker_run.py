"""One backend's benchmark (run by :mod:`tests.benchmarks.run` with the backend's environment).

Prints one JSON line: per scenario and round, tasks/s, queries/task, peak RSS; the fan-out rates.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.app import app

app.loader.import_default_modules()
app.finalize()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from celery_deactivate.dispatch import dispatch_active  # noqa: E402
from tests.benchmarks import stats, tasks  # noqa: E402
from tests.benchmarks.run import SCENARIOS  # noqa: E402
from tests.testapp.models import Feed  # noqa: E402


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def reset_rows(n: int) -> list[int]:
    if Feed.objects.count() != n:
        Feed.objects.all().delete()
        Feed.objects.bulk_create([Feed(title=f"feed {i}") for i in range(n)], batch_size=2000)
    Feed.objects.update(
        active=True, error=False, error_message="", failure_count=0, deactivated_at=None
    )
    if connection.vendor == "postgresql":
        # Every scenario starts from the same table: no dead row versions left by the previous
        # one (a read by primary key would walk their chains).
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM {Feed._meta.db_table}")
    return list(Feed.objects.order_by("pk").values_list("pk", flat=True))


def purge(queue: str) -> None:
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


class Worker:
    def __init__(self, workdir: Path) -> None:
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
                "--concurrency=2",
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
        self, task: Any, pks: list[int], timeout: float = 300.0, count_queries: bool = False
    ) -> dict[str, float]:
        # Hold both pool children, queue the scenario, then let them go.
        for path in Path(self.gate).parent.glob("gate*"):
            path.unlink()
        for _ in range(2):
            tasks.gate.delay(self.gate)
        self._wait(lambda: len(list(Path(self.gate).parent.glob("gate.started.*"))) >= 2, 120)
        stats.reset(self.map)
        stats.set_counting(self.map, count_queries)
        from celery_deactivate.dispatch import publish_pks

        publish_pks(task, iter([pks]))
        Path(self.gate).touch()
        self._wait(lambda: stats.totals(self.map).tasks >= len(pks), timeout)
        total = stats.totals(self.map)
        return {
            "rate": total.tasks / (total.last - total.first),
            "queries": total.queries / total.tasks,
            "rss_mib": total.rss_kib / 1024,
        }

    def _wait(self, predicate: Any, timeout: float) -> None:
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


def fanout(n: int) -> tuple[float, float]:
    """Messages/s of a ``.delay()`` loop and of ``dispatch_active``, into an unconsumed queue."""
    target = tasks.fanout_target
    purge("bench_fanout")
    start = time.perf_counter()
    for pk in Feed.objects.filter(active=True).values_list("pk", flat=True).iterator():
        target.delay(pk)
    delay = n / (time.perf_counter() - start)
    purge("bench_fanout")
    start = time.perf_counter()
    sent = dispatch_active(target)
    fast = sent / (time.perf_counter() - start)
    purge("bench_fanout")
    assert sent == n, (sent, n)
    return delay, fast


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
    dispatch_active(tasks.fanout_target)
    done.set()
    thread.join()
    purge("bench_fanout")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--fanout-n", type=int, default=10000)
    parser.add_argument("--workdir", default=".")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--dispatch-rss", action="store_true")
    args = parser.parse_args()
    if args.dispatch_rss:
        dispatch_rss()
        return 0
    call_command("migrate", run_syncdb=True, verbosity=0)
    purge("bench")
    workdir = Path(args.workdir)
    worker = Worker(workdir)
    results: dict[str, list[dict[str, float]]] = {name: [] for _, _, name in SCENARIOS}
    fan: dict[str, Any] = {"n": args.fanout_n, "delay": [], "dispatch": []}
    try:
        # One warm-up pass so that every child has imported, connected and compiled everything;
        # it counts the queries (the timed rounds run without the counting wrapper).
        pks = reset_rows(args.n)
        queries: dict[str, float] = {}
        for _, _, name in SCENARIOS:
            reset_rows(args.n)
            warm = worker.run(app.tasks[name], pks[: max(50, args.n // 10)], count_queries=True)
            queries[name] = warm["queries"]
        names = [name for _, _, name in SCENARIOS]
        for round_ in range(1, args.rounds + 1):
            # Forwards, then backwards: each scenario runs next to the ones it is compared with,
            # after them as often as before them.
            for name in names if round_ % 2 else names[::-1]:
                pks = reset_rows(args.n)
                result = worker.run(app.tasks[name], pks)
                results[name].append(dict(result, queries=queries[name]))
                log(f"round {round_} {name}: {result['rate']:.0f}/s")
    finally:
        worker.stop()
    for round_ in range(1, args.rounds + 1):
        reset_rows(args.fanout_n)
        delay, fast = fanout(args.fanout_n)
        fan["delay"].append(delay)
        fan["dispatch"].append(fast)
        log(f"round {round_} fan-out: delay {delay:.0f}/s dispatch_active {fast:.0f}/s")
    with app.producer_or_acquire() as producer:
        fan["path"] = (
            "kombu Producer.batch() pipelining"
            if getattr(producer, "supports_batch_publish", False)
            else "one producer, no pipelining (transport has no batch publish)"
        )
    data: dict[str, Any] = {"rounds": args.rounds, "n": args.n, "scenarios": results, "fanout": fan}
    if args.memory:
        data["memory"] = memory([100_000, 1_000_000])
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
